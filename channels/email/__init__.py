"""Email: templates rendered in a sandbox, checked before any lead can receive them."""

from channels.email.templates import (
    EmailTemplates,
    MissingBlock,
    OfferView,
    RenderedEmail,
    check_templates,
)

__all__ = ["EmailTemplates", "MissingBlock", "OfferView", "RenderedEmail", "check_templates"]
