"""The message a rendered email becomes: parts, headers, tracked links and the pixel."""

from __future__ import annotations

from datetime import UTC, datetime
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default
from urllib.parse import quote

import pytest

from channels.email import RenderedEmail
from channels.email.message import build_message

UNSUBSCRIBE = "https://cjm.example.com/e/unsubscribe/tok-u"
PIXEL = "https://cjm.example.com/e/open/tok-o.gif"
PIXEL_TAG = f'<img src="{PIXEL}" width="1" height="1" alt="" style="display:none">'
NOW = datetime(2025, 3, 4, 9, 30, tzinfo=UTC)
HTML = (
    "<html><body>\n"
    '<p>Hi Ada, <a class="cta" href="https://shop.example.com/doors?a=1&amp;b=2">see doors</a>'
    " or <a href='http://shop.example.com/windows' title=\"a > b\">windows</a>.</p>\n"
    '<p><a href="mailto:help@example.com">Mail us</a> <a href="tel:+15551234">call</a>'
    ' <a href="#top">top</a> <a name="anchor">here</a></p>\n'
    f'<p><a href="{UNSUBSCRIBE}">Unsubscribe</a></p>\n'
    "</body></html>\n"
)
TEXT = "Hi Ada, see doors: https://shop.example.com/doors?a=1&b=2\nUnsubscribe: " + UNSUBSCRIBE


def click(url: str) -> str:
    return "https://cjm.example.com/e/click?u=" + quote(url, safe="")


def build(
    subject: str = "Doors for Ada",
    to: str = "Ada <ada@example.com>",
    html: str = HTML,
    unsubscribe_url: str = UNSUBSCRIBE,
) -> EmailMessage:
    return build_message(
        RenderedEmail(subject=subject, html=html, text=TEXT),
        sender="Shop <news@shop.example.com>",
        to=to,
        message_id_domain="shop.example.com",
        unsubscribe_url=unsubscribe_url,
        click_url=click,
        open_pixel_url=PIXEL,
        now=NOW,
    )


def parts(message: EmailMessage) -> tuple[str, str]:
    """The text and HTML parts as a receiving client decodes them."""
    received = message_from_bytes(message.as_bytes(), policy=default)
    assert isinstance(received, EmailMessage)
    text, html = received.iter_parts()
    assert isinstance(text, EmailMessage) and isinstance(html, EmailMessage)
    # SMTP puts CRLF at every line end; the template wrote LF.
    return text.get_content().replace("\r\n", "\n"), html.get_content().replace("\r\n", "\n")


def test_the_message_is_multipart_alternative_with_the_text_part_first_then_html() -> None:
    message = build()

    assert message.get_content_type() == "multipart/alternative"
    assert [part.get_content_type() for part in message.iter_parts()] == [
        "text/plain",
        "text/html",
    ]
    assert all(part.get_content_charset() == "utf-8" for part in message.iter_parts())


def test_the_headers_name_sender_recipient_subject_and_date() -> None:
    message = build(subject="Türen für Ada")

    assert message["From"] == "Shop <news@shop.example.com>"
    assert message["To"] == "Ada <ada@example.com>"
    assert message["Subject"] == "Türen für Ada"
    assert message["Date"] == "Tue, 04 Mar 2025 09:30:00 +0000"


def test_every_message_gets_its_own_message_id_in_the_given_domain() -> None:
    first, second = build()["Message-ID"], build()["Message-ID"]

    assert first != second
    assert first.endswith("@shop.example.com>")


def test_one_click_unsubscribe_headers_follow_rfc_8058() -> None:
    message = build()

    assert message["List-Unsubscribe"] == f"<{UNSUBSCRIBE}>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_a_long_signed_unsubscribe_url_is_written_as_is_not_encoded() -> None:
    long_url = "https://cjm.example/e/unsubscribe/" + "t" * 140 + "." + "s" * 22
    message = build(unsubscribe_url=long_url)

    raw = message.as_bytes()
    assert f"\r\nList-Unsubscribe: <{long_url}>\r\n".encode() in raw


def test_web_links_go_through_the_click_url_with_the_unescaped_original() -> None:
    _, html = parts(build())

    assert f'href="{click("https://shop.example.com/doors?a=1&b=2")}"' in html
    assert f'href="{click("http://shop.example.com/windows")}" title="a > b"' in html
    assert "shop.example.com/doors?a=1&amp;b=2" not in html


def test_only_web_links_other_than_unsubscribe_are_passed_to_the_click_url() -> None:
    seen: list[str] = []

    def recording(url: str) -> str:
        seen.append(url)
        return click(url)

    build_message(
        RenderedEmail(subject="s", html=HTML, text=TEXT),
        sender="news@shop.example.com",
        to="ada@example.com",
        message_id_domain="shop.example.com",
        unsubscribe_url=UNSUBSCRIBE,
        click_url=recording,
        open_pixel_url=PIXEL,
        now=NOW,
    )

    assert seen == ["https://shop.example.com/doors?a=1&b=2", "http://shop.example.com/windows"]


def test_the_click_url_is_escaped_when_written_back() -> None:
    message = build_message(
        RenderedEmail(subject="s", html='<a href="https://a.example/">a</a>', text="a"),
        sender="news@shop.example.com",
        to="ada@example.com",
        message_id_domain="shop.example.com",
        unsubscribe_url=UNSUBSCRIBE,
        click_url=lambda url: f"https://t.example/c?t=1&u={url}",
        open_pixel_url=PIXEL,
        now=NOW,
    )
    _, html = parts(message)

    assert '<a href="https://t.example/c?t=1&amp;u=https://a.example/">a</a>' in html


def test_unsubscribe_mailto_tel_and_anchor_links_are_left_as_they_are() -> None:
    _, html = parts(build())

    assert f'<a href="{UNSUBSCRIBE}">Unsubscribe</a>' in html
    assert '<a href="mailto:help@example.com">Mail us</a>' in html
    assert '<a href="tel:+15551234">call</a>' in html
    assert '<a href="#top">top</a>' in html
    assert '<a name="anchor">here</a>' in html


def test_everything_but_the_rewritten_hrefs_and_the_pixel_is_byte_identical() -> None:
    _, html = parts(build())

    expected = HTML.replace(
        '"https://shop.example.com/doors?a=1&amp;b=2"',
        f'"{click("https://shop.example.com/doors?a=1&b=2")}"',
    ).replace("'http://shop.example.com/windows'", f'"{click("http://shop.example.com/windows")}"')
    assert html == expected.replace("</body>", f"{PIXEL_TAG}</body>")


def test_the_text_part_is_sent_as_rendered() -> None:
    text, _ = parts(build())

    assert text.rstrip("\n") == TEXT


def test_the_open_pixel_sits_just_before_the_end_of_the_body() -> None:
    _, html = parts(build())

    assert html.endswith(f"{PIXEL_TAG}</body></html>\n")


def test_the_open_pixel_is_appended_when_there_is_no_body_tag() -> None:
    _, html = parts(build(html="<p>Hello</p>"))

    assert html.rstrip("\n") == f"<p>Hello</p>{PIXEL_TAG}"


@pytest.mark.parametrize(
    "subject", ["Hello\r\nBcc: victim@example.com", "Hello\nBcc: x@example.com", "Hi\r"]
)
def test_a_line_break_in_the_subject_is_refused(subject: str) -> None:
    with pytest.raises(ValueError, match="subject"):
        build(subject=subject)


@pytest.mark.parametrize("to", ["ada@example.com\r\nBcc: victim@example.com", "a@b.c\nX: y"])
def test_a_line_break_in_the_recipient_is_refused(to: str) -> None:
    with pytest.raises(ValueError, match="to"):
        build(to=to)


def test_a_naive_date_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone"):
        build_message(
            RenderedEmail(subject="s", html="h", text="t"),
            sender="news@shop.example.com",
            to="ada@example.com",
            message_id_domain="shop.example.com",
            unsubscribe_url=UNSUBSCRIBE,
            click_url=click,
            open_pixel_url=PIXEL,
            now=datetime(2025, 3, 4, 9, 30),
        )
