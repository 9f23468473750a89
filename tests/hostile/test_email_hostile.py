"""What a lead writes into their traits, and what anyone can put into a public email
link, cannot reach beyond the one email it belongs to: no forged headers, no extra
recipients, no acting on another lead's email, no redirect to a URL the email did
not contain."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from email.message import EmailMessage
from html.parser import HTMLParser
from urllib.parse import urlsplit

import httpx
import pytest

from channels.email.links import CLICK
from channels.email.tokens import Sealer
from engine.db.schema import suppressions
from tests.email.conftest import Mail
from tests.email.conftest import mail as mail
from tests.email.conftest import smtp as smtp
from tests.worker.conftest import app_client

ADDRESS = "ada@example.com"
TEMPLATE_LINK = "https://shop.example.com/doors"  # the one tracked link of the template
EVIL = "https://evil.example/phish"
OTHER_SEALER = Sealer(b"a secret this server never had")  # a forger's own key


@pytest.fixture
def database_url(sqlite_database_url: str) -> str:
    """SQLite only: headers are built and tokens checked the same on any database."""
    return sqlite_database_url


@pytest.fixture
async def client(mail: Mail) -> AsyncIterator[httpx.AsyncClient]:
    async with app_client(mail.runtime) as client:
        yield client


def received(mail: Mail) -> list[EmailMessage]:
    return mail.smtp.recorder.received()


class _Hrefs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.hrefs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.hrefs.extend(value for name, value in attrs if tag == "a" and name == "href" and value)


def click_paths(message: EmailMessage) -> list[str]:
    html_part = message.get_body(("html",))
    assert html_part is not None
    parser = _Hrefs()
    parser.feed(html_part.get_content())
    return [urlsplit(href).path for href in parser.hrefs if "/e/click/" in href]


async def delivered_to(mail: Mail, user_id: str, **traits: str) -> tuple[int, int, EmailMessage]:
    """Sign a lead up, send its email; the lead id, the email id and the message."""
    lead_id = await mail.sign_up(user_id, **traits)
    await mail.deliver()
    (row,) = await mail.emails(lead_id)
    (message,) = received(mail)
    return lead_id, row.id, message


def altered(token: str, **changes: str | int) -> str:
    """The token's payload changed, its signature kept: what a forger can do."""
    body, _, signature = token.partition(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload.update(changes)
    encoded = json.dumps(payload, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(encoded).rstrip(b"=").decode() + "." + signature


# --- header injection --------------------------------------------------------------------------


@pytest.mark.parametrize("line_break", ["\r\n", "\r", "\u2028"])
async def test_a_line_break_in_a_trait_shown_in_the_subject_adds_no_header(
    mail: Mail, line_break: str
) -> None:
    forged = f"Ada{line_break}Bcc: thief@evil.example{line_break}X-Injected: yes"

    _, _, message = await delivered_to(mail, "ada", email=ADDRESS, first_name=forged)

    assert "Bcc" not in message
    assert "X-Injected" not in message
    assert message["Subject"] == "Hello Ada Bcc: thief@evil.example X-Injected: yes"
    assert [envelope.rcpt_tos for envelope in mail.smtp.recorder.envelopes] == [[ADDRESS]]


@pytest.mark.parametrize("line_break", ["\r\n", "\n", "\u2028"])
async def test_an_address_with_a_line_break_is_never_mailed(mail: Mail, line_break: str) -> None:
    lead_id = await mail.sign_up(
        "eve", email=f"{ADDRESS}{line_break}Bcc: thief@evil.example", first_name="Eve"
    )

    await mail.deliver()

    assert mail.smtp.recorder.envelopes == []
    (row,) = await mail.emails(lead_id)
    assert row.status == "failed"
    assert "single line" in row.last_error


@pytest.mark.parametrize(
    "address",
    [f"{ADDRESS}, thief@evil.example", f"friends: {ADDRESS}, thief@evil.example;"],
    ids=["list", "group"],
)
async def test_an_address_listing_other_recipients_is_never_mailed(
    mail: Mail, address: str
) -> None:
    lead_id = await mail.sign_up("eve", email=address, first_name="Eve")

    await mail.deliver()

    assert mail.smtp.recorder.envelopes == []
    (row,) = await mail.emails(lead_id)
    assert row.status == "failed"


# --- forged and altered tokens -----------------------------------------------------------------


async def test_the_click_links_of_an_email_redirect_only_to_the_urls_it_contained(
    mail: Mail, client: httpx.AsyncClient
) -> None:
    _, _, message = await delivered_to(mail, "ada", email=ADDRESS, first_name="Ada")
    (path,) = click_paths(message)
    token = path.removeprefix("/e/click/")

    followed = await client.get(path)
    with_redirect_parameters = await client.get(path, params={"url": EVIL, "next": EVIL})

    assert followed.status_code == with_redirect_parameters.status_code == 302
    assert followed.headers["location"] == TEMPLATE_LINK
    assert with_redirect_parameters.headers["location"] == TEMPLATE_LINK
    for forged in (
        f"/e/click/{altered(token, url=EVIL)}",
        f"/e/click/{token}/{EVIL}",
        f"/e/click/{token}x",
        f"/e/click/{OTHER_SEALER.seal(CLICK, {'email': 1, 'lead': 1, 'url': EVIL})}",
    ):
        answer = await client.get(forged)
        assert answer.status_code == 404, forged
        assert "location" not in answer.headers


@pytest.mark.parametrize(
    "sealed_url",
    ["javascript:alert(1)", "//evil.example/phish", "https:evil.example", "data:text/html,x"],
)
async def test_a_sealed_url_that_is_no_web_address_is_refused_not_followed(
    mail: Mail, client: httpx.AsyncClient, sealed_url: str
) -> None:
    lead_id, email_id, _ = await delivered_to(mail, "ada", email=ADDRESS, first_name="Ada")
    path = urlsplit(mail.runtime.links.click(email_id, lead_id, sealed_url)).path

    answer = await client.get(path)

    assert answer.status_code == 400
    assert "location" not in answer.headers


async def test_a_forged_unsubscribe_link_unsubscribes_no_one(
    mail: Mail, client: httpx.AsyncClient
) -> None:
    ada, email_id, _ = await delivered_to(mail, "ada", email=ADDRESS, first_name="Ada")
    bob = await mail.sign_up("bob", email="bob@example.com", first_name="Bob")
    own = urlsplit(mail.runtime.links.unsubscribe(email_id, ada)).path.removeprefix(
        "/e/unsubscribe/"
    )
    opened = urlsplit(mail.runtime.links.open_pixel(email_id, bob)).path.removeprefix("/e/open/")
    forged_tokens = [
        altered(own, lead=bob),  # Ada's link, pointed at Bob
        opened,  # a valid token, minted for another purpose
        "e30.AAAAAAAAAAAAAAAAAAAAAA",  # `{}`, with a made-up signature
        "x" * 5000,
        "..",
    ]

    for token in forged_tokens:
        shown = await client.get(f"/e/unsubscribe/{token}")
        posted = await client.post(
            f"/e/unsubscribe/{token}", data={"List-Unsubscribe": "One-Click"}
        )
        assert (shown.status_code, posted.status_code) == (404, 404), token

    assert await mail.rows(suppressions) == []
    assert await mail.events_named("email.unsubscribed") == []


async def test_a_forged_open_pixel_answers_the_image_and_records_nothing(
    mail: Mail, client: httpx.AsyncClient
) -> None:
    ada, email_id, _ = await delivered_to(mail, "ada", email=ADDRESS, first_name="Ada")
    genuine = urlsplit(mail.runtime.links.open_pixel(email_id, ada)).path.removeprefix("/e/open/")
    clicked = urlsplit(mail.runtime.links.click(email_id, ada, TEMPLATE_LINK)).path

    for token in (altered(genuine, email=email_id + 1), clicked.removeprefix("/e/click/"), "x"):
        answer = await client.get(f"/e/open/{token}")
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "image/gif"

    assert await mail.events_named("email.opened") == []
