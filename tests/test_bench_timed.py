"""bench/timed.py: the stamps the deployment bench splits ``ark node start`` and ``ark
demo`` at are when each line arrived, and a failing or hanging command is reported."""

from __future__ import annotations

import sys

import pytest

from bench.timed import run_timed

# Prints a line, waits, prints two more: the stamps must show the wait between them.
_SCRIPT = """\
import sys, time
print("sandbox starting (pid 1)")
time.sleep(0.6)
print("sandbox attested; the model is unsealed")
print("SuperNode connected to 198.51.100.1:9092")
sys.exit(int(sys.argv[1]))
"""


def test_lines_are_stamped_as_they_arrive_and_split_between_patterns() -> None:
    done = run_timed([sys.executable, "-c", _SCRIPT, "0"]).require_success()
    assert next(line for _, line in done.lines) == "sandbox starting (pid 1)"
    starting, attested = done.first(r"^sandbox starting"), done.first(r"^sandbox attested")
    assert starting is not None
    assert attested is not None
    assert attested - starting >= 0.5  # the child's sleep, not the end of the command
    gap = done.between(r"^sandbox attested", r"^SuperNode connected")
    assert gap is not None
    assert 0 <= gap < attested - starting  # printed right after: no sleep between them
    assert done.wall_seconds >= attested
    assert done.first(r"refused") is None
    assert done.between(r"refused", r"^SuperNode") is None


def test_a_failing_command_is_an_error_naming_it_and_its_output() -> None:
    done = run_timed([sys.executable, "-c", _SCRIPT, "3"])
    assert done.code == 3
    with pytest.raises(RuntimeError, match=r"exited 3:[\s\S]*SuperNode connected"):
        done.require_success()


def test_a_command_past_its_timeout_is_terminated() -> None:
    done = run_timed([sys.executable, "-c", "import time; time.sleep(30)"], timeout=0.5)
    assert done.code != 0
    assert done.wall_seconds < 10
