"""File digests, streamed so large weight files never sit in memory whole."""

from __future__ import annotations

import hashlib
from pathlib import Path


def sha256_file(path: Path) -> tuple[str, int]:
    """Hex SHA-256 and size in bytes of a file."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of in-memory bytes."""
    return hashlib.sha256(data).hexdigest()
