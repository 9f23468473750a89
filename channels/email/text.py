"""The plain-text part of an email, derived from its HTML when the template writes none.

Mail clients that show text (and spam filters that compare both parts) need the same
message in words: paragraphs and line breaks kept, every link still usable as
`text (url)`, and nothing a reader never sees (scripts, styles, the head, hidden
preheaders) leaking in.
"""

from __future__ import annotations

import re
from html.parser import HTMLParser

_DROPPED = frozenset({"head", "script", "style", "template", "title"})
_VOID = frozenset(
    {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}
)
_PARAGRAPHS = frozenset(
    {"blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "ol", "p", "pre", "table", "ul"}
)
_LINES = frozenset({"br", "div", "hr", "li", "tr"})  # a new line where they start
_HIDDEN = re.compile(r"display\s*:\s*none", re.IGNORECASE)
# Invisible characters inboxes use to pad preheaders; in text they are only noise.
_INVISIBLE = dict.fromkeys(map(ord, "\u034f\u200b\u200c\u200d\u2060\ufeff"))


def html_to_text(html: str) -> str:
    """Readable plain text for an HTML email."""
    parser = _TextParser()
    parser.feed(html)
    parser.close()
    return parser.text()


class _TextParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._parts: list[str] = []
        self._skipping = 0  # depth inside an element whose content is never shown
        self._link: tuple[str, int] | None = None  # href, index of its first text part

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        void = tag in _VOID
        if self._skipping:
            self._skipping += 0 if void else 1
            return
        if tag in _DROPPED or _HIDDEN.search(dict(attrs).get("style") or ""):
            self._skipping = 0 if void else 1
            return
        self._break(tag)
        if tag == "li":
            self._parts.append("- ")
        elif tag == "a":
            href = (dict(attrs).get("href") or "").strip()
            self._link = (href, len(self._parts)) if href else None

    def handle_endtag(self, tag: str) -> None:
        if self._skipping:
            self._skipping -= 1
            return
        if tag == "a" and self._link is not None:
            href, start = self._link
            label = "".join(self._parts[start:]).strip()
            if href.startswith(("http:", "https:", "mailto:")) and label != href:
                self._parts.append(f" ({href})" if label else href)
            self._link = None
        if tag in _PARAGRAPHS:
            self._break(tag)

    def handle_data(self, data: str) -> None:
        if not self._skipping:
            self._parts.append(re.sub(r"\s+", " ", data.translate(_INVISIBLE)))

    def _break(self, tag: str) -> None:
        if tag in _PARAGRAPHS:
            self._parts.append("\n\n")
        elif tag in _LINES:
            self._parts.append("\n")
        elif tag in ("td", "th"):
            self._parts.append(" ")

    def text(self) -> str:
        text = "".join(self._parts).replace("\xa0", " ")
        text = re.sub(r" *\n *", "\n", re.sub(r" {2,}", " ", text))
        return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"
