"""The scale bench's pure parts: growth fitting, the table, and the simulated federation's
file. The simulation itself runs only in the bench (``python -m bench.run --only scale``)."""

from __future__ import annotations

import math
import os
import threading
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, RecordDict
from flwr.common.constant import PARTITION_ID_KEY

from bench.scale import (
    Quantity,
    format_value,
    held_bytes,
    loglog_slope,
    markdown_table,
    secagg_quantities,
    table_rows,
)
from clients.shuttle import is_simulated, node_config
from clients.simulated import SIMULATION_ENV, SimulatedFederation
from sandbox.errors import ConfigError
from sandbox.protocol import NODE_CONFIG_KEY

NODES = (10, 100, 1000)


@pytest.mark.parametrize(
    ("power", "scale"), [(0.0, 3.0), (1.0, 0.5), (2.0, 1e-4), (0.5, 7.0), (-1.0, 2.0)]
)
def test_the_slope_of_a_power_law_is_its_exponent(power: float, scale: float) -> None:
    points = [(n, scale * n**power) for n in NODES]
    slope = loglog_slope(points)
    assert slope is not None
    assert slope == pytest.approx(power, abs=1e-9)


def test_n_log_n_fits_between_linear_and_quadratic() -> None:
    slope = loglog_slope((n, n * math.log(n)) for n in NODES)
    assert slope is not None
    assert 1.0 < slope < 1.5


def test_a_slope_needs_two_positive_points_at_distinct_n() -> None:
    assert loglog_slope([]) is None
    assert loglog_slope([(10, 5.0)]) is None
    assert loglog_slope([(10, 5.0), (10, 7.0)]) is None
    assert loglog_slope([(10, 5.0), (100, 0.0), (1000, -1.0)]) is None
    # Points that cannot be on a log scale are left out, not fitted as zeros.
    assert loglog_slope([(10, 1.0), (100, 0.0), (1000, 100.0)]) == pytest.approx(1.0)


def test_the_table_reads_each_quantity_by_its_dotted_path() -> None:
    points: dict[int, dict[str, Any]] = {
        10: {"round_seconds": 1.0, "log": {"round_entries": 30}, "ok": True},
        100: {"round_seconds": 10.0, "log": {"round_entries": 300}},
        1000: {"round_seconds": None, "log": {}},
    }
    quantities = [
        Quantity("round_seconds", "round", "O(n)", "s"),
        Quantity("log.round_entries", "entries", "O(n)"),
        Quantity("ok", "a flag is not a figure", "O(1)"),
    ]
    rows = table_rows(points, quantities)
    assert rows[0]["values"] == {10: 1.0, 100: 10.0, 1000: None}
    assert rows[0]["slope"] == pytest.approx(1.0)
    assert rows[1]["values"] == {10: 30.0, 100: 300.0, 1000: None}
    assert rows[2]["values"] == {10: None, 100: None, 1000: None}
    assert rows[2]["slope"] is None


def test_the_markdown_table_has_a_column_per_n_and_marks_what_is_missing() -> None:
    rows = table_rows(
        {10: {"a": 1.5}, 100: {"a": 150.0}, 1000: {}}, [Quantity("a", "cost", "O(n)", "B")]
    )
    lines = markdown_table(rows, list(NODES)).splitlines()
    assert lines[0] == "| quantity | n=10 | n=100 | n=1,000 | expected | log-log slope |"
    assert lines[2] == "| cost (B) | 1.5 | 150 | - | O(n) | 2.00 |"


@pytest.mark.parametrize(
    ("value", "shown"),
    [(None, "-"), (0.0, "0"), (0.004, "4.00e-03"), (1.23456, "1.23"), (123456.7, "123,457")],
)
def test_a_cell_keeps_three_significant_figures(value: float | None, shown: str) -> None:
    assert format_value(value) == shown


def test_secure_aggregation_rows_follow_what_the_cost_function_returned() -> None:
    costs: dict[str, dict[str, Any]] = {
        "10": {
            "full": {"mask_seconds": 0.1, "unmask_seconds": 0.2, "peers": 9},
            "sparse": {"mask_seconds": 0.1},
        },
        "100": {"full": {"error": "MemoryError"}},
    }
    rows = {q.key: q for q in secagg_quantities(costs)}
    # A failed call's error text is no figure: it gets no row.
    assert set(rows) == {
        "secagg.full.mask_seconds",
        "secagg.full.unmask_seconds",
        "secagg.full.peers",
        "secagg.sparse.mask_seconds",
    }
    assert rows["secagg.full.unmask_seconds"].expected == "O(n³)"
    assert rows["secagg.sparse.mask_seconds"].expected == "O(log n)"
    assert rows["secagg.full.peers"].unit == ""
    assert rows["secagg.full.mask_seconds"].value({"secagg": {"full": {"error": "x"}}}) is None


def test_the_simulated_federation_file_round_trips(tmp_path: Path) -> None:
    nodes = tuple(tmp_path / f"node-{i}" / "node.toml" for i in range(3))
    path = tmp_path / "simulation.toml"
    SimulatedFederation(nodes).write(path)
    loaded = SimulatedFederation.load(path)
    assert loaded.nodes == nodes
    assert loaded.node(2) == nodes[2]
    with pytest.raises(ConfigError, match=r"simulation\.toml: key 'simulation\.nodes'.*id 3"):
        loaded.node(3)


@pytest.mark.parametrize(
    ("text", "found"),
    [
        ("[simulation]\nnodes = 'one.toml'\n", "must be a list"),
        ("[simulation]\nnodes = ['a.toml', 3]\n", "must be a list"),
        ("[other]\nnodes = []\n", "must be a list"),
        ("[simulation\n", "cannot read"),
    ],
)
def test_a_bad_simulated_federation_file_names_the_file_and_key(
    tmp_path: Path, text: str, found: str
) -> None:
    path = tmp_path / "simulation.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=found) as caught:
        SimulatedFederation.load(path)
    assert str(path) in str(caught.value)


def _context(node_config: dict[str, bool | float | int | str]) -> Context:
    return Context(run_id=1, node_id=1, node_config=node_config, state=RecordDict(), run_config={})


def test_only_a_node_without_a_node_config_is_simulated(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A SuperNode whose operator names a node config always reaches its sandbox over the
    socket, whatever partition-id it also has; a virtual node needs ARK_SIMULATION, which
    only whoever starts the engine sets."""
    real = _context({PARTITION_ID_KEY: 0, NODE_CONFIG_KEY: str(tmp_path / "node.toml")})
    assert not is_simulated(real)
    virtual = _context({PARTITION_ID_KEY: 0, "num-partitions": 2})
    assert is_simulated(virtual)
    monkeypatch.delenv(SIMULATION_ENV, raising=False)
    with pytest.raises(ConfigError, match=SIMULATION_ENV):
        node_config(virtual)
    monkeypatch.setenv(SIMULATION_ENV, str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match="cannot read the simulated federation"):
        node_config(virtual)


class LinkState:
    """What Flower's in-memory SuperLink state has that the sizer uses: a lock, and what
    it holds (a queued message of 100 kB)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.queue = {"message": b"q" * 100_000}


def test_what_the_aggregator_holds_is_told_apart_from_the_superlink_and_the_grid() -> None:
    link = LinkState()
    grid = SimpleNamespace(state=link, blob=b"g" * 300_000)  # Flower's: left out
    here = (f"{Path(__file__).resolve().parent}{os.sep}",)  # this file's frames count

    def aggregator_frame() -> Any:
        running_sum = np.zeros(50_000)  # 400 kB of arrays
        records = {str(node): {"accuracy": 0.5, "loss": 1.0} for node in range(1_000)}
        job = SimpleNamespace(grid=grid, records=records, sums=running_sum)
        return held_bytes((grid,), link, here), job

    held, _ = aggregator_frame()
    assert 400_000 <= held.arrays < 410_000
    records = held.aggregator - held.arrays
    assert 100_000 < records < 300_000, "a thousand small records, without the grid's blob"
    assert 100_000 <= held.superlink < 110_000
    # Frames of other code count for nothing.
    assert held_bytes((grid,), link, ("/nowhere/",)).aggregator == 0
