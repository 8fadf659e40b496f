"""``ark compare``: a finished comparison's scored models side by side, and the model a
stated rule recommends."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from sandbox.errors import ArkError, ConfigError
from sandbox.ops.cli.base import compare_app, console, fail, plain


@compare_app.command("results")
def compare_results(
    comparison_dir: Annotated[
        Path, typer.Argument(help="The comparison's output folder (holds comparison.json).")
    ],
    max_price: Annotated[
        float | None,
        typer.Option(
            help="Recommend only among models priced at most this per 1k training examples "
            "(default: the limit comparison.json states)."
        ),
    ] = None,
) -> None:
    """Print one table per node and overall, and the recommended model with its rule."""
    from sandbox.ops.comparison import Rule, load_comparison, notes, recommend, render_tables

    if max_price is not None and not (math.isfinite(max_price) and max_price >= 0):
        raise fail(ConfigError(f"must be a finite number >= 0, not {max_price}", key="--max-price"))
    try:
        comparison = load_comparison(comparison_dir)
    except ArkError as exc:
        raise fail(exc) from exc
    if max_price is not None:
        comparison = comparison.with_rule(Rule(max_price))
    for table in render_tables(comparison):
        console.print(table)
    for note in notes(comparison):
        plain(note)
    advice = recommend(comparison)
    # Model ids are other parties' strings: printed as they are, never read as markup.
    if advice.model_id is None:
        plain(f"No model recommended: {advice.reason}.")
    else:
        plain(f"Recommended: {advice.model_id} ({advice.reason}).")
    if advice.excluded:
        plain(f"Over the price limit, not considered: {', '.join(advice.excluded)}.")
    plain(advice.rule)
