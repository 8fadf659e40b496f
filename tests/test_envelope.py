"""HPKE envelopes: both suites round-trip; any change of key, purpose or context fails."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives import hpke
from cryptography.hazmat.primitives.asymmetric import mlkem, x25519

from sandbox.errors import EnvelopeError, PublicKeyRejected
from sandbox.seal.envelope import (
    SUITE_MLKEM768_X25519,
    SUITE_X25519,
    RecipientKey,
    envelope_info,
    load_public_key,
    open_envelope,
    seal_to,
    unwrap_content_key,
    wrap_content_key,
)

SUITES = [SUITE_X25519, SUITE_MLKEM768_X25519]
CONTEXT: dict[str, str | int] = {
    "run": "r1",
    "round": 3,
    "node": "n7",
    "model": "ab" * 32,
    "direction": "uplink",
}


@pytest.mark.parametrize("suite", SUITES)
def test_round_trip(suite: str) -> None:
    key = RecipientKey.generate(suite)
    envelope = seal_to(
        key.public_key(), b"adapter bytes", purpose="update", context=CONTEXT, suite=suite
    )
    assert b"adapter bytes" not in envelope
    opened = open_envelope(
        key.private_key, envelope, purpose="update", context=CONTEXT, suite=suite
    )
    assert opened == b"adapter bytes"


@pytest.mark.parametrize("suite", SUITES)
@pytest.mark.parametrize(
    "change",
    [{"round": 4}, {"run": "r2"}, {"node": "n8"}, {"model": "cd" * 32}, {"direction": "downlink"}],
    ids=["replayed-next-round", "other-run", "other-node", "other-model", "reflected"],
)
def test_envelope_bound_to_its_context(suite: str, change: dict[str, str | int]) -> None:
    key = RecipientKey.generate(suite)
    envelope = seal_to(key.public_key(), b"update", purpose="update", context=CONTEXT, suite=suite)
    with pytest.raises(EnvelopeError, match="did not open"):
        open_envelope(
            key.private_key, envelope, purpose="update", context={**CONTEXT, **change}, suite=suite
        )


@pytest.mark.parametrize("suite", SUITES)
def test_sealed_to_another_key_or_tampered(suite: str) -> None:
    key, other = RecipientKey.generate(suite), RecipientKey.generate(suite)
    envelope = seal_to(key.public_key(), b"update", purpose="update", context=CONTEXT, suite=suite)
    with pytest.raises(EnvelopeError):
        open_envelope(other.private_key, envelope, purpose="update", context=CONTEXT, suite=suite)
    tampered = envelope[:-1] + bytes([envelope[-1] ^ 1])
    with pytest.raises(EnvelopeError):
        open_envelope(key.private_key, tampered, purpose="update", context=CONTEXT, suite=suite)
    with pytest.raises(EnvelopeError):
        open_envelope(
            key.private_key, envelope, purpose="key-release", context=CONTEXT, suite=suite
        )


def test_key_release_binds_session_key_id_and_model() -> None:
    tee = RecipientKey.generate()
    wrapped = wrap_content_key(
        b"k" * 32, tee.public_key(), session_id="s1", key_id="kid", model_id="minilm"
    )
    assert (
        unwrap_content_key(
            wrapped, tee.private_key, session_id="s1", key_id="kid", model_id="minilm"
        )
        == b"k" * 32
    )
    for changed in ({"session_id": "s2"}, {"key_id": "kid2"}, {"model_id": "other"}):
        args = {"session_id": "s1", "key_id": "kid", "model_id": "minilm", **changed}
        with pytest.raises(EnvelopeError):
            unwrap_content_key(wrapped, tee.private_key, **args)


def test_info_names_purpose_and_version_and_is_canonical() -> None:
    info = envelope_info("update", {"round": 1, "run": "r"})
    assert info.startswith(b"ark/v1/update\x00")
    assert info == envelope_info("update", {"run": "r", "round": 1})
    with pytest.raises(EnvelopeError, match="unknown HPKE suite"):
        RecipientKey.generate("rot13")


@pytest.mark.parametrize("suite", SUITES)
def test_public_key_wire_form_round_trips(suite: str) -> None:
    key = RecipientKey.generate(suite)
    public = load_public_key(suite, key.public_bytes)
    envelope = seal_to(public, b"k", purpose="update", context=CONTEXT, suite=suite)
    assert open_envelope(key.private_key, envelope, purpose="update", context=CONTEXT, suite=suite)
    for bad in (key.public_bytes[:-1], key.public_bytes + b"\0", b""):
        with pytest.raises(EnvelopeError, match="public key is"):
            load_public_key(suite, bad)


# The small-order X25519 u-coordinates (libsodium's list, RFC 7748 §6.1), little-endian:
# 0, 1, the two points of order 8, p - 1, p, p + 1; each also with the top bit set.
_P = 2**255 - 19
_ORDER_8 = (
    0x00B8495F16056286FDB1329CEB8D09DA6AC49FF1FAE35616AEB8413B7C7AEBE0,
    0x57119FD0DD4E22D8868E1C58C45C44045BEF839C55B1D0B1248C50A3BC959C5F,
)
SMALL_ORDER = [
    (u | top).to_bytes(32, "little")
    for u in (0, 1, *_ORDER_8, _P - 1, _P, _P + 1)
    for top in (0, 1 << 255)
]


@pytest.mark.parametrize("key", SMALL_ORDER, ids=lambda key: key.hex()[:8] + key.hex()[-2:])
def test_a_small_order_x25519_key_is_rejected_on_load(key: bytes) -> None:
    """Cross-checked with the library: every shared secret with it is all zeros."""
    with pytest.raises(ValueError, match="shared key"):
        x25519.X25519PrivateKey.generate().exchange(x25519.X25519PublicKey.from_public_bytes(key))
    with pytest.raises(PublicKeyRejected, match="small order"):
        load_public_key(SUITE_X25519, key)
    hybrid = RecipientKey.generate(SUITE_MLKEM768_X25519).public_bytes[:-32] + key
    with pytest.raises(PublicKeyRejected, match="small order"):
        load_public_key(SUITE_MLKEM768_X25519, hybrid)


def test_keys_of_large_order_next_to_the_list_load() -> None:
    for u in (2, 9, _P - 2, _P + 2, _ORDER_8[0] + 1):
        load_public_key(SUITE_X25519, u.to_bytes(32, "little"))


def test_an_ml_kem_key_out_of_range_is_rejected() -> None:
    """FIPS 203's modulus check (the library's): coefficients must be below q = 3329."""
    key = RecipientKey.generate(SUITE_MLKEM768_X25519).public_bytes
    with pytest.raises(PublicKeyRejected, match="malformed"):
        load_public_key(SUITE_MLKEM768_X25519, b"\xff" * 1184 + key[-32:])


@pytest.mark.parametrize("suite", SUITES)
def test_sealing_to_a_small_order_key_is_a_typed_error(suite: str) -> None:
    """A key object that never went through load_public_key still fails typed."""
    zero = x25519.X25519PublicKey.from_public_bytes(bytes(32))
    if suite == SUITE_MLKEM768_X25519:
        kem = mlkem.MLKEM768PrivateKey.generate().public_key()
        public: object = hpke.MLKEM768X25519PublicKey(kem, zero)
    else:
        public = zero
    with pytest.raises(EnvelopeError, match="cannot seal"):
        seal_to(public, b"k", purpose="update", context=CONTEXT, suite=suite)
