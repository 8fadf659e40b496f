"""How the launcher of real processes learns that a run ended: from the ServerApp's events.

A stand-in SuperLink (a real process) starts a stand-in ServerApp (a real child process
whose command line names ``flwr-serverapp``, as Flower's does), which writes the job's
events file as the real one does; no Flower CLI is involved.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest

from sandbox.errors import FederationError
from sandbox.events import JOB_EVENTS_FILE as EVENTS_FILE
from sandbox.ops.federation import EventsTail, Federation, job_output_dir, write_run_config
from sandbox.ops.processes import start_process


def _line(kind: str, run: int) -> str:
    return json.dumps({"kind": kind, "run": run, "job": "j"}) + "\n"


def test_the_tail_returns_only_whole_new_lines(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    tail = EventsTail(events)
    assert tail.read() == []  # no file yet
    events.write_text(_line("run_started", 1) + '{"kind": "round_st', encoding="utf-8")
    assert [e["kind"] for e in tail.read()] == ["run_started"]
    assert tail.read() == []
    with events.open("a", encoding="utf-8") as handle:
        handle.write('arted", "run": 1}\n' + _line("run_finished", 1))
    assert [e["kind"] for e in tail.read()] == ["round_started", "run_finished"]


def test_a_line_that_is_not_json_is_named(tmp_path: Path) -> None:
    events = tmp_path / "events.jsonl"
    events.write_text("not json\n", encoding="utf-8")
    with pytest.raises(FederationError, match=r"events\.jsonl"):
        EventsTail(events).read()


def test_the_job_is_where_the_run_config_says(tmp_path: Path) -> None:
    values = {"model-path": str(tmp_path), "labels": '["a", "b"]', "output-dir": str(tmp_path)}
    assert job_output_dir(write_run_config(tmp_path / "run.toml", values)) == tmp_path
    del values["output-dir"]
    assert job_output_dir(write_run_config(tmp_path / "bare.toml", values)) is None
    (tmp_path / "bad.toml").write_text("num-rounds = 0\n", encoding="utf-8")
    with pytest.raises(FederationError, match=r"bad\.toml"):
        job_output_dir(tmp_path / "bad.toml")


def _fake_superlink(fed: Federation, serverapp: str) -> None:
    """A SuperLink stand-in whose child runs ``serverapp`` as ``flwr-serverapp``."""
    parent = textwrap.dedent(
        f"""
        import subprocess, sys, time
        subprocess.Popen([sys.executable, "-c", {serverapp!r}, "flwr-serverapp"]).wait()
        time.sleep(60)
        """
    )
    fed.superlink = start_process(
        "SuperLink",
        [sys.executable, "-c", parent],
        env={},
        log_path=fed.logs / "superlink.log",
    )


def test_a_run_completes_when_its_serverapp_wrote_run_finished_and_exited(
    tmp_path: Path,
) -> None:
    events = tmp_path / "job" / EVENTS_FILE
    events.parent.mkdir()
    done = tmp_path / "exited"
    # run_finished of another run first; this run's only after a while, then a pause
    # before the process exits, which the wait must sit out.
    serverapp = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        events = Path({str(events)!r})
        time.sleep(1.0)
        events.write_text({_line("run_finished", 3)!r} + {_line("run_started", 7)!r})
        time.sleep(1.0)
        with events.open("a") as handle:
            handle.write({_line("run_finished", 7)!r})
        time.sleep(1.0)
        Path({str(done)!r}).touch()
        """
    )
    fed = Federation(tmp_path)
    fed.run_events[7] = events
    try:
        _fake_superlink(fed, serverapp)
        ticks: list[None] = []
        outcome = fed.wait(7, timeout=60, on_tick=lambda: ticks.append(None))
        assert outcome.ok
        assert json.loads(outcome.details)["run"] == 7
        assert done.exists(), "the wait returned before the ServerApp exited"
        assert ticks
    finally:
        assert fed.stop() == []


def test_waiting_on_a_run_without_an_events_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(FederationError, match=r"run 5 .*output-dir"):
        Federation(tmp_path).wait(5, timeout=1)


def test_a_serverapp_that_exits_without_run_finished_ends_the_wait(tmp_path: Path) -> None:
    """No waiting out the timeout: Flower is asked once how the run ended (here there is
    no real SuperLink to ask, so the question itself fails, naming the CLI)."""
    events = tmp_path / "job" / EVENTS_FILE
    events.parent.mkdir()
    serverapp = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        Path({str(events)!r}).write_text({_line("run_started", 7)!r})
        time.sleep(1.5)
        """
    )
    fed = Federation(tmp_path)
    fed.run_events[7] = events
    try:
        _fake_superlink(fed, serverapp)
        with pytest.raises(FederationError, match="flwr list failed"):
            fed.wait(7, timeout=300)
    finally:
        assert fed.stop() == []
