"""Tokens for the public email links: they open only as sealed, for the purpose sealed."""

from __future__ import annotations

import base64
import json

import pytest

from channels.email.tokens import MAX_TOKEN_LENGTH, BadToken, Sealer

SECRET = b"0123456789abcdef0123456789abcdef"
PAYLOAD: dict[str, str | int] = {
    "email": "e-42",
    "lead": 7,
    "url": "https://shop.example.com/doors?a=1&b=2",
}


def sealer(secret: bytes = SECRET) -> Sealer:
    return Sealer(secret)


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_a_sealed_payload_opens_to_the_same_payload() -> None:
    token = sealer().seal("click", PAYLOAD)

    assert sealer().open("click", token) == PAYLOAD


def test_a_token_is_url_safe_and_unpadded() -> None:
    token = sealer().seal("click", PAYLOAD)

    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_.")
    assert "=" not in token


def test_an_altered_payload_is_refused() -> None:
    token = sealer().seal("unsubscribe", {"lead": 7})
    _, signature = token.split(".")
    forged = b64(json.dumps({"lead": 8}, separators=(",", ":")).encode())

    with pytest.raises(BadToken):
        sealer().open("unsubscribe", f"{forged}.{signature}")


def test_an_altered_signature_is_refused() -> None:
    token = sealer().seal("open", {"email": "e-1"})
    body, signature = token.split(".")
    flipped = ("A" if signature[0] != "A" else "B") + signature[1:]

    with pytest.raises(BadToken):
        sealer().open("open", f"{body}.{flipped}")


def test_a_token_for_another_purpose_is_refused() -> None:
    token = sealer().seal("open", {"email": "e-1"})

    with pytest.raises(BadToken):
        sealer().open("unsubscribe", token)


def test_a_token_sealed_with_another_secret_is_refused() -> None:
    token = sealer(b"another secret, just as long as the first").seal("open", {"email": "e-1"})

    with pytest.raises(BadToken):
        sealer().open("open", token)


@pytest.mark.parametrize("cut", [1, 5, 30])
def test_a_truncated_token_is_refused(cut: int) -> None:
    token = sealer().seal("open", {"email": "e-1"})

    with pytest.raises(BadToken):
        sealer().open("open", token[:-cut])


@pytest.mark.parametrize(
    "garbage",
    ["", ".", "abc", "abc.", ".abc", "a.b.c", "!!!.???", "é.é", "a b.c d", "a=.b="],
)
def test_garbage_is_refused(garbage: str) -> None:
    with pytest.raises(BadToken):
        sealer().open("open", garbage)


def test_a_validly_signed_token_that_is_too_long_is_refused_before_decoding() -> None:
    token = sealer().seal("click", {"url": "https://example.com/" + "x" * MAX_TOKEN_LENGTH})

    with pytest.raises(BadToken, match="too long"):
        sealer().open("click", token)


def test_a_click_tokens_url_cannot_be_swapped_for_another() -> None:
    token = sealer().seal("click", {"email": "e-1", "url": "https://shop.example.com/"})
    body, signature = token.split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["url"] = "https://evil.example.net/"
    swapped = b64(json.dumps(payload, separators=(",", ":"), sort_keys=True).encode())

    with pytest.raises(BadToken):
        sealer().open("click", f"{swapped}.{signature}")


def test_a_short_secret_is_rejected() -> None:
    with pytest.raises(ValueError):
        Sealer(b"short")
