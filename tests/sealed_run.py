"""A node's short sealed run, driven in-process as the ServerApp drives one, so the node
keeps its run's adapters: what the inference tests (tests/test_inference.py) and the
inference bench (bench/inference.py) both start from.

Real components: the key broker over TLS on loopback, the node sandbox's attestation
and key release, and the aggregator sandbox (``server/sandbox.py``) sealing each
instruction to the node's attested channel.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from clients.channels import RunIds
from clients.model import load_node_model, plaintext_files
from clients.sandbox import EvaluateResult, NodeSandbox, Request, TrainResult
from sandbox.channel import STAGE_EVALUATE, STAGE_TRAIN, manifest_digest
from sandbox.config import RunSpec
from sandbox.events import JsonlEventSink
from sandbox.keyfiles import load_ed25519_public
from sandbox.lora import Adapter, adapter_state
from sandbox.ops.keybroker.service import serve as serve_broker
from sandbox.ops.provision import LoopbackDeployment, build_broker
from sandbox.seal.package import read_manifest
from server.sandbox import AggregatorSandbox


@contextlib.contextmanager
def key_broker(deployment: LoopbackDeployment) -> Iterator[None]:
    """The deployment's key broker, served over TLS on its loopback address, for the
    block's duration."""
    ws = deployment.provider
    port = deployment.key_broker.rsplit(":", 1)[1]
    broker, _ = serve_broker(
        build_broker(ws, JsonlEventSink(ws.events)),
        address=f"127.0.0.1:{port}",
        cert=ws.tls / "server.crt",
        key=ws.tls / "server.key",
    )
    try:
        yield
    finally:
        broker.stop(grace=None)


@dataclass(frozen=True)
class SealedExchange:
    """What a node's sandbox answered in a driven run: round 1's training, the final
    evaluation, and the final global adapter it was sent."""

    train: TrainResult
    evaluate: EvaluateResult
    final: Adapter


def drive_sealed_exchange(
    sandbox: NodeSandbox, deployment: LoopbackDeployment, spec: RunSpec, run_id: int
) -> SealedExchange:
    """One sealed run as the ServerApp drives it: hello, round 1 train, final evaluation,
    with the real aggregator sandbox sealing each instruction to the node's channel."""
    node = sandbox.node
    sandbox_cfg = node.require_sandbox()
    manifest = read_manifest(sandbox_cfg.package, load_ed25519_public(sandbox_cfg.manifest_key))
    aggregator = AggregatorSandbox.load(
        deployment.provider.aggregator, run_id=run_id, model_digest=manifest_digest(manifest)
    )
    # The run's initial adapter, as the ServerApp makes it from the plaintext model, before
    # the hello: the hello has the sandbox build its model in a thread of this process,
    # and transformers' lazy imports are not safe from two threads at once.
    initial = adapter_state(load_node_model(spec, plaintext_files(spec).build(spec)).model)
    ids = RunIds(run_id=run_id, node_id=3)
    hello = sandbox.hello(ids, 1, spec)
    peer = aggregator.admit(ids.node_id, hello.record)
    train = Request(
        ids, 1, STAGE_TRAIN, spec, aggregator.instruction(peer, 1, initial, STAGE_TRAIN)
    )
    trained = sandbox.train(train)
    # A final adapter visibly unlike the initial one (B is zero at the start).
    final = {name: a + np.float32(0.5) for name, a in initial.items()}
    evaluate = aggregator.instruction(peer, 1, final, STAGE_EVALUATE)
    evaluated = sandbox.evaluate(Request(ids, 1, STAGE_EVALUATE, spec, evaluate))
    return SealedExchange(trained, evaluated, final)


def drive_sealed_run(
    sandbox: NodeSandbox, deployment: LoopbackDeployment, spec: RunSpec, run_id: int
) -> Adapter:
    """:func:`drive_sealed_exchange`; the node keeps the run's baseline and final
    adapters, and the final one is returned."""
    return drive_sealed_exchange(sandbox, deployment, spec, run_id).final
