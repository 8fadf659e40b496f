"""The run's results as a person reads them: the before/after table and the plot, at 3
nodes and at a thousand (where both summarise instead of listing every node)."""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from rich.console import Console

from server.results import MAX_NODES_SHOWN, metrics_figure, plot_metrics, render_table


def results(n: int, rounds: int = 2, broken: dict[int, float] | None = None) -> dict[str, Any]:
    """Node i's accuracy in round r is (i + r) / (n + rounds): known means, no two equal;
    ``broken`` overrides some nodes' last-round accuracy (a diverged node's inf or NaN)."""
    made: dict[str, Any] = {
        "job_id": "j",
        "mode": "sealed",
        "metrics": ["accuracy", "macro_f1"],
        "rounds": [
            {
                "round": r,
                "nodes": {
                    str(i): {"accuracy": (i + r) / (n + rounds), "macro_f1": 0.5} for i in range(n)
                },
            }
            for r in range(rounds + 1)
        ],
    }
    for node, value in (broken or {}).items():
        made["rounds"][-1]["nodes"][str(node)]["accuracy"] = value
    return made


def text(made: dict[str, Any]) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(render_table(made))
    return console.export_text()


def mean_row(shown: str, label: str) -> list[str]:
    row = next(line for line in shown.splitlines() if label in line)
    return [cell.strip() for cell in row.split("│")[2:5]]


@pytest.mark.parametrize("n", [3, MAX_NODES_SHOWN])
def test_up_to_the_limit_every_node_is_listed(n: int) -> None:
    shown = text(results(n))
    assert [f"node {i} " in shown for i in range(n)] == [True] * n
    assert "more nodes" not in shown
    assert "mean of" not in shown


@pytest.mark.parametrize("n", [MAX_NODES_SHOWN + 1, 1000])
def test_many_nodes_show_the_first_ones_a_count_and_the_mean_of_all(n: int) -> None:
    shown = text(results(n))
    assert f"node {MAX_NODES_SHOWN - 1} " in shown
    assert f"node {MAX_NODES_SHOWN} " not in shown
    assert f"… {n - MAX_NODES_SHOWN:,} more nodes (results.json)" in shown
    # Mean accuracy in round r is (mean i + r) / (n + 2); every node gains 2 / (n + 2).
    before, after = ((n - 1) / 2) / (n + 2), ((n - 1) / 2 + 2) / (n + 2)
    cells = mean_row(shown, f"mean of {n:,} nodes")
    assert cells == [f"{before:.3f}", f"{after:.3f}", f"{after - before:+.3f}"]


def test_a_node_that_diverged_is_left_out_of_the_means_not_the_table() -> None:
    """One node's NaN or inf (a diverged run) would make every mean NaN; the means are
    over the nodes with finite values in both rounds, and the row says how many."""
    n = 100
    shown = text(results(n, broken={0: math.nan, 1: math.inf}))
    kept = [i for i in range(n) if i not in (0, 1)]
    before = sum(i / (n + 2) for i in kept) / len(kept)
    after = sum((i + 2) / (n + 2) for i in kept) / len(kept)
    # accuracy over 98 nodes, macro-F1 (finite everywhere) over all 100
    assert mean_row(shown, "mean of 98–100 nodes") == [
        f"{before:.3f}",
        f"{after:.3f}",
        f"{after - before:+.3f}",
    ]
    node_0 = next(line for line in shown.splitlines() if "node 0 " in line)
    assert [c.strip() for c in node_0.split("│")[2:5]] == ["0.000", "-", "-"]


@pytest.mark.parametrize("n", [3, 1000])
def test_the_plot_draws_each_node_up_to_the_limit_then_bands(n: int, tmp_path: Path) -> None:
    figure = metrics_figure(results(n, broken={0: math.nan}))
    try:
        panel = figure.axes[0]
        labels = set(panel.get_legend_handles_labels()[1])
        if n <= MAX_NODES_SHOWN:
            assert labels == {f"node {i}" for i in range(n)}
            assert len(panel.lines) == n
        else:
            assert labels == {
                "lowest to highest node",
                "middle half of the nodes",
                f"mean of {n - 1:,}–{n:,} nodes",  # node 0's last round is NaN
            }
            assert len(panel.lines) == 1
            assert np.isfinite(panel.lines[0].get_ydata()).all(), "NaN is left out of the mean"
    finally:
        import matplotlib.pyplot as plt

        plt.close(figure)
    path = plot_metrics(results(n), tmp_path / "metrics.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
