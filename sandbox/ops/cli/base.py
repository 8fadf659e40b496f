"""Shared parts of the ``ark`` command line: the command groups, consoles and helpers."""

from __future__ import annotations

import contextlib
import json
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape

from sandbox.errors import ArkError

# Output that is not a terminal (a pipe, a file, CI) is never wrapped or cut, whatever
# COLUMNS says: scripts, tests and logs read whole lines (paths are often longer than 80).
UNWRAPPED_WIDTH = 10_000


def _console(*, stderr: bool = False) -> Console:
    out = Console(stderr=stderr, highlight=False, soft_wrap=True)
    if not out.is_terminal:
        out.width = UNWRAPPED_WIDTH
    return out


console = _console()
err_console = _console(stderr=True)

app = typer.Typer(
    pretty_exceptions_show_locals=False,  # locals may hold key material
    help="Ark Sandbox: privacy-preserving federated LoRA fine-tuning.",
    no_args_is_help=True,
    add_completion=False,
)
provider_app = typer.Typer(
    pretty_exceptions_show_locals=False,  # locals may hold key material
    help="Model provider: identities, sealed models, the key broker, run results.",
    no_args_is_help=True,
)
node_app = typer.Typer(
    pretty_exceptions_show_locals=False,  # locals may hold key material
    help="Enterprise node operator: identity, attestation, private data checks.",
    no_args_is_help=True,
)
audit_app = typer.Typer(
    pretty_exceptions_show_locals=False,  # locals may hold key material
    help=(
        "Auditor: verify the transparency log, cross-check node journals, write reports.\n\n"
        "Exit codes: 0 everything holds; 2 bad usage or unreadable key file; "
        "10 bad checkpoint signature, 11 signed only by unknown keys, 12 malformed note, "
        "13 wrong origin; 20 log does not extend the last checkpoint, 21 truncated or "
        "rolled back, 22 forked, 23 edited entry, 24 deleted entry, 25 bad inclusion proof; "
        "30 malformed event, 31 key release without an affirming appraisal, 32 update from "
        "an unattested node, 33 aggregate with an unaccepted update; 34 journal entry "
        "missing from the log, 35 journal chain or signature broken; 36 one TEE (ueid) admitted "
        "as two nodes in one run; 40 log unreachable; 41 a secure-aggregation round whose "
        "logged stages break the protocol."
    ),
    no_args_is_help=True,
)
compare_app = typer.Typer(
    pretty_exceptions_show_locals=False,  # locals may hold key material
    help="Model comparison (1+N): the scored models side by side and a recommendation.",
    no_args_is_help=True,
)
app.add_typer(provider_app, name="provider")
app.add_typer(node_app, name="node")
app.add_typer(audit_app, name="audit")
app.add_typer(compare_app, name="compare")


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT: services run until it is set, then clean up."""
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def shorten(text: str, width: int = 60) -> str:
    """``text`` on one line, cut to ``width`` characters for a table cell."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def fail(exc: BaseException, code: int = 2) -> typer.Exit:
    # The message may quote another party's text or a log line: never read as markup.
    err_console.print(f"[bold red]error:[/] {escape(str(exc))}")
    return typer.Exit(code)


def plain(line: str) -> None:
    """Print ``line`` as it is: text from another process or party is not markup."""
    console.print(line, markup=False)


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``, or exit with an error naming the file."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise fail(ArkError(f"{path}: {exc}")) from exc
    if not isinstance(document, dict):
        raise fail(ArkError(f"{path}: expected a JSON object"))
    return document


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt so cleanup runs the same way as for Ctrl-C."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def party_command() -> Iterator[None]:
    """A party's start command: an interrupt or SIGTERM (what it started is stopped on the
    way out) exits 130, an ArkError exits 2, each with its message."""
    try:
        with sigterm_as_interrupt():
            yield
    except KeyboardInterrupt:
        raise fail(ArkError("interrupted: what this command started was stopped"), 130) from None
    except ArkError as exc:
        raise fail(exc) from exc


def stop_side(workspace: Path, order: tuple[tuple[str, ...], ...], side: str) -> None:
    """A party's stop command: stop what its record names; exit 1 if a process survives."""
    from sandbox.ops.parties import stop_party

    try:
        leftovers = stop_party(workspace, order)
    except ArkError as exc:
        raise fail(exc) from exc
    if leftovers:
        raise fail(ArkError(f"processes that would not stop: {leftovers}"), code=1)
    console.print(f"{side} stopped: no process of it is left")
