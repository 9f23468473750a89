"""Audiences for ad platforms: lead traits normalised and hashed the way Meta and Google
match them."""

from channels.audiences.normalize import GOOGLE_HEADER, META_SCHEMA, google_row, meta_row

__all__ = ["GOOGLE_HEADER", "META_SCHEMA", "google_row", "meta_row"]
