"""The message a rendered email becomes: parts, headers, tracked links and the pixel."""

from __future__ import annotations

import random
from datetime import UTC, datetime
from email import message_from_bytes
from email.message import EmailMessage, Message
from email.policy import SMTP, default
from email.utils import formataddr
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from channels.email import RenderedEmail
from channels.email.message import (
    _PLAIN_ADDRESS,
    OutgoingEmail,
    _parsed_mailbox,
    build_message,
    only_mailbox,
)

UNSUBSCRIBE = "https://cjm.example.com/e/unsubscribe/tok-u"
MESSAGE_ID = "<0123456789abcdef.42@shop.example.com>"
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


def wire(
    subject: str = "Doors for Ada",
    to: str = "Ada <ada@example.com>",
    html: str = HTML,
    unsubscribe_url: str = UNSUBSCRIBE,
    text: str = TEXT,
    sender: str = "Shop <news@shop.example.com>",
) -> OutgoingEmail:
    return build_message(
        RenderedEmail(subject=subject, html=html, text=text),
        sender=sender,
        to=to,
        message_id=MESSAGE_ID,
        unsubscribe_url=unsubscribe_url,
        click_url=click,
        open_pixel_url=PIXEL,
        now=NOW,
    )


def build(
    subject: str = "Doors for Ada",
    to: str = "Ada <ada@example.com>",
    html: str = HTML,
    unsubscribe_url: str = UNSUBSCRIBE,
) -> EmailMessage:
    """The message as a receiving client reads it off the wire."""
    received = message_from_bytes(wire(subject, to, html, unsubscribe_url).data, policy=default)
    assert isinstance(received, EmailMessage)
    return received


def parts(received: Message) -> tuple[str, str]:
    """The text and HTML parts as a receiving client decodes them."""
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


def test_a_boundary_that_occurs_in_a_part_is_drawn_again() -> None:
    random.seed(2026)
    first = f"==============={random.randrange(10**19):019d}=="
    text = f"{TEXT}\n--{first}\n"
    random.seed(2026)  # build_message draws `first` again, and must not keep it

    sent = wire(text=text)

    received = message_from_bytes(sent.data, policy=default)
    assert received.get_boundary() != first
    assert parts(received)[0] == text


def test_the_headers_name_sender_recipient_subject_and_date() -> None:
    message = build(subject="Türen für Ada")

    assert message["From"] == "Shop <news@shop.example.com>"
    assert message["To"] == "Ada <ada@example.com>"
    assert message["Subject"] == "Türen für Ada"
    assert message["Date"] == "Tue, 04 Mar 2025 09:30:00 +0000"


def test_the_message_carries_the_given_message_id_and_names_its_envelope() -> None:
    sent = wire(to='"Lovelace, Ada" <Ada@Example.com>')

    assert build()["Message-ID"] == MESSAGE_ID == sent.message_id
    assert (sent.envelope_from, sent.recipient) == ("news@shop.example.com", "Ada@Example.com")


def test_one_click_unsubscribe_headers_follow_rfc_8058() -> None:
    message = build()

    assert message["List-Unsubscribe"] == f"<{UNSUBSCRIBE}>"
    assert message["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_a_long_signed_unsubscribe_url_is_written_as_is_not_encoded() -> None:
    long_url = "https://cjm.example/e/unsubscribe/" + "t" * 140 + "." + "s" * 22
    raw = wire(unsubscribe_url=long_url).data

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
        message_id=MESSAGE_ID,
        unsubscribe_url=UNSUBSCRIBE,
        click_url=recording,
        open_pixel_url=PIXEL,
        now=NOW,
    )

    assert seen == ["https://shop.example.com/doors?a=1&b=2", "http://shop.example.com/windows"]


def test_the_click_url_is_escaped_when_written_back() -> None:
    sent = build_message(
        RenderedEmail(subject="s", html='<a href="https://a.example/">a</a>', text="a"),
        sender="news@shop.example.com",
        to="ada@example.com",
        message_id=MESSAGE_ID,
        unsubscribe_url=UNSUBSCRIBE,
        click_url=lambda url: f"https://t.example/c?t=1&u={url}",
        open_pixel_url=PIXEL,
        now=NOW,
    )
    _, html = parts(message_from_bytes(sent.data, policy=default))

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
            message_id=MESSAGE_ID,
            unsubscribe_url=UNSUBSCRIBE,
            click_url=click,
            open_pixel_url=PIXEL,
            now=datetime(2025, 3, 4, 9, 30),
        )


# --- the wire read back as the standard library would have written it -----------------------

# What a single-line header may hold: anything but the line breaks refused above.
_ONE_LINE = st.characters(categories=("L", "M", "N", "P", "S", "Zs"))
# Bodies: any text, any line ends.
_BODY = st.characters(blacklist_categories=("Cs",))


def written_by_the_standard_library(
    subject: str, sender: str, to: str, text: str, html: str
) -> Message:
    """The same message made with `email.message`, as cjm made it before writing its
    own bytes, read back: the reference the wire is compared with."""
    message = EmailMessage(policy=SMTP.clone(max_line_length=998))
    message["From"] = sender
    message["To"] = to
    message["Subject"] = subject
    message.set_content(text, subtype="plain", charset="utf-8")
    message.add_alternative(html, subtype="html", charset="utf-8")
    return message_from_bytes(message.as_bytes(), policy=default)


def spaced(text: str) -> str:
    return " ".join(text.split())


@settings(max_examples=150, deadline=None, derandomize=True)
@given(
    subject=st.text(_ONE_LINE, max_size=300),
    sender_name=st.text(_ONE_LINE, max_size=60),
    name=st.text(_ONE_LINE, max_size=60),
    text=st.text(_BODY, max_size=400) | st.text("ab \n\r.=", max_size=2500),
    html=st.text(_BODY.filter(lambda ch: ch != "<"), max_size=400),
)
def test_the_wire_reads_back_as_the_standard_library_would_have_written_it(
    subject: str, sender_name: str, name: str, text: str, html: str
) -> None:
    sender = formataddr((sender_name, "news@shop.example.com"))
    to = formataddr((name, "ada@example.com"))
    sent = wire(subject=subject, to=to, html=html, text=text, sender=sender)
    ours = message_from_bytes(sent.data, policy=default)
    expected = written_by_the_standard_library(subject, sender, to, text, f"{html}{PIXEL_TAG}")

    assert not ours.defects and all(not part.defects for part in ours.walk())
    # Compared with runs of white space as one: readers differ on those at the edges.
    assert spaced(ours["Subject"]) == spaced(expected["Subject"])
    for header in ("From", "To"):
        assert [(spaced(a.display_name), a.addr_spec) for a in ours[header].addresses] == [
            (spaced(a.display_name), a.addr_spec) for a in expected[header].addresses
        ], header
    assert parts(ours) == parts(expected)
    # Every line within SMTP's limit, and 7-bit clean: no server needs 8BITMIME for it.
    assert all(len(line) <= 998 for line in sent.data.split(b"\r\n"))
    assert sent.data.isascii()
    assert b"\r\n" not in sent.data.replace(b"\r\n", b"") and b"\n" not in sent.data.replace(
        b"\r\n", b""
    )


@settings(max_examples=200, deadline=None, derandomize=True)
@given(address=st.from_regex(_PLAIN_ADDRESS, fullmatch=True))
def test_a_plain_address_is_known_without_the_parser_as_the_parser_knows_it(
    address: str,
) -> None:
    assert only_mailbox(address) == _parsed_mailbox(address)
