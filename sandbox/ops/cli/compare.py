"""``ark compare``: run a comparison of catalog models on one federation (the provider's
side), and show a finished comparison's scored models side by side with the model a
stated rule recommends."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer

from sandbox.errors import ArkError, CatalogError, ConfigError, FederationError
from sandbox.ops.cli.base import compare_app, console, fail, plain


def _check_price(max_price: float | None) -> None:
    if max_price is not None and not (math.isfinite(max_price) and max_price >= 0):
        raise fail(ConfigError(f"must be a finite number >= 0, not {max_price}", key="--max-price"))


@compare_app.command("run")
def compare_run(
    catalog: Annotated[Path, typer.Argument(help="The provider's catalog folder.")],
    run_config: Annotated[
        Path, typer.Argument(help="The run config every model runs with (data, rounds, steps).")
    ],
    workdir: Annotated[Path, typer.Option(help="The provider workspace.")] = Path("provider"),
    model: Annotated[
        list[str] | None,
        typer.Option(help="A catalog model to compare (repeat; default: all for the task)."),
    ] = None,
    comparison: Annotated[
        str | None, typer.Option(help="The comparison's id (default: cmp-<UTC time>).")
    ] = None,
    app_dir: Annotated[
        Path | None, typer.Option(help="The Flower app to run (default: this checkout).")
    ] = None,
    with_local: Annotated[
        bool,
        typer.Option(
            "--with-local",
            help="Also have each node fine-tune and score its operator's own model "
            "([node.sandbox] local-model), which never leaves the node (the 1 of 1+N).",
        ),
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds each model's job may take.")] = 3600.0,
    max_price: Annotated[
        float | None,
        typer.Option(help="The recommendation's price limit per 1k training examples."),
    ] = None,
    show: Annotated[
        bool, typer.Option(help="Print the tables and the recommendation at the end.")
    ] = True,
) -> None:
    """Compare catalog models on the running federation: one job per model, one after
    another, with the same data, budget and seed; the nodes commit to their held-out sets
    and sign a scorecard per model. Then write comparison.json, .html and .png and print
    the tables and the recommendation."""
    from sandbox.ops.apps import project_root
    from sandbox.ops.cli.provider import JobProgress
    from sandbox.ops.comparison_job import (
        comparison_dir,
        finish_comparison,
        plan_comparison,
        run_comparison,
    )
    from sandbox.ops.parties import follow_job, node_names, submit_job
    from sandbox.ops.provision import ProviderWorkspace

    _check_price(max_price)
    root = workdir.resolve()
    names = node_names(root) if (root / "run").is_dir() else {}

    def submit(config: Path) -> tuple[int, Path]:
        job = submit_job(root, config, app_dir or project_root(), say=plain)
        plain(f"run {job.run_id} submitted: job {job.spec.job_id}")
        outcome = follow_job(
            root,
            job,
            timeout=timeout,
            on_events=JobProgress(job.spec.num_rounds, names).show,
        )
        if not outcome.ok:
            raise FederationError(f"run {job.run_id} ended {outcome.status}: {outcome.details}")
        return job.run_id, job.output_dir

    try:
        plan = plan_comparison(
            root,
            catalog,
            run_config,
            models=model or (),
            comparison=comparison,
            with_local=with_local,
        )
        folder = comparison_dir(root, plan.comparison)
        plain(
            f"comparison {plan.comparison}: {len(plan.models)} models "
            f"({', '.join(m.model_id for m in plan.models)}), output in {folder}"
        )
        ws = ProviderWorkspace(root)
        jobs = run_comparison(plan, folder, ws.event_sink(), submit, say=plain)
        finish_comparison(plan, folder, jobs, names, ws.log_db, max_price=max_price, say=plain)
    except KeyboardInterrupt:
        raise fail(ArkError("stopped; the current model's job goes on"), 130) from None
    except CatalogError as exc:
        raise fail(exc, exc.exit_code) from exc
    except ArkError as exc:
        raise fail(exc) from exc
    if show:
        _show(folder, None)


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
    _check_price(max_price)
    _show(comparison_dir, max_price)


def _show(comparison_dir: Path, max_price: float | None) -> None:
    """Print a comparison's tables, notes and recommendation."""
    from sandbox.ops.comparison import Rule, load_comparison, notes, recommend, render_tables

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
    if advice.incomplete:
        plain(f"Not scored by every node, not considered: {', '.join(advice.incomplete)}.")
    if advice.excluded:
        plain(f"Over the price limit, not considered: {', '.join(advice.excluded)}.")
    plain(advice.rule)
