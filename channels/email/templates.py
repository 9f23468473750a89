"""Email templates: Jinja2 in a sandbox, rendered into a subject, an HTML part and a text part.

Neither side of a template is trusted: marketers write the templates, and leads write
the traits they are filled with. So rendering is sandboxed (no way to Python internals),
HTML is autoescaped (a trait cannot inject markup), and an undefined variable is an
error rather than a blank in a sent email. The subject and the text part are plain
text, so they are rendered from a second environment without autoescaping: O'Brien
stays O'Brien there.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from jinja2 import (
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateError,
    TemplateNotFound,
    TemplateSyntaxError,
    UndefinedError,
)
from jinja2.exceptions import SecurityError
from jinja2.runtime import Context
from jinja2.sandbox import SandboxedEnvironment

from channels.email.text import html_to_text
from engine.journey import JourneyError

SUFFIX = ".j2"
REQUIRED_BLOCKS = ("subject", "html")


@dataclass(frozen=True)
class OfferView:
    """The offer a lead holds, as templates see it."""

    code: str
    title: str
    expires_at: datetime  # aware, so templates can show it in any zone


@dataclass(frozen=True)
class RenderedEmail:
    subject: str  # one line: a CR or LF here would forge headers
    html: str
    text: str


class MissingBlock(TemplateError):
    """A template that lacks a block every email needs."""

    def __init__(self, template: str, block: str) -> None:
        super().__init__(f"missing block {block!r}")
        self.template = template
        self.block = block


class Attributes:
    """Values a template reads as attributes (`lead.first_name`), named after the variable
    so that a missing one is reported as `lead.first_name`.

    Values are reached only through `__getitem__`: no method of a mapping (`items`,
    `keys`) shadows a trait of that name, and a missing key becomes undefined.
    """

    __slots__ = ("_path", "_values")

    def __init__(self, path: str, values: Mapping[str, Any]) -> None:
        self._path = path
        self._values = values

    def __getitem__(self, key: str) -> Any:
        value = self._values[key]
        if isinstance(value, Mapping):
            return Attributes(f"{self._path}.{key}", value)
        return value


class _Undefined(StrictUndefined):
    """Strict, and says which value was missing the way the template spells it."""

    __slots__ = ()

    @property
    def _undefined_message(self) -> str:
        owner, name = self._undefined_obj, self._undefined_name
        if self._undefined_hint is None and isinstance(owner, Attributes):
            return f"'{owner._path}.{name}' is undefined"
        if self._undefined_hint is None and owner is None and isinstance(name, str):
            return (
                f"no attribute {name!r} on None (offer is None when the lead holds no offer:"
                " guard with {% if offer %})"
            )
        return super()._undefined_message


class _Sandbox(SandboxedEnvironment):
    """The sandbox, with `a.b` on the values templates read most found without the
    exception Jinja's lookup raises first: the attribute it looks for before the item
    does not exist on them. What a template gets is what Jinja's own lookup gives
    (8% of rendering an email)."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        # Its values are items only, by design; a name of Python's own (`__class__`)
        # goes to the sandbox, which refuses it as unsafe.
        if type(obj) is Attributes and not attribute.startswith("_"):
            try:
                return obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        # A plain dict has no attributes of its own: only its type's (`items`), which
        # Jinja prefers to an item of the same name, and still does below.
        if type(obj) is dict and not hasattr(dict, attribute):
            try:
                return obj[attribute]
            except KeyError:
                pass
        return super().getattr(obj, attribute)


def _environment(directory: Path, *, autoescape: bool) -> SandboxedEnvironment:
    # Each file read once, not looked at again for every email: the templates are
    # checked when cjm starts (check_templates), and an edited one is taken, checked, at
    # the next start, as journeys are.
    return _Sandbox(
        loader=FileSystemLoader(directory),
        autoescape=autoescape,
        undefined=_Undefined,
        auto_reload=False,
    )


class EmailTemplates:
    """The templates of one folder, rendered for one lead at a time."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._html = _environment(directory, autoescape=True)
        self._plain = _environment(directory, autoescape=False)

    def names(self) -> list[str]:
        """Every template that can be sent; partials (`_layout.j2`) cannot."""
        return sorted(
            path.name.removesuffix(SUFFIX)
            for path in self.directory.glob(f"*{SUFFIX}")
            if not path.name.startswith("_")
        )

    def path(self, name: str) -> Path:
        return self.directory / f"{name}{SUFFIX}"

    def render(
        self,
        name: str,
        *,
        lead: Mapping[str, Any],
        offer: OfferView | None,
        journey: tuple[str, str],
        stage: tuple[str, str],
        unsubscribe_url: str,
    ) -> RenderedEmail:
        """Raises TemplateError (UndefinedError, SecurityError, MissingBlock, ...) rather
        than return an email with a hole in it."""
        if name.startswith("_"):
            raise TemplateNotFound(name, f"{name} is a partial, never sent on its own")
        variables: dict[str, Any] = {
            "lead": Attributes("lead", lead),
            "offer": offer,
            "journey": Attributes("journey", {"id": journey[0], "name": journey[1]}),
            "stage": Attributes("stage", {"id": stage[0], "name": stage[1]}),
            "unsubscribe_url": unsubscribe_url,
        }
        plain = self._plain.get_template(f"{name}{SUFFIX}")
        for block in REQUIRED_BLOCKS:
            if block not in plain.blocks:
                raise MissingBlock(name, block)
        # The subject and the text share one context, as the blocks of one page do.
        context = plain.new_context(variables)
        subject = " ".join(_render_block(plain, "subject", context).split())
        html = self._html.get_template(f"{name}{SUFFIX}").render(variables)
        if "text" in plain.blocks:
            text = _render_block(plain, "text", context).strip() + "\n"
        else:
            text = html_to_text(html)
        return RenderedEmail(subject=subject, html=html, text=text)


def _render_block(template: Template, block: str, context: Context) -> str:
    """One block on its own, with the traceback pointing at template lines, as `render` does."""
    try:
        return "".join(template.blocks[block](context))
    except Exception:
        template.environment.handle_exception()


# --- checking: what `cjm validate` runs before any lead gets a broken email -----------------------

SAMPLE_LEAD: Mapping[str, Any] = {
    "email": "ada@example.com",
    "phone": "+14155550123",
    "first_name": "Ada",
    "last_name": "Lovelace",
    "city": "Springfield",
    "state": "IL",
    "zip": "62701",
    "country": "US",
    "timezone": "America/Chicago",
    "company": "Analytical Engines Ltd",
}
MINIMAL_LEAD: Mapping[str, Any] = {"email": "ada@example.com"}
SAMPLE_OFFER = OfferView(
    code="SAMPLE-7KQ4PX",
    title="A sample offer",
    expires_at=datetime(2030, 12, 31, 23, 59, tzinfo=UTC),
)
SAMPLE_JOURNEY = ("sample", "Sample journey")
SAMPLE_STAGE = ("sample", "Sample stage")
SAMPLE_UNSUBSCRIBE_URL = "https://example.com/unsubscribe/sample"
_UNDEFINED = re.compile(r"^'(.+)' is undefined$")


def check_templates(directory: Path, names: Iterable[str]) -> list[JourneyError]:
    """Render each named template, and every other email in the folder, for the fullest
    and the barest lead: every failure is an error at the template line to fix.

    Two leads because both kinds reach production: a trait a template uses without
    `| default(...)` breaks only for leads who lack it, and `offer.code` only for leads
    without an offer.
    """
    templates = EmailTemplates(directory)
    errors: set[JourneyError] = set()
    for name in sorted({*names, *templates.names()}):
        for lead, offer in ((SAMPLE_LEAD, SAMPLE_OFFER), (MINIMAL_LEAD, None)):
            try:
                templates.render(
                    name,
                    lead=lead,
                    offer=offer,
                    journey=SAMPLE_JOURNEY,
                    stage=SAMPLE_STAGE,
                    unsubscribe_url=SAMPLE_UNSUBSCRIBE_URL,
                )
            except Exception as error:  # any exception is an email that cannot be sent
                errors.add(_located(error, templates.path(name)))
    return sorted(errors)


def _located(error: Exception, path: Path) -> JourneyError:
    if isinstance(error, TemplateSyntaxError):
        file = Path(error.filename) if error.filename else path
        return JourneyError(file, error.lineno, f"syntax error: {error.message}")
    file, line = _template_frame(error, path)
    return JourneyError(file, line, _describe(error))


def _template_frame(error: Exception, path: Path) -> tuple[Path, int]:
    """The innermost template line on the traceback (Jinja rewrites its frames to point
    at template files); the template's first line when none is there."""
    found = (path, 1)
    for frame, line in traceback.walk_tb(error.__traceback__):
        filename = Path(frame.f_code.co_filename)
        if filename.suffix == SUFFIX and filename.parent == path.parent:
            found = (filename, line)
    return found


def _describe(error: Exception) -> str:
    if isinstance(error, SecurityError):
        return f"unsafe: {error}"
    if isinstance(error, UndefinedError):
        match = _UNDEFINED.match(str(error))
        return f"undefined: {match.group(1) if match else error}"
    if isinstance(error, MissingBlock):
        return str(error)
    if isinstance(error, TemplateNotFound):
        return f"template not found: {error.name}"
    return f"error: {type(error).__name__}: {error}"
