"""The enterprise node's ClientApp: shake hands, check the aggregator, train LoRA, reply.

A sealed run (the default) goes: a hello (``query``) that certifies this run's channel
key; then per instruction the aggregator's evidence is appraised against the node's
own policy, the global adapter is opened from its envelope, and the reply carries
only the update sealed to the attested aggregator key plus allowlisted scalar
metrics. The egress guard (``clients/egress.py``) checks every reply on its way out.
Private text never leaves this process.
"""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp

from clients.channel import (
    NodeChannel,
    VerifiedAggregator,
    channel_path,
    check_aggregator,
    open_channel,
    open_global,
    seal_update,
)
from clients.data import Split, load_examples, split_examples
from clients.egress import egress_guard
from clients.model import NodeModel, certify_channel, load_node_model
from sandbox import events
from sandbox.channel import (
    DOWNLINK,
    STAGE_EVALUATE,
    STAGE_TRAIN,
    UPLINK,
    ChannelContext,
    manifest_digest,
)
from sandbox.config import PROTECTION_OFF, NodeConfig, RunSpec
from sandbox.errors import AggregatorRefused, ConfigError
from sandbox.events import Key
from sandbox.journal import append_journal
from sandbox.keyfiles import load_ed25519_public
from sandbox.protocol import (
    GLOBAL_KEY,
    HELLO_KEY,
    METRICS_KEY,
    NODE_CONFIG_KEY,
    NUM_EXAMPLES,
    SEALED_KEY,
    SEALED_UPDATE_KEY,
    UPDATE_KEY,
    from_record,
    metric_record,
    round_of,
    sealed_digest,
    to_record,
)
from sandbox.seal.envelope import RecipientKey
from sandbox.seal.package import read_manifest

app = ClientApp(mods=[egress_guard])
# torch, transformers and peft are imported inside the train and evaluate handlers only:
# Flower starts a process per message, and the hello's process does not need them.


def node_config(context: Context) -> NodeConfig:
    """The operator's node config, named by the SuperNode's ``--node-config``."""
    path = context.node_config.get(NODE_CONFIG_KEY)
    if not isinstance(path, str) or not path:
        raise ConfigError(
            "the SuperNode was started without --node-config 'node-config=\"PATH\"'",
            key=NODE_CONFIG_KEY,
        )
    return NodeConfig.load(Path(path))


def _protection(spec: RunSpec, node: NodeConfig) -> None:
    """A node runs unprotected only when both its operator and the run say so."""
    if node.unprotected != (spec.protection == PROTECTION_OFF):
        raise ConfigError(
            f"the run asks for protection={spec.protection!r} but this node is "
            + ("unprotected" if node.unprotected else "sealed-only"),
            path=node.source,
            key="node.unprotected",
        )


@dataclass
class Instruction:
    """An instruction this node accepted: the round, and (sealed runs) its channel."""

    round: int
    stage: str
    adapter: dict[str, np.ndarray]
    channel: NodeChannel | None = None
    aggregator: VerifiedAggregator | None = None
    model_digest: str = ""
    ticket: str = ""

    def context(self, context: Context, direction: str) -> ChannelContext:
        return ChannelContext(
            str(context.run_id),
            self.round,
            str(context.node_id),
            self.model_digest,
            direction,
            self.stage,
        )


def _accept(msg: Message, context: Context, spec: RunSpec, node: NodeConfig) -> Instruction:
    """Verify the aggregator and open the global adapter, before any private data is read."""
    rnd = round_of(msg.content)
    stage = STAGE_TRAIN if msg.metadata.message_type == MessageType.TRAIN else STAGE_EVALUATE
    if node.unprotected:
        return Instruction(rnd, stage, from_record(msg.content.array_records[GLOBAL_KEY]))
    sandbox = node.require_sandbox()
    channel = NodeChannel.load(channel_path(node, context.run_id), context.run_id)
    try:
        aggregator = check_aggregator(node, channel, msg.content, now=dt.datetime.now(dt.UTC))
    except AggregatorRefused as exc:
        _journal(node, context, events.AggregatorRefused, round=rnd, reason=str(exc))
        raise
    manifest = read_manifest(sandbox.package, load_ed25519_public(sandbox.manifest_key))
    accepted = Instruction(rnd, stage, {}, channel, aggregator, manifest_digest(manifest))
    accepted.adapter, accepted.ticket = open_global(
        channel, msg.content, accepted.context(context, DOWNLINK)
    )
    return accepted


def load_split(spec: RunSpec, node: NodeConfig) -> Split:
    """The node's private data, checked against the run's task and labels, split locally.

    A row whose label the run does not list fails as a :class:`~sandbox.errors.DataError`
    that names the file, row and label for the node's own log. The egress guard sends
    the provider only the fixed ``clientapp-failed`` code for it, the same code as for any
    other failure (a missing or empty label included): a code of its own would tell the
    provider that the node holds a label outside the list it sent.
    """
    examples = load_examples(
        node.data_path, spec.task, labels=spec.labels or None, max_row_bytes=node.max_row_bytes
    )
    return split_examples(
        examples,
        heldout_fraction=node.heldout_fraction,
        seed=node.split_seed,
        source=node.data_path,
    )


def _setup(
    msg: Message, context: Context
) -> tuple[RunSpec, NodeConfig, Instruction, Split, NodeModel]:
    spec = RunSpec.from_run_config(context.run_config)
    node = node_config(context)
    _protection(spec, node)
    accepted = _accept(msg, context, spec, node)
    if node.threads:
        import torch

        torch.set_num_threads(node.threads)
    split = load_split(spec, node)
    from sandbox.lora import load_adapter_state

    loaded = load_node_model(spec, node)
    load_adapter_state(loaded.model, accepted.adapter)
    return spec, node, accepted, split, loaded


def _timings(started: float) -> dict[str, float]:
    """Seconds from process start (Flower starts one ClientApp process per message)."""
    import psutil

    return {
        "process_start": psutil.Process().create_time(),
        "handler_start": started,
        "handler_end": time.time(),
    }


def _journal(node: NodeConfig, context: Context, kind: type[events.InRun], **fields: Any) -> None:
    """Append what this node sent to its own journal (the auditor cross-checks it later)."""
    append_journal(node, kind(run_id=context.run_id, node_id=context.node_id, **fields))


def _attested(loaded: NodeModel, accepted: Instruction) -> dict[Key, Any]:
    """What the journal keeps of this message's key release and aggregator check."""
    result = loaded.attestation
    if result is None or accepted.aggregator is None:
        return {Key.ATTESTATION: None, Key.AGGREGATOR: None}
    appraisal = accepted.aggregator.appraisal
    return {
        Key.ATTESTATION: events.KeyAttestation(
            ear_sha256=result.digest,
            status=result.status,
            session=result.session_id,
            stub=result.is_stub,
        ),
        Key.AGGREGATOR: events.AggregatorSeen(
            ueid=appraisal.claims.get("ueid"), stub=appraisal.is_stub
        ),
    }


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}-{name}": value for name, value in metrics.items()}


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Start this run's channel: a nonce and a channel key the key broker certifies."""
    spec = RunSpec.from_run_config(context.run_config)
    node = node_config(context)
    _protection(spec, node)
    sandbox = node.require_sandbox()
    manifest = read_manifest(sandbox.package, load_ed25519_public(sandbox.manifest_key))

    def certify(key: RecipientKey) -> str:
        return certify_channel(node, manifest["key_id"], key)

    channel, record = open_channel(node, context.run_id, certify)
    _journal(node, context, events.Hello, round=round_of(msg.content), suite=channel.key.suite)
    return Message(RecordDict({HELLO_KEY: record}), reply_to=msg)


def _reply_update(
    update: dict[str, np.ndarray], examples: float, accepted: Instruction, context: Context
) -> dict[str, Any]:
    """The update as it leaves: sealed to the verified aggregator, or (unprotected) raw."""
    if accepted.aggregator is None:
        return {UPDATE_KEY: to_record(update)}
    record = seal_update(
        update,
        accepted.aggregator,
        accepted.context(context, UPLINK),
        allowed=frozenset(accepted.adapter),
        ticket=accepted.ticket,
        examples=examples,
    )
    return {SEALED_KEY: record}


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Evaluate the incoming global adapter, train locally, evaluate again, reply."""
    from clients.training import evaluate, train_local
    from sandbox.lora import adapter_state, is_trained

    started = time.time()
    spec, node, accepted, split, loaded = _setup(msg, context)
    server_round = accepted.round
    before = evaluate(loaded.model, loaded.tokenizer, split.heldout, spec)
    loss = train_local(
        loaded.model, loaded.tokenizer, split.train, spec, seed=spec.seed * 1000 + server_round
    )
    after = evaluate(loaded.model, loaded.tokenizer, split.heldout, spec)
    update = {
        name: value
        for name, value in adapter_state(loaded.model).items()
        if is_trained(name, spec.mode)
    }
    metrics: dict[str, float] = {
        NUM_EXAMPLES: float(len(split.train)),
        "heldout-examples": float(len(split.heldout)),
        "train-loss": loss,
        **_prefixed("before", before),
        **_prefixed("after", after),
    }
    content = RecordDict(
        {
            **_reply_update(update, metrics[NUM_EXAMPLES], accepted, context),
            METRICS_KEY: metric_record(metrics),
        }
    )
    _journal(
        node,
        context,
        events.Train,
        round=server_round,
        **_attested(loaded, accepted),
        received_sha256=sealed_digest(msg.content),
        sent_sha256=sealed_digest(content, SEALED_UPDATE_KEY),
        metrics=metrics,
        tensors=sorted(update),
        timings=_timings(started),
    )
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the final global adapter on the local held-out split."""
    from clients.training import evaluate

    started = time.time()
    spec, node, accepted, split, loaded = _setup(msg, context)
    server_round = accepted.round
    result = evaluate(loaded.model, loaded.tokenizer, split.heldout, spec)
    metrics = {NUM_EXAMPLES: float(len(split.heldout)), **_prefixed("before", result)}
    _journal(
        node,
        context,
        events.Evaluate,
        round=server_round,
        **_attested(loaded, accepted),
        received_sha256=sealed_digest(msg.content),
        metrics=metrics,
        timings=_timings(started),
    )
    return Message(RecordDict({METRICS_KEY: metric_record(metrics)}), reply_to=msg)
