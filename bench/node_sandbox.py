"""The node sandbox's figures (issue 14), from one sealed ``ark demo`` run's own records.

One demo-sized run (three nodes, MiniLM, the demo data, two rounds) of ``ark demo``, the
command whose wall time the issue quotes, is timed; then its records are read:

* the nodes' journals (``nodes/<name>/journal.jsonl``): each train and evaluate entry's
  ``timings`` say when the forwarding ClientApp process started, when the sandbox
  received the instruction, how long it trained and evaluated, and when it was done;
* the job's events (``provider/jobs/<job>/events.jsonl``): when each round's
  instructions went out (``round_started``) and its aggregate was committed;
* the provider's events (``provider/events.jsonl``, the transparency log's entries):
  ``key_released`` per node TEE (by ueid).

The same reading of an older run, a cold ClientApp per message, is kept in
``results/before-sandbox.json`` (``python -m bench.node_sandbox --before WORKDIR``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.timed import run_timed
from sandbox.events import (
    AggregateCommitted,
    ChannelCertified,
    Evaluate,
    JsonlEventSink,
    Key,
    KeyReleased,
    RoundStarted,
    Train,
)
from sandbox.journal import read_journal

NODES = 3
ROUNDS = 2
BEFORE_FILE = Path(__file__).resolve().parent / "results" / "before-sandbox.json"
# The demo's own closing line: "... (3/3) · 71s wall time".
_WALL = re.compile(r"(\d+)s wall time")
# The provider's ``ark provider submit`` lines, relayed by the demo as "[provider] …".
_SUBMITTED = r"\] run \d+ submitted"
_FINISHED = r"\] run \d+ finished"
# The demo's line saying where the parties run (sandbox/ops/cli/demo.py).
_RAN_ON = {
    "netns": r"running each party on its own test host",
    "loopback": r"running every party on loopback",
}


def flower_sleeps() -> dict[str, dict[str, Any]]:
    """The fixed sleeps on a round's path, with where they are set. Flower's are literals
    in flwr 1.41's source (not settable); ours are read from the code that sets them."""
    import flwr

    from sandbox.ops.federation import _flower_env
    from server.rounds import POLL_SECONDS

    superexec = float(_flower_env(Path())["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"])
    return {
        "supernode_idle_pull": {
            "seconds": 3.0,
            "where": f"flwr {flwr.__version__} supernode/start_client_internal.py: after a "
            "pull that finds no instruction, time.sleep(3) before the next pull",
        },
        "superexec_task_poll": {
            "seconds": superexec,
            "where": "FLWR_SUPEREXEC_TASK_POLL_INTERVAL, set by sandbox/ops/federation.py "
            "(flwr's default 1.0 s, supercore/superexec/run_superexec.py): how often the "
            "node's SuperExec looks for a ClientApp to launch",
        },
        "supernode_reply_poll": {
            "seconds": 0.5,
            "where": f"flwr {flwr.__version__} supernode/start_client_internal.py "
            "_push_messages: time.sleep(0.5) until the ClientApp's reply is stored",
        },
        "serverapp_reply_poll": {
            "seconds": POLL_SECONDS,
            "where": "server/rounds.py POLL_SECONDS: the ServerApp's pull interval for "
            "replies (flwr's own Grid.send_and_receive, not used, sleeps 3 s)",
        },
    }


def _time(event: dict[str, Any]) -> float:
    return dt.datetime.fromisoformat(str(event[Key.TIME])).timestamp()


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _messages(root: Path) -> list[dict[str, Any]]:
    """Every train and evaluate entry of the run's node journals, with its node's name."""
    entries = []
    for journal in sorted(root.glob("nodes/*/journal.jsonl")):
        for entry in read_journal(journal):
            if entry[Key.KIND] in (Train.kind, Evaluate.kind) and Key.TIMINGS in entry:
                entries.append({**entry, "journal_node": journal.parent.name})
    if not entries:
        raise RuntimeError(f"{root}: no train or evaluate entries in nodes/*/journal.jsonl")
    return entries


def message_costs(root: Path, work: dict[str, float] | None = None) -> dict[str, Any]:
    """Per-message fixed cost: ClientApp process start to the sandbox's answer, less the
    training and evaluation inside it. ``work`` (seconds per message kind) stands in for
    the work time of journals that do not record it (a run before the sandbox)."""
    rows: dict[str, list[dict[str, float]]] = {}
    order: dict[str, list[dict[str, float]]] = {}
    seen: set[str] = set()
    for entry in _messages(root):
        t = entry[Key.TIMINGS]
        kind = entry[Key.KIND]
        measured = "work_seconds" in t
        spent = t["work_seconds"] if measured else (work or {}).get(kind, float("nan"))
        row = {
            "total": t["handler_end"] - t["process_start"],
            "start_to_handler": t["handler_start"] - t["process_start"],
            "handler_overhead": t["handler_end"] - t["handler_start"] - spent,
            "work": spent,
            "fixed": t["handler_end"] - t["process_start"] - spent,
            "measured_work": float(measured),
        }
        rows.setdefault(kind, []).append(row)
        # A node's first message of the run is the one that builds the run's model.
        first = entry["journal_node"] not in seen
        seen.add(entry["journal_node"])
        order.setdefault("first_per_node" if first else "later", []).append(row)

    def medians(items: list[dict[str, float]]) -> dict[str, float]:
        names = (k for k in items[0] if k != "measured_work")
        return {f"{k}_seconds": _median([i[k] for i in items]) for k in names}

    every = [row for items in rows.values() for row in items]
    return {
        "messages": len(every),
        "work_measured": all(row["measured_work"] for row in every),
        **medians(every),
        "by_kind": {k: {"messages": len(items), **medians(items)} for k, items in rows.items()},
        "by_order": {k: {"messages": len(items), **medians(items)} for k, items in order.items()},
    }


def _job_events(root: Path) -> list[dict[str, Any]]:
    files = sorted(root.glob("provider/jobs/*/events.jsonl"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise RuntimeError(f"{root}: no provider/jobs/*/events.jsonl")
    return JsonlEventSink(files[-1]).read()


def _round_times(root: Path) -> tuple[dict[int, float], dict[int, float]]:
    """When each training round's instructions went out, and when its aggregate was
    committed, by the ServerApp's events."""
    events = _job_events(root)
    started = {
        e[Key.ROUND]: _time(e)
        for e in events
        if e[Key.KIND] == RoundStarted.kind and e[Key.STAGE] == "train"
    }
    committed = {e[Key.ROUND]: _time(e) for e in events if e[Key.KIND] == AggregateCommitted.kind}
    return started, committed


def round_walls(root: Path) -> dict[int, float]:
    """Each training round's wall time, instructions out to aggregate committed."""
    started, committed = _round_times(root)
    return {rnd: committed[rnd] - started[rnd] for rnd in sorted(set(started) & set(committed))}


def round_costs(root: Path) -> dict[str, Any]:
    """Each training round's wall time (instructions out to aggregate committed, by the
    ServerApp's events) against the slowest node's train + evaluate time in it, and where
    the difference went on the path of the node that answered last."""
    started, committed = _round_times(root)
    trains = [e for e in _messages(root) if e[Key.KIND] == Train.kind]
    rounds = []
    for rnd in sorted(set(started) & set(committed)):
        timings = [e[Key.TIMINGS] for e in trains if e[Key.ROUND] == rnd]
        if not timings or any("work_seconds" not in t for t in timings):
            continue
        wall = committed[rnd] - started[rnd]
        slowest = max(t["work_seconds"] for t in timings)
        last = max(timings, key=lambda t: t["handler_end"])
        rounds.append(
            {
                "round": rnd,
                "wall_seconds": wall,
                "slowest_work_seconds": slowest,
                "ratio": wall / slowest,
                # The path of the node whose answer came last; these five sum to the wall.
                "last_node": {
                    "instruction_out_to_clientapp_start": last["process_start"] - started[rnd],
                    "clientapp_start_to_sandbox": last["handler_start"] - last["process_start"],
                    "sandbox_work": last["work_seconds"],
                    "sandbox_overhead": last["handler_end"]
                    - last["handler_start"]
                    - last["work_seconds"],
                    "sandbox_done_to_committed": committed[rnd] - last["handler_end"],
                },
            }
        )
    return {
        "rounds": rounds,
        "ratio_median": _median([r["ratio"] for r in rounds]),
        "wall_seconds_median": _median([r["wall_seconds"] for r in rounds]),
        "slowest_work_seconds_median": _median([r["slowest_work_seconds"] for r in rounds]),
        "fixed_sleeps": flower_sleeps(),
    }


def key_releases(root: Path) -> dict[str, Any]:
    """Model keys released per node TEE (``key_released``) and channel keys certified
    (``channel_certified``, once per run's hello: no key leaves), from the provider's
    events. A node's ueid is ``<node name>-<random>`` (``sandbox/ops/provision.py``)."""
    events = JsonlEventSink(root / "provider" / "events.jsonl").read()
    nodes = sorted(p.parent.name for p in root.glob("nodes/*/journal.jsonl"))

    def per_node(kind: str) -> dict[str, int]:
        counts = Counter(str(e[Key.UEID]).rsplit("-", 1)[0] for e in events if e[Key.KIND] == kind)
        return {node: counts.get(node, 0) for node in nodes}

    released = per_node(KeyReleased.kind)
    return {
        "key_released": released,
        "channel_certified": per_node(ChannelCertified.kind),
        "key_releases_per_node_max": max(released.values()) if released else 0,
    }


def figures(root: Path, work: dict[str, float] | None = None) -> dict[str, Any]:
    """Every figure this module reads from a finished run's workdir."""
    return {
        "per_message": message_costs(root, work),
        "round": round_costs(root),
        "key_releases": key_releases(root),
    }


def run_demo(
    root: Path, rounds: int = ROUNDS, nodes: int = NODES, hosts: str | None = None
) -> dict[str, Any]:
    """Run ``ark demo`` (sealed, real processes) into ``root``, on ``hosts`` (its
    ``--hosts``; the demo's default when None). Its wall time as the caller waits for it
    and as the demo prints it; the job's, from the provider's "run N submitted" line to
    its "run N finished" line, as they reached the caller; and where the parties ran."""
    argv = [
        str(Path(sys.executable).parent / "ark"),
        "demo",
        "--workdir",
        str(root),
        "--rounds",
        str(rounds),
        "--nodes",
        str(nodes),
        *(["--hosts", hosts] if hosts else []),
    ]
    load = os.getloadavg()[0]
    done = run_timed(argv).require_success()
    printed = _WALL.findall(done.text)
    return {
        "command": " ".join(["ark", *argv[1:2], *argv[4:]]),
        "wall_seconds": done.wall_seconds,
        "printed_wall_seconds": float(printed[-1]) if printed else None,
        "job_seconds": done.between(_SUBMITTED, _FINISHED),
        "ran_on": next((k for k, line in _RAN_ON.items() if done.first(line) is not None), None),
        # This machine is shared: the 1-minute load average before and after the run.
        "load_average": [load, os.getloadavg()[0]],
    }


def sandbox_bench(rounds: int = ROUNDS) -> dict[str, Any]:
    """The live ("after") figures from one demo run, beside the recorded "before" ones."""
    with tempfile.TemporaryDirectory(prefix="ark-bench-sandbox-") as tmp:
        root = Path(tmp) / "demo"
        demo = run_demo(root, rounds)
        after = {"demo": demo, **figures(root)}
    before = json.loads(BEFORE_FILE.read_text(encoding="utf-8")) if BEFORE_FILE.exists() else None
    return {"nodes": NODES, "rounds": rounds, "after": after, "before": before}


def record_before(root: Path, commit: str, demo_wall: float, printed: float | None) -> None:
    """Write ``results/before-sandbox.json`` from an old run's workdir. Its journals have no
    work time: each message's is taken as the median ``work_seconds`` of its kind in the
    newest ``results/latest.json`` sandbox run (same data, seed, model and steps)."""
    latest = json.loads((BEFORE_FILE.parent / "latest.json").read_text(encoding="utf-8"))
    kinds = latest["sandbox"]["after"]["per_message"]["by_kind"]
    work = {kind: row["work_seconds"] for kind, row in kinds.items()}
    before = {
        "commit": commit,
        "date": time.strftime("%Y-%m-%d"),
        "method": "ark demo --rounds 2 (3 nodes) at this commit, timed by the caller; "
        "per-message cost = handler_end - process_start of the ClientApp's journal "
        "timings (one cold ClientApp per message: import, attest, key release, unseal, "
        "build, train/evaluate) less work_seconds_assumed, the after run's median "
        "sandbox train+evaluate time for the same message kind (the old journal does "
        "not time the work apart); key releases from provider/events.jsonl",
        "work_seconds_assumed": work,
        "demo": {"wall_seconds": demo_wall, "printed_wall_seconds": printed},
        "per_message": message_costs(root, work),
        "round_wall_seconds": round_walls(root),
        "key_releases": key_releases(root),
    }
    BEFORE_FILE.write_text(json.dumps(before, indent=2) + "\n", encoding="utf-8")
    latest_path = BEFORE_FILE.parent / "latest.json"
    latest["sandbox"]["before"] = before  # the report shows the record it was compared with
    latest_path.write_text(json.dumps(latest, indent=2), encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--before", type=Path, required=True, help="an old run's workdir")
    parser.add_argument("--commit", required=True)
    parser.add_argument("--wall", type=float, required=True, help="its demo wall time")
    parser.add_argument("--printed-wall", type=float)
    args = parser.parse_args(argv)
    record_before(args.before, args.commit, args.wall, args.printed_wall)
    print(BEFORE_FILE.read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
