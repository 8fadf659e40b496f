"""Run results: ``results.json``, a rich before/after table and a PNG plot per round."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from sandbox.config import TASK_CLASSIFICATION, RunSpec
from server.history import History, RoundRecord, Training

RESULTS_FILE = "results.json"
PLOT_FILE = "metrics.png"
# Past this many nodes the table shows the first ones and a summary row, and the plot a
# band per metric instead of a line per node: a table or a legend of a thousand nodes
# reads as nothing, and drawing it took tens of MiB at the end of a 1,000-node run.
MAX_NODES_SHOWN = 12


def metric_names(task: str) -> tuple[str, str]:
    """The two held-out metrics reported for a task, headline first."""
    return ("accuracy", "macro_f1") if task == TASK_CLASSIFICATION else ("perplexity", "loss")


def build_results(spec: RunSpec, history: History) -> dict[str, Any]:
    """Per-node held-out metrics of the global adapter for round 0 and every round."""
    table = []
    names = metric_names(spec.task)
    for rnd in range(spec.num_rounds + 1):
        record = history.rounds.get(rnd, RoundRecord())
        training = record.training or Training()
        nodes = record.held_out
        mean = {
            name: sum(m[name] for m in nodes.values()) / len(nodes)
            for name in names
            if nodes and all(name in m for m in nodes.values())
        }
        table.append(
            {
                "round": rnd,
                "nodes": nodes,
                "mean": mean,
                "local_after_training": training.local,
                "train_loss": training.train_loss,
                "examples": training.examples,
                "rejected": training.rejected,
                "missing": training.missing,
                "seconds": None if record.training is None else training.seconds,
            }
        )
    return {
        "format": "ark-results/1",
        "job_id": spec.job_id,
        "task": spec.task,
        "mode": spec.mode,
        "labels": list(spec.labels),
        "num_rounds": spec.num_rounds,
        "metrics": list(metric_names(spec.task)),
        "rounds": table,
    }


def node_ids(results: Mapping[str, Any]) -> list[str]:
    """Every node that reported a held-out metric in any round."""
    seen: dict[str, None] = {}
    for entry in results["rounds"]:
        for node in entry["nodes"]:
            seen[node] = None
    return list(seen)


def _fmt(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3f}"


def _metric(entry: Mapping[str, Any], node: str, metric: str) -> float | None:
    value = entry["nodes"].get(node, {}).get(metric)
    return None if value is None else float(value)


def _finite(entry: Mapping[str, Any], node: str, metric: str) -> float | None:
    """A node's metric if it is a finite number (a diverged run reports inf or NaN)."""
    value = _metric(entry, node, metric)
    return value if value is not None and math.isfinite(value) else None


def _delta(before: float | None, after: float | None) -> str:
    if before is None or after is None or not math.isfinite(after - before):
        return "-"
    return f"{after - before:+.3f}"


def _nodes_counted(counts: set[int]) -> str:
    """How many nodes a mean is over: one count, or the range when metrics or rounds
    left out different nodes (a diverged node's inf or NaN)."""
    low, high = min(counts, default=0), max(counts, default=0)
    return f"{low:,}" if low == high else f"{low:,}–{high:,}"


def render_table(results: Mapping[str, Any], names: Mapping[str, str] | None = None) -> Table:
    """Before (round 0) and after (last round) held-out metrics per node; past
    :data:`MAX_NODES_SHOWN` nodes, the first of them, a row counting the rest (all in
    ``results.json``) and the means over every node with a finite value in both rounds."""
    names = names or {}
    first, last = results["rounds"][0], results["rounds"][-1]
    table = Table(
        title=f"{results['job_id']}: held-out metrics, round 0 → round {last['round']}"
        f" ({results['mode']})"
    )
    table.add_column("node")
    for metric in results["metrics"]:
        table.add_column(f"{metric} r0", justify="right")
        table.add_column(f"{metric} r{last['round']}", justify="right")
        table.add_column("Δ", justify="right")
    nodes = node_ids(results)
    for node in nodes[:MAX_NODES_SHOWN]:
        row = [names.get(node, f"node {node}")]
        for metric in results["metrics"]:
            before, after = _metric(first, node, metric), _metric(last, node, metric)
            row += [_fmt(before), _fmt(after), _delta(before, after)]
        table.add_row(*row)
    if len(nodes) <= MAX_NODES_SHOWN:
        return table
    table.add_row(
        f"… {len(nodes) - MAX_NODES_SHOWN:,} more nodes ({RESULTS_FILE})",
        *["" for _ in range(3 * len(results["metrics"]))],
    )
    row, counted = [], set()
    for metric in results["metrics"]:
        pairs = [
            (before, after)
            for node in nodes
            if (before := _finite(first, node, metric)) is not None
            and (after := _finite(last, node, metric)) is not None
        ]
        counted.add(len(pairs))
        means = [sum(p[i] for p in pairs) / len(pairs) if pairs else None for i in (0, 1)]
        row += [_fmt(means[0]), _fmt(means[1]), _delta(*means)]
    table.add_row(f"mean of {_nodes_counted(counted)} nodes", *row, style="bold")
    return table


def metrics_figure(results: Mapping[str, Any], names: Mapping[str, str] | None = None) -> Any:
    """A matplotlib figure with one panel per metric: held-out value per node per round;
    past :data:`MAX_NODES_SHOWN` nodes, each round's mean over the nodes, the band of
    the middle half of them and the band from the lowest to the highest (finite values)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    names = names or {}
    metrics = results["metrics"]
    nodes = node_ids(results)
    fig, axes = plt.subplots(1, len(metrics), figsize=(5 * len(metrics), 3.6))
    for ax, metric in zip(axes, metrics, strict=True):
        if len(nodes) <= MAX_NODES_SHOWN:
            for node in nodes:
                kept = [e for e in results["rounds"] if _metric(e, node, metric) is not None]
                xs = [e["round"] for e in kept]
                ys = [_metric(e, node, metric) for e in kept]
                ax.plot(xs, ys, marker="o", label=names.get(node, f"node {node}"))
        else:
            spread = [
                (e["round"], values)
                for e in results["rounds"]
                if (values := [v for n in nodes if (v := _finite(e, n, metric)) is not None])
            ]
            xs = [rnd for rnd, _ in spread]
            ax.fill_between(
                xs, [min(v) for _, v in spread], [max(v) for _, v in spread],
                alpha=0.15, color="C0", label="lowest to highest node",
            )  # fmt: skip
            quartiles = [np.percentile(v, [25, 75]) for _, v in spread]
            ax.fill_between(
                xs, [q[0] for q in quartiles], [q[1] for q in quartiles],
                alpha=0.3, color="C0", label="middle half of the nodes",
            )  # fmt: skip
            counted = _nodes_counted({len(v) for _, v in spread})
            ax.plot(xs, [sum(v) / len(v) for _, v in spread], marker="o",
                    label=f"mean of {counted} nodes")  # fmt: skip
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.set_title(f"held-out {metric}")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize="small")
    fig.suptitle(f"{results['job_id']} ({results['mode']})")
    fig.tight_layout()
    return fig


def plot_metrics(
    results: Mapping[str, Any], path: Path, names: Mapping[str, str] | None = None
) -> Path:
    """Write :func:`metrics_figure` as a PNG at ``path``."""
    fig = metrics_figure(results, names)  # selects the Agg backend before pyplot loads
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(results: Mapping[str, Any], out_dir: Path) -> None:
    """Write ``results.json`` and the plot, and print the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=2), encoding="utf-8")
    plot_metrics(results, out_dir / PLOT_FILE)
    Console(width=120).print(render_table(results))
