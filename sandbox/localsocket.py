"""Node-local Unix sockets that only the node's user can open.

The node sandbox's API and the node's ClientApp launcher pool listen on sockets in a
folder that is the node user's and mode 0700, the socket itself 0600: another local
user cannot even reach the socket file. :func:`prepare_socket` sets the folder up and
clears what a crashed server left behind, but never replaces a file that is not a
socket or a socket another server still answers on.
"""

from __future__ import annotations

import os
import socket
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sandbox.errors import ConfigError


def private_folder(
    folder: Path, what: str, *, key: str | None = None, path: Path | None = None
) -> None:
    """Make ``folder`` (and its parents) exist, this user's and mode 0700; ConfigError
    (naming the config ``key`` or the file ``path``) when it is a symbolic link or
    another user's."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = folder.lstat()
    if stat.S_ISLNK(info.st_mode):
        raise ConfigError(f"{what} {folder} is a symbolic link", key=key, path=path)
    if info.st_uid != os.getuid():
        raise ConfigError(
            f"{what} {folder} belongs to uid {info.st_uid}, not this user", key=key, path=path
        )
    folder.chmod(0o700)


def prepare_socket(path: Path, key: str) -> None:
    """Make ``path``'s folder private (0700, this user's) and remove a stale socket;
    ConfigError naming ``key`` when the folder is another user's, ``path`` is not a
    socket, or a server still listens on it."""
    private_folder(path.parent, "socket folder", key=key)
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"{path} exists and is not a socket", key=key)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except OSError:
        path.unlink()  # left by a server that died
        return
    finally:
        probe.close()
    raise ConfigError(f"another server already listens on {path}", key=key)


@contextmanager
def owner_only() -> Iterator[None]:
    """A umask under which a socket is created 0600 (bind takes the mode from it)."""
    old = os.umask(0o177)
    try:
        yield
    finally:
        os.umask(old)


def listen_private(path: Path, key: str, backlog: int = 64) -> socket.socket:
    """A listening stream socket at ``path`` (prepared as above), mode 0600."""
    prepare_socket(path, key)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    with owner_only():
        server.bind(str(path))
    path.chmod(0o600)
    server.listen(backlog)
    return server
