"""HPKE envelopes (RFC 9180, via ``cryptography``) whose ``info`` names purpose and context.

``info = b"ark/v1/" + purpose + b"\\x00" + JCS(context)``: an envelope made for one
purpose, session, run, round, node or model does not open under any other, so a
replayed or redirected envelope fails. Failures collapse into one opaque EnvelopeError.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import rfc8785
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke

from sandbox.errors import EnvelopeError

SUITE_X25519 = "x25519-hkdf-sha256-aes256gcm"
SUITE_MLKEM768_X25519 = "mlkem768-x25519-hkdf-sha256-aes256gcm"
SUITES: dict[str, hpke.Suite] = {
    SUITE_X25519: hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    SUITE_MLKEM768_X25519: hpke.Suite(
        hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM
    ),
}
PURPOSE_KEY_RELEASE = "key-release"


def generate_private_key(suite: str = SUITE_X25519) -> Any:
    """A fresh recipient key pair for ``suite`` (ephemeral sandbox and aggregator keys)."""
    from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

    if suite == SUITE_X25519:
        return x25519.X25519PrivateKey.generate()
    if suite == SUITE_MLKEM768_X25519:
        return hpke.MLKEM768X25519PrivateKey(
            mlkem.MLKEM768PrivateKey.generate(), x25519.X25519PrivateKey.generate()
        )
    raise EnvelopeError(f"unknown HPKE suite {suite!r}; known: {sorted(SUITES)}")


def envelope_info(purpose: str, context: Mapping[str, str | int]) -> bytes:
    """The HPKE ``info`` for a purpose and the context it protects."""
    if not purpose or "\x00" in purpose:
        raise ValueError(f"bad envelope purpose {purpose!r}")
    return b"ark/v1/" + purpose.encode() + b"\x00" + rfc8785.dumps(dict(context))


def _suite(name: str) -> hpke.Suite:
    try:
        return SUITES[name]
    except KeyError:
        raise EnvelopeError(f"unknown HPKE suite {name!r}; known: {sorted(SUITES)}") from None


def seal_to(
    public_key: Any,
    plaintext: bytes,
    *,
    purpose: str,
    context: Mapping[str, str | int],
    suite: str = SUITE_X25519,
) -> bytes:
    """Encrypt ``plaintext`` to ``public_key`` (single-shot HPKE base mode)."""
    return _suite(suite).encrypt(plaintext, public_key, info=envelope_info(purpose, context))


def open_envelope(
    private_key: Any,
    envelope: bytes,
    *,
    purpose: str,
    context: Mapping[str, str | int],
    suite: str = SUITE_X25519,
) -> bytes:
    """Decrypt an envelope made by :func:`seal_to` for exactly this purpose and context."""
    try:
        return _suite(suite).decrypt(envelope, private_key, info=envelope_info(purpose, context))
    except (InvalidTag, ValueError, TypeError) as exc:
        raise EnvelopeError("envelope did not open") from exc


def _release_context(session_id: str, key_id: str, model_id: str) -> dict[str, str | int]:
    return {"session": session_id, "key_id": key_id, "model_id": model_id}


def wrap_content_key(
    content_key: bytes,
    tee_public_key: Any,
    *,
    session_id: str,
    key_id: str,
    model_id: str,
    suite: str = SUITE_X25519,
) -> bytes:
    """The key broker's release: the content key sealed to an attested sandbox key."""
    return seal_to(
        tee_public_key,
        content_key,
        purpose=PURPOSE_KEY_RELEASE,
        context=_release_context(session_id, key_id, model_id),
        suite=suite,
    )


def unwrap_content_key(
    envelope: bytes,
    tee_private_key: Any,
    *,
    session_id: str,
    key_id: str,
    model_id: str,
    suite: str = SUITE_X25519,
) -> bytes:
    """Inverse of :func:`wrap_content_key`, inside the sandbox that holds the private key."""
    return open_envelope(
        tee_private_key,
        envelope,
        purpose=PURPOSE_KEY_RELEASE,
        context=_release_context(session_id, key_id, model_id),
        suite=suite,
    )
