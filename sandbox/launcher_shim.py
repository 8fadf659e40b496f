"""The node's ``flwr-clientapp`` when its launcher pool runs: hand this start to the pool.

Flower's SuperExec starts ``flwr-clientapp`` once per message. This script (copied
into the node's ``bin/flwr-clientapp`` by :func:`sandbox.launcher.install_launcher` and
run as ``python -IS``: the standard library only, nothing of the venv) sends its
arguments and its standard streams to the node's launcher pool (``sandbox/warmstart.py``)
over the pool's private Unix socket, passes SIGTERM and SIGINT on, and exits with the
status of the pool's child. The child runs exactly what the cold launcher runs.

When no pool answers (it is not running, or the socket is not set), the cold launcher
runs in this process's place, so a node without a pool works as before, only slower.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import sys
from types import FrameType

POOL_ENV = "ARK_LAUNCH_POOL"
COLD_LAUNCHER = "from sandbox.launcher import main; main()"
# Messages from the shim to the pool after the start request: stop the child.
STOP = b"T"


def _cold() -> None:
    """Run the cold launcher in place of this process (a full Python, site included;
    ``-P``: the working directory is not put on the module path)."""
    argv = [sys.executable, "-P", "-c", COLD_LAUNCHER, *sys.argv[1:]]
    os.execv(sys.executable, argv)  # noqa: S606  (argv is ours; no shell involved)


def main() -> None:
    path = os.environ.get(POOL_ENV, "")
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect(path)
        # Only a pool of this same user gets the task's token and this process's streams.
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        if struct.unpack("3i", creds)[1] != os.getuid():
            raise PermissionError("the launch pool socket is served by another user")
    except OSError:
        conn.close()
        _cold()
        return
    request = json.dumps({"argv": sys.argv[1:]}).encode() + b"\n"
    socket.send_fds(conn, [request], [0, 1, 2])

    def stop(signum: int, frame: FrameType | None) -> None:
        with contextlib.suppress(OSError):
            conn.sendall(STOP)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    answer = b""
    while not answer.endswith(b"\n"):
        chunk = conn.recv(64)
        if not chunk:
            sys.exit(1)  # the pool went away mid-task
        answer += chunk
    sys.exit(int(answer))


if __name__ == "__main__":
    main()
