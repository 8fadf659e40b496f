"""``ark audit``: the auditor's offline checks of the transparency log, node journals and
a job's checkpoints.

Exit codes (also in ``ark audit --help`` and the README):

====  ==========================================================================
0     everything holds
2     bad usage or an unreadable input of the auditor's own (key file, options)
10    a checkpoint signature by the log's key does not verify
11    the checkpoint is signed only by keys the auditor does not trust
12    the checkpoint or its signed note is malformed
13    the checkpoint is for another log (wrong origin)
20    the log does not extend the last checkpoint seen (history rewritten)
21    the log is smaller than the last checkpoint seen (truncated or rolled back)
22    two signed checkpoints of one size with different roots (forked log)
23    an entry does not hash into the signed tree (edited)
24    the log serves fewer entries than its checkpoint signs (deleted)
25    an inclusion proof does not verify
30    a malformed event
31    a key release with no affirming appraisal of that session and key before it
32    an update accepted from a node never attested and admitted in that run
33    a committed aggregate lists an update that was not accepted
34    a node journal records something the provider's log does not
35    a node journal's chain or signatures do not verify
40    the log cannot be reached or read
====  ==========================================================================
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from sandbox.cli.base import audit_app, console, err_console, fail, read_json
from sandbox.errors import ArkError, LogUnavailable, LogVerificationError

if TYPE_CHECKING:
    from sandbox.translog.audit import Audit
    from sandbox.translog.note import NoteVerifier
    from sandbox.translog.store import LogReader

LogOption = Annotated[
    str, typer.Option("--log", help="The log: host:port of its gRPC service, or its SQLite file.")
]
KeyOption = Annotated[
    Path,
    typer.Option(
        "--key", help="The provider's log key: public/log.vkey (C2SP vkey) or signing.pub (PEM)."
    ),
]
CaOption = Annotated[
    Path | None,
    typer.Option(help="CA certificate of the log's TLS (default: ca.crt next to --key)."),
]
OriginOption = Annotated[
    str | None, typer.Option(help="The log's origin (default: the key's name).")
]


def _exit(exc: ArkError) -> typer.Exit:
    """Print the error and pick its documented exit code."""
    code = getattr(exc, "exit_code", 2)
    err_console.print(f"[bold red]{type(exc).__name__}:[/] {exc}")
    return typer.Exit(code)


def _open_log(log: str, key: Path, ca: Path | None) -> LogReader:
    from sandbox.translog.client import LogClient
    from sandbox.translog.store import LogStore

    path = Path(log)
    if path.exists():
        return LogStore(path, readonly=True)
    host, _, port = log.rpartition(":")
    if not host or not port.isdigit():
        raise LogUnavailable(f"{log}: neither a log database nor host:port")
    ca = ca or key.parent / "ca.crt"
    if not ca.is_file():
        raise LogUnavailable(f"{ca}: no CA certificate for the log's TLS (pass --ca)")
    return LogClient(log, ca_cert=ca)


def _checks(audit: Audit, verifier: NoteVerifier) -> list[tuple[str, bool, str]]:
    cp, previous = audit.checkpoint, audit.previous
    since = (
        "no earlier checkpoint kept (first audit)"
        if previous is None
        else f"size {previous.size} → {cp.size}"
    )
    violations = len(audit.violations)
    return [
        ("Checkpoint signature", True, f"signed by {verifier.name} (key {verifier.key_id.hex()})"),
        ("Consistent with the last checkpoint seen", True, since),
        ("Every entry included", True, f"{cp.size} entries hash to the signed root"),
        (
            "Policy across events",
            not violations,
            "key releases, accepted updates and aggregates all check out"
            if not violations
            else f"{violations} violation(s)",
        ),
    ]


def _verify(
    log: str, key: Path, ca: Path | None, origin: str | None, state: Path | None
) -> tuple[Audit, NoteVerifier]:
    from sandbox.translog.audit import AuditorState, load_verifier, verify_log

    verifier = load_verifier(key)
    reader = _open_log(log, key, ca)
    keeper = None if state is None else AuditorState(state)
    previous = None if keeper is None else keeper.load(verifier, origin)
    audit = verify_log(reader, verifier, origin=origin, previous=previous)
    if keeper is not None:  # the log itself is sound: remember how far it went
        keeper.save(audit.note, audit.checkpoint)
    return audit, verifier


@audit_app.command("verify")
def audit_verify(
    log: LogOption,
    key: KeyOption,
    state: Annotated[
        Path | None,
        typer.Option(help="Folder keeping the last checkpoint seen, to catch rewritten history."),
    ] = None,
    ca: CaOption = None,
    origin: OriginOption = None,
) -> None:
    """Verify the log: checkpoint signature, consistency with the last checkpoint kept
    under --state, inclusion of every entry, and policy across events."""
    try:
        audit, verifier = _verify(log, key, ca, origin, state)
    except (LogVerificationError, LogUnavailable) as exc:
        raise _exit(exc) from exc
    except ArkError as exc:
        raise fail(exc) from exc
    for name, ok, detail in _checks(audit, verifier):
        console.print(f"{'ok' if ok else 'FAILED'}: {name}: {detail}")
    for violation in audit.violations:
        err_console.print(f"[bold red]{type(violation).__name__}:[/] {violation}")
    cp = audit.checkpoint
    console.print(f"log {cp.origin} at size {cp.size}, root {cp.root.hex()}")
    if audit.violations:
        raise typer.Exit(audit.violations[0].exit_code)


@audit_app.command("inclusion")
def audit_inclusion(
    log: LogOption,
    key: KeyOption,
    index: Annotated[int | None, typer.Option(help="The entry's index in the log.")] = None,
    entry: Annotated[
        Path | None, typer.Option(help="A file holding the entry's exact bytes.")
    ] = None,
    leaf_hash: Annotated[
        str | None, typer.Option(help="The entry's RFC 9162 leaf hash (hex).")
    ] = None,
    ca: CaOption = None,
    origin: OriginOption = None,
) -> None:
    """Prove that one entry is in the log under its latest signed checkpoint."""
    from sandbox.translog import merkle
    from sandbox.translog.audit import load_verifier
    from sandbox.translog.note import verify_checkpoint

    if sum(x is not None for x in (index, entry, leaf_hash)) != 1:
        raise fail(ArkError("give exactly one of --index, --entry or --leaf-hash"))
    try:
        verifier = load_verifier(key)
        reader = _open_log(log, key, ca)
        cp = verify_checkpoint(reader.checkpoint(), verifier, origin=origin)
        if index is not None:
            found = reader.entries(index, index + 1)
            if not found or index >= cp.size:
                raise fail(ArkError(f"entry {index} is not under the checkpoint of size {cp.size}"))
            leaf = merkle.leaf_hash(found[0])
            proof = reader.inclusion_proof(index, cp.size)
        else:
            leaf = (
                merkle.leaf_hash(entry.read_bytes())
                if entry is not None
                else bytes.fromhex(leaf_hash or "")
            )
            index, proof = reader.inclusion_proof_by_leaf(leaf, cp.size)
        merkle.verify_inclusion(leaf, index, cp.size, proof, cp.root)
    except (LogVerificationError, LogUnavailable) as exc:
        raise _exit(exc) from exc
    except (ArkError, OSError, ValueError) as exc:
        raise fail(ArkError(str(exc))) from exc
    console.print(
        f"ok: entry {index} (leaf {leaf.hex()[:16]}…) is in {cp.origin} at size {cp.size}; "
        f"proof of {len(proof)} hashes"
    )


@audit_app.command("crosscheck")
def audit_crosscheck(
    log: LogOption,
    key: KeyOption,
    journal: Annotated[
        list[Path], typer.Option("--journal", help="A node's journal.jsonl; repeat for each node.")
    ],
    ca: CaOption = None,
    origin: OriginOption = None,
) -> None:
    """Check each node journal's signatures, then that the provider's log records every
    instruction the node received and every update it sent."""
    from sandbox.journal import read_journal
    from sandbox.translog.audit import crosscheck

    try:
        audit, _ = _verify(log, key, ca, origin, None)
        mismatches = []
        for path in journal:
            entries = read_journal(path)
            found = crosscheck(audit.records, entries, str(path))
            console.print(
                f"{'ok' if not found else 'FAILED'}: {path}: {len(entries)} journal entries, "
                f"{len(found)} missing from the log"
            )
            mismatches.extend(found)
    except (LogVerificationError, LogUnavailable) as exc:
        raise _exit(exc) from exc
    except ArkError as exc:
        raise fail(exc) from exc
    for mismatch in mismatches:
        err_console.print(f"[bold red]{type(mismatch).__name__}:[/] {mismatch}")
    if mismatches:
        raise typer.Exit(mismatches[0].exit_code)


@audit_app.command("report")
def audit_report(
    log: LogOption,
    key: KeyOption,
    html: Annotated[Path, typer.Option("--html", help="Where to write the HTML report.")],
    state: Annotated[Path | None, typer.Option(help="As for `ark audit verify`.")] = None,
    ca: CaOption = None,
    origin: OriginOption = None,
) -> None:
    """Verify the log and write a report a non-engineer can read: verdict, runs and
    rounds, attestations, key releases, participants, rejected updates, metrics.

    The report is written even when verification fails (it then says why), and the
    command exits with the same code `ark audit verify` would."""
    from sandbox.translog.report import render_report

    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    code = 0
    try:
        audit, verifier = _verify(log, key, ca, origin, state)
    except (LogVerificationError, LogUnavailable) as exc:
        page = render_report(
            [],
            origin=origin or "unknown",
            size=0,
            root_hex="",
            checks=[("Log verification", False, f"{type(exc).__name__}: {exc}")],
            problems=[str(exc)],
            generated_at=now,
        )
        code = getattr(exc, "exit_code", 2)
    except ArkError as exc:
        raise fail(exc) from exc
    else:
        cp = audit.checkpoint
        page = render_report(
            audit.records,
            origin=cp.origin,
            size=cp.size,
            root_hex=cp.root.hex(),
            checks=_checks(audit, verifier),
            problems=[f"{type(v).__name__}: {v}" for v in audit.violations],
            generated_at=now,
        )
        code = audit.violations[0].exit_code if audit.violations else 0
    html.parent.mkdir(parents=True, exist_ok=True)
    html.write_text(page, encoding="utf-8")
    console.print(f"report written to {html}")
    if code:
        raise typer.Exit(code)


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
