"""The enterprise node's ClientApp: evaluate the global adapter, train LoRA locally, reply.

A reply carries exactly three things: the trained adapter tensors, the number of
training examples, and scalar metrics. Private text never leaves this process.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp

from clients.data import Split, load_examples, split_examples
from clients.model import NodeModel, load_node_model
from clients.training import evaluate, train_local
from sandbox.config import NodeConfig, RunSpec
from sandbox.errors import ConfigError
from sandbox.lora import adapter_state, is_trained, load_adapter_state
from sandbox.protocol import (
    GLOBAL_KEY,
    METRICS_KEY,
    NODE_CONFIG_KEY,
    NUM_EXAMPLES,
    UPDATE_KEY,
    from_record,
    metric_record,
    round_of,
    to_record,
)

app = ClientApp()


def node_config(context: Context) -> NodeConfig:
    """The operator's node config, named by the SuperNode's ``--node-config``."""
    path = context.node_config.get(NODE_CONFIG_KEY)
    if not isinstance(path, str) or not path:
        raise ConfigError(
            "the SuperNode was started without --node-config 'node-config=\"PATH\"'",
            key=NODE_CONFIG_KEY,
        )
    return NodeConfig.load(Path(path))


def _setup(msg: Message, context: Context) -> tuple[RunSpec, NodeConfig, Split, NodeModel]:
    spec = RunSpec.from_run_config(context.run_config)
    node = node_config(context)
    if node.threads:
        import torch

        torch.set_num_threads(node.threads)
    examples = load_examples(
        node.data_path, spec.task, labels=spec.labels or None, max_row_bytes=node.max_row_bytes
    )
    split = split_examples(
        examples,
        heldout_fraction=node.heldout_fraction,
        seed=node.split_seed,
        source=node.data_path,
    )
    loaded = load_node_model(spec, node)
    load_adapter_state(loaded.model, from_record(msg.content.array_records[GLOBAL_KEY]))
    return spec, node, split, loaded


def _timings(started: float) -> dict[str, float]:
    """Seconds from process start (Flower starts one ClientApp process per message)."""
    import psutil

    return {
        "process_start": psutil.Process().create_time(),
        "handler_start": started,
        "handler_end": time.time(),
    }


def _journal(node: NodeConfig, context: Context, entry: dict[str, Any]) -> None:
    """Append what this node sent to its own journal (the auditor cross-checks it later)."""
    if node.journal_path is None:
        return
    node.journal_path.parent.mkdir(parents=True, exist_ok=True)
    line = {
        "time": time.time(),
        "run_id": context.run_id,
        "node_id": context.node_id,
        "node": node.name,
        **entry,
    }
    with node.journal_path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(line, sort_keys=True) + "\n")


def _attested(loaded: NodeModel) -> dict[str, Any]:
    """What the journal keeps of this message's key release: the result's digest and status."""
    result = loaded.attestation
    return {
        "attestation": {
            "ear_sha256": result.digest,
            "status": result.status,
            "session": result.session_id,
            "stub": result.is_stub,
        }
    }


def _prefixed(prefix: str, metrics: dict[str, float]) -> dict[str, float]:
    return {f"{prefix}-{name}": value for name, value in metrics.items()}


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Evaluate the incoming global adapter, train locally, evaluate again, reply."""
    started = time.time()
    spec, node, split, loaded = _setup(msg, context)
    server_round = round_of(msg.content)
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
    _journal(
        node,
        context,
        {
            "kind": "train",
            "round": server_round,
            **_attested(loaded),
            "metrics": metrics,
            "tensors": sorted(update),
            "timings": _timings(started),
        },
    )
    content = RecordDict({UPDATE_KEY: to_record(update), METRICS_KEY: metric_record(metrics)})
    return Message(content, reply_to=msg)


@app.evaluate()
def evaluate_global(msg: Message, context: Context) -> Message:
    """Evaluate the final global adapter on the local held-out split."""
    started = time.time()
    spec, node, split, loaded = _setup(msg, context)
    server_round = round_of(msg.content)
    result = evaluate(loaded.model, loaded.tokenizer, split.heldout, spec)
    metrics = {NUM_EXAMPLES: float(len(split.heldout)), **_prefixed("before", result)}
    _journal(
        node,
        context,
        {
            "kind": "evaluate",
            "round": server_round,
            **_attested(loaded),
            "metrics": metrics,
            "timings": _timings(started),
        },
    )
    return Message(RecordDict({METRICS_KEY: metric_record(metrics)}), reply_to=msg)
