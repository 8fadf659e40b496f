"""Scale (issue 19): the project's ServerApp and ClientApp on Flower's simulation engine at
10, 100 and 1,000 virtual nodes, and how each cost grows with the node count.

What runs is ``server.app:app`` and ``clients.app:app`` themselves, on Flower 1.41's
simulation engine (Ray: ``pip install -e '.[simulation]'``, which ``make bench`` does),
in a fresh process per node count (``python -m bench.scale point``), so that no memory
figure carries over from a smaller run. For each n:

* a tiny BERT (2 layers, 16 wide, a WordPiece vocabulary of the demo tickets' words),
  built from a config and seeded, sealed by a provider workspace, and n node workspaces
  of 20 demo tickets each, provisioned as ``ark provider init|seal|allow-node`` and
  ``ark node init`` do (``sandbox.ops.provision.provision_loopback``);
* the provider's key broker and transparency log: ``ark provider serve``, a process of
  its own, TLS on loopback;
* the run: the simulation engine with one Ray actor running every virtual node's
  ClientApp, whose sandbox is a real :class:`~clients.sandbox.NodeSandbox` in that actor
  (``clients/simulated.py``); ``rounds`` rounds of 2 local steps, then the final
  evaluation. ``flwr.simulation.run_simulation`` takes no run config, and the ServerApp
  and every node read theirs, so the run goes through the function under it,
  ``_run_simulation``, with the run and its override config, as Flower's own
  ``flwr-simulation`` process calls it.

How each figure is measured:

* round wall time: from the previous round's ``aggregate_committed`` to this round's, in
  the job's events; the last training round is the steady state. The first round, from
  ``run_started``, also holds the handshake: every node's sandbox attests, has the model
  key released, unseals, certifies its channel key and builds its model.
* aggregator memory, by owner: in the simulation engine the ServerApp shares its process
  with Flower's in-memory SuperLink (in a deployment ``flower-superlink`` is a process of
  its own), so what each holds is sized apart (:func:`held_bytes`, pympler's deep
  ``asizeof``), in the ServerApp's thread before each round's first push (its
  instructions made and logged), at the first pull after each push and at each tenth of
  a message type's replies: what the aggregator's code reaches, and of it its numpy
  arrays (the global adapter, the running sums, the update being folded in: the
  model-sized part); and what the SuperLink reaches (the instructions not yet answered,
  the replies not yet pulled, its node registry). The row is the largest sample of the
  last training round. Beside them, at the same moments: the bytes of the aggregator's
  scratch stores on disk (``server/scratch.py``), where its per-node records are kept.
* process memory: ``tracemalloc`` in the process running the ServerApp, started just
  before the run; its peak between two commits (the aggregator, the SuperLink and the
  engine's driver threads together, peaks between samples included); torch's tensor
  storage and the C libraries' own heaps are not traced. Beside it: the process's RSS
  high-water, and the Ray actor's peak RSS (every virtual node's sandbox lives there).
* bytes per node per round: every message's size as Flower's protobuf
  (``message_to_proto``), instructions out and replies in, counted by a Grid that passes
  the ServerApp's calls through (:class:`MeteredGrid`), for the last training round,
  divided by n.
* log entries and bytes per round: read back from the run's SQLite log (the key broker's
  and the ServerApp's entries) between the same two commits; the largest single entry
  over the whole log.
* audit: ``ark audit verify --log translog.db`` as a command (exit code kept), and
  ``verify_log`` alone in this process.
* secure aggregation, full graph against sparse: ``bench.secagg.mask_unmask_costs``
  (median seconds, in one process: not part of the simulated run).

Growth is the least-squares slope of log(value) against log(n) over the node counts run.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import importlib
import importlib.util
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import types
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from flwr.serverapp import Grid

REPO = Path(__file__).resolve().parent.parent
NODES = (10, 100, 1000)
ROUNDS = 2
LOCAL_STEPS = 2
BATCH_SIZE = 8
MAX_LENGTH = 32
ROWS_PER_NODE = 20
MODEL_ID = "tiny"
SECAGG_GRAPHS = ("full", "sparse")
# A point (one node count) may take this long, plus this much per node and round.
POINT_SECONDS = 300.0
POINT_SECONDS_PER_NODE_ROUND = 2.0
MIB = 2**20
RAY_MISSING = (
    "the scale bench runs Flower's simulation engine, which needs ray: "
    "`.venv/bin/pip install -e '.[simulation]'` (make bench installs it)"
)
Log = Callable[[str], Any]


# -- growth and the table (pure) ------------------------------------------------------------


def loglog_slope(points: Iterable[tuple[float, float]]) -> float | None:
    """The least-squares slope of log(value) against log(n) over ``(n, value)`` points
    with both positive: 0 for a flat cost, 1 for a linear one, 2 for a quadratic one.
    None with fewer than two such points at distinct n."""
    kept = [(math.log(n), math.log(v)) for n, v in points if n > 0 and v is not None and v > 0]
    if len({x for x, _ in kept}) < 2:
        return None
    mean_x = sum(x for x, _ in kept) / len(kept)
    mean_y = sum(y for _, y in kept) / len(kept)
    sxx = sum((x - mean_x) ** 2 for x, _ in kept)
    sxy = sum((x - mean_x) * (y - mean_y) for x, y in kept)
    return sxy / sxx


@dataclass(frozen=True)
class Quantity:
    """One row of the table: where its value sits in a point's figures (a dotted path),
    what it is, and how it is expected to grow with n."""

    key: str
    name: str
    expected: str
    unit: str = ""

    def value(self, figures: Mapping[str, Any]) -> float | None:
        found: Any = figures
        for part in self.key.split("."):
            if not isinstance(found, Mapping) or part not in found:
                return None
            found = found[part]
        if isinstance(found, bool) or not isinstance(found, int | float):
            return None
        return float(found)


QUANTITIES = (
    Quantity("round_seconds", "round wall time, last training round", "O(n) here", "s"),
    Quantity("first_round_seconds", "first round, with the handshake", "O(n) here", "s"),
    Quantity(
        "memory.arrays_held_mib",
        "aggregator: its arrays (adapter, sums, update), in a round",
        "O(1)",
        "MiB",
    ),
    Quantity(
        "memory.aggregator_held_mib",
        "aggregator: all its code holds, in a round (sampled)",
        "O(1)",
        "MiB",
    ),
    Quantity(
        "memory.scratch_disk_mib",
        "aggregator: its per-node records on disk (scratch SQLite), in a round",
        "O(n)",
        "MiB",
    ),
    Quantity(
        "memory.superlink_held_mib",
        "Flower's in-memory SuperLink: instructions queued, nodes (sampled)",
        "O(n)",
        "MiB",
    ),
    Quantity(
        "memory.round_peak_mib",
        "ServerApp process: traced peak in a round (both of the above)",
        "O(n): the queue",
        "MiB",
    ),
    Quantity(
        "memory.round_start_mib",
        "ServerApp process: traced memory between rounds",
        "O(n): the registry",
        "MiB",
    ),
    Quantity("memory.rss_high_water_mib", "ServerApp process RSS high-water", "O(1)", "MiB"),
    Quantity(
        "memory.actor_rss_peak_mib", "virtual nodes' actor RSS (all sandboxes)", "O(n)", "MiB"
    ),
    Quantity("bytes.per_node_round", "bytes per node per round (down + up)", "O(1)", "B"),
    Quantity("log.round_entries", "log entries per round (the round's own)", "O(n)"),
    Quantity("log.round_bytes", "log bytes per round (the round's own)", "O(n)", "B"),
    Quantity("log.largest_entry_bytes", "largest single log entry", "O(1)", "B"),
    Quantity("audit.command_seconds", "ark audit verify of the run's log", "O(n)", "s"),
    Quantity("audit.verify_log_seconds", "verify_log alone", "O(n)", "s"),
)
# Secure aggregation's rows, for each graph and each median the cost function returns.
# Unmasking rebuilds every survivor's seed from t shares (t^2 field products each) and
# each dropped node's pair masks with its k neighbours: t and k grow as n in the full
# graph and as log n in the sparse one (Bell et al., CCS 2020).
SECAGG_EXPECTED = {
    ("full", "peers"): "O(n)",
    ("sparse", "peers"): "O(log n)",
    ("full", "masking"): "O(n)",
    ("sparse", "masking"): "O(log n)",
    ("full", "unmasking"): "O(n³)",
    ("sparse", "unmasking"): "O(n log² n)",
}


def secagg_quantities(costs: Mapping[str, Mapping[str, Any]]) -> list[Quantity]:
    """A row per graph and per figure the secure-aggregation cost function returned."""
    rows = []
    for graph in SECAGG_GRAPHS:
        names = sorted(
            {
                name
                for point in costs.values()
                for name, value in point.get(graph, {}).items()
                if isinstance(value, int | float) and not isinstance(value, bool)
            }
        )
        for name in names:
            kind = "peers" if name == "peers" else "unmasking" if "unmask" in name else "masking"
            rows.append(
                Quantity(
                    f"secagg.{graph}.{name}",
                    f"secagg {graph} graph: {name}",
                    SECAGG_EXPECTED[(graph, kind)],
                    "" if kind == "peers" else "s",
                )
            )
    return rows


def table_rows(
    points: Mapping[int, Mapping[str, Any]], quantities: Sequence[Quantity]
) -> list[dict[str, Any]]:
    """The table: for each quantity its value at every n run (None where not measured),
    its expected growth and its measured log-log slope."""
    nodes = sorted(points)
    rows = []
    for quantity in quantities:
        values = {n: quantity.value(points[n]) for n in nodes}
        rows.append(
            {
                "key": quantity.key,
                "quantity": quantity.name,
                "unit": quantity.unit,
                "values": values,
                "expected": quantity.expected,
                "slope": loglog_slope((n, v) for n, v in values.items() if v is not None),
            }
        )
    return rows


def format_value(value: float | None) -> str:
    """A table cell: three significant figures, thousands separated; "-" when missing."""
    if value is None:
        return "-"
    if value != 0 and abs(value) < 0.01:
        return f"{value:.2e}"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def markdown_table(rows: Sequence[Mapping[str, Any]], nodes: Sequence[int]) -> str:
    """The table as Markdown: quantity, one column per n, expected and measured growth."""
    head = ["quantity", *(f"n={n:,}" for n in nodes), "expected", "log-log slope"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        name = f"{row['quantity']} ({row['unit']})" if row["unit"] else row["quantity"]
        slope = "-" if row["slope"] is None else f"{row['slope']:.2f}"
        cells = [format_value(row["values"].get(n)) for n in nodes]
        lines.append("| " + " | ".join([name, *cells, row["expected"], slope]) + " |")
    return "\n".join(lines) + "\n"


def plot_rows(rows: Sequence[Mapping[str, Any]], folder: Path) -> list[str]:
    """One log-log PNG per quantity against n, its fitted slope in the legend; returns
    the file names written into ``folder``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    written = []
    for row in rows:
        points = sorted((n, v) for n, v in row["values"].items() if v is not None and v > 0)
        if not points:
            continue
        fig = Figure(figsize=(5, 3.6))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        slope = row["slope"]
        label = "measured" if slope is None else f"measured (slope {slope:.2f})"
        ax.plot(xs, ys, marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("virtual nodes n")
        ax.set_ylabel(row["unit"] or "count")
        ax.set_title(f"{row['quantity']}\nexpected {row['expected']}", fontsize=9)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"scale-{row['key'].replace('.', '-').replace('_', '-')}.png"
        fig.savefig(folder / name, dpi=110)
        written.append(name)
    return written


# -- one node count, in its own process -------------------------------------------------------


def _ark() -> tuple[list[str], dict[str, str]]:
    """The ``ark`` command and its environment: the code of this checkout first on its
    path, so the key broker and the auditor run what the apps run."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return [str(Path(sys.executable).parent / "ark")], {**os.environ, "PYTHONPATH": path}


def ray_available() -> bool:
    return importlib.util.find_spec("ray") is not None


def _say(n: int, started: float, text: str) -> None:
    # The terminal's stream: while the run goes, sys.stdout is the point's log file.
    stream = sys.__stdout__ or sys.stderr
    print(f"[scale n={n:,} {time.monotonic() - started:7.1f}s] {text}", file=stream, flush=True)


@dataclass
class Meter:
    """What the metered grid and the run monitor record in the ServerApp's process."""

    n: int
    started: float
    # (round, message type) -> bytes out (instructions) and in (replies), and counts.
    down: Counter[tuple[int, str]] = field(default_factory=Counter)
    up: Counter[tuple[int, str]] = field(default_factory=Counter)
    sent: Counter[tuple[int, str]] = field(default_factory=Counter)
    replies: Counter[tuple[int, str]] = field(default_factory=Counter)
    pushed_at: dict[tuple[int, str], float] = field(default_factory=dict)
    # message id -> its (round, type): replies are counted under their instruction's.
    pending: dict[str, tuple[int, str]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    # A tracemalloc snapshot's largest allocation sites, taken once, halfway through
    # the first training round's replies.
    top_sites: list[dict[str, Any]] = field(default_factory=list)
    # What the ServerApp's own code and Flower's in-memory SuperLink hold, sampled in the
    # ServerApp's thread (:func:`held_bytes`): at the first pull after each push and at
    # each tenth of the replies of a message type, the last reply included.
    held: list[dict[str, Any]] = field(default_factory=list)
    just_pushed: tuple[int, str] | None = None
    # Where the ServerApp's scratch stores (server/scratch.py) are made during the run:
    # their files are the per-node records kept on disk instead of in memory.
    scratch: Path | None = None

    def say(self, text: str) -> None:
        _say(self.n, self.started, text)


def _message_bytes(message: Any) -> int:
    from flwr.common.serde import message_to_proto

    return int(message_to_proto(message).ByteSize())


def _round_of(message: Any) -> int:
    from sandbox.errors import ProtocolError
    from sandbox.protocol import round_of

    try:
        return round_of(message.content) if message.has_content() else 0
    except ProtocolError:
        return 0


def _top_sites(limit: int = 8) -> list[dict[str, Any]]:
    """The traced memory's largest allocation sites now, as ``file:line`` (this
    checkout's and site-packages' files by their relative names)."""
    snapshot = tracemalloc.take_snapshot()
    prefixes = sorted({f"{REPO}/", *(f"{p}/" for p in sys.path if "site-packages" in p)})
    sites = []
    for stat in snapshot.statistics("lineno")[:limit]:
        site = str(stat.traceback[0])
        for prefix in prefixes:
            site = site.removeprefix(prefix)
        sites.append({"site": site, "mib": stat.size / MIB, "blocks": stat.count})
    return sites


# The aggregator's code: a frame of a file under these folders is the ServerApp's own.
AGGREGATOR_CODE = tuple(f"{REPO / folder}{os.sep}" for folder in ("server", "sandbox"))


@dataclass(frozen=True)
class Held:
    """Bytes held at one moment, by owner (see :func:`held_bytes`)."""

    # Everything the aggregator's code reaches, and of it the numpy arrays: the global
    # adapter, the running sums, the update being added (the model-sized part).
    aggregator: int
    arrays: int
    superlink: int


def held_bytes(
    flower: Sequence[Any], linkstate: Any, code: tuple[str, ...] = AGGREGATOR_CODE
) -> Held:
    """Bytes held now, by owner (pympler's ``asizeof``, deep): the aggregator (and of it
    its numpy arrays), and Flower's in-memory SuperLink. Call it from the ServerApp's
    thread.

    The aggregator's are the objects its code reaches: the locals of every frame of
    ``server/`` and ``sandbox/`` (``code``, the files whose frames count) on this thread's
    stack (the job, the round's state, the channel, the history, the running sums), with
    the objects in ``flower`` (the Grid that reaches the SuperLink) and every module,
    class and function left out. The per-node records those keep in their scratch stores
    (``server/scratch.py``) are rows on disk, not objects: the bench counts their files
    apart; SQLite's page caches (``CACHE_KIB`` a store, at most) are not counted here.
    Two passes size them, the second without numpy arrays; the samples' time counts in
    the round's wall time. The SuperLink's are what ``linkstate`` reaches: the
    instructions not yet answered, the replies not yet pulled, its node registry. In a
    deployment the two live in different processes (``flower-superlink`` is its own); in
    the simulation engine they share this one, so ``tracemalloc`` alone cannot tell them
    apart.
    """
    import numpy as np
    from pympler import asizeof

    # pympler ships no annotations: its sizer is taken as what it returns, Any.
    make_sizer: Callable[[], Any] = asizeof.Asizer

    frames: list[dict[str, Any]] = []
    frame: types.FrameType | None = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_filename.startswith(code):
            frames.append(dict(frame.f_locals))
        frame = frame.f_back

    def sizer(*excluded: type) -> Any:
        made = make_sizer()
        made.exclude_objs(*flower, linkstate)
        made.exclude_types(*excluded)
        return made

    aggregator = sizer().asizeof(*frames)
    records = sizer(np.ndarray).asizeof(*frames)
    superlink = 0
    if linkstate is not None:
        with linkstate.lock:
            superlink = make_sizer().asizeof(linkstate)
    return Held(aggregator, aggregator - records, superlink)


def _folder_bytes(folder: Path | None) -> int:
    """Bytes of the files under ``folder`` now (0 when there is none)."""
    if folder is None:
        return 0
    total = 0
    for path in folder.rglob("*"):
        with contextlib.suppress(FileNotFoundError):  # a store closed meanwhile
            total += path.stat().st_size if path.is_file() else 0
    return total


def metered_grid(grid: Grid, meter: Meter) -> Grid:
    """``grid`` with every call passed through, each message's size counted by round and
    type, and the replies' progress printed (:class:`MeteredGrid`)."""

    class MeteredGrid(Grid):
        """Flower's Grid as the ServerApp is handed it, counting what goes through."""

        def set_run(self, run: Any) -> None:
            grid.set_run(run)

        @property
        def run(self) -> Any:
            return grid.run

        def create_message(self, content: Any, message_type: str, dst_node_id: int,
                           group_id: str, ttl: float | None = None) -> Any:  # fmt: skip
            return grid.create_message(content, message_type, dst_node_id, group_id, ttl)

        def get_node_ids(self) -> Iterable[int]:
            return grid.get_node_ids()

        def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
            messages = list(messages)
            first = next(iter(messages), None)
            if first is not None:
                key = (_round_of(first), str(first.metadata.message_type))
                if not meter.sent[key]:
                    # The round's instructions are made and logged: measured before the
                    # first of them is handed to the SuperLink.
                    self.sample(key, "instructed")
            ids = list(grid.push_messages(messages))
            with meter.lock:
                for message in messages:
                    key = (_round_of(message), str(message.metadata.message_type))
                    meter.down[key] += _message_bytes(message)
                    meter.sent[key] += 1
                    meter.pushed_at.setdefault(key, time.monotonic())
                    meter.pending[message.metadata.message_id] = key
            pushed = sorted({meter.pending[m] for m in ids if m in meter.pending})
            for key in pushed:
                meter.say(f"round {key[0]} {key[1]}: {meter.sent[key]:,} messages out")
            if pushed:
                # Measured at the next pull: until the push returns, the instructions are
                # in the caller's hands as well as in the SuperLink's.
                meter.just_pushed = pushed[-1]
            return ids

        def sample(self, key: tuple[int, str], point: str) -> None:
            linkstate = getattr(grid, "state", None)
            if linkstate is None:
                raise RuntimeError(
                    "Flower's in-memory Grid has no `state`: its SuperLink cannot be sized"
                )
            held = held_bytes((self, grid), linkstate)
            meter.held.append(
                {
                    "round": key[0],
                    "type": key[1],
                    "point": point,
                    "aggregator_bytes": held.aggregator,
                    "arrays_bytes": held.arrays,
                    "superlink_bytes": held.superlink,
                    "scratch_bytes": _folder_bytes(meter.scratch),
                }
            )

        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
            if meter.just_pushed is not None:
                self.sample(meter.just_pushed, "pushed")
                meter.just_pushed = None
            replies = list(grid.pull_messages(message_ids))
            snapshot = False
            tenth: tuple[tuple[int, str], int] | None = None
            with meter.lock:
                for reply in replies:
                    key = meter.pending.pop(reply.metadata.reply_to_message_id, (0, "?"))
                    meter.up[key] += _message_bytes(reply)
                    before, meter.replies[key] = meter.replies[key], meter.replies[key] + 1
                    sent, done = meter.sent[key], meter.replies[key]
                    step = max(1, sent // 10)
                    if done // step != before // step or done == sent:
                        seconds = time.monotonic() - meter.pushed_at.get(key, meter.started)
                        meter.say(
                            f"round {key[0]} {key[1]}: {done:,}/{sent:,} replies ({seconds:.1f}s)"
                        )
                        tenth = (key, done)
                    half = key == (1, "train") and before < sent // 2 <= done
                    snapshot = snapshot or (half and not meter.top_sites)
            if snapshot:
                meter.top_sites = _top_sites()
            if tenth is not None:
                # The replies just pulled are still this frame's: what the job keeps of
                # them is measured once the job has taken them (the next pull's sample).
                self.sample(tenth[0], f"{tenth[1]} replies")
            return replies

        def send_and_receive(self, messages: Iterable[Any], *, timeout: float | None = None
                             ) -> Iterable[Any]:  # fmt: skip
            return self.pull_messages(self.push_messages(messages))

    return MeteredGrid()


@dataclass
class Window:
    """A stretch of the run between two events of the job: what the memory peaked at."""

    name: str
    start_mib: float
    peak_mib: float = 0.0


class RunMonitor:
    """Watches the job's events while the run goes (rounds committed, printed), and per
    round the traced memory's peak; also the Ray actor's RSS, sampled."""

    def __init__(self, events: Path, meter: Meter, interval: float = 0.2):
        self.events = events
        self.meter = meter
        self.interval = interval
        self.windows: list[Window] = []
        self.actor_rss = 0
        self.loads: list[float] = []  # the 1-minute load average, once a second
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="scale-monitor", daemon=True)
        self._offset = 0

    def __enter__(self) -> RunMonitor:
        current, _ = tracemalloc.get_traced_memory()
        self.windows.append(Window("start", current / MIB))
        tracemalloc.reset_peak()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._close("end")

    def _close(self, name: str) -> None:
        current, peak = tracemalloc.get_traced_memory()
        self.windows[-1].peak_mib = peak / MIB
        self.windows.append(Window(name, current / MIB))
        tracemalloc.reset_peak()

    def _new_events(self) -> list[dict[str, Any]]:
        try:
            with self.events.open("rb") as handle:
                handle.seek(self._offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        complete = data[: data.rfind(b"\n") + 1]
        self._offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]

    def _sample_actor(self) -> None:
        with contextlib.suppress(psutil.Error):
            for proc in psutil.Process().children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if "ClientAppActor" in " ".join(proc.cmdline()):
                        self.actor_rss = max(self.actor_rss, proc.memory_info().rss)

    def _watch(self) -> None:
        ticks = 0
        while not self._stop.wait(self.interval):
            for event in self._new_events():
                kind = event.get("kind")
                if kind == "aggregate_committed":
                    self._close(f"after round {event.get('round')}")
                    self.meter.say(f"round {event.get('round')} committed")
                elif kind in ("run_started", "run_finished"):
                    self.meter.say(kind.replace("_", " "))
            if ticks % 5 == 0:
                self._sample_actor()
                self.loads.append(os.getloadavg()[0])
            ticks += 1


def tiny_model(folder: Path, texts: Iterable[str]) -> Path:
    """A 2-layer, 16-wide BERT encoder (seeded) and a WordPiece tokenizer whose
    vocabulary is the special tokens, the words of ``texts`` and their characters (so an
    unseen word still splits), saved into ``folder``: small enough that a thousand
    sandboxes each hold one in one process."""
    import torch
    import transformers
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normalizer, splitter = BertNormalizer(lowercase=True), BertPreTokenizer()
    words: set[str] = set()
    for text in texts:
        words.update(word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    chars = sorted({c for word in words for c in word})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words), *chars]
    vocab += [f"##{c}" for c in chars]
    vocab = list(dict.fromkeys(vocab))
    folder.mkdir(parents=True)
    tokenizer = transformers.BertTokenizer(vocab={token: i for i, token in enumerate(vocab)})
    tokenizer.save_pretrained(str(folder))
    config = transformers.BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=MAX_LENGTH * 2,
    )
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    with torch.random.fork_rng():
        torch.manual_seed(0)
        transformers.BertModel(config).save_pretrained(str(folder), safe_serialization=True)
    return folder


@contextlib.contextmanager
def key_broker_process(workdir: Path, address: str, log_path: Path) -> Iterator[None]:
    """``ark provider serve`` (key broker and log) for the block; stopped after it, when
    it signs the log's last checkpoint."""
    from sandbox.ops.processes import start_process, stop_processes, wait_for_port

    port = address.rsplit(":", 1)[1]
    ark, env = _ark()
    proc = start_process(
        "ark provider serve",
        [*ark, "provider", "serve", "--workdir", str(workdir), "--address", f"127.0.0.1:{port}"],
        env=env,
        log_path=log_path,
    )
    try:
        wait_for_port("127.0.0.1", int(port), proc, timeout=60)
        yield
    finally:
        left = stop_processes([[proc]], grace=30)
        if left:
            raise RuntimeError(f"ark provider serve left processes {left} running")


def _simulate(spec: Any, n: int, meter: Meter, ray_dir: Path) -> None:
    """Run the ServerApp and the ClientApp on the simulation engine, one actor, with
    Ray's session files under ``ray_dir``."""
    from flwr.app import Context, RecordDict
    from flwr.common.config import get_fused_config_from_dir
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.serverapp import ServerApp
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    from clients.app import app as clientapp
    from server.app import app as serverapp

    metered = ServerApp()

    @metered.main()
    def main(grid: Grid, context: Context) -> None:
        serverapp(grid=metered_grid(grid, meter), context=context)

    run = Run.create_empty(run_id=int.from_bytes(os.urandom(7), "big"))
    run.primary_task_id = 1
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = dict(spec.to_run_config())
    # What the legacy entry point sets for the ServerApp's thread when it makes the run.
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(
        run_id=run.run_id,
        node_id=0,
        node_config={},
        state=RecordDict(),
        run_config=get_fused_config_from_dir(REPO, run.override_config),
    )
    # One actor holds every virtual node's sandbox across its messages; a second actor
    # would get messages of nodes whose hello it never saw.
    cpus = os.cpu_count() or 1
    _run_simulation(
        num_supernodes=n,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=clientapp,
        server_app=metered,
        backend_name="ray",
        backend_config={
            "client_resources": {"num_cpus": cpus, "num_gpus": 0.0},
            "init_args": {
                "num_cpus": cpus,
                "num_gpus": 0,
                "object_store_memory": 256 * MIB,
                "_temp_dir": str(ray_dir),
                "logging_level": "WARNING",
                "log_to_driver": True,
            },
        },
        server_app_context=context,
        app_dir=str(REPO),
        run=run,
        is_app=True,
    )


def _job_times(events: Path) -> dict[str, Any]:
    """Round boundaries from the job's events: run start, each commit, run end."""
    records = [json.loads(line) for line in events.read_text(encoding="utf-8").splitlines()]
    stamp: dict[str, float | None] = {"run_started": None, "run_finished": None}
    commits: dict[int, float] = {}
    for record in records:
        when = dt.datetime.fromisoformat(record["time"]).timestamp()
        if record["kind"] in stamp and stamp[record["kind"]] is None:
            stamp[record["kind"]] = when
        elif record["kind"] == "aggregate_committed":
            commits[int(record["round"])] = when
    return {"started": stamp["run_started"], "finished": stamp["run_finished"], "commits": commits}


def _walls(times: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each training round's wall time: from the previous commit (the run's start for
    the first) to its own."""
    walls, previous = [], times["started"]
    for rnd, when in sorted(times["commits"].items()):
        if previous is not None:
            walls.append({"round": rnd, "seconds": when - previous, "start": previous, "end": when})
        previous = when
    return walls


def log_figures(db: Path, window: tuple[float, float] | None, rnd: int) -> dict[str, Any]:
    """Entries and bytes of the whole log; of round ``rnd``'s own events (the ServerApp's
    entries that name the round, logged within ``window``, two UNIX times); what else
    was logged within the window (the key broker's: a node whose attestation result
    expired attests again); the largest single entry and its kind."""
    from sandbox.translog.store import LogStore

    with LogStore(db, readonly=True) as store:
        entries = store.entries(0, store.size())
    largest, largest_kind = 0, ""
    own: Counter[str] = Counter()
    other: Counter[str] = Counter()
    own_bytes = 0
    for entry in entries:
        record = json.loads(entry)
        kind = str(record.get("kind"))
        if len(entry) > largest:
            largest, largest_kind = len(entry), kind
        when = record.get("time")
        if window is None or not isinstance(when, str):
            continue
        if window[0] < dt.datetime.fromisoformat(when).timestamp() <= window[1]:
            if record.get("round") == rnd:
                own[kind] += 1
                own_bytes += len(entry)
            else:
                other[kind] += 1
    return {
        "entries": len(entries),
        "bytes": sum(len(e) for e in entries),
        "round_entries": sum(own.values()) if window else None,
        "round_bytes": own_bytes if window else None,
        "round_kinds": dict(sorted(own.items())),
        "others_in_round": dict(sorted(other.items())),
        "largest_entry_bytes": largest,
        "largest_entry_kind": largest_kind,
    }


def audit_figures(db: Path, vkey: Path) -> dict[str, Any]:
    """``ark audit verify`` over the log file (timed, its exit code), and ``verify_log``
    alone in this process (timed, its violations counted)."""
    from sandbox.ops.translog.audit import load_verifier, verify_log
    from sandbox.translog.store import LogStore

    ark, env = _ark()
    started = time.perf_counter()
    command = subprocess.run(
        [*ark, "audit", "verify", "--log", str(db), "--key", str(vkey)],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
        check=False,
    )
    seconds = time.perf_counter() - started
    with LogStore(db, readonly=True) as store:
        started = time.perf_counter()
        audit = verify_log(store, load_verifier(vkey))
        alone = time.perf_counter() - started
    return {
        "command_seconds": seconds,
        "command_rc": command.returncode,
        "command_tail": (command.stdout + command.stderr)[-600:],
        "verify_log_seconds": alone,
        "violations": len(audit.violations),
    }


def run_point(n: int, rounds: int, folder: Path) -> dict[str, Any]:
    """Provision and run ``n`` virtual nodes for ``rounds`` rounds in ``folder``; every
    figure of the point (see the module docstring). Failures are kept, not raised."""
    from clients.data import derive_labels
    from clients.simulated import SIMULATION_ENV, SimulatedFederation
    from sandbox.config import TASK_CLASSIFICATION, RunSpec
    from sandbox.events import JOB_EVENTS_FILE
    from sandbox.ops.demo_data import write_demo_data
    from sandbox.ops.federation import free_port
    from sandbox.ops.provision import provision_loopback
    from server.scratch import JOB_FOLDER

    started = time.monotonic()
    meter = Meter(n, started)
    figures: dict[str, Any] = {"nodes": n, "rounds": rounds, "ok": False, "error": None}
    # Other work on the machine stretches every time figure: its load is kept beside them.
    figures["load_average"] = {"start": os.getloadavg()}
    setup: dict[str, float] = {}
    figures["setup_seconds"] = setup
    data = write_demo_data(folder / "data", n, rows_per_node=ROWS_PER_NODE)
    names = list(data)
    sample = [json.loads(line)["text"] for p in list(data.values())[:3] for line in p.open()]
    model_dir = tiny_model(folder / "model", sample)
    setup["data_and_model"] = time.monotonic() - started
    meter.say(f"data and tiny model ready; provisioning {n:,} nodes")
    mark = time.monotonic()
    deployment = provision_loopback(
        folder / "federation",
        model_dir=model_dir,
        node_data=data,
        key_broker_port=free_port(),
        model_id=MODEL_ID,
        threads=1,
    )
    setup["provision"] = time.monotonic() - mark
    meter.say(f"provisioned in {setup['provision']:.1f}s")
    nodes_file = folder / "simulation.toml"
    SimulatedFederation(tuple(deployment.node_configs[name] for name in names)).write(nodes_file)
    os.environ[SIMULATION_ENV] = str(nodes_file)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    ws = deployment.provider
    events = folder / "job" / JOB_EVENTS_FILE
    spec = RunSpec(
        job_id=f"scale-{n}",
        task=TASK_CLASSIFICATION,
        model_path=model_dir,
        labels=tuple(derive_labels(list(data.values()))),
        num_rounds=rounds,
        min_nodes=n,
        expected_nodes=n,
        round_timeout=POINT_SECONDS + POINT_SECONDS_PER_NODE_ROUND * n,
        local_steps=LOCAL_STEPS,
        batch_size=BATCH_SIZE,
        max_length=MAX_LENGTH,
        output_dir=events.parent,
        aggregator_dir=ws.aggregator,
        log_db=ws.log_db,
    )
    import logging

    logging.getLogger("flwr").setLevel(logging.WARNING)  # the grid prints progress instead
    _preload()
    rss_before = psutil.Process().memory_info().rss
    monitor = RunMonitor(events, meter)
    try:
        with key_broker_process(ws.root, deployment.key_broker, folder / "keybroker.log"):
            meter.say("key broker and log serving; starting the simulation (Ray)")
            # The ServerApp's scratch stores (server/scratch.py), with the job's outputs.
            meter.scratch = events.parent / JOB_FOLDER  # the job's output directory
            tracemalloc.start()
            mark = time.monotonic()
            try:
                # The ServerApp prints a table of every node's metrics at the end, and
                # the actor's output comes through here too: into the point's log.
                with (
                    (folder / "run.log").open("w") as out,
                    contextlib.redirect_stdout(out),
                    monitor,
                ):
                    _simulate(spec, n, meter, folder / "ray")
                figures["ok"] = True
            except BaseException as exc:
                figures["error"] = f"{type(exc).__name__}: {exc}"
                meter.say(f"the run failed: {figures['error']}")
                if not isinstance(exc, Exception):
                    raise
            finally:
                figures["run_seconds"] = time.monotonic() - mark
                tracemalloc.stop()
                _shutdown_ray()
    except Exception as exc:  # the key broker would not start or stop
        figures["error"] = figures["error"] or f"{type(exc).__name__}: {exc}"
    rss_high = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    figures.update(_run_figures(events, monitor, meter, rounds, n))
    figures["memory"].update(
        {
            "rss_before_mib": rss_before / MIB,
            "rss_high_water_mib": rss_high / MIB,
            "actor_rss_peak_mib": monitor.actor_rss / MIB or None,
            "top_sites_first_round": meter.top_sites,
        }
    )
    if ws.log_db.exists():
        figures["log"] = log_figures(ws.log_db, figures.pop("_window"), rounds)
        meter.say(f"log: {figures['log']['entries']:,} entries; auditing")
        figures["audit"] = audit_figures(ws.log_db, ws.log_vkey)
        meter.say(
            f"ark audit verify: exit {figures['audit']['command_rc']} in "
            f"{figures['audit']['command_seconds']:.1f}s"
        )
    figures.pop("_window", None)
    figures["load_average"]["end"] = os.getloadavg()
    if monitor.loads:
        figures["load_average"]["run_mean"] = sum(monitor.loads) / len(monitor.loads)
        figures["load_average"]["run_max"] = max(monitor.loads)
    figures["point_seconds"] = time.monotonic() - started
    return figures


def _preload() -> None:
    """Import now what the run would import on first use (the apps, the model stack, the
    plot, Ray), so module code is not counted as the aggregator's memory."""
    for name in (
        "server.app",
        "server.secure_job",
        "clients.app",
        "torch",
        "transformers",
        "peft",
        "matplotlib.pyplot",
        "pympler.asizeof",
        "flwr.simulation.run_simulation",
        "flwr.server.superlink.fleet.vce.backend.raybackend",
        "ray",
    ):
        importlib.import_module(name)


def _shutdown_ray() -> None:
    """Flower shuts Ray down when its engine ends; make sure of it when it failed first."""
    if ray_available():
        ray = importlib.import_module("ray")
        if ray.is_initialized():
            ray.shutdown()


def _run_figures(
    events: Path, monitor: RunMonitor, meter: Meter, rounds: int, n: int
) -> dict[str, Any]:
    """Round walls, memory per round and bytes per node from what the run left."""
    out: dict[str, Any] = {"memory": {"windows": [dataclasses.asdict(w) for w in monitor.windows]}}
    walls = _walls(_job_times(events)) if events.exists() else []
    out["round_walls"] = [{k: w[k] for k in ("round", "seconds")} for w in walls]
    out["first_round_seconds"] = walls[0]["seconds"] if walls else None
    out["round_seconds"] = walls[-1]["seconds"] if len(walls) == rounds else None
    out["_window"] = (walls[-1]["start"], walls[-1]["end"]) if len(walls) == rounds else None
    # Window i runs from commit i (the run's start for the first) to commit i + 1: the
    # last training round's is closed by its commit only if that commit happened.
    windows = monitor.windows
    last = windows[rounds - 1] if len(windows) > rounds else None
    out["memory"]["round_peak_mib"] = None if last is None else last.peak_mib
    out["memory"]["round_start_mib"] = None if last is None else last.start_mib
    out["memory"]["round_peak_above_start_mib"] = (
        None if last is None else last.peak_mib - last.start_mib
    )
    out["memory"]["run_peak_mib"] = max((w.peak_mib for w in windows), default=None)
    out["memory"]["held_samples"] = meter.held
    last_round = [h for h in meter.held if (h["round"], h["type"]) == (rounds, "train")]
    for owner in ("aggregator", "arrays", "superlink"):
        out["memory"][f"{owner}_held_mib"] = (
            max(h[f"{owner}_bytes"] for h in last_round) / MIB if last_round else None
        )
        out["memory"][f"{owner}_held_run_mib"] = (
            max(h[f"{owner}_bytes"] for h in meter.held) / MIB if meter.held else None
        )
    out["memory"]["scratch_disk_mib"] = (
        max(h["scratch_bytes"] for h in last_round) / MIB if last_round else None
    )
    last_train = (rounds, "train")
    out["bytes"] = {
        "per_node_round": (meter.down[last_train] + meter.up[last_train]) / n
        if meter.replies[last_train]
        else None,
        "downlink_per_node_round": meter.down[last_train] / n,
        "uplink_per_node_round": meter.up[last_train] / n,
        "hello_per_node": (meter.down[(1, "query")] + meter.up[(1, "query")]) / n,
        "evaluate_per_node": (meter.down[(rounds, "evaluate")] + meter.up[(rounds, "evaluate")])
        / n,
        "by_round": [
            {
                "round": k[0],
                "type": k[1],
                "sent": meter.sent[k],
                "replies": meter.replies[k],
                "down": meter.down[k],
                "up": meter.up[k],
            }
            for k in sorted(meter.sent)
        ],
    }
    return out


def point_main(argv: Sequence[str] | None = None) -> None:
    """``python -m bench.scale point N``: one node count, its figures as JSON."""
    parser = argparse.ArgumentParser(prog="python -m bench.scale point")
    parser.add_argument("nodes", type=int)
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--keep", action="store_true", help="keep the point's folder")
    args = parser.parse_args(argv)
    if not ray_available():
        sys.exit(RAY_MISSING)
    folder = Path(tempfile.mkdtemp(prefix=f"ark-scale-{args.nodes}-"))
    try:
        figures = run_point(args.nodes, args.rounds, folder)
    finally:
        if args.keep:
            print(f"kept {folder}", flush=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)
    args.out.write_text(json.dumps(figures, indent=2, default=str), encoding="utf-8")


# -- the bench: every node count, secure aggregation's costs, the table ------------------------


def _run_child(n: int, rounds: int, out: Path, log: Log) -> dict[str, Any]:
    """Run one point in a fresh process (its own session); stop whatever it left."""
    from sandbox.ops.processes import terminate_group

    timeout = POINT_SECONDS + POINT_SECONDS_PER_NODE_ROUND * n * (rounds + 2)
    argv = [sys.executable, "-m", "bench.scale", "point", str(n), "--rounds", str(rounds)]
    proc = subprocess.Popen(
        [*argv, "--out", str(out)], cwd=REPO, start_new_session=True, stdin=subprocess.DEVNULL
    )
    seen: dict[int, psutil.Process] = {}
    deadline = time.monotonic() + timeout
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(psutil.Error):
                for child in psutil.Process(proc.pid).children(recursive=True):
                    seen.setdefault(child.pid, child)
            time.sleep(1.0)
        if proc.poll() is None:
            log(f"scale n={n}: no result after {timeout:.0f}s; stopping it")
            proc.send_signal(signal.SIGTERM)
    finally:
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)
        parent = [psutil.Process(proc.pid)] if proc.poll() is None else []
        left = terminate_group(parent, seen, grace=10)
        proc.wait()
        stray = [pid for pid, p in left.items() if p.is_running()]
        if stray:
            log(f"scale n={n}: processes {stray} would not stop")
    if not out.exists():
        return {"nodes": n, "rounds": rounds, "ok": False, "error": f"exit code {proc.returncode}"}
    figures: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    return figures


def secagg_costs(nodes: Sequence[int], log: Log) -> dict[str, Any]:
    """Secure aggregation's masking and unmasking, full graph against sparse, per n, from
    ``bench.secagg.mask_unmask_costs`` (skipped, with a note, while it does not exist)."""
    secagg = importlib.import_module("bench.secagg")
    costs = getattr(secagg, "mask_unmask_costs", None)
    if costs is None:
        return {"note": "bench.secagg.mask_unmask_costs does not exist yet; rows skipped"}
    points: dict[str, Any] = {}
    for n in nodes:
        points[str(n)] = {}
        for graph in SECAGG_GRAPHS:
            started = time.monotonic()
            try:
                points[str(n)][graph] = dict(costs(n, graph))
            except Exception as exc:
                points[str(n)][graph] = {"error": f"{type(exc).__name__}: {exc}"}
            log(
                f"secagg n={n} {graph}: {points[str(n)][graph]} ({time.monotonic() - started:.0f}s)"
            )
    return {"points": points}


def scale_bench(
    nodes: Sequence[int], rounds: int, results: Path, log: Log = print
) -> dict[str, Any]:
    """Every node count in its own process, secure aggregation's costs, the table (saved
    as ``scale.md``) and one PNG per quantity in ``results``."""
    if not ray_available():
        raise RuntimeError(RAY_MISSING)
    points: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="ark-scale-") as tmp:
        for n in nodes:
            log(f"scale: {n:,} virtual nodes, {rounds} rounds")
            points[n] = _run_child(n, rounds, Path(tmp) / f"{n}.json", log)
            status = "ok" if points[n]["ok"] else f"FAILED: {points[n]['error']}"
            log(f"scale n={n:,}: {status} ({points[n].get('point_seconds', 0):.0f}s)")
    secagg = secagg_costs(nodes, log)
    for n, costs in secagg.get("points", {}).items():
        points[int(n)]["secagg"] = costs
    quantities = [*QUANTITIES, *secagg_quantities(secagg.get("points", {}))]
    rows = table_rows(points, quantities)
    table = markdown_table(rows, sorted(points))
    (results / "scale.md").write_text(table, encoding="utf-8")
    figures = plot_rows(rows, results)
    return {
        "nodes": sorted(points),
        "rounds": rounds,
        "setup": {
            "model": "BERT 2 layers x 16, WordPiece of the demo words",
            "rows_per_node": ROWS_PER_NODE,
            "local_steps": LOCAL_STEPS,
            "batch_size": BATCH_SIZE,
            "max_length": MAX_LENGTH,
            "ray_actors": 1,
        },
        "points": {str(n): p for n, p in points.items()},
        "secagg_note": secagg.get("note"),
        "rows": [{**r, "values": {str(n): v for n, v in r["values"].items()}} for r in rows],
        "table": "scale.md",
        "figures": figures,
    }


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "point":
        point_main(sys.argv[2:])
    else:
        figures = scale_bench(NODES, ROUNDS, REPO / "bench" / "results")
        print(Path(REPO / "bench" / "results" / "scale.md").read_text(encoding="utf-8"))
