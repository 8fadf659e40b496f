"""``ark audit``: the auditor's offline checks."""

from __future__ import annotations

from pathlib import Path

from sandbox.cli.base import audit_app, console, fail, read_json
from sandbox.errors import ArkError


@audit_app.command("checkpoints")
def audit_checkpoints(job_dir: Path) -> None:
    """Verify a job's latest round checkpoint against the digest recorded in its state."""
    from server.checkpoint import STATE_FILE, CheckpointStore

    store = CheckpointStore(job_dir / "checkpoints")
    document = read_json(store.directory / STATE_FILE)
    try:
        loaded = store.load(str(document.get("fingerprint", "")))
    except ArkError as exc:
        raise fail(exc) from exc
    if loaded is None:
        raise fail(ArkError(f"{store.directory}: no checkpoint state"))
    state, adapter = loaded
    console.print(
        f"ok: round {state.round} adapter ({len(adapter)} tensors) matches its digest; "
        f"finished={state.finished}"
    )
