"""Encrypted update channels and aggregator evidence (issue 4's building blocks).

Each attack must fail to open or fail appraisal with a typed error; nothing reaches the
aggregate. The aggregator's evidence is appraised against the node's own policy.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from sandbox.attestation.backends import VerifierRegistry
from sandbox.attestation.measure import AGGREGATOR_PACKAGES, NODE_PACKAGES, code_measurement
from sandbox.attestation.stub import DevManufacturer, StubAttester
from sandbox.attestation.verifier import AppraisalPolicy, Verifier
from sandbox.channel import DOWNLINK, UPLINK, ChannelContext, open_tensors, seal_tensors
from sandbox.errors import MeasurementRejected, NonceMismatch, UpdateRejected
from sandbox.seal.envelope import SUITE_MLKEM768_X25519, SUITE_X25519, RecipientKey

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
UPDATE = {
    "layer.lora_B.weight": np.arange(18, dtype=np.float32).reshape(6, 3),
    "classifier.bias": np.array([0.5, -1.0, 2.0], dtype=np.float32),
}
CONTEXT = ChannelContext("run-7", 3, "node-1", "ab" * 32, UPLINK)


@pytest.mark.parametrize("suite", [SUITE_X25519, SUITE_MLKEM768_X25519])
def test_update_round_trips_to_the_aggregator_key(suite: str) -> None:
    aggregator = RecipientKey.generate(suite)
    sealed = seal_tensors(UPDATE, aggregator.public_key(), CONTEXT, suite=suite)
    assert UPDATE["layer.lora_B.weight"].tobytes() not in sealed
    opened = open_tensors(sealed, aggregator.private_key, CONTEXT, suite=suite)
    assert opened.keys() == UPDATE.keys()
    for name, value in UPDATE.items():
        np.testing.assert_array_equal(opened[name], value)


@pytest.mark.parametrize(
    "change",
    [
        {"round": 4},
        {"run_id": "run-8"},
        {"model_digest": "cd" * 32},
        {"node_id": "node-2"},
        {"direction": DOWNLINK},
        {"stage": "evaluate"},
    ],
    ids=[
        "replayed-into-next-round",
        "another-run",
        "another-base-model",
        "another-node",
        "reflected",
        "train-adapter-as-evaluation",
    ],
)
def test_update_opens_only_in_its_own_context(change: dict[str, Any]) -> None:
    aggregator = RecipientKey.generate()
    sealed = seal_tensors(UPDATE, aggregator.public_key(), CONTEXT)
    with pytest.raises(UpdateRejected, match="did not open"):
        open_tensors(sealed, aggregator.private_key, dataclasses.replace(CONTEXT, **change))


def test_update_sealed_to_another_key_does_not_open() -> None:
    aggregator, impostor = RecipientKey.generate(), RecipientKey.generate()
    sealed = seal_tensors(UPDATE, impostor.public_key(), CONTEXT)
    with pytest.raises(UpdateRejected, match="did not open"):
        open_tensors(sealed, aggregator.private_key, CONTEXT)


def test_tensors_outside_the_allowlist_are_not_sealed() -> None:
    aggregator = RecipientKey.generate()
    with pytest.raises(UpdateRejected, match="outside the adapter allowlist"):
        seal_tensors(
            {**UPDATE, "embeddings.word_embeddings.weight": np.zeros(4, np.float32)},
            aggregator.public_key(),
            CONTEXT,
            allowed=frozenset(UPDATE),
        )


def test_tampered_envelope_is_rejected() -> None:
    aggregator = RecipientKey.generate()
    sealed = bytearray(seal_tensors(UPDATE, aggregator.public_key(), CONTEXT))
    sealed[-3] ^= 1
    with pytest.raises(UpdateRejected):
        open_tensors(bytes(sealed), aggregator.private_key, CONTEXT)


# --- the aggregator's evidence, appraised by a node (passport model) ---------------------


@dataclasses.dataclass
class Aggregator:
    attester: StubAttester
    key: RecipientKey


@pytest.fixture(scope="module")
def maker() -> DevManufacturer:
    return DevManufacturer.create(now=NOW)


@pytest.fixture
def aggregator(maker: DevManufacturer) -> Aggregator:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = maker.certify(key.public_key(), "aggregator-1", now=NOW)
    return Aggregator(
        StubAttester(key=key, chain=[cert], ueid="aggregator-1"), RecipientKey.generate()
    )


def _node_policy(code: str) -> AppraisalPolicy:
    return AppraisalPolicy(
        policy_id="node-policy/1",
        accepted_tees=frozenset({"stub"}),
        allow_stub=True,
        reference_values={"code": frozenset({code})},
        allowed_nodes=frozenset({"aggregator-1"}),
    )


def _appraise(maker: DevManufacturer, token: str, nonce: bytes, key: bytes, code: str) -> object:
    registry = VerifierRegistry({"stub": Verifier({"stub": [maker.certificate]})})
    return registry.appraise(
        "stub", token, nonce=nonce, tee_pubkey=key, policy=_node_policy(code), now=NOW
    )


def test_node_accepts_an_approved_aggregator_over_its_own_nonce(
    maker: DevManufacturer, aggregator: Aggregator
) -> None:
    code = code_measurement(AGGREGATOR_PACKAGES)
    nonce = bytes(range(32))
    token = aggregator.attester.evidence(
        nonce=nonce, tee_pubkey=aggregator.key.public_bytes, measurements={"code": code}, now=NOW
    )
    _appraise(maker, token, nonce, aggregator.key.public_bytes, code)


def test_aggregator_with_unapproved_code_is_refused(
    maker: DevManufacturer, aggregator: Aggregator
) -> None:
    nonce = bytes(range(32))
    # The node-side code is a different measurement from the ServerApp's.
    wrong = code_measurement(NODE_PACKAGES)
    token = aggregator.attester.evidence(
        nonce=nonce, tee_pubkey=aggregator.key.public_bytes, measurements={"code": wrong}, now=NOW
    )
    with pytest.raises(MeasurementRejected):
        _appraise(
            maker, token, nonce, aggregator.key.public_bytes, code_measurement(AGGREGATOR_PACKAGES)
        )


def test_aggregator_evidence_over_a_stale_nonce_is_refused(
    maker: DevManufacturer, aggregator: Aggregator
) -> None:
    code = code_measurement(AGGREGATOR_PACKAGES)
    stale, fresh = bytes(32), bytes(range(32))
    token = aggregator.attester.evidence(
        nonce=stale, tee_pubkey=aggregator.key.public_bytes, measurements={"code": code}, now=NOW
    )
    with pytest.raises(NonceMismatch):
        _appraise(maker, token, fresh, aggregator.key.public_bytes, code)
