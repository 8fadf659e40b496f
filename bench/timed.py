"""A command run to its end, each line of its output stamped with when it arrived.

The benches time the commands people run (``ark demo``, ``ark node start``) as their
caller waits for them, and split that time at lines the commands print ("run 1
submitted", "sandbox attested", …): a line's stamp is when the caller read it, so a
stage ends no later than its line's stamp.
"""

from __future__ import annotations

import os
import re
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class TimedOutput:
    """A finished command: its exit code, its wall time as the caller waited, and each
    line of its output (stdout and stderr together) with seconds since it was started."""

    argv: tuple[str, ...]
    code: int
    wall_seconds: float
    lines: tuple[tuple[float, str], ...]

    @property
    def text(self) -> str:
        return "\n".join(line for _, line in self.lines)

    def first(self, pattern: str) -> float | None:
        """Seconds from the start to the first line matching ``pattern`` (a regular
        expression searched in each line), or None when no line matches."""
        found = re.compile(pattern)
        return next((at for at, line in self.lines if found.search(line)), None)

    def between(self, start: str, end: str) -> float | None:
        """Seconds from the first line matching ``start`` to the first matching ``end``
        after it; None when either is missing."""
        begun = self.first(start)
        if begun is None:
            return None
        found = re.compile(end)
        return next(
            (at - begun for at, line in self.lines if at >= begun and found.search(line)), None
        )

    def require_success(self) -> TimedOutput:
        """This output; RuntimeError with the command and its last lines if it failed."""
        if self.code != 0:
            raise RuntimeError(f"`{' '.join(self.argv)}` exited {self.code}:\n{self.text[-4000:]}")
        return self


def run_timed(argv: Sequence[str], *, timeout: float = 1800.0) -> TimedOutput:
    """Run ``argv`` to its end, stamping each output line as it is read; the child runs
    unbuffered (``PYTHONUNBUFFERED``) so lines arrive as they are printed. A command still
    running after ``timeout`` seconds is terminated (it is ours; SIGTERM lets it stop what
    it started) and so ends with a failing exit code."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    proc = subprocess.Popen(
        list(argv),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
    )
    watchdog = threading.Timer(timeout, proc.terminate)
    watchdog.start()
    lines: list[tuple[float, str]] = []
    assert proc.stdout is not None  # stdout=PIPE
    try:
        for line in proc.stdout:
            lines.append((time.perf_counter() - started, line.rstrip("\n")))
        code = proc.wait()
    except BaseException:
        proc.terminate()
        proc.wait(timeout=60)
        raise
    finally:
        watchdog.cancel()
    return TimedOutput(tuple(argv), code, time.perf_counter() - started, tuple(lines))
