"""``ark node``: the enterprise node operator's commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from sandbox.cli.base import console, fail, node_app
from sandbox.config import TASK_CLASSIFICATION, TASKS
from sandbox.errors import ArkError


@node_app.command("check-data")
def check_data(
    data_file: Path,
    task: Annotated[str, typer.Option(help=f"One of {', '.join(TASKS)}.")] = TASK_CLASSIFICATION,
    labels: Annotated[str | None, typer.Option(help="Comma-separated allowed labels.")] = None,
) -> None:
    """Validate a private data file locally; nothing leaves this machine."""
    from clients.data import load_examples, split_examples

    try:
        allowed = [x.strip() for x in labels.split(",")] if labels else None
        examples = load_examples(data_file, task, labels=allowed)
        split = split_examples(examples, source=data_file)
    except ArkError as exc:
        raise fail(exc) from exc
    console.print(
        f"ok: {len(examples)} rows ({len(split.train)} train, {len(split.heldout)} held out)"
    )
