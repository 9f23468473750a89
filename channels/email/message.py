"""A rendered email made into the MIME message that is sent: headers, parts, tracking.

Every marketing email carries what inboxes and the law expect (a unique Message-ID,
one-click unsubscribe per RFC 8058) and what the journeys need to see what the lead
did with it (links through the click redirect, an open pixel).
"""

from __future__ import annotations

import base64
import binascii
import html
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from email.errors import NonASCIILocalPartDefect
from email.header import Header
from email.headerregistry import Address, AddressHeader, BaseHeader, HeaderRegistry
from email.utils import format_datetime
from functools import lru_cache
from typing import cast
from urllib.parse import urlsplit

from channels.email.templates import RenderedEmail


class _HeaderClasses(HeaderRegistry):
    """The standard header classes, each made once.

    The stock registry makes a new class (with `type()`) for every header it parses,
    about half the time of building a message; as nothing changes its mapping, the
    classes it makes for one name are all alike, and one of them serves every message.
    """

    def __init__(self) -> None:
        super().__init__()
        self._made: dict[str, type[BaseHeader]] = {}

    def __getitem__(self, name: str) -> type[BaseHeader]:
        key = name.lower()
        made = self._made.get(key)
        if made is None:
            made = self._made[key] = super().__getitem__(name)
        return made


# RFC 5322's own line limit, which headers written as they are keep to. (Folded at
# 78, a long header without spaces, our signed List-Unsubscribe URL, would become
# RFC 2047 encoded words, which mail clients do not decode in List-Unsubscribe.)
MAX_LINE = 998
# Parses the address headers given; nothing here changes their mapping.
_HEADERS = _HeaderClasses()
# An address alone, as most are written: a dot-atom local part and a domain of labels
# (RFC 5322 section 3.4.1), which needs no parsing to be known as one mailbox.
_ATOM = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_PLAIN_ADDRESS = re.compile(rf"({_ATOM}(?:\.{_ATOM})*)@([A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*)")
# What makes a display name need quotes, and what is escaped inside them (RFC 5322).
_SPECIALS = re.compile(r'[][\\()<>@,:;".]')
_QUOTED = re.compile(r'[\\"]')

# An <a> start tag; quoted attribute values may contain ">".
_ANCHOR = re.compile(r"""<a(?=[\s/>])((?:[^>"']|"[^"]*"|'[^']*')*)>""", re.IGNORECASE)
# One attribute inside a start tag, the way HTML tokenises them: a name, then maybe a
# double-quoted, single-quoted or unquoted value.
_ATTRIBUTE = re.compile(r"""([^\s"'>/=]+)(?:\s*=\s*("[^"]*"|'[^']*'|[^\s>]+))?""")
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)
_TRACKED_SCHEMES = frozenset({"http", "https"})


@dataclass(frozen=True)
class OutgoingEmail:
    """A message ready for the wire: its envelope and its bytes (CRLF line ends)."""

    envelope_from: str
    recipient: str
    message_id: str
    data: bytes


def build_message(
    rendered: RenderedEmail,
    *,
    sender: str,
    to: str,
    message_id: str,
    unsubscribe_url: str,
    click_url: Callable[[str], str],
    open_pixel_url: str,
    now: datetime,
) -> OutgoingEmail:
    """The multipart/alternative message for `rendered`, sent from `sender` to `to`.

    `click_url(url)` is the tracking URL that redirects to `url`; `now` (aware) is the
    Date, passed in so that the caller's clock decides.

    Written straight to bytes rather than through `email.message`: that package parses
    and refolds every header it is given, two thirds of the cost of sending an email.
    What is written is what it would write, read back alike (tests/email/test_message.py
    compares the two): headers in RFC 2047 encoded words where they are not ASCII,
    bodies in 7bit when they are ASCII and else quoted-printable, which any SMTP server
    takes, with or without 8BITMIME.
    """
    for name, value in (
        ("subject", rendered.subject),
        ("sender", sender),
        ("to", to),
        ("unsubscribe_url", unsubscribe_url),
        ("message_id", message_id),
    ):
        _refuse_line_breaks(name, value)
    recipient = only_mailbox(to)
    envelope_from = only_mailbox(sender)
    if now.utcoffset() is None:
        raise ValueError("now must be timezone-aware: a Date header needs an offset")
    if not (message_id.isascii() and unsubscribe_url.isascii()):
        raise ValueError("the Message-ID and the unsubscribe URL must be ASCII")

    tracked = _rewrite_links(rendered.html, click_url, keep={unsubscribe_url})
    # The text part keeps its links as rendered: plain-text clients show the raw URL,
    # and a tracking URL there looks like phishing to readers and spam filters alike.
    parts = (_body(rendered.text, "plain"), _body(_add_pixel(tracked, open_pixel_url), "html"))
    boundary = _boundary(parts)
    head = (
        f"Message-ID: {message_id}\r\n"
        f"Date: {format_datetime(now)}\r\n"
        f"From: {_address_header('From', envelope_from)}\r\n"
        f"To: {_address_header('To', recipient)}\r\n"
        f"Subject: {_text_header('Subject', rendered.subject)}\r\n"
        f"List-Unsubscribe: <{unsubscribe_url}>\r\n"
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        "MIME-Version: 1.0\r\n"
        f'Content-Type: multipart/alternative; boundary="{boundary}"\r\n'
        "\r\n"
    ).encode()
    delimiter = f"\r\n--{boundary}\r\n".encode()
    data = b"".join(
        (head, delimiter[2:], delimiter.join(parts), f"\r\n--{boundary}--\r\n".encode())
    )
    return OutgoingEmail(envelope_from.addr_spec, recipient.addr_spec, message_id, data)


@lru_cache(maxsize=64)  # the sender, mostly: the same few for every email
def only_mailbox(text: str) -> Address:
    """The one mailbox `text` names (a display name allowed), or ValueError.

    `to` comes from the lead's `email` trait, written by whoever filled in a form:
    "ada@example.com, thief@example.net" or a group ("friends: a@x, b@y;") would mail
    everyone it lists if it were taken as the To header."""
    plain = _PLAIN_ADDRESS.fullmatch(text)
    if plain:  # most addresses: what the parser would make of them, without it
        return Address(username=plain.group(1), domain=plain.group(2))
    return _parsed_mailbox(text)


def _parsed_mailbox(text: str) -> Address:
    refused = ValueError(f"expected exactly one address, not {text[:80]!r}")
    try:
        parsed = _HEADERS("To", text)
    except (IndexError, ValueError):  # the header parser gives up on some broken input
        raise refused from None
    header = cast(AddressHeader, parsed)
    mailboxes, groups = header.addresses, header.groups
    # A non-ASCII local part is a real address (SMTPUTF8); the transport decides on it.
    defects = [d for d in parsed.defects if not isinstance(d, NonASCIILocalPartDefect)]
    if (
        defects
        or len(mailboxes) != 1
        or groups[0].display_name is not None
        or not mailboxes[0].username
        or not mailboxes[0].domain
    ):
        raise refused
    return mailboxes[0]


def _address_header(name: str, mailbox: Address) -> str:
    """`Display Name <addr>`, the name quoted or encoded as it needs."""
    display = mailbox.display_name
    if not display:
        return mailbox.addr_spec
    if not display.isascii() or "=?" in display:
        # One encoded word, however long: split into several, the name would be read
        # with spaces between them by some readers (Python's own among them), though
        # RFC 2047 says to join them.
        word = f"=?utf-8?b?{base64.b64encode(display.encode()).decode()}?="
        if len(word) > MAX_LINE // 2:  # the line limit is near: folded after all
            word = Header(display, "utf-8", header_name=name).encode(linesep="\r\n")
        display = word
    elif _SPECIALS.search(display):
        display = '"' + _QUOTED.sub(r"\\\g<0>", display) + '"'
    return f"{display} <{mailbox.addr_spec}>"


def _text_header(name: str, value: str) -> str:
    """`value` as written when it is plain ASCII, else in RFC 2047 encoded words (text
    that merely looks like encoded words too, or it would be decoded)."""
    if value.isascii() and "=?" not in value and len(name) + 2 + len(value) <= MAX_LINE:
        return value
    return Header(value, "utf-8", header_name=name).encode(linesep="\r\n")


def _body(text: str, subtype: str) -> bytes:
    """One text part, its headers and its body, with CRLF line ends."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n")
    if not lines.endswith("\n"):
        lines += "\n"
    if lines.isascii() and all(len(line) <= MAX_LINE for line in lines.split("\n")):
        encoding, body = "7bit", lines.encode()
    else:
        encoding, body = "quoted-printable", binascii.b2a_qp(lines.encode(), istext=True)
    return (
        f'Content-Type: text/{subtype}; charset="utf-8"\r\n'
        f"Content-Transfer-Encoding: {encoding}\r\n\r\n"
    ).encode() + body.replace(b"\n", b"\r\n")


def _boundary(parts: tuple[bytes, ...]) -> str:
    """A multipart boundary that occurs in no part.

    Drawn like the standard `email` package's, from the ordinary generator: a boundary
    guards no secret, only has to be absent from the parts, which is checked here (the
    system's random source took a system call per draw, 2% of sending an email)."""
    while True:
        boundary = f"==============={random.randrange(10**19):019d}=="
        if not any(boundary.encode() in part for part in parts):
            return boundary


def _refuse_line_breaks(name: str, value: str) -> None:
    # Any line boundary (CR, LF, and the others str.splitlines knows) could end the
    # header and start a forged one, such as a Bcc.
    if "".join(value.splitlines()) != value:
        raise ValueError(f"{name} must be a single line: {value!r}")


def _rewrite_links(document: str, click_url: Callable[[str], str], *, keep: set[str]) -> str:
    """`document` with the http(s) href of every <a> sent through `click_url`.

    Only the href values change; every other byte stays as the template rendered it.
    """

    def anchor(match: re.Match[str]) -> str:
        attributes = match.group(1)
        for attribute in _ATTRIBUTE.finditer(attributes):
            if attribute.group(1).lower() != "href":
                continue
            raw = attribute.group(2)
            if raw is None:
                return match.group(0)
            url = html.unescape(raw[1:-1] if raw[0] in "\"'" else raw).strip()
            if url in keep or not _is_web_url(url):
                return match.group(0)
            start, end = attribute.span(2)
            offset = match.start(1) - match.start(0)
            tag = match.group(0)
            replaced = f'"{html.escape(click_url(url), quote=True)}"'
            return tag[: offset + start] + replaced + tag[offset + end :]
        return match.group(0)

    return _ANCHOR.sub(anchor, document)


def _is_web_url(url: str) -> bool:
    try:
        return urlsplit(url).scheme.lower() in _TRACKED_SCHEMES
    except ValueError:  # e.g. an unclosed IPv6 bracket: not a link anyone can follow
        return False


def _add_pixel(document: str, open_pixel_url: str) -> str:
    pixel = (
        f'<img src="{html.escape(open_pixel_url, quote=True)}" width="1" height="1" alt=""'
        ' style="display:none">'
    )
    ends = list(_BODY_END.finditer(document))
    if not ends:
        return document + pixel
    at = ends[-1].start()
    return document[:at] + pixel + document[at:]
