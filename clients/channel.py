"""The node's end of the encrypted update channel: handshake, aggregator check, envelopes.

Before its first instruction in a run, a node answers a hello. It picks a nonce and a
channel key pair, has the key broker certify that key (the attestation result binds
it), keeps both 0600 in its workspace for the run, and replies with the nonce, the
public key and the result. Every later instruction must carry the aggregator's
evidence over that nonce, binding the key the node will seal its update to. The node
appraises that evidence against its own policy (``clients/aggregator.py``) before it
opens the global adapter, trains, or seals anything; if it cannot, it refuses.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
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
    ConfigError,
    EnvelopeError,
    ProtocolError,
    UpdateRejected,
)
from sandbox.keyfiles import write_private
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

CHANNEL_DIR = "channel"
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

    def save(self, path: Path) -> None:
        """Write (replacing any earlier handshake of this run) with mode 0600."""
        body = {
            "run_id": self.run_id,
            "suite": self.key.suite,
            "private_key": base64.b64encode(self.key.private_bytes()).decode(),
            "nonce": base64.b64encode(self.nonce).decode(),
        }
        # A unique temporary name: two overlapping hellos never clobber each other's file.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        write_private(tmp, json.dumps(body).encode())
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path, run_id: int) -> NodeChannel:
        """This run's channel, or AggregatorRefused if the node never shook hands in it."""
        try:
            body = json.loads(path.read_text(encoding="utf-8"))
            channel = cls(
                int(body["run_id"]),
                RecipientKey.from_private_bytes(
                    str(body["suite"]), base64.b64decode(body["private_key"], validate=True)
                ),
                base64.b64decode(body["nonce"], validate=True),
            )
        except FileNotFoundError:
            raise AggregatorRefused(
                f"no handshake in run {run_id}: this node has no channel key for it"
            ) from None
        except (OSError, ValueError, KeyError, TypeError, EnvelopeError) as exc:
            raise ConfigError(f"unreadable channel state: {exc}", path=path) from exc
        if channel.run_id != run_id or len(channel.nonce) != NONCE_BYTES:
            raise ConfigError(f"channel state is not for run {run_id}", path=path)
        return channel


def channel_path(node: NodeConfig, run_id: int) -> Path:
    """Where a run's channel state lives: ``channel/run-N.json`` in the node workspace."""
    if node.source is None:
        raise ConfigError("the node config was not loaded from a file; no workspace for state")
    return node.source.parent / CHANNEL_DIR / f"run-{run_id}.json"


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
    node: NodeConfig, run_id: int, certify: Callable[[RecipientKey], str]
) -> tuple[NodeChannel, ConfigRecord]:
    """Start this run's channel: a fresh key and nonce, certified by ``certify``, saved."""
    sandbox = node.require_sandbox()
    channel = NodeChannel.create(run_id, sandbox.hpke_suite)
    token = certify(channel.key)
    path = channel_path(node, run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    channel.save(path)
    return channel, hello_record(channel, token)


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
