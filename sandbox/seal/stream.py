"""STREAM over AES-256-GCM: chunked authenticated encryption that decrypts in constant memory.

Layout: ``header ‖ chunk_0 ‖ … ‖ chunk_n`` where ``header = MAGIC ‖ chunk_size (u32) ‖
prefix (7 bytes)`` and every chunk is AES-256-GCM with nonce ``prefix ‖ counter (u32) ‖
last (1 byte)`` and AAD ``header ‖ context``. The counter stops reordering and chunk
swapping, the last flag stops truncation and extension, and the header (with the
caller's context) is bound into every chunk. Each stream gets a fresh random prefix,
so one key may seal several files.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sandbox.errors import SealedModelError

MAGIC = b"ARKSTRM1"
CHUNK_SIZE = 1 << 20
KEY_SIZE = 32
PREFIX_SIZE = 7
TAG_SIZE = 16
HEADER_SIZE = len(MAGIC) + 4 + PREFIX_SIZE
MAX_CHUNK_SIZE = 1 << 24
_MAX_COUNTER = 0xFFFFFFFF


def _read_exact(src: BinaryIO, size: int) -> bytes:
    """Up to ``size`` bytes, looping over short reads (pipes, sockets); short only at EOF."""
    parts: list[bytes] = []
    remaining = size
    while remaining:
        part = src.read(remaining)
        if not part:
            break
        parts.append(part)
        remaining -= len(part)
    return b"".join(parts)


def _nonce(prefix: bytes, counter: int, last: bool) -> bytes:
    if counter > _MAX_COUNTER:
        raise SealedModelError("stream too long: chunk counter overflow")
    return prefix + struct.pack(">I", counter) + (b"\x01" if last else b"\x00")


def _check_key(key: bytes) -> AESGCM:
    if len(key) != KEY_SIZE:
        raise SealedModelError(f"content key must be {KEY_SIZE} bytes, got {len(key)}")
    return AESGCM(key)


def encrypt_stream(
    key: bytes,
    src: BinaryIO,
    dst: BinaryIO,
    *,
    context: bytes = b"",
    chunk_size: int = CHUNK_SIZE,
    rng: Callable[[int], bytes] = os.urandom,
) -> int:
    """Encrypt ``src`` into ``dst``; return the number of bytes written."""
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be in (0, {MAX_CHUNK_SIZE}], got {chunk_size}")
    aead = _check_key(key)
    prefix = rng(PREFIX_SIZE)
    header = MAGIC + struct.pack(">I", chunk_size) + prefix
    aad = header + context
    written = dst.write(header)
    counter = 0
    current = _read_exact(src, chunk_size)
    while True:
        following = _read_exact(src, chunk_size)
        last = not following
        sealed = aead.encrypt(_nonce(prefix, counter, last), current, aad)
        written += dst.write(sealed)
        if last:
            return written
        current = following
        counter += 1


def _sealed_chunks(src: BinaryIO | memoryview, sealed_size: int) -> Iterator[tuple[Any, bool]]:
    """``(sealed chunk, is_last)`` pairs; zero-copy slices when ``src`` is a buffer."""
    if isinstance(src, memoryview):
        offset, end = HEADER_SIZE, len(src)
        while True:
            stop = offset + sealed_size
            yield src[offset:stop], stop >= end
            if stop >= end:
                return
            offset = stop
    current = _read_exact(src, sealed_size)
    while True:
        following = _read_exact(src, sealed_size)
        yield current, not following
        if not following:
            return
        current = following


def decrypt_stream(
    key: bytes, src: BinaryIO | memoryview, *, context: bytes = b""
) -> Iterator[bytes]:
    """Yield plaintext chunks of a stream read from a file object or a memory buffer.

    From a file object at most two sealed chunks are held in memory; from a buffer (a
    read-only memory map of a sealed file, say) chunks are decrypted in place without
    copies. Raises SealedModelError on any tampering. Truncation is only detectable at
    the end, so a caller must not act on the plaintext until the iterator finishes.
    """
    aead = _check_key(key)
    header = (
        bytes(src[:HEADER_SIZE]) if isinstance(src, memoryview) else _read_exact(src, HEADER_SIZE)
    )
    if len(header) != HEADER_SIZE or not header.startswith(MAGIC):
        raise SealedModelError("not an ark stream (bad header)")
    (chunk_size,) = struct.unpack(">I", header[len(MAGIC) : len(MAGIC) + 4])
    if not 0 < chunk_size <= MAX_CHUNK_SIZE:
        raise SealedModelError(f"bad chunk size {chunk_size} in stream header")
    prefix = header[len(MAGIC) + 4 :]
    aad = header + context
    for counter, (sealed, last) in enumerate(_sealed_chunks(src, chunk_size + TAG_SIZE)):
        try:
            plain = aead.decrypt(_nonce(prefix, counter, last), sealed, aad)
        except InvalidTag:
            raise SealedModelError(
                f"chunk {counter} failed authentication (tampered, reordered, truncated, "
                "wrong key or wrong context)"
            ) from None
        if not last and len(plain) != chunk_size:
            raise SealedModelError(f"chunk {counter} is short but not the last")
        yield plain
