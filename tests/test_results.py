"""The run's results as a person reads them: the before/after table and the plot, at 3
nodes and at a thousand (where both summarise instead of listing every node)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from rich.console import Console

from server.results import MAX_NODES_SHOWN, plot_metrics, render_table


def results(n: int, rounds: int = 2) -> dict[str, Any]:
    """Node i's accuracy in round r is (i + r) / (n + rounds): known means, no two equal."""
    return {
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


def text(n: int) -> str:
    console = Console(width=200, record=True, file=io.StringIO())
    console.print(render_table(results(n)))
    return console.export_text()


def test_a_few_nodes_are_each_listed() -> None:
    shown = text(3)
    assert [f"node {i} " in shown for i in range(3)] == [True] * 3
    assert "more nodes" not in shown
    assert "mean of" not in shown


@pytest.mark.parametrize("n", [MAX_NODES_SHOWN + 1, 1000])
def test_many_nodes_show_the_first_ones_a_count_and_the_mean_of_all(n: int) -> None:
    shown = text(n)
    assert f"node {MAX_NODES_SHOWN - 1} " in shown
    assert f"node {MAX_NODES_SHOWN} " not in shown
    assert f"… {n - MAX_NODES_SHOWN:,} more nodes (results.json)" in shown
    row = next(line for line in shown.splitlines() if f"mean of {n:,} nodes" in line)
    # Mean accuracy in round r is (mean i + r) / (n + 2); every node gains 2 / (n + 2).
    before, after = ((n - 1) / 2) / (n + 2), ((n - 1) / 2 + 2) / (n + 2)
    cells = [cell.strip() for cell in row.split("│")[2:5]]
    assert cells == [f"{before:.3f}", f"{after:.3f}", f"{after - before:+.3f}"]


@pytest.mark.parametrize("n", [3, 1000])
def test_the_plot_is_written_at_any_node_count(n: int, tmp_path: Path) -> None:
    path = plot_metrics(results(n), tmp_path / "metrics.png")
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[0] > 500
