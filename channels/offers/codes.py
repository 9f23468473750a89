"""Offer codes from a journey's pattern: `DOORS-{6}` -> `DOORS-7KQ4PX`.

Each `{N}` is N characters drawn with `secrets` from an alphabet without look-alikes
(no 0/O, 1/I/L), so a code read aloud or typed from a phone screen survives, and
cannot be guessed: six characters already give 31^6, about 900 million codes.
"""

from __future__ import annotations

import re
import secrets

ALPHABET = "ABCDEFGHJKMNPQRSTUVWXYZ23456789"
_SLOT = re.compile(r"\{(\d+)\}")


def make_code(pattern: str) -> str:
    return _SLOT.sub(
        lambda slot: "".join(secrets.choice(ALPHABET) for _ in range(int(slot.group(1)))),
        pattern,
    )
