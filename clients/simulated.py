"""The node sandbox of a virtual node of Flower's simulation engine, in the ClientApp's process.

On a SuperNode the node sandbox is a process of its own (``ark node sandbox``,
``clients/service.py``) that the ClientApp reaches over a Unix socket. The simulation
engine runs hundreds of virtual nodes on one machine's few processes, with no room for a
process per node, so here each virtual node, named by its ``partition-id``, gets a real
:class:`~clients.sandbox.NodeSandbox` inside the process that runs the ClientApp (one Ray
actor). It is made on the node's first message: it attests, has the model key released
and unseals, as ``ark node sandbox`` does before it serves; it then holds the node's
channel keys, model and data for the rest of the process. Calls take the socket's path
less the socket: each request is serialized and handed to the sandbox service's own
handlers (``clients/service.py``), which parse it, answer or refuse with a fixed code
(journaled on the node), and the reply is parsed back.

Which node workspace a partition is comes from the simulated federation's file, named
by the ``ARK_SIMULATION`` environment variable (the scale bench, ``bench/scale.py``,
writes both). :func:`clients.shuttle.node_sandbox` chooses this module for a virtual
node only; nothing else uses it.
"""

from __future__ import annotations

import importlib
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
import tomli_w
from flwr.app import Context
from flwr.common.constant import PARTITION_ID_KEY
from google.protobuf.message import Message as ProtoMessage

from clients.sandbox import NodeSandbox
from clients.service import NodeSandboxService, method_handlers
from clients.shuttle import STATUS_TIMEOUT, SandboxApi, refused
from protos.ark.v1 import nodesandbox_pb2 as pb
from sandbox.config import NodeConfig, read_toml
from sandbox.errors import ConfigError
from sandbox.models import model_class, supported_tasks

# Names the simulated federation's file (:class:`SimulatedFederation`).
SIMULATION_ENV = "ARK_SIMULATION"
SECTION = "simulation"
R = TypeVar("R", bound=ProtoMessage)


@dataclass(frozen=True)
class SimulatedFederation:
    """The node workspaces of a simulated federation: ``nodes[i]`` is the ``node.toml``
    of the virtual node whose partition-id is ``i``."""

    nodes: tuple[Path, ...]
    source: Path | None = None

    def node(self, partition: int) -> Path:
        if not 0 <= partition < len(self.nodes):
            raise ConfigError(
                f"no node for partition-id {partition} (the file lists {len(self.nodes)})",
                path=self.source,
                key=f"{SECTION}.nodes",
            )
        return self.nodes[partition]

    def write(self, path: Path) -> None:
        path.write_bytes(tomli_w.dumps({SECTION: {"nodes": [str(p) for p in self.nodes]}}).encode())

    @classmethod
    def load(cls, path: Path) -> SimulatedFederation:
        """Read and validate ``[simulation] nodes`` from a TOML file."""
        raw = read_toml(path, "the simulated federation")
        section = raw.get(SECTION)
        nodes = section.get("nodes") if isinstance(section, dict) else None
        if not isinstance(nodes, list) or not all(isinstance(n, str) and n for n in nodes):
            raise ConfigError(
                f"must be a list of node.toml paths, not {nodes!r}",
                path=path,
                key=f"{SECTION}.nodes",
            )
        return cls(tuple(Path(n) for n in nodes), source=path)

    @classmethod
    def from_environment(cls) -> SimulatedFederation:
        value = os.environ.get(SIMULATION_ENV, "")
        if not value:
            raise ConfigError(
                f"a simulated node needs {SIMULATION_ENV} set to its federation's file",
                key=SIMULATION_ENV,
            )
        return _load_cached(value)


@lru_cache(maxsize=4)
def _load_cached(path: str) -> SimulatedFederation:
    return SimulatedFederation.load(Path(path))


class _Aborted(Exception):
    """Where gRPC's ``context.abort`` would end the call; carries the status's text."""


class _LocalCall:
    """The part of a gRPC call's context the sandbox service uses: failing the call."""

    def abort(self, code: grpc.StatusCode, details: str) -> NoReturn:
        raise _Aborted(details)


class LocalSandboxClient:
    """:class:`~clients.shuttle.SandboxApi` over a sandbox in this process: the socket's
    requests and replies as bytes, through the service's own handlers."""

    def __init__(self, service: NodeSandboxService):
        self._handlers = method_handlers(service)

    def _call(self, name: str, request: ProtoMessage, kind: type[R]) -> R:
        handler = self._handlers[name]
        if handler.unary_unary is None or handler.response_serializer is None:
            raise RuntimeError(f"{name} is not a unary call")
        try:
            reply: Any = handler.unary_unary(request.SerializeToString(), _LocalCall())  # type: ignore[arg-type]
        except _Aborted as exc:
            raise refused(str(exc)) from None
        return kind.FromString(handler.response_serializer(reply))

    def hello(self, run: pb.RunContext, rnd: int) -> pb.HelloReply:
        return self._call("Hello", pb.HelloRequest(run=run, round=rnd), pb.HelloReply)

    def train(self, request: pb.Instruction) -> pb.TrainReply:
        return self._call("Train", request, pb.TrainReply)

    def evaluate(self, request: pb.Instruction) -> pb.EvaluateReply:
        return self._call("Evaluate", request, pb.EvaluateReply)

    def secagg(self, request: pb.SecAggRequest) -> pb.SecAggReply:
        return self._call("SecAgg", request, pb.SecAggReply)

    def status(self, timeout: float = STATUS_TIMEOUT) -> pb.StatusReply:
        return self._call("Status", pb.StatusRequest(), pb.StatusReply)


# The virtual nodes' configs and sandboxes in this process, by node.toml.
_NODES: dict[Path, NodeConfig] = {}
_SANDBOXES: dict[Path, LocalSandboxClient] = {}
_STARTING = threading.Lock()


def _partition(context: Context) -> int:
    value = context.node_config.get(PARTITION_ID_KEY)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"must be an integer, not {value!r}", key=PARTITION_ID_KEY)
    return value


def simulated_node(context: Context) -> NodeConfig:
    """The node config of the virtual node ``context`` names (read once)."""
    path = SimulatedFederation.from_environment().node(_partition(context))
    node = _NODES.get(path)
    if node is None:
        node = _NODES[path] = NodeConfig.load(path)
    return node


def _import_model_stack(node: NodeConfig) -> None:
    """Import what building the node's model imports on first use, here and now.

    transformers resolves its classes lazily, which is not safe from two threads at once
    (one finds a class missing while another is still importing): a sandbox process
    builds its model in one preparation thread, but here every virtual node's sandbox
    starts one, so the model stack is imported before the first of them runs."""
    for name in ("clients.training", "clients.model", "sandbox.lora", "peft"):
        importlib.import_module(name)
    config = node.require_sandbox().package / "config.json"
    model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    if isinstance(model_type, str):
        for task in supported_tasks(model_type):
            model_class(model_type, task)


@contextmanager
def simulated_sandbox(node: NodeConfig) -> Iterator[SandboxApi]:
    """``node``'s sandbox in this process, started (attested, unsealed) on first use."""
    if node.source is None:
        raise ConfigError("a simulated node's config must come from its file", key="node")
    with _STARTING:  # one start per node, even if the engine ever calls from two threads
        client = _SANDBOXES.get(node.source)
        if client is None:
            if not _SANDBOXES:
                _import_model_stack(node)
            sandbox = NodeSandbox(node)
            sandbox.start()
            client = _SANDBOXES[node.source] = LocalSandboxClient(NodeSandboxService(sandbox))
    yield client
