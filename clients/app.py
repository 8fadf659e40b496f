"""The enterprise node's ClientApp: shake hands, check the aggregator, train LoRA, reply.

A sealed run (the default) goes: a hello (``query``) that certifies this run's channel
key; then per instruction the aggregator's evidence is appraised against the node's
own policy, the global adapter is opened from its envelope, and the reply carries
only the update sealed to the attested aggregator key plus allowlisted scalar
metrics. How an instruction is accepted and an update replied is the run's update
channel (``clients/channels.py``), chosen once from the run's protection and the node's
config. The egress guard (``clients/egress.py``) checks every reply on its way out.
Private text never leaves this process.
"""

from __future__ import annotations

import time
from pathlib import Path

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients.channels import Accepted, journal, update_channel
from clients.data import Split, load_examples, split_examples
from clients.egress import egress_guard
from clients.model import NodeModel, load_node_model
from sandbox import events
from sandbox.config import NodeConfig, RunSpec
from sandbox.errors import ConfigError
from sandbox.protocol import (
    HELLO_KEY,
    METRICS_KEY,
    NODE_CONFIG_KEY,
    NUM_EXAMPLES,
    SEALED_UPDATE_KEY,
    metric_record,
    round_of,
    sealed_digest,
)

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
) -> tuple[RunSpec, NodeConfig, Accepted, Split, NodeModel]:
    """Accept the instruction over the run's channel (before any private data is read),
    then load the node's data and model with the instruction's global adapter."""
    spec = RunSpec.from_run_config(context.run_config)
    node = node_config(context)
    channel = update_channel(spec, node)
    accepted = channel.accept(msg, context, round_of(msg.content))
    if node.threads:
        import torch

        torch.set_num_threads(node.threads)
    split = load_split(spec, node)
    from sandbox.lora import load_adapter_state

    loaded = load_node_model(spec, channel.base_model(spec))
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


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}-{name}": value for name, value in metrics.items()}


@app.query()
def hello(msg: Message, context: Context) -> Message:
    """Answer the aggregator's handshake over the run's channel."""
    spec = RunSpec.from_run_config(context.run_config)
    node = node_config(context)
    answer = update_channel(spec, node).hello(context)
    journal(node, context, events.Hello, round=round_of(msg.content), suite=answer.suite)
    return Message(RecordDict({HELLO_KEY: answer.record}), reply_to=msg)


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
            **accepted.reply(update, metrics[NUM_EXAMPLES]),
            METRICS_KEY: metric_record(metrics),
        }
    )
    journal(
        node,
        context,
        events.Train,
        round=server_round,
        **accepted.attested(loaded),
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
    journal(
        node,
        context,
        events.Evaluate,
        round=server_round,
        **accepted.attested(loaded),
        received_sha256=sealed_digest(msg.content),
        metrics=metrics,
        timings=_timings(started),
    )
    return Message(RecordDict({METRICS_KEY: metric_record(metrics)}), reply_to=msg)
