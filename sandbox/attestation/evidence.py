"""Evidence: an EAT (RFC 9711) claims set, signed as a compact JWS with ES256 and ``x5c``.

``report_data = SHA-384(JCS({"nonce": …, "tee_pubkey": …}))`` binds the verifier's nonce
and the sandbox's ephemeral public key into what the attester signs (the Trustee pattern).
This module only encodes and decodes; appraisal lives in :mod:`sandbox.attestation.verifier`.
"""

from __future__ import annotations

import base64
import hashlib
import json
import string
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import (
    decode_dss_signature,
    encode_dss_signature,
)

from sandbox import canonical
from sandbox.errors import EvidenceFormatError, SignatureInvalid

EAT_PROFILE = "tag:ark-sandbox.dev,2026:eat/1"
JWS_ALG = "ES256"
JWS_TYP = "eat+jwt"
MIN_NONCE_BYTES = 8
# RFC 9711 §4.2.9 debug status values; only the "disabled" family is acceptable.
DBGSTAT_DISABLED = {
    "disabled",
    "disabled-since-boot",
    "disabled-permanently",
    "disabled-fully-and-permanently",
}
REQUIRED_CLAIMS = (
    "eat_profile",
    "eat_nonce",
    "ueid",
    "hwmodel",
    "swname",
    "swversion",
    "measurements",
    "report_data",
    "tee",
    "iat",
)
_B64URL_ALPHABET = frozenset(string.ascii_letters + string.digits + "-_")


def b64url(data: bytes) -> str:
    """Unpadded base64url, as JOSE uses."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, what: str = "value") -> bytes:
    """Inverse of :func:`b64url`, strictly: EvidenceFormatError naming ``what`` otherwise.

    Only the unpadded base64url alphabet is accepted, and trailing bits must be zero, so
    each byte string has exactly one encoding. A lenient decoder (one that skips other
    characters or ignores trailing bits) lets anyone make a second text of a signed token
    that verifies, and a token is known by the digest of its text (the log's EAR id).
    """
    if not isinstance(text, str) or not _B64URL_ALPHABET.issuperset(text) or len(text) % 4 == 1:
        raise EvidenceFormatError(f"{what} is not unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url(data) != text:
        raise EvidenceFormatError(f"{what} is not canonical base64url (trailing bits set)")
    return data


def report_data(nonce: bytes, tee_pubkey: bytes) -> str:
    """Hex SHA-384 over the JCS form of the nonce and the TEE public key."""
    bound = canonical.dumps({"nonce": b64url(nonce), "tee_pubkey": b64url(tee_pubkey)})
    return hashlib.sha384(bound).hexdigest()


# ES256 signatures are accepted with low S only (s <= n/2, as Bitcoin's BIP 62 and
# libsecp256k1 require): (r, s) and (r, n - s) both verify under ECDSA, so without this
# one signed token would have two encodings and two identities in the log.
_P256_HALF_ORDER = ec.SECP256R1.group_order // 2


def es256_sign(key: ec.EllipticCurvePrivateKey, data: bytes) -> bytes:
    """ES256 as JOSE wants it: raw 32-byte r ‖ 32-byte s, with s in the low half."""
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
    if s > _P256_HALF_ORDER:
        s = ec.SECP256R1.group_order - s
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def es256_verify(key: ec.EllipticCurvePublicKey, signature: bytes, data: bytes) -> None:
    """Verify a raw r ‖ s ES256 signature with low S; raise SignatureInvalid otherwise."""
    if len(signature) != 64:
        raise SignatureInvalid("ES256 signature must be 64 bytes")
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    if s > _P256_HALF_ORDER:
        raise SignatureInvalid("ES256 signature has a high S (s > n/2); only low S is accepted")
    try:
        key.verify(encode_dss_signature(r, s), data, ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise SignatureInvalid("signature does not verify") from None


@dataclass(frozen=True)
class SignedEvidence:
    """A decoded compact JWS: protected header, claims, and what the signature covers."""

    header: dict[str, Any]
    claims: dict[str, Any]
    signing_input: bytes
    signature: bytes


def encode_jws(header: dict[str, Any], claims: dict[str, Any], sign: Any) -> str:
    """Compact JWS; ``sign(signing_input) -> raw r||s`` signature bytes."""
    signing_input = (
        b64url(canonical.dumps(header)) + "." + b64url(canonical.dumps(claims))
    ).encode()
    return signing_input.decode() + "." + b64url(sign(signing_input))


def decode_jws(
    token: str, *, typ: str, required: tuple[str, ...] = REQUIRED_CLAIMS
) -> SignedEvidence:
    """Split and parse a compact ES256 JWS of type ``typ`` without verifying its signature.

    EvidenceFormatError unless every part is strict base64url, header and claims are JSON
    objects (no duplicate names, no NaN or Infinity), the ``required`` claims exist, and
    the header says ``alg`` ES256, ``typ`` ``typ`` and has no ``crit``: this verifier
    understands no JWS extension, and RFC 7515 §4.1.11 says to refuse what it must
    understand but does not. Header values are not quoted: they are the presenter's text.
    """
    parts = token.split(".") if isinstance(token, str) else []
    if len(parts) != 3:
        raise EvidenceFormatError("evidence is not a compact JWS (three dot-separated parts)")
    try:
        header = _json_object(b64url_decode(parts[0], "JWS header"))
        claims = _json_object(b64url_decode(parts[1], "JWS claims"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError too
        raise EvidenceFormatError(f"token header or claims are not JSON ({exc})") from exc
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise EvidenceFormatError("evidence header and claims must be JSON objects")
    if header.get("alg") != JWS_ALG:
        raise EvidenceFormatError(f"JWS header 'alg' must be {JWS_ALG!r}")
    if header.get("typ") != typ:
        raise EvidenceFormatError(f"JWS header 'typ' must be {typ!r}")
    if "crit" in header:
        raise EvidenceFormatError("JWS header 'crit' names extensions this verifier refuses")
    missing = [c for c in required if c not in claims]
    if missing:
        raise EvidenceFormatError(f"token lacks claims {missing}")
    return SignedEvidence(
        header,
        claims,
        f"{parts[0]}.{parts[1]}".encode(),
        b64url_decode(parts[2], "JWS signature"),
    )


def _json_object(text: bytes) -> Any:
    """JSON as RFC 8259 §4 and I-JSON (RFC 7493) want it: unique names, no NaN/Infinity.

    Two readers of an object with a name twice may see two different claims sets.
    """
    return json.loads(text, object_pairs_hook=_unique_names, parse_constant=_no_constant)


def _unique_names(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    members = dict(pairs)
    if len(members) != len(pairs):
        raise ValueError("an object has a member name twice")
    return members


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")
