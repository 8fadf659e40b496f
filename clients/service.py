"""The node sandbox process: :class:`~clients.sandbox.NodeSandbox` served on a Unix socket.

``ark node sandbox --config node.toml`` runs :func:`serve` in the foreground until it
is stopped (SIGTERM or Ctrl-C). The socket is gRPC with gRPC's local UDS credentials,
in a folder only the node's user may enter (0700) and itself 0600, so no other local
user can connect. It attests and unseals before it listens: a ClientApp that finds the
socket finds a sandbox ready to serve.

Every request is hostile input: the run config is parsed as a :class:`RunSpec`, the
records are rebuilt from typed fields only, and whatever fails leaves as a gRPC status
whose details are one fixed code from ``sandbox/reasons.py``. The detail stays in this
process's log and the node's journal.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Callable
from concurrent import futures
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
from flwr.app import ConfigRecord, RecordDict
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.message import DecodeError

from clients.channels import RunIds
from clients.egress import failure_reason
from clients.inference_api import InferenceServer
from clients.sandbox import NodeSandbox, Request
from clients.shuttle import (
    CHANNEL_OPTIONS,
    hello_reply,
    tensors_record,
    unix_target,
)
from protos.ark.v1 import nodesandbox_pb2 as pb
from protos.ark.v1 import nodesandbox_pb2_grpc as pb_grpc
from sandbox.channel import STAGE_EVALUATE, STAGE_TRAIN, adapter_bytes
from sandbox.config import NodeConfig, RunSpec
from sandbox.errors import ConfigError, ProtocolError
from sandbox.events import ClientappFailed
from sandbox.journal import append_journal
from sandbox.localsocket import owner_only, prepare_socket
from sandbox.protocol import (
    AGGREGATOR_EVIDENCE,
    AGGREGATOR_KEY,
    AGGREGATOR_PUBLIC_KEY,
    AGGREGATOR_SUITE,
    AGGREGATOR_TEE,
    CONFIG_KEY,
    GLOBAL_KEY,
    SEALED_GLOBAL_KEY,
    SEALED_KEY,
    SEALED_UPDATE_KEY,
    UPDATE_KEY,
    from_record,
    round_config,
)

log = logging.getLogger("ark.sandbox")
# The run config a request may carry, as JSON: far more than any real one.
MAX_RUN_CONFIG_BYTES = 64 * 1024
WORKERS = 4
SOCKET_KEY = "node.sandbox-socket"
SERVICE = pb.DESCRIPTOR.services_by_name["NodeSandbox"]
T = TypeVar("T")


def parse_run_config(text: str) -> RunSpec:
    """The request's run config (hostile): a bounded JSON object of scalars, as a RunSpec."""
    if len(text.encode("utf-8")) > MAX_RUN_CONFIG_BYTES:
        raise ProtocolError(f"run config is larger than {MAX_RUN_CONFIG_BYTES} bytes")
    try:
        values = json.loads(text)
    except ValueError as exc:
        raise ProtocolError(f"run config is not JSON: {exc}") from None
    if not isinstance(values, dict) or not all(
        isinstance(v, str | int | float | bool) for v in values.values()
    ):
        raise ProtocolError("run config must be a JSON object of scalars")
    return RunSpec.from_run_config(values)


def _ids(run: pb.RunContext) -> RunIds:
    return RunIds(run_id=run.run_id, node_id=run.node_id)


def to_request(msg: pb.Instruction, stage: str) -> Request:
    """The instruction's records, rebuilt from the request's typed fields only."""
    content = RecordDict({CONFIG_KEY: round_config(msg.round)})
    if msg.HasField("aggregator"):
        evidence = msg.aggregator
        content[AGGREGATOR_KEY] = ConfigRecord(
            {
                AGGREGATOR_TEE: evidence.tee,
                AGGREGATOR_EVIDENCE: evidence.evidence,
                AGGREGATOR_PUBLIC_KEY: evidence.key,
                AGGREGATOR_SUITE: evidence.suite,
            }
        )
    if msg.sealed_global:
        content[SEALED_KEY] = ConfigRecord({SEALED_GLOBAL_KEY: msg.sealed_global})
    if msg.plain_global:
        try:
            content[GLOBAL_KEY] = tensors_record(msg.plain_global)
        except Exception as exc:  # safetensors raises its own error types
            raise ProtocolError(f"plain_global is not safetensors: {exc}") from None
    return Request(
        ids=_ids(msg.run),
        round=msg.round,
        stage=stage,
        spec=parse_run_config(msg.run.run_config_json),
        content=content,
        clientapp_started=msg.clientapp_started,
    )


class NodeSandboxService(pb_grpc.NodeSandboxServicer):
    """The gRPC face of one :class:`NodeSandbox`."""

    def __init__(self, sandbox: NodeSandbox, inference_url: Callable[[], str] = str):
        self.sandbox = sandbox
        self._inference_url = inference_url

    def _serve(self, context: grpc.ServicerContext, run: pb.RunContext, call: Callable[[], T]) -> T:
        """Run ``call``; a failure leaves as its fixed code, its detail stays here."""
        try:
            return call()
        except Exception as exc:
            self.refuse(context, run, exc)

    def refuse(self, context: grpc.ServicerContext, run: pb.RunContext, exc: Exception) -> NoReturn:
        """End the call with ``exc``'s fixed code as the status's only text; the detail
        goes to this process's log and the node's journal."""
        reason = failure_reason(exc)
        detail = f"{type(exc).__name__}: {exc}"
        log.error("request failed (%s): %s", reason.label, detail)
        ids = _ids(run)
        append_journal(
            self.sandbox.node,
            ClientappFailed(
                run_id=ids.run_id, node_id=ids.node_id, code=reason.label, reason=detail
            ),
        )
        status = (
            grpc.StatusCode.INVALID_ARGUMENT
            if isinstance(exc, ProtocolError | ConfigError)
            else grpc.StatusCode.FAILED_PRECONDITION
        )
        context.abort(status, reason.label)
        raise AssertionError("unreachable: abort raises") from None

    def Hello(self, request: pb.HelloRequest, context: grpc.ServicerContext) -> pb.HelloReply:
        def call() -> pb.HelloReply:
            spec = parse_run_config(request.run.run_config_json)
            return hello_reply(self.sandbox.hello(_ids(request.run), request.round, spec).record)

        return self._serve(context, request.run, call)

    def Train(self, request: pb.Instruction, context: grpc.ServicerContext) -> pb.TrainReply:
        def call() -> pb.TrainReply:
            result = self.sandbox.train(to_request(request, STAGE_TRAIN))
            reply = pb.TrainReply(
                metrics=result.metrics, commitment=result.commitment, secagg=result.secagg
            )
            sealed = result.records.get(SEALED_KEY)
            if isinstance(sealed, ConfigRecord):
                reply.sealed_update = bytes(sealed[SEALED_UPDATE_KEY])  # type: ignore[arg-type]
            update = result.records.get(UPDATE_KEY)
            if update is not None and not isinstance(update, ConfigRecord):
                reply.plain_update = adapter_bytes(from_record(update))
            return reply

        return self._serve(context, request.run, call)

    def Evaluate(self, request: pb.Instruction, context: grpc.ServicerContext) -> pb.EvaluateReply:
        def call() -> pb.EvaluateReply:
            result = self.sandbox.evaluate(to_request(request, STAGE_EVALUATE))
            return pb.EvaluateReply(metrics=result.metrics, scorecard=result.scorecard)

        return self._serve(context, request.run, call)

    def SecAgg(self, request: pb.SecAggRequest, context: grpc.ServicerContext) -> pb.SecAggReply:
        def call() -> pb.SecAggReply:
            result = self.sandbox.secagg(
                _ids(request.run), request.round, request.stage, request.payload
            )
            reply = pb.SecAggReply(payload=result.payload, metrics=result.metrics)
            sealed = result.records.get(SEALED_KEY)
            if isinstance(sealed, ConfigRecord):
                reply.sealed_update = bytes(sealed[SEALED_UPDATE_KEY])  # type: ignore[arg-type]
            return reply

        return self._serve(context, request.run, call)

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusReply:
        result = self.sandbox.attestation
        channels = dict(self.sandbox.channels)
        reply = pb.StatusReply(
            runs=sorted(channels),
            channels=[
                pb.ChannelInfo(run_id=run, node_key=c.key.public_bytes, nonce=c.nonce)
                for run, c in sorted(channels.items())
            ],
            adapters=self.sandbox.stored_runs(),
            inference_url=self._inference_url(),
            pid=os.getpid(),
        )
        if result is not None:
            reply.attested = True
            reply.result_sha256 = result.digest
            reply.expires_at = int(result.expires_at.timestamp())
            reply.stub = result.is_stub
        return reply


def _parsing(
    service: NodeSandboxService, method: MethodDescriptor
) -> grpc.RpcMethodHandler[bytes, Any]:
    """``method`` of ``service``, taking its request as raw bytes and parsing it itself:
    a request that does not parse is refused like any other bad input (a fixed code,
    journaled), not with gRPC's own INTERNAL error, which nothing on the node records."""
    kind = getattr(pb, method.input_type.name)
    call = getattr(service, method.name)

    def handle(raw: bytes, context: grpc.ServicerContext) -> Any:
        try:
            request = kind.FromString(raw)
        except DecodeError as exc:
            error = ProtocolError(f"a {method.name} request that is not a {kind.__name__}: {exc}")
            service.refuse(context, pb.RunContext(), error)
        return call(request, context)

    return grpc.unary_unary_rpc_method_handler(
        handle, response_serializer=lambda reply: reply.SerializeToString()
    )


def method_handlers(service: NodeSandboxService) -> dict[str, grpc.RpcMethodHandler[bytes, Any]]:
    """The API's calls (exactly those the proto declares) by name, each parsing its own
    request: what the socket serves, and what a simulated node calls in-process."""
    return {method.name: _parsing(service, method) for method in SERVICE.methods}


def add_service(service: NodeSandboxService, server: grpc.Server) -> None:
    """Serve the API's calls on ``server``."""
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, method_handlers(service)),)
    )


def serve(
    node: NodeConfig,
    stop: threading.Event,
    *,
    sandbox: NodeSandbox | None = None,
    on_ready: Callable[[Path], Any] | None = None,
    broker_wait: float = 0.0,
) -> None:
    """Attest, unseal (waiting up to ``broker_wait`` seconds for an unreachable key
    broker), then serve ``node``'s sandbox API (and its local inference API,
    ``clients/inference_api.py``) until ``stop`` is set."""
    path = node.socket_path()
    prepare_socket(path, SOCKET_KEY)
    sandbox = sandbox or NodeSandbox(node)
    sandbox.start(broker_wait=broker_wait, sleep=stop.wait)
    api = InferenceServer(sandbox)
    if node.source is not None:  # the API's token and address live in the workspace
        api.start()
    try:
        serve_grpc(node, path, sandbox, stop, on_ready, lambda: api.url)
    finally:
        api.stop()


def serve_grpc(
    node: NodeConfig,
    path: Path,
    sandbox: NodeSandbox,
    stop: threading.Event,
    on_ready: Callable[[Path], Any] | None,
    inference_url: Callable[[], str],
) -> None:
    """Serve ``sandbox`` on the Unix socket ``path`` until ``stop`` is set."""
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="ark-sandbox"),
        options=CHANNEL_OPTIONS,
    )
    add_service(NodeSandboxService(sandbox, inference_url), server)
    with owner_only():
        bound = server.add_secure_port(
            unix_target(path), grpc.local_server_credentials(grpc.LocalConnectionType.UDS)
        )
    if not bound:
        raise ConfigError(f"cannot listen on {path}", key=SOCKET_KEY)
    path.chmod(0o600)
    server.start()
    log.info("node sandbox of %s serving on %s (pid %d)", node.name, path, os.getpid())
    if on_ready is not None:
        on_ready(path)
    try:
        stop.wait()
    finally:
        server.stop(grace=5).wait()
        path.unlink(missing_ok=True)
        log.info("node sandbox of %s stopped", node.name)
