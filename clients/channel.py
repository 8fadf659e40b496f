"""The node's end of the encrypted update channel: handshake, aggregator check, envelopes.

Before its first instruction in a run, a node answers a hello. It picks a nonce and a
channel key pair, has the key broker certify that key (the attestation result binds
it), keeps both only in the node sandbox's memory for the run, and replies with the nonce, the
public key and the result. Every later instruction must carry the aggregator's
evidence over that nonce, binding the key the node will seal its update to. The node
appraises that evidence against its own policy (``clients/aggregator.py``) before it
opens the global adapter, trains, or seals anything; if it cannot, it refuses.
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
from flwr.app import ConfigRecord, RecordDict

from clients.aggregator import verify_aggregator
from sandbox.attestation.verifier import Appraisal
from sandbox.channel import EXAMPLES, TICKET, ChannelContext, open_sealed, seal_tensors
from sandbox.config import NodeConfig
from sandbox.errors import (
    AggregatorRefused,
    AttestationError,
    EnvelopeError,
    ProtocolError,
    UpdateRejected,
)
from sandbox.protocol import (
    AGGREGATOR_EVIDENCE,
    AGGREGATOR_KEY,
    AGGREGATOR_PUBLIC_KEY,
    AGGREGATOR_SUITE,
    AGGREGATOR_TEE,
    HELLO_NODE_KEY,
    HELLO_NONCE,
    HELLO_RESULT,
    SEALED_GLOBAL_KEY,
    SEALED_KEY,
    SEALED_UPDATE_KEY,
)
from sandbox.seal.envelope import RecipientKey, load_public_key

NONCE_BYTES = 32


@dataclass(frozen=True)
class NodeChannel:
    """One run's channel state on a node: its key pair and the nonce it chose."""

    run_id: int
    key: RecipientKey
    nonce: bytes

    @classmethod
    def create(cls, run_id: int, suite: str) -> NodeChannel:
        return cls(run_id, RecipientKey.generate(suite), os.urandom(NONCE_BYTES))


# A sandbox's open channels, by run: held only in the sandbox process's memory.
Channels = dict[int, NodeChannel]


def hello_record(channel: NodeChannel, result_token: str) -> ConfigRecord:
    """The hello reply: nonce, channel public key, and the result that certifies the key."""
    return ConfigRecord(
        {
            HELLO_NONCE: channel.nonce,
            HELLO_NODE_KEY: channel.key.public_bytes,
            HELLO_RESULT: result_token.encode("ascii"),
        }
    )


def open_channel(
    node: NodeConfig, run_id: int, certify: Callable[[RecipientKey], str], channels: Channels
) -> tuple[NodeChannel, ConfigRecord]:
    """Start this run's channel: a fresh key and nonce, certified by ``certify``, kept in
    ``channels`` (memory only), replacing any earlier handshake of the run."""
    sandbox = node.require_sandbox()
    channel = NodeChannel.create(run_id, sandbox.hpke_suite)
    token = certify(channel.key)
    channels[run_id] = channel
    return channel, hello_record(channel, token)


def channel_of(channels: Channels, run_id: int) -> NodeChannel:
    """This run's channel, or AggregatorRefused if the sandbox never shook hands in it
    (or was restarted since: its keys lived only in the old process's memory)."""
    channel = channels.get(run_id)
    if channel is None:
        raise AggregatorRefused(
            f"no handshake in run {run_id}: this sandbox holds no channel key for it"
        )
    return channel


@dataclass(frozen=True)
class VerifiedAggregator:
    """The aggregator as one instruction presented it, after this node appraised it."""

    public_key: Any
    suite: str
    appraisal: Appraisal


def _field(record: Mapping[str, Any], name: str, kind: type) -> Any:
    value = record.get(name)
    if not isinstance(value, kind):
        raise AggregatorRefused(f"aggregator record field {name!r} is missing or not {kind}")
    return value


def check_aggregator(
    node: NodeConfig, channel: NodeChannel, content: RecordDict, *, now: dt.datetime
) -> VerifiedAggregator:
    """Appraise the instruction's aggregator evidence; AggregatorRefused says why not."""
    record = content.config_records.get(AGGREGATOR_KEY)
    if record is None:
        raise AggregatorRefused("the instruction carries no aggregator evidence")
    suite = _field(record, AGGREGATOR_SUITE, str)
    if suite != channel.key.suite:
        raise AggregatorRefused(
            f"aggregator key suite {suite!r} != this node's {channel.key.suite!r}"
        )
    key = _field(record, AGGREGATOR_PUBLIC_KEY, bytes)
    try:
        appraisal = verify_aggregator(
            node,
            tee=_field(record, AGGREGATOR_TEE, str),
            evidence=_field(record, AGGREGATOR_EVIDENCE, str),
            aggregator_key=key,
            nonce=channel.nonce,
            now=now,
        )
        public_key = load_public_key(suite, key)
    except (AttestationError, EnvelopeError) as exc:
        raise AggregatorRefused(
            f"aggregator evidence failed this node's policy: {type(exc).__name__}: {exc}"
        ) from exc
    return VerifiedAggregator(public_key, suite, appraisal)


def open_global(
    channel: NodeChannel, content: RecordDict, context: ChannelContext
) -> tuple[dict[str, np.ndarray], str]:
    """The global adapter from the instruction's downlink envelope, and its ticket."""
    try:
        blob = content.config_records[SEALED_KEY][SEALED_GLOBAL_KEY]
    except KeyError:
        raise ProtocolError(f"instruction has no {SEALED_KEY}.{SEALED_GLOBAL_KEY}") from None
    if not isinstance(blob, bytes):
        raise ProtocolError(f"{SEALED_KEY}.{SEALED_GLOBAL_KEY} must be bytes")
    try:
        adapter, metadata = open_sealed(
            blob, channel.key.private_key, context, suite=channel.key.suite
        )
    except UpdateRejected as exc:
        raise AggregatorRefused(f"the global adapter did not open: {exc}") from exc
    ticket = metadata.get(TICKET)
    if not ticket:
        raise AggregatorRefused("the global adapter carries no ticket")
    return adapter, ticket


def seal_update(
    update: Mapping[str, np.ndarray],
    aggregator: VerifiedAggregator,
    context: ChannelContext,
    *,
    allowed: frozenset[str],
    ticket: str,
    examples: float,
) -> ConfigRecord:
    """The uplink record: only the allowlisted adapter tensors, sealed to the aggregator
    with the instruction's ticket and the example count the update is weighted by."""
    blob = seal_tensors(
        update,
        aggregator.public_key,
        context,
        allowed=allowed,
        suite=aggregator.suite,
        metadata={TICKET: ticket, EXAMPLES: repr(float(examples))},
    )
    return ConfigRecord({SEALED_UPDATE_KEY: blob})
