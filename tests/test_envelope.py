"""HPKE envelopes: both suites round-trip; any change of key, purpose or context fails."""

from __future__ import annotations

import pytest

from sandbox.errors import EnvelopeError
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
