"""The one place files are opened for reading untrusted bytes and written atomically.

Reads go through one descriptor opened without following a symlink and without blocking
on a FIFO, and refuse anything but a regular file. Writes never go through what is
already at the path: a new file is created exclusively beside it and then replaces it
(:func:`os.replace`), so a symlink there is replaced rather than followed, the new file
has exactly the mode asked for whatever the umask, and no reader sees half a file.
"""

from __future__ import annotations

import os
import secrets
import stat
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

PRIVATE = 0o600


@contextmanager
def open_regular(path: Path, fail: Callable[[str], Exception]) -> Iterator[BinaryIO]:
    """Open ``path`` for reading if it is a regular file (no symlink, FIFO or device);
    otherwise raise ``fail(reason)``, whose message the caller words."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise fail(f"cannot open: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise fail("not a regular file")
        yield handle


def read_regular(path: Path, limit: int, fail: Callable[[str], Exception]) -> bytes:
    """The bytes of regular file ``path``, refused with ``fail(reason)`` when it is larger
    than ``limit``. At most ``limit + 1`` bytes are read: one more than ``limit`` shows a
    file that grew after it was measured, for the caller's size check to catch."""
    with open_regular(path, fail) as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > limit:
            raise fail(f"{size} bytes, more than the {limit} expected")
        # One byte past what fstat saw shows a file that grew since, and the read size
        # stays a C ssize_t whatever ``limit`` the caller gives.
        return handle.read(min(limit, size) + 1)


def create_new(path: Path, data: bytes | Iterable[bytes], mode: int | None = None) -> None:
    """Create ``path`` (never an existing file or symlink: FileExistsError) with ``data``
    (bytes, or pieces of them written as they come), fsynced; nothing half-written is left
    behind on failure. Its mode is exactly ``mode`` whatever the umask, or (None) what the
    umask leaves of 0666, as for any new file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode or 0o666)
    with os.fdopen(fd, "wb") as handle:
        try:
            if mode is not None:
                os.fchmod(handle.fileno(), mode)
            pieces = [data] if isinstance(data, (bytes, bytearray, memoryview)) else data
            for piece in pieces:
                handle.write(piece)
            handle.flush()
            os.fsync(handle.fileno())
        except BaseException:
            path.unlink(missing_ok=True)
            raise


def write_atomic(
    path: Path,
    data: bytes | Iterable[bytes],
    mode: int | None = None,
    check: Callable[[Path], object] | None = None,
) -> None:
    """Replace ``path`` with ``data`` (bytes, or pieces of them) at once;
    ``check(staged_path)`` may refuse the new content by raising, in which case ``path`` is
    left as it was."""
    staging = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    create_new(staging, data, mode)
    try:
        if check is not None:
            check(staging)
        os.replace(staging, path)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
