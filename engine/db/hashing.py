"""Addresses kept only as a hash, once the person behind them was erased."""

from __future__ import annotations

import hashlib

HASHED = "sha256:"


def hashed_address(address: str) -> str:
    """How an erased person's address stays on the suppression list: never mailed again,
    never readable again."""
    return HASHED + hashlib.sha256(address.strip().lower().encode()).hexdigest()
