"""Canary planting, loopback capture and leak scanning for the canary test.

A canary is a unique byte string planted in private data or base weights. The scan
looks for it, and for its base64 forms at every alignment, in every file the provider
side wrote and in every TCP stream of a loopback capture (reassembled per flow, so a
canary split across two segments is still found).
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import numpy as np
from safetensors.numpy import load_file, save_file

WEIGHT_CANARY_VALUES = 8  # float32 values: a 32-byte pattern


def canary_forms(canary: bytes) -> list[bytes]:
    """``canary`` itself and its base64 (standard and URL-safe) at all three alignments."""
    forms = [canary]
    for start in range(3):
        chunk = canary[start:]
        chunk = chunk[: len(chunk) - len(chunk) % 3]
        forms += [base64.b64encode(chunk), base64.urlsafe_b64encode(chunk)]
    return forms


def plant_text_canaries(data: dict[str, Path], rows: int = 3) -> dict[str, bytes]:
    """Put a unique canary into the first ``rows`` training texts of each node's data."""
    canaries = {}
    for name, path in data.items():
        canary = f"ARK-CANARY-{name}-{os.urandom(8).hex()}"
        lines = path.read_text(encoding="utf-8").splitlines()
        for i in range(min(rows, len(lines))):
            row = json.loads(lines[i])
            row["text"] = f"{row['text']} ref {canary}"
            lines[i] = json.dumps(row)
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        canaries[name] = canary.encode()
    return canaries


def plant_weight_canary(model_dir: Path, out_dir: Path) -> bytes:
    """Copy ``model_dir`` with a random 32-byte pattern at the start of its first tensor."""
    shutil.copytree(model_dir, out_dir)
    weights_file = out_dir / "model.safetensors"
    tensors = load_file(str(weights_file))
    first = sorted(tensors)[0]
    rng = np.random.default_rng(int.from_bytes(os.urandom(8), "little"))
    values = rng.uniform(-0.05, 0.05, WEIGHT_CANARY_VALUES).astype(np.float32)
    flat = tensors[first].astype(np.float32).reshape(-1).copy()
    flat[:WEIGHT_CANARY_VALUES] = values
    tensors[first] = flat.reshape(tensors[first].shape)
    save_file(tensors, str(weights_file))
    return values.tobytes()


@dataclass
class LoopbackCapture:
    """``tcpdump`` on ``lo`` writing every TCP packet to ``path`` while the block runs."""

    path: Path
    process: subprocess.Popen[bytes] | None = None
    stderr: bytes = b""

    def __enter__(self) -> LoopbackCapture:
        tcpdump = shutil.which("tcpdump") or "/usr/sbin/tcpdump"
        # Capturing needs CAP_NET_RAW: root, or passwordless sudo on a developer machine.
        prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
        argv = [tcpdump, "-i", "lo", "-U", "-s", "0", "-B", "32768", "-w", str(self.path), "tcp"]
        self.process = subprocess.Popen(
            prefix + argv,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        assert self.process.stderr is not None
        # tcpdump says "listening on lo" once the capture is live.
        line = self.process.stderr.readline()
        if b"listening on" not in line:
            self.process.kill()
            self.process.wait()
            raise RuntimeError(f"tcpdump did not start: {line!r}")
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        assert self.process is not None
        time.sleep(0.5)  # let the last packets reach the file
        self.process.send_signal(signal.SIGTERM)
        _, rest = self.process.communicate(timeout=30)
        self.stderr = rest

    @property
    def dropped(self) -> int:
        """Packets the kernel dropped during the capture (tcpdump's own count)."""
        for line in self.stderr.decode(errors="replace").splitlines():
            if "dropped by kernel" in line:
                return int(line.split()[0])
        raise RuntimeError(f"tcpdump printed no drop count: {self.stderr!r}")


@dataclass
class Streams:
    """TCP payload bytes of a capture, concatenated per flow in capture order."""

    flows: dict[tuple[bytes, bytes, int, int], bytearray] = field(default_factory=dict)
    packets: int = 0

    @property
    def total_bytes(self) -> int:
        return sum(len(flow) for flow in self.flows.values())


def read_pcap(path: Path) -> Streams:
    """Parse a classic pcap of Ethernet (``lo`` on Linux) or raw IP frames."""
    data = path.read_bytes()
    magic = data[:4]
    endian = {b"\xd4\xc3\xb2\xa1": "<", b"\xa1\xb2\xc3\xd4": ">"}.get(magic)
    if endian is None:
        raise ValueError(f"{path}: not a classic pcap file")
    link_type = struct.unpack(endian + "I", data[20:24])[0]
    link_header = {1: 14, 101: 0, 113: 16}[link_type]  # Ethernet, raw IP, Linux cooked
    streams = Streams()
    offset = 24
    while offset + 16 <= len(data):
        captured = struct.unpack(endian + "I", data[offset + 8 : offset + 12])[0]
        frame = data[offset + 16 : offset + 16 + captured]
        offset += 16 + captured
        streams.packets += 1
        _add_packet(streams, frame[link_header:])
    return streams


def _add_packet(streams: Streams, packet: bytes) -> None:
    if not packet:
        return
    version = packet[0] >> 4
    if version == 4:
        header = (packet[0] & 0x0F) * 4
        if packet[9] != 6:
            return
        total = struct.unpack(">H", packet[2:4])[0]
        src, dst, segment = packet[12:16], packet[16:20], packet[header:total]
    elif version == 6:
        if packet[6] != 6:
            return
        length = struct.unpack(">H", packet[4:6])[0]
        src, dst, segment = packet[8:24], packet[24:40], packet[40 : 40 + length]
    else:
        return
    if len(segment) < 20:
        return
    sport, dport = struct.unpack(">HH", segment[:4])
    payload = segment[(segment[12] >> 4) * 4 :]
    if payload:
        streams.flows.setdefault((src, dst, sport, dport), bytearray()).extend(payload)


def files_under(roots: Iterable[Path]) -> Iterator[Path]:
    for root in roots:
        if root.is_file():
            yield root
        elif root.is_dir():
            yield from (p for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink())


def find_canaries(
    canaries: dict[str, bytes], files: Iterable[Path], streams: Streams | None = None
) -> dict[str, list[str]]:
    """For each canary found anywhere: where (file paths, ``tcp:PORT->PORT`` flows)."""
    found: dict[str, list[str]] = {}
    forms = {name: canary_forms(canary) for name, canary in canaries.items()}

    def scan(where: str, blob: bytes | bytearray) -> None:
        for name, variants in forms.items():
            if any(form in blob for form in variants):
                found.setdefault(name, []).append(where)

    for path in files:
        scan(str(path), path.read_bytes())
    if streams is not None:
        for (_, _, sport, dport), payload in streams.flows.items():
            scan(f"tcp:{sport}->{dport}", payload)
    return found


def byte_windows(
    data: bytes, start: int = 0, count: int = 256, size: int = 64, seed: int = 7
) -> list[bytes]:
    """Random ``size``-byte windows of ``data[start:]`` with varied bytes (runs of zeros
    or repeated values, which any file may hold, are skipped)."""
    rng = random.Random(seed)
    windows: list[bytes] = []
    for _ in range(count * 50):
        if len(windows) == count:
            break
        offset = rng.randrange(start, len(data) - size)
        window = data[offset : offset + size]
        if len(set(window)) >= 24:
            windows.append(window)
    return windows


def weight_windows(model_dir: Path, count: int = 256) -> list[bytes]:
    """Windows of a model's tensor data (not its safetensors header)."""
    data = (model_dir / "model.safetensors").read_bytes()
    return byte_windows(data, start=8 + int.from_bytes(data[:8], "little"), count=count)


def files_holding(windows: Iterable[bytes], roots: Iterable[Path]) -> list[str]:
    """The files under ``roots`` that hold any of ``windows``."""
    wanted = list(windows)
    return [str(p) for p in files_under(roots) if any(w in p.read_bytes() for w in wanted)]
