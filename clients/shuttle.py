"""The ClientApp's end of the node sandbox's socket: instructions in, sealed replies out.

The ClientApp (``clients/app.py``) holds no key, opens no private file and imports no
torch. It turns a Flower instruction into the sandbox's typed request (the round, the
aggregator's evidence, the sealed global adapter, the run config as JSON) and the
sandbox's reply back into Flower records. A failure the sandbox reports arrives as its
fixed code only (:class:`~sandbox.errors.SandboxRefused`); a sandbox that cannot be
reached is :class:`~sandbox.errors.SandboxUnavailable`.

Which sandbox a message goes to is chosen once, from the ClientApp's context
(:func:`node_config`, :func:`node_sandbox`): the one whose socket the SuperNode's node
config names or, for a virtual node of Flower's simulation engine (a partition-id and no
node config), its sandbox in this process (``clients/simulated.py``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any, Protocol, TypeVar

import grpc
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.constant import PARTITION_ID_KEY
from safetensors.numpy import load as load_tensors

from protos.ark.v1 import nodesandbox_pb2 as pb
from protos.ark.v1 import nodesandbox_pb2_grpc as pb_grpc
from sandbox.channel import adapter_bytes
from sandbox.config import NodeConfig
from sandbox.errors import ConfigError, SandboxRefused, SandboxUnavailable
from sandbox.protocol import (
    AGGREGATOR_EVIDENCE,
    AGGREGATOR_KEY,
    AGGREGATOR_PUBLIC_KEY,
    AGGREGATOR_SUITE,
    AGGREGATOR_TEE,
    COMMITMENT_KEY,
    GLOBAL_KEY,
    HELLO_KEY,
    HELLO_NODE_KEY,
    HELLO_NONCE,
    HELLO_RESULT,
    METRICS_KEY,
    NODE_CONFIG_KEY,
    SCORECARD_KEY,
    SEALED_GLOBAL_KEY,
    SEALED_KEY,
    SEALED_UPDATE_KEY,
    SECAGG_KEY,
    SECAGG_PAYLOAD,
    SECAGG_STAGE,
    SIGNED_KEY,
    UPDATE_KEY,
    from_record,
    metric_record,
    round_of,
    secagg_record,
    to_record,
)
from sandbox.reasons import NodeReason

# The largest message either end accepts: a sealed adapter, with room to spare.
MAX_MESSAGE_BYTES = 256 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]
# How long a request may take: a training round on a large model takes a while.
REQUEST_TIMEOUT = 3600.0
STATUS_TIMEOUT = 10.0
# How long a request waits for a sandbox that is not serving (yet): one the operator is
# restarting answers it once it has attested and unsealed, instead of the node declining.
CONNECT_TIMEOUT = 60.0
# Retry connecting to the socket at least once a second while waiting.
CONNECT_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]
R = TypeVar("R")


def unix_target(path: Path) -> str:
    return f"unix:{path}"


def run_context(context: Context) -> pb.RunContext:
    """The run and node ids, and the run config as the provider sent it (as JSON)."""
    config = json.dumps(dict(context.run_config), sort_keys=True, allow_nan=True)
    return pb.RunContext(run_id=context.run_id, node_id=context.node_id, run_config_json=config)


def _typed(record: Mapping[str, Any], name: str, kind: type) -> Any:
    """The record's ``name`` if it is a ``kind``, else its empty value: the sandbox then
    refuses the instruction as missing that field."""
    value = record.get(name)
    return value if isinstance(value, kind) else kind()


def instruction(msg: Message, context: Context, started: float) -> pb.Instruction:
    """The sandbox's request for a Flower train or evaluate instruction."""
    content = msg.content
    request = pb.Instruction(
        run=run_context(context), round=round_of(content), clientapp_started=started
    )
    aggregator = content.config_records.get(AGGREGATOR_KEY)
    if aggregator is not None:
        request.aggregator.CopyFrom(
            pb.AggregatorEvidence(
                tee=_typed(aggregator, AGGREGATOR_TEE, str),
                evidence=_typed(aggregator, AGGREGATOR_EVIDENCE, str),
                key=_typed(aggregator, AGGREGATOR_PUBLIC_KEY, bytes),
                suite=_typed(aggregator, AGGREGATOR_SUITE, str),
            )
        )
    sealed = content.config_records.get(SEALED_KEY)
    if sealed is not None:
        request.sealed_global = _typed(sealed, SEALED_GLOBAL_KEY, bytes)
    arrays = content.array_records.get(GLOBAL_KEY)
    if arrays is not None:
        request.plain_global = adapter_bytes(from_record(arrays))
    return request


def tensors_record(blob: bytes) -> ArrayRecord:
    """Safetensors bytes as a Flower ArrayRecord."""
    return to_record(load_tensors(blob))


def hello_content(reply: pb.HelloReply) -> RecordDict:
    return RecordDict(
        {
            HELLO_KEY: ConfigRecord(
                {
                    HELLO_NONCE: reply.nonce,
                    HELLO_NODE_KEY: reply.node_key,
                    HELLO_RESULT: reply.result,
                }
            )
        }
    )


def hello_reply(record: ConfigRecord) -> pb.HelloReply:
    """The sandbox's hello record as its reply (what :func:`hello_content` turns back)."""
    return pb.HelloReply(
        nonce=bytes(record[HELLO_NONCE]),  # type: ignore[arg-type]
        node_key=bytes(record[HELLO_NODE_KEY]),  # type: ignore[arg-type]
        result=bytes(record[HELLO_RESULT]),  # type: ignore[arg-type]
    )


def train_content(reply: pb.TrainReply) -> RecordDict:
    """The train reply's records: the sealed update (or, unprotected, the arrays) and
    the metrics."""
    content = RecordDict({})
    if reply.sealed_update:
        content[SEALED_KEY] = ConfigRecord({SEALED_UPDATE_KEY: reply.sealed_update})
    if reply.plain_update:
        content[UPDATE_KEY] = tensors_record(reply.plain_update)
    content[METRICS_KEY] = metric_record(dict(reply.metrics))
    if reply.commitment:
        content[COMMITMENT_KEY] = ConfigRecord({SIGNED_KEY: reply.commitment})
    if reply.secagg:
        return RecordDict({SECAGG_KEY: secagg_record(reply.secagg)})
    return content


def secagg_request(msg: Message, context: Context, started: float) -> pb.SecAggRequest:
    """The sandbox's request for a secure-aggregation stage's query."""
    record = msg.content.config_records.get(SECAGG_KEY)
    return pb.SecAggRequest(
        run=run_context(context),
        round=round_of(msg.content),
        stage=_typed(record or {}, SECAGG_STAGE, str),
        payload=_typed(record or {}, SECAGG_PAYLOAD, bytes),
        clientapp_started=started,
    )


def secagg_content(reply: pb.SecAggReply) -> RecordDict:
    """A secure-aggregation stage's reply: the node's message, or the sealed masked input
    and its metrics."""
    content = RecordDict({})
    if reply.payload:
        content[SECAGG_KEY] = secagg_record(reply.payload)
    if reply.sealed_update:
        content[SEALED_KEY] = ConfigRecord({SEALED_UPDATE_KEY: reply.sealed_update})
    if reply.metrics:
        content[METRICS_KEY] = metric_record(dict(reply.metrics))
    return content


def evaluate_content(reply: pb.EvaluateReply) -> RecordDict:
    """The final evaluation's records: the metrics and, in a comparison, the scorecard."""
    content = RecordDict({METRICS_KEY: metric_record(dict(reply.metrics))})
    if reply.scorecard:
        content[SCORECARD_KEY] = ConfigRecord({SIGNED_KEY: reply.scorecard})
    return content


def refused(details: str) -> SandboxRefused:
    """The error for a call the sandbox refused: its fixed code only (a status text that
    is no code counts as ``clientapp-failed``)."""
    reason = NodeReason.from_label(details)
    if reason is NodeReason.UNRECOGNIZED:
        reason = NodeReason.CLIENTAPP_FAILED
    return SandboxRefused(f"the node sandbox refused: {reason.label}", reason=reason)


class SandboxApi(Protocol):
    """What the ClientApp asks of its node's sandbox, whichever way the calls travel: over
    the socket (:class:`SandboxClient`) or, in a simulation, within this process
    (``clients/simulated.py``). A refusal raises :class:`~sandbox.errors.SandboxRefused`."""

    def hello(self, run: pb.RunContext, rnd: int) -> pb.HelloReply: ...

    def train(self, request: pb.Instruction) -> pb.TrainReply: ...

    def evaluate(self, request: pb.Instruction) -> pb.EvaluateReply: ...

    def secagg(self, request: pb.SecAggRequest) -> pb.SecAggReply: ...

    def status(self, timeout: float = ...) -> pb.StatusReply: ...


class SandboxClient:
    """A connection to the node sandbox's socket (gRPC with local UDS credentials)."""

    def __init__(self, path: Path):
        self.path = path
        self._channel = grpc.secure_channel(
            unix_target(path),
            grpc.local_channel_credentials(grpc.LocalConnectionType.UDS),
            options=CHANNEL_OPTIONS + CONNECT_OPTIONS,
        )
        self._stub = pb_grpc.NodeSandboxStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def _call(self, method: Callable[..., R], request: Any, timeout: float) -> R:
        try:
            grpc.channel_ready_future(self._channel).result(timeout=min(timeout, CONNECT_TIMEOUT))
        except grpc.FutureTimeoutError:
            raise SandboxUnavailable(
                f"the node sandbox at {self.path} is not serving; is `ark node sandbox` running?"
            ) from None
        try:
            return method(request, timeout=timeout)
        except grpc.RpcError as exc:
            code = exc.code()
            if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                raise SandboxUnavailable(
                    f"the node sandbox at {self.path} did not answer ({code.name}); "
                    "is `ark node sandbox` running?"
                ) from None
            raise refused(str(exc.details())) from None

    def hello(self, run: pb.RunContext, rnd: int) -> pb.HelloReply:
        return self._call(self._stub.Hello, pb.HelloRequest(run=run, round=rnd), REQUEST_TIMEOUT)

    def train(self, request: pb.Instruction) -> pb.TrainReply:
        return self._call(self._stub.Train, request, REQUEST_TIMEOUT)

    def evaluate(self, request: pb.Instruction) -> pb.EvaluateReply:
        return self._call(self._stub.Evaluate, request, REQUEST_TIMEOUT)

    def secagg(self, request: pb.SecAggRequest) -> pb.SecAggReply:
        return self._call(self._stub.SecAgg, request, REQUEST_TIMEOUT)

    def status(self, timeout: float = STATUS_TIMEOUT) -> pb.StatusReply:
        return self._call(self._stub.Status, pb.StatusRequest(), timeout)


@contextmanager
def sandbox_client(node: NodeConfig) -> Iterator[SandboxClient]:
    """A client of ``node``'s sandbox socket, closed on exit."""
    client = SandboxClient(node.socket_path())
    try:
        yield client
    finally:
        client.close()


def is_simulated(context: Context) -> bool:
    """A virtual node of Flower's simulation engine: a partition-id and no node config."""
    config = context.node_config
    return PARTITION_ID_KEY in config and NODE_CONFIG_KEY not in config


def node_config(context: Context) -> NodeConfig:
    """The operator's node config: the one the SuperNode's ``--node-config`` names, or a
    virtual node's from its simulated federation."""
    if is_simulated(context):
        # Imported here: on a SuperNode the ClientApp process loads no sandbox code.
        from clients.simulated import simulated_node

        return simulated_node(context)
    path = context.node_config.get(NODE_CONFIG_KEY)
    if not isinstance(path, str) or not path:
        raise ConfigError(
            "the SuperNode was started without --node-config 'node-config=\"PATH\"'",
            key=NODE_CONFIG_KEY,
        )
    return NodeConfig.load(Path(path))


def node_sandbox(context: Context, node: NodeConfig) -> AbstractContextManager[SandboxApi]:
    """``node``'s sandbox: over its socket, or a virtual node's in this process."""
    if is_simulated(context):
        from clients.simulated import simulated_sandbox

        return simulated_sandbox(node)
    return sandbox_client(node)
