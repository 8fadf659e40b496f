"""Which long-running processes a party started, recorded by PID in its own workspace.

``ark provider start`` and ``ark node start`` launch their processes detached (each in
a session of its own, outliving the command) and record each one here: its role, its
PID and the process's identity: the boot it runs in and its start time in clock ticks
since that boot (``/proc/<pid>/stat``), both exact and unmoved by a wall-clock step.
``stop`` and ``status`` act on a PID only while it still names the process that was
recorded, run by this user, so a PID reused by a stranger after a crash or a reboot is
never signalled. Nothing is ever found by name.

The record is ``run/processes.json`` in the workspace: the folder must be this user's,
mode 0700 and not a symbolic link, and the file is read without following one (a record
is what decides which processes get signalled). A lock file beside it keeps two
commands of the same party from starting or stopping at once.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from sandbox.errors import ArkError, ConfigError
from sandbox.files import write_atomic
from sandbox.localsocket import private_folder
from sandbox.ops.processes import ManagedProcess, log_tail, still_running, terminate_group

RECORD_FILE = "processes.json"
# The longest a start or stop waits for another one of the same party to finish.
LOCK_WAIT = 600.0


def _boot_id() -> str:
    return Path("/proc/sys/kernel/random/boot_id").read_text(encoding="ascii").strip()


def process_identity(pid: int) -> tuple[str, int]:
    """(boot id, start time in clock ticks since boot) of process ``pid``: names exactly
    one process of this machine's life. ProcessLookupError once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError) as exc:
        raise ProcessLookupError(pid) from exc
    # The command name (field 2) may hold spaces and parentheses: fields after its ")".
    fields = stat[stat.rindex(b")") + 2 :].split()
    return _boot_id(), int(fields[19])  # field 22 of proc(5): starttime


@dataclass(frozen=True)
class Recorded:
    """One process a party started: what it is for, where its log is, and its identity."""

    role: str
    pid: int
    boot: str
    ticks: int
    argv: tuple[str, ...]
    log: str
    address: str = ""  # what it listens on, where it listens
    log_start: int = 0  # where its output starts in the log (a restart appends)

    def process(self) -> psutil.Process | None:
        """The live process this record names, run by this user; None once it exited or
        the PID names another process."""
        try:
            if process_identity(self.pid) != (self.boot, self.ticks):
                return None
            proc = psutil.Process(self.pid)
            if proc.uids().real != os.getuid() or not still_running(proc):
                return None
        except (ProcessLookupError, psutil.NoSuchProcess, psutil.AccessDenied):
            return None
        return proc

    def orphans(self) -> list[psutil.Process]:
        """Processes still in this process's session (it was started as a session
        leader) that started after it, this user's: what a crashed parent left behind.

        Only while the PID is ours or free: the kernel does not hand out a PID that is
        still some session's id, so with the PID free, that session is still ours. A PID
        that now names another process heads that process's session, not ours: none."""
        if self.boot != _boot_id():
            return []
        try:
            if process_identity(self.pid) != (self.boot, self.ticks):
                return []
        except ProcessLookupError:
            pass  # free: the session, if any member is left, is the one we started
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.pid == self.pid or os.getsid(proc.pid) != self.pid:
                    continue
                boot, ticks = process_identity(proc.pid)
                if boot == self.boot and ticks >= self.ticks and proc.uids().real == os.getuid():
                    found.append(proc)
            except (OSError, psutil.Error):
                continue
        return found

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines this process wrote to its log."""
        return log_tail(Path(self.log), self.log_start, lines)


class ProcessRecord:
    """The record of one party's processes under ``workspace/run``."""

    def __init__(self, workspace: Path):
        self.folder = workspace / "run"
        self.path = self.folder / RECORD_FILE

    def _private(self) -> None:
        private_folder(self.folder, "the process record's folder", path=self.path)

    @contextlib.contextmanager
    def locked(
        self, *, say: Callable[[str], None] | None = None, wait: float = LOCK_WAIT
    ) -> Iterator[ProcessRecord]:
        """Hold the party's lock: one start or stop at a time. While another holds it,
        say so once and wait (at most ``wait`` seconds; then ArkError)."""
        self._private()
        fd = os.open(self.folder / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            deadline = time.monotonic() + wait
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if say is not None:
                        say(f"waiting for another start or stop of {self.folder.parent}")
                        say = None
                    if time.monotonic() >= deadline:
                        raise ArkError(
                            f"another start or stop of {self.folder.parent} has held its "
                            f"lock ({self.folder / 'lock'}) for {wait:.0f}s"
                        ) from None
                    time.sleep(0.2)
            yield self
        finally:
            os.close(fd)

    def load(self) -> dict[str, Recorded]:
        """Every recorded process by role; ConfigError naming the file if it is malformed,
        a symbolic link, or in a folder that is not this user's."""
        if not self.folder.exists():
            return {}
        self._private()
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return {}
        except OSError as exc:
            why = "is a symbolic link" if exc.errno == errno.ELOOP else f"unreadable ({exc})"
            raise ConfigError(f"the process record {why}", path=self.path) from exc
        try:
            with os.fdopen(fd, "rb") as handle:
                raw = json.loads(handle.read().decode("utf-8"))
            records = {
                str(role): Recorded(
                    role=str(role),
                    pid=int(entry["pid"]),
                    boot=str(entry["boot"]),
                    ticks=int(entry["ticks"]),
                    argv=tuple(str(a) for a in entry["argv"]),
                    log=str(entry["log"]),
                    address=str(entry.get("address", "")),
                    log_start=int(entry.get("log_start", 0)),
                )
                for role, entry in raw["processes"].items()
            }
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ConfigError(f"unreadable process record ({exc})", path=self.path) from exc
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ConfigError(f"malformed process record ({exc!r})", path=self.path) from exc
        return records

    def _save(self, records: dict[str, Recorded]) -> None:
        document = {"processes": {role: asdict(rec) for role, rec in sorted(records.items())}}
        self._private()
        write_atomic(self.path, json.dumps(document, indent=2).encode(), mode=0o600)

    def add(self, role: str, proc: ManagedProcess, *, address: str = "") -> Recorded:
        """Record ``proc`` (just started) under ``role``."""
        boot, ticks = process_identity(proc.pid)
        argv = tuple(str(a) for a in proc.popen.args)  # type: ignore[union-attr]
        record = Recorded(
            role, proc.pid, boot, ticks, argv, str(proc.log_path), address, proc.log_start
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
        last), with every descendant and whatever a crashed one left in its session;
        return the PIDs that would not die. Their roles stay recorded, so a second stop
        (and ``status``) still finds them."""
        records = self.load()
        named = [role for group in order for role in group]
        groups = [list(group) for group in order] + [[r for r in records if r not in named]]
        leftovers: list[int] = []
        for group in groups:
            parents: list[psutil.Process] = []
            children: dict[int, psutil.Process] = {}
            for role in group:
                record = records.get(role)
                if record is None:
                    continue
                children.update({p.pid: p for p in record.orphans()})
                proc = record.process()
                if proc is None:
                    continue
                parents.append(proc)
                with contextlib.suppress(psutil.NoSuchProcess):
                    children.update({c.pid: c for c in proc.children(recursive=True)})
            targets = terminate_group(parents, children, grace=grace)
            survivors = [pid for pid, proc in targets.items() if still_running(proc)]
            leftovers += survivors
            for role in group:
                record = records.get(role)
                if record is not None and record.pid not in survivors:
                    del records[role]
        self._save(records)
        return sorted(set(leftovers))

    def forget(self, roles: Sequence[str]) -> None:
        """Drop ``roles`` from the record (their processes have exited)."""
        records = self.load()
        for role in roles:
            records.pop(role, None)
        self._save(records)
