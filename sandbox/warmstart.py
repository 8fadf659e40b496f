"""The node's ClientApp launcher pool: Flower's per-message process without its import cost.

Flower 1.41's SuperExec starts a fresh ``flwr-clientapp`` process for every message,
and most of such a process's life is importing Flower (about a second on this project's
2-core machine) before it pulls its one task. The pool (``ark node launch-pool``) is a
long-lived process of the node's operator, started beside the SuperNode with the same
environment. It holds no key and no data, and it imports only Flower's ClientApp
runtime and the third-party libraries the app uses, once. For each message the node's
``flwr-clientapp`` shim (``sandbox/launcher_shim.py``) hands it the arguments and
standard streams Flower gave it; the pool forks a child that runs exactly what the cold
launcher runs (``sandbox.launcher.main``: the node's approval gate around Flower's own
runtime, which pulls the task by its token, installs the approved FAB and loads the app
from it) and sends the child's exit status back.

The pool is single-threaded, so forking it is safe; nothing in it opens a gRPC channel.
A shim that goes away (its SuperNode was killed) takes its child down with it.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import selectors
import signal
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sandbox.errors import ProtocolError
from sandbox.launcher_shim import POOL_ENV, STOP
from sandbox.localsocket import listen_private

log = logging.getLogger("ark.launcher")
# What every ClientApp process imports anyway: loaded once, before any fork.
PRELOAD = (
    "flwr.supernode.cli.flwr_clientapp",
    "flwr.supernode.runtime.run_clientapp",
    "flwr.clientapp",
    "flwr.app",
    "grpc",
    "psutil",
    "safetensors.numpy",
    "cryptography.hazmat.primitives.asymmetric.ec",
    "cryptography.hazmat.primitives.asymmetric.ed25519",
    "sandbox.launcher",
)
# The arguments Flower's SubprocessExecutor gives ``flwr-clientapp`` (flwr 1.41), and
# whether each takes a value: a start request with anything else is refused.
FLOWER_ARGS = {
    "--clientappio-api-address": True,
    "--runtime-api-address": True,
    "--token": True,
    "--insecure": False,
    "--root-certificates": True,
    "--parent-pid": True,
    "--allow-runtime-dependency-installation": False,
}
MAX_REQUEST_BYTES = 16 * 1024
# How long a connected client has to send its start request.
REQUEST_SECONDS = 1.0
POLL_SECONDS = 0.2
SOCKET_KEY = "launch-pool socket"
# What `ark node launch-pool` prints once it accepts start requests.
POOL_READY = "launch pool ready on"


def check_argv(argv: object) -> list[str]:
    """The shim's arguments, if they are exactly Flower's flags; ProtocolError otherwise."""
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise ProtocolError("launch request: argv must be a list of strings")
    index = 0
    while index < len(argv):
        takes_value = FLOWER_ARGS.get(argv[index])
        if takes_value is None:
            raise ProtocolError(f"launch request: unexpected argument #{index}")
        index += 2 if takes_value else 1
    if index != len(argv):
        raise ProtocolError("launch request: the last flag has no value")
    return argv


def _read_request(conn: socket.socket) -> tuple[list[str], list[int]]:
    """One start request: a JSON line ``{"argv": [...]}`` with the shim's three stdio fds."""
    data, fds, _, _ = socket.recv_fds(conn, MAX_REQUEST_BYTES, 3)
    try:
        if len(fds) != 3 or not data.endswith(b"\n"):
            raise ProtocolError("launch request: expected one JSON line and three fds")
        try:
            request = json.loads(data)
        except ValueError:
            raise ProtocolError("launch request: not JSON") from None
        if not isinstance(request, dict) or set(request) != {"argv"}:
            raise ProtocolError("launch request: expected exactly {'argv': [...]}")
        return check_argv(request["argv"]), fds
    except ProtocolError:
        for fd in fds:
            os.close(fd)
        raise


def _run_child(listener: socket.socket, argv: list[str], fds: list[int]) -> None:
    """In the forked child: become the cold launcher's process for this one task."""
    code = 1
    try:
        listener.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, signal.SIG_DFL)
        from sandbox.launcher import LAUNCHER_NAME, main

        sys.argv = [LAUNCHER_NAME, *argv]
        main()
        code = 0
    except SystemExit as exc:  # as the interpreter would end on it: a text goes to stderr
        if isinstance(exc.code, int):
            code = exc.code
        elif exc.code is None:
            code = 0
        else:
            print(exc.code, file=sys.stderr)
    except BaseException:
        log.exception("the ClientApp launcher failed")
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


@dataclass
class _Task:
    pid: int
    conn: socket.socket


class LaunchPool:
    """Accepts start requests on ``path`` and forks one child per request."""

    def __init__(self, path: Path):
        self.path = path
        self.tasks: dict[int, _Task] = {}

    def serve(
        self, stop: threading.Event, on_ready: Callable[[Path], object] | None = None
    ) -> None:
        """Preload, listen, and fork a child per start request until ``stop`` is set;
        then stop the children still running and remove the socket."""
        for name in PRELOAD:
            importlib.import_module(name)
        listener = listen_private(self.path, SOCKET_KEY)
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ)
        log.info("launch pool serving on %s (pid %d)", self.path, os.getpid())
        if on_ready is not None:
            on_ready(self.path)
        try:
            while not stop.is_set():
                for key, _ in selector.select(POLL_SECONDS):
                    if key.fileobj is listener:
                        self._accept(listener, selector)
                    else:
                        self._from_shim(key.data, selector)
                self._reap(selector)
        finally:
            for task in list(self.tasks.values()):
                self._signal(task, signal.SIGTERM)
            selector.close()
            listener.close()
            self.path.unlink(missing_ok=True)

    def _accept(self, listener: socket.socket, selector: selectors.BaseSelector) -> None:
        conn, _ = listener.accept()
        conn.settimeout(REQUEST_SECONDS)  # a client that sends nothing holds no one up
        try:
            argv, fds = _read_request(conn)
            conn.settimeout(None)
        except (ProtocolError, OSError) as exc:
            log.warning("start request refused: %s", exc)
            conn.close()
            return
        pid = os.fork()
        if pid == 0:
            conn.close()
            for other in self.tasks.values():
                other.conn.close()
            selector.close()
            _run_child(listener, argv, fds)
        for fd in fds:
            os.close(fd)
        log.info("ClientApp start forked as pid %d", pid)
        task = _Task(pid, conn)
        self.tasks[pid] = task
        selector.register(conn, selectors.EVENT_READ, task)

    def _from_shim(self, task: _Task, selector: selectors.BaseSelector) -> None:
        """The shim asked to stop its child, or went away (its SuperNode was killed):
        either way the child stops."""
        try:
            data = task.conn.recv(16)
        except OSError:
            data = b""
        if not data:
            selector.unregister(task.conn)
            self._signal(task, signal.SIGKILL)
        elif STOP in data:
            self._signal(task, signal.SIGTERM)

    def _signal(self, task: _Task, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(task.pid, signum)

    def _reap(self, selector: selectors.BaseSelector) -> None:
        """Collect finished children and tell each one's shim how it ended."""
        while self.tasks:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            task = self.tasks.pop(pid, None)
            if task is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            with contextlib.suppress(KeyError, ValueError):
                selector.unregister(task.conn)
            with contextlib.suppress(OSError):
                task.conn.sendall(f"{code if code >= 0 else 128 - code}\n".encode())
            task.conn.close()


def pool_socket(node_config: Path) -> Path:
    """Where a node's launch pool listens: beside its sandbox's socket."""
    from sandbox.config import NodeConfig

    return NodeConfig.load(node_config).socket_path().with_name("launch.sock")


__all__ = ["POOL_ENV", "POOL_READY", "LaunchPool", "check_argv", "pool_socket"]
