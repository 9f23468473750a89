"""A rendered email made into the MIME message that is sent: headers, parts, tracking.

Every marketing email carries what inboxes and the law expect (a unique Message-ID,
one-click unsubscribe per RFC 8058) and what the journeys need to see what the lead
did with it (links through the click redirect, an open pixel).
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable
from datetime import datetime
from email.errors import NonASCIILocalPartDefect
from email.headerregistry import BaseHeader, HeaderRegistry
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime, make_msgid
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


# RFC 5322's own line limit. With the default 78, a long header without spaces (our
# signed List-Unsubscribe URL) is folded into RFC 2047 encoded words, which mail
# clients do not decode in List-Unsubscribe: the one-click link would be lost.
POLICY = SMTP.clone(max_line_length=998, header_factory=_HeaderClasses())

# An <a> start tag; quoted attribute values may contain ">".
_ANCHOR = re.compile(r"""<a(?=[\s/>])((?:[^>"']|"[^"]*"|'[^']*')*)>""", re.IGNORECASE)
# One attribute inside a start tag, the way HTML tokenises them: a name, then maybe a
# double-quoted, single-quoted or unquoted value.
_ATTRIBUTE = re.compile(r"""([^\s"'>/=]+)(?:\s*=\s*("[^"]*"|'[^']*'|[^\s>]+))?""")
_BODY_END = re.compile(r"</body\s*>", re.IGNORECASE)
_TRACKED_SCHEMES = frozenset({"http", "https"})


def build_message(
    rendered: RenderedEmail,
    *,
    sender: str,
    to: str,
    message_id_domain: str,
    unsubscribe_url: str,
    click_url: Callable[[str], str],
    open_pixel_url: str,
    now: datetime,
) -> EmailMessage:
    """The multipart/alternative message for `rendered`, sent from `sender` to `to`.

    `click_url(url)` is the tracking URL that redirects to `url`; `now` (aware) is the
    Date, passed in so that the caller's clock decides.
    """
    for name, value in (
        ("subject", rendered.subject),
        ("sender", sender),
        ("to", to),
        ("unsubscribe_url", unsubscribe_url),
    ):
        _refuse_line_breaks(name, value)
    _refuse_other_recipients(to)
    if now.utcoffset() is None:
        raise ValueError("now must be timezone-aware: a Date header needs an offset")

    message = EmailMessage(policy=POLICY)
    message["Message-ID"] = make_msgid(domain=message_id_domain)
    message["Date"] = format_datetime(now)
    message["From"] = sender
    message["To"] = to
    message["Subject"] = rendered.subject
    message["List-Unsubscribe"] = f"<{unsubscribe_url}>"
    message["List-Unsubscribe-Post"] = "List-Unsubscribe=One-Click"
    # The text part keeps its links as rendered: plain-text clients show the raw URL,
    # and a tracking URL there looks like phishing to readers and spam filters alike.
    message.set_content(rendered.text, subtype="plain", charset="utf-8")
    tracked = _rewrite_links(rendered.html, click_url, keep={unsubscribe_url})
    message.add_alternative(_add_pixel(tracked, open_pixel_url), subtype="html", charset="utf-8")
    return message


def _refuse_other_recipients(to: str) -> None:
    """`to` comes from the lead's `email` trait, written by whoever filled in a form:
    "ada@example.com, thief@example.net" or a group ("friends: a@x, b@y;") would mail
    everyone it lists, since the transport takes its recipients from the To header."""
    refused = ValueError(f"to must be exactly one address, not {to[:80]!r}")
    try:
        header = POLICY.header_factory("To", to)
    except (IndexError, ValueError):  # the header parser gives up on some broken input
        raise refused from None
    mailboxes, groups = header.addresses, header.groups
    # A non-ASCII local part is a real address (SMTPUTF8); the transport decides on it.
    defects = [d for d in header.defects if not isinstance(d, NonASCIILocalPartDefect)]
    if (
        defects
        or len(mailboxes) != 1
        or groups[0].display_name is not None
        or not mailboxes[0].username
        or not mailboxes[0].domain
    ):
        raise refused


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
