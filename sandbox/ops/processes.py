"""Processes we start, and only those: launch, watch, and stop them with their children.

Every process starts in its own session so a Ctrl-C in the terminal does not race our
orderly shutdown. Stopping walks the process tree captured from our own PIDs, never
by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import psutil

from sandbox.errors import FederationError


@dataclass
class ManagedProcess:
    """One process we launched, with its log file and the descendants seen so far."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    _log: IO[bytes]
    seen: dict[int, psutil.Process] = field(default_factory=dict)
    # Where this process's output starts in the log (a restarted process appends to the
    # log of the one before it).
    log_start: int = 0

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def remember_descendants(self) -> None:
        """Record children (Flower's launchers and app processes) while they exist.

        Only while our process is alive and unreaped: afterwards its PID may belong to
        a stranger, whose children are none of our business.
        """
        if not self.alive():
            return
        try:
            for child in psutil.Process(self.pid).children(recursive=True):
                self.seen.setdefault(child.pid, child)
        except psutil.NoSuchProcess:
            pass

    def log_tail(self, lines: int = 20) -> str:
        """The last ``lines`` lines this process wrote (not those of an earlier process
        with the same log, so a restart is not taken as ready by its predecessor's word)."""
        return log_tail(self.log_path, self.log_start, lines)


def log_tail(path: Path, start: int, lines: int = 20) -> str:
    """The last ``lines`` lines of the log at ``path`` from byte ``start`` on."""
    try:
        with path.open("rb") as handle:
            handle.seek(start)
            text = handle.read().decode("utf-8", errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def start_process(
    name: str,
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    log_path: Path,
    cwd: Path | None = None,
) -> ManagedProcess:
    """Start ``argv`` in a new session, with stdout and stderr going to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log = log_path.open("ab")
    start = log.seek(0, os.SEEK_END)
    try:
        popen = subprocess.Popen(
            list(argv),
            env=dict(env),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=cwd,
            start_new_session=True,
        )
    except OSError as exc:
        log.close()
        raise FederationError(f"cannot start {name} ({argv[0]}): {exc}") from exc
    return ManagedProcess(name=name, popen=popen, log_path=log_path, _log=log, log_start=start)


def _wait_gone(procs: Iterable[psutil.Process], timeout: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(list(procs), timeout=timeout)
    return list(alive)


def stop_processes(groups: Sequence[Sequence[ManagedProcess]], *, grace: float = 10.0) -> list[int]:
    """Stop groups in order (SIGTERM, wait, SIGKILL); return PIDs that would not die.

    The order matters for Flower: SuperNodes first, then the SuperLink, whose launcher
    exits by watching its parent.
    """
    leftovers: list[int] = []
    everything: dict[int, psutil.Process] = {}
    for group in groups:
        parents: list[psutil.Process] = []
        children: dict[int, psutil.Process] = {}
        for proc in group:
            proc.remember_descendants()
            children.update(proc.seen)
            if proc.alive():
                with contextlib.suppress(psutil.NoSuchProcess):
                    parents.append(psutil.Process(proc.pid))
        everything.update(terminate_group(parents, children, grace=grace))
        for proc in group:
            try:
                proc.popen.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                leftovers.append(proc.pid)
            proc._log.close()
    leftovers += [p.pid for p in everything.values() if still_running(p)]
    return sorted(set(leftovers))


def terminate_group(
    parents: Sequence[psutil.Process],
    children: Mapping[int, psutil.Process],
    *,
    grace: float = 10.0,
) -> dict[int, psutil.Process]:
    """SIGTERM ``parents`` and ``children`` together, SIGKILL what is left after ``grace``
    seconds; return every process targeted. psutil refuses to signal a PID that now
    belongs to another process, so a stale record never hits a stranger."""
    targets: dict[int, psutil.Process] = dict(children)
    for parent in parents:
        targets[parent.pid] = parent
    # The children are asked too, at once, instead of each waiting for its parent to go
    # (a SuperNode's SuperExec otherwise retries its gone parent for seconds).
    for proc in targets.values():
        if still_running(proc):
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
    alive = _wait_gone(targets.values(), grace)
    for survivor in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            survivor.kill()
    _wait_gone(alive, 5.0)
    return targets


def still_running(proc: psutil.Process) -> bool:
    """Whether a process we saw earlier is still running (the same one, not a reused PID)."""
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False


def kill_tree(proc: ManagedProcess) -> None:
    """SIGKILL a process and every descendant at once, as a crash would."""
    proc.remember_descendants()
    victims = [psutil.Process(proc.pid)] if proc.alive() else []
    victims += list(proc.seen.values())
    for victim in victims:
        try:
            victim.kill()
        except psutil.NoSuchProcess:
            continue
    _wait_gone(victims, 5.0)
    proc.popen.wait(timeout=5.0)


def wait_for_port(host: str, port: int, proc: ManagedProcess, timeout: float) -> None:
    """Block until ``host:port`` accepts connections or ``proc`` exits (RuntimeError)."""
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with code {proc.popen.returncode}")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.settimeout(0.5)
            if sock.connect_ex((host, port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"{proc.name} did not open {host}:{port} within {timeout:.0f}s")


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Ignore SIGINT and SIGTERM while the block runs (a stop in progress finishes; the
    caller was already told to stop), then restore the handlers."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
