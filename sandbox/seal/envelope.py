"""HPKE envelopes (RFC 9180, via ``cryptography``) whose ``info`` names purpose and context.

``info = b"ark/v1/" + purpose + b"\\x00" + JCS(context)``: an envelope made for one
purpose, session, run, round, node or model does not open under any other, so a
replayed or redirected envelope fails. Failures collapse into one opaque EnvelopeError.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from sandbox import canonical
from sandbox.errors import EnvelopeError, PublicKeyRejected

SUITE_X25519 = "x25519-hkdf-sha256-aes256gcm"
SUITE_MLKEM768_X25519 = "mlkem768-x25519-hkdf-sha256-aes256gcm"
SUITES: dict[str, hpke.Suite] = {
    SUITE_X25519: hpke.Suite(hpke.KEM.X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM),
    SUITE_MLKEM768_X25519: hpke.Suite(
        hpke.KEM.MLKEM768_X25519, hpke.KDF.HKDF_SHA256, hpke.AEAD.AES_256_GCM
    ),
}
PURPOSE_KEY_RELEASE = "key-release"


@dataclass(frozen=True)
class RecipientKey:
    """An HPKE recipient key pair and the wire form of its public half.

    The hybrid suite's public key object has no byte accessor, so the wire form is kept
    from generation: ML-KEM-768 public key ‖ X25519 public key (1184 + 32 bytes).
    """

    suite: str
    private_key: Any
    public_bytes: bytes
    # The hybrid suite's ML-KEM and X25519 halves (its combined key exposes neither).
    parts: tuple[Any, ...] = field(default=(), repr=False, compare=False)

    @classmethod
    def generate(cls, suite: str = SUITE_X25519) -> RecipientKey:
        """A fresh key pair for ``suite`` (ephemeral sandbox and aggregator keys)."""
        _suite(suite)
        if suite == SUITE_MLKEM768_X25519:
            return cls._hybrid(
                mlkem.MLKEM768PrivateKey.generate(), x25519.X25519PrivateKey.generate()
            )
        key = x25519.X25519PrivateKey.generate()
        return cls(suite, key, key.public_key().public_bytes_raw())

    def public_key(self) -> Any:
        return self.private_key.public_key()

    def private_bytes(self) -> bytes:
        """Raw private key material (ML-KEM-768 seed ‖ X25519 key for the hybrid suite).

        Only for a key the sandbox keeps between its own processes (the node's channel
        key, written 0600 in the node workspace); never sent anywhere.
        """
        if self.suite == SUITE_MLKEM768_X25519:
            kem, dh = self.parts
            return bytes(kem.private_bytes_raw() + dh.private_bytes_raw())
        return bytes(self.private_key.private_bytes_raw())

    @classmethod
    def from_private_bytes(cls, suite: str, data: bytes) -> RecipientKey:
        """Inverse of :meth:`private_bytes`; EnvelopeError if ``data`` is malformed."""
        _suite(suite)
        try:
            if suite == SUITE_MLKEM768_X25519:
                if len(data) != _MLKEM_SEED_BYTES + _X25519_BYTES:
                    raise ValueError("wrong length")
                kem = mlkem.MLKEM768PrivateKey.from_seed_bytes(data[:_MLKEM_SEED_BYTES])
                dh = x25519.X25519PrivateKey.from_private_bytes(data[_MLKEM_SEED_BYTES:])
                return cls._hybrid(kem, dh)
            key = x25519.X25519PrivateKey.from_private_bytes(data)
        except ValueError as exc:
            raise EnvelopeError(f"malformed {suite} private key") from exc
        return cls(suite, key, key.public_key().public_bytes_raw())

    @classmethod
    def _hybrid(cls, kem: Any, dh: Any) -> RecipientKey:
        return cls(
            SUITE_MLKEM768_X25519,
            hpke.MLKEM768X25519PrivateKey(kem, dh),
            kem.public_key().public_bytes_raw() + dh.public_key().public_bytes_raw(),
            (kem, dh),
        )


def load_public_key(suite: str, data: bytes) -> Any:
    """The public key object for a wire-form public key of ``suite``.

    PublicKeyRejected if it is malformed or its X25519 part has small order. Every
    shared secret with a small-order key is zero, so sealing to it gives no secrecy; the
    library refuses it with an untyped error wherever the sealing happens (in the
    ServerApp, mid-round), so it is refused here, where a peer's key arrives, typed.
    """
    _suite(suite)
    expected = _HYBRID_PUBLIC_BYTES if suite == SUITE_MLKEM768_X25519 else _X25519_BYTES
    if not isinstance(data, bytes) or len(data) != expected:
        raise PublicKeyRejected(f"a {suite} public key is {expected} bytes")
    split = expected - _X25519_BYTES
    # RFC 7748 §5: the receiver ignores the top bit of a u-coordinate, so compare without it.
    if data[split:-1] + bytes([data[-1] & 0x7F]) in _SMALL_ORDER_X25519:
        raise PublicKeyRejected(f"the {suite} public key's X25519 part has small order")
    try:
        dh = x25519.X25519PublicKey.from_public_bytes(data[split:])
        if suite == SUITE_MLKEM768_X25519:
            # ML-KEM-768's own check (FIPS 203 §7.2, coefficients below q) is the library's.
            return hpke.MLKEM768X25519PublicKey(
                mlkem.MLKEM768PublicKey.from_public_bytes(data[:split]), dh
            )
        return dh
    except ValueError as exc:
        raise PublicKeyRejected(f"malformed {suite} public key") from exc


_X25519_BYTES = 32
_MLKEM_SEED_BYTES = 64
_HYBRID_PUBLIC_BYTES = 1184 + _X25519_BYTES
# The X25519 u-coordinates of small order, little-endian with the top bit clear (the list
# libsodium refuses and cr.yp.to/ecdh.html gives; RFC 7748 §6.1): 0, 1, the two points of
# order 8, p - 1, p and p + 1 for p = 2^255 - 19. With the top bit set they are the same
# points, which load_public_key masks off before it looks them up.
_SMALL_ORDER_X25519 = frozenset(
    bytes.fromhex(u)
    for u in (
        "0000000000000000000000000000000000000000000000000000000000000000",
        "0100000000000000000000000000000000000000000000000000000000000000",
        "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
        "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
        "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
        "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    )
)


def envelope_info(purpose: str, context: Mapping[str, str | int]) -> bytes:
    """The HPKE ``info`` for a purpose and the context it protects."""
    if not purpose or "\x00" in purpose:
        raise ValueError(f"bad envelope purpose {purpose!r}")
    return b"ark/v1/" + purpose.encode() + b"\x00" + canonical.dumps(dict(context))


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
    """Encrypt ``plaintext`` to ``public_key`` (single-shot HPKE base mode).

    EnvelopeError if the library refuses the key (a small-order X25519 key that did not
    come through :func:`load_public_key`): one typed error, whoever the recipient was.
    """
    info = envelope_info(purpose, context)
    try:
        return _suite(suite).encrypt(plaintext, public_key, info=info)
    except ValueError as exc:
        raise EnvelopeError("cannot seal to this public key") from exc


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
