"""``ark provider``: identities, sealed models, the key broker, run results."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sandbox.cli.base import console, fail, provider_app, read_json
from sandbox.config import TASK_CLASSIFICATION, TASKS
from sandbox.errors import ArkError


@provider_app.command("check-model")
def check_model(
    model_dir: Path,
    task: Annotated[str, typer.Option(help=f"One of {', '.join(TASKS)}.")] = TASK_CLASSIFICATION,
) -> None:
    """Check that a local model directory can serve as a base model for TASK."""
    from sandbox.models import inspect_model_dir

    try:
        info = inspect_model_dir(model_dir, task)
    except ArkError as exc:
        raise fail(exc) from exc
    console.print(
        f"ok: {info.model_type} for {task}; weights: {', '.join(p.name for p in info.weight_files)}"
    )


@provider_app.command("results")
def show_results(job_dir: Path) -> None:
    """Print the before/after table of a finished job directory."""
    from server.results import RESULTS_FILE, render_table

    results = read_json(job_dir / RESULTS_FILE)
    console.print(render_table(results, results.get("node_names")))
