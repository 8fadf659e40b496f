"""Which long-running processes a party started, recorded by PID in its own workspace.

``ark provider start`` and ``ark node start`` launch their processes detached (each in
its own session, outliving the command) and record each one here: its role, its PID and
the kernel's start time for that PID. ``stop`` and ``status`` read the record back and
act on a PID only while it still belongs to the process that was recorded (same start
time), so a PID reused by a stranger after a reboot or a crash is never signalled.
Nothing is ever found by name.

The record is ``run/processes.json`` in the workspace, replaced atomically; a lock file
beside it keeps two commands of the same party from starting or stopping at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from sandbox.errors import ConfigError
from sandbox.files import write_atomic
from sandbox.ops.processes import ManagedProcess, log_tail, still_running, terminate_group

RECORD_FILE = "processes.json"


@dataclass(frozen=True)
class Recorded:
    """One process a party started: what it is for, where its log is, and its identity."""

    role: str
    pid: int
    started: float  # psutil's create_time: with the PID, names exactly one process
    argv: tuple[str, ...]
    log: str
    address: str = ""  # what it listens on, where it listens
    log_start: int = 0  # where its output starts in the log (a restart appends)

    def process(self) -> psutil.Process | None:
        """The live process this record names, or None (exited, or the PID is reused)."""
        try:
            proc = psutil.Process(self.pid)
            if abs(proc.create_time() - self.started) > 0.01 or not still_running(proc):
                return None
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        return proc

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines this process wrote to its log."""
        return log_tail(Path(self.log), self.log_start, lines)


class ProcessRecord:
    """The record of one party's processes under ``workspace/run``."""

    def __init__(self, workspace: Path):
        self.folder = workspace / "run"
        self.path = self.folder / RECORD_FILE

    @contextlib.contextmanager
    def locked(self) -> Iterator[ProcessRecord]:
        """Hold the party's lock: one start or stop at a time."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield self
        finally:
            os.close(fd)

    def load(self) -> dict[str, Recorded]:
        """Every recorded process by role; ConfigError naming the file if it is malformed."""
        try:
            raw = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"unreadable process record ({exc})", path=self.path) from exc
        try:
            records = {
                str(role): Recorded(
                    role=str(role),
                    pid=int(entry["pid"]),
                    started=float(entry["started"]),
                    argv=tuple(str(a) for a in entry["argv"]),
                    log=str(entry["log"]),
                    address=str(entry.get("address", "")),
                    log_start=int(entry.get("log_start", 0)),
                )
                for role, entry in raw["processes"].items()
            }
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"malformed process record ({exc!r})", path=self.path) from exc
        return records

    def _save(self, records: dict[str, Recorded]) -> None:
        document = {"processes": {role: asdict(rec) for role, rec in sorted(records.items())}}
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(self.path, json.dumps(document, indent=2).encode(), mode=0o600)

    def add(self, role: str, proc: ManagedProcess, *, address: str = "") -> Recorded:
        """Record ``proc`` (just started) under ``role``."""
        started = psutil.Process(proc.pid).create_time()
        argv = tuple(str(a) for a in proc.popen.args)  # type: ignore[union-attr]
        record = Recorded(
            role, proc.pid, started, argv, str(proc.log_path), address, proc.log_start
        )
        records = self.load()
        records[role] = record
        self._save(records)
        return record

    def live(self) -> dict[str, tuple[Recorded, psutil.Process]]:
        """The recorded processes that are still the processes recorded, by role."""
        found = {}
        for role, record in self.load().items():
            proc = record.process()
            if proc is not None:
                found[role] = (record, proc)
        return found

    def stop(self, order: Sequence[Sequence[str]], *, grace: float = 10.0) -> list[int]:
        """Stop the recorded processes, group by group in ``order`` (roles not named go
        last), with every descendant; forget them; return the PIDs that would not die."""
        records = self.load()
        named = [role for group in order for role in group]
        groups = [list(group) for group in order] + [[r for r in records if r not in named]]
        leftovers: list[int] = []
        for group in groups:
            parents: list[psutil.Process] = []
            children: dict[int, psutil.Process] = {}
            for role in group:
                record = records.get(role)
                proc = record.process() if record is not None else None
                if proc is None:
                    continue
                parents.append(proc)
                with contextlib.suppress(psutil.NoSuchProcess):
                    children.update({c.pid: c for c in proc.children(recursive=True)})
            targets = terminate_group(parents, children, grace=grace)
            leftovers += [pid for pid, proc in targets.items() if still_running(proc)]
            for role in group:
                records.pop(role, None)
        self._save(records)
        return sorted(set(leftovers))

    def forget(self, roles: Sequence[str]) -> None:
        """Drop ``roles`` from the record (their processes have exited)."""
        records = self.load()
        for role in roles:
            records.pop(role, None)
        self._save(records)
