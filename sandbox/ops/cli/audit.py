"""``ark audit``: the auditor's offline checks of the transparency log, node journals and
a job's checkpoints.

Exit codes (also in ``ark audit --help`` and docs/audit.md):

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
36    one attested TEE (ueid) admitted as two nodes in one run
37    a comparison's scorecard on another held-out set than its node committed to
38    a comparison finished without a scorecard of one of its models from a node
39    a scorecard or commitment not signed by a key certified for an attested sandbox
40    the log cannot be reached or read
41    a secure-aggregation round whose logged stages break the protocol
42    a node's or the aggregate's logged privacy spending does not recompute
43    a list logged per member does not match what its event commits to
====  ==========================================================================
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from sandbox.errors import ArkError, LogUnavailable, LogVerificationError
from sandbox.ops.cli.base import audit_app, console, err_console, fail, read_json
from sandbox.ops.translog import MAX_AUDIT_ENTRIES

if TYPE_CHECKING:
    from sandbox.ops.translog.audit import Audit
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
StateOption = Annotated[
    Path | None,
    typer.Option(
        help="Folder keeping the last checkpoint seen, to catch rewritten history "
        "(without it, a rewrite before this audit cannot be detected)."
    ),
]
MaxEntriesOption = Annotated[
    int, typer.Option(min=0, help="Refuse logs with more entries (the audit holds them all).")
]


def _exit(exc: ArkError) -> typer.Exit:
    """Print the error and pick its documented exit code."""
    code = getattr(exc, "exit_code", 2)
    err_console.print(f"[bold red]{type(exc).__name__}:[/] {exc}")
    return typer.Exit(code)


def _open_log(log: str, key: Path, ca: Path | None) -> LogReader:
    from sandbox.ops.translog.client import LogClient
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


def _checks(
    audit: Audit, verifier: NoteVerifier, state: Path | None
) -> list[tuple[str, bool | None, str]]:
    cp, previous = audit.checkpoint, audit.previous
    consistent: tuple[str, bool | None, str]
    name = "Consistent with the last checkpoint seen"
    if previous is not None:
        consistent = (name, True, f"size {previous.size} → {cp.size}")
    elif state is None:
        consistent = (name, None, "not checked: no --state folder, so no earlier checkpoint")
    else:
        consistent = (name, None, f"not checked: first audit with --state {state}; kept now")
    violations = len(audit.violations)
    return [
        ("Checkpoint signature", True, f"signed by {verifier.name} (key {verifier.key_id.hex()})"),
        consistent,
        ("Every entry included", True, f"{cp.size} entries hash to the signed root"),
        (
            "Policy across events",
            not violations,
            "key releases, accepted updates, aggregates, secure rounds, privacy ledgers and "
            "comparisons all check out"
            if not violations
            else f"{violations} violation(s)",
        ),
    ]


def _verify(
    log: str,
    key: Path,
    ca: Path | None,
    origin: str | None,
    state: Path | None,
    max_entries: int = MAX_AUDIT_ENTRIES,
    verifier: NoteVerifier | None = None,
) -> tuple[Audit, NoteVerifier]:
    """Verify the log named by ``log`` with the key in ``key`` (or ``verifier``, already
    loaded from it), keeping checkpoints under ``state``."""
    from sandbox.ops.translog.audit import AuditorState, load_verifier, verify_log

    verifier = verifier or load_verifier(key)
    reader = _open_log(log, key, ca)
    keeper = None if state is None else AuditorState(state)
    previous = None if keeper is None else keeper.load(verifier, origin)
    audit = verify_log(reader, verifier, origin=origin, previous=previous, max_entries=max_entries)
    if keeper is not None:  # the log itself is sound: remember how far it went
        keeper.save(audit.note, audit.checkpoint)
    return audit, verifier


_OUTCOME = {True: "ok", False: "FAILED", None: "SKIPPED"}


def _print_checks(checks: list[tuple[str, bool | None, str]]) -> None:
    for name, ok, detail in checks:
        console.print(f"{_OUTCOME[ok]}: {name}: {detail}")


@audit_app.command("verify")
def audit_verify(
    log: LogOption,
    key: KeyOption,
    state: StateOption = None,
    ca: CaOption = None,
    origin: OriginOption = None,
    max_entries: MaxEntriesOption = MAX_AUDIT_ENTRIES,
) -> None:
    """Verify the log: checkpoint signature, consistency with the last checkpoint kept
    under --state, inclusion of every entry, and policy across events."""
    try:
        audit, verifier = _verify(log, key, ca, origin, state, max_entries)
    except (LogVerificationError, LogUnavailable) as exc:
        raise _exit(exc) from exc
    except ArkError as exc:
        raise fail(exc) from exc
    _print_checks(_checks(audit, verifier, state))
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
    state: StateOption = None,
    ca: CaOption = None,
    origin: OriginOption = None,
) -> None:
    """Prove that one entry is in the log under its latest signed checkpoint (which,
    with --state, must extend the last checkpoint seen)."""
    from sandbox.ops.translog.audit import AuditorState, check_consistency, load_verifier
    from sandbox.translog import merkle
    from sandbox.translog.note import verify_checkpoint

    if sum(x is not None for x in (index, entry, leaf_hash)) != 1:
        raise fail(ArkError("give exactly one of --index, --entry or --leaf-hash"))
    try:
        verifier = load_verifier(key)
        reader = _open_log(log, key, ca)
        note = reader.checkpoint()
        cp = verify_checkpoint(note, verifier, origin=origin)
        keeper = None if state is None else AuditorState(state)
        previous = None if keeper is None else keeper.load(verifier, origin)
        if previous is not None:
            check_consistency(reader, previous, cp)
        if keeper is not None:
            keeper.save(note, cp)
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
    journal_key: Annotated[
        list[Path] | None,
        typer.Option(
            "--journal-key",
            help="The node's journal public key (journal.jsonl.pub, from the node operator), "
            "one per --journal in the same order; without it each journal's own key is used.",
        ),
    ] = None,
    state: StateOption = None,
    ca: CaOption = None,
    origin: OriginOption = None,
    max_entries: MaxEntriesOption = MAX_AUDIT_ENTRIES,
) -> None:
    """Check each node journal's chain and signatures, then hold it against the log: the
    log must record every instruction the node received and every update it sent, and
    the node must have sent every update the log attributes to it."""
    from sandbox.journal import read_journal
    from sandbox.keyfiles import load_ed25519_public
    from sandbox.ops.translog.audit import crosscheck

    keys = journal_key or []
    if keys and len(keys) != len(journal):
        raise fail(ArkError("give one --journal-key per --journal, in the same order"))
    try:
        pinned: list[Any] = [load_ed25519_public(p) for p in keys] or [None] * len(journal)
        audit, _ = _verify(log, key, ca, origin, state, max_entries)
        mismatches = []
        for path, public_key in zip(journal, pinned, strict=True):
            entries = read_journal(path, public_key=public_key)
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
    state: StateOption = None,
    ca: CaOption = None,
    origin: OriginOption = None,
    max_entries: MaxEntriesOption = MAX_AUDIT_ENTRIES,
) -> None:
    """Verify the log and write a report a non-engineer can read: verdict, runs and
    rounds, attestations, key releases, participants, rejected updates, metrics.

    The report is written even when verification fails (it then says why), and the
    command exits with the same code `ark audit verify` would."""
    from sandbox.ops.translog.audit import load_verifier
    from sandbox.ops.translog.report import render_report

    now = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    try:
        verifier = load_verifier(key)
    except ArkError as exc:
        raise fail(exc) from exc
    expected = origin or verifier.name  # the log the auditor asked about
    code = 0
    try:
        audit, _ = _verify(log, key, ca, origin, state, max_entries, verifier)
    except (LogVerificationError, LogUnavailable) as exc:
        page = render_report(
            [],
            origin=expected,
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
            checks=_checks(audit, verifier, state),
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
    """Verify a job's latest round checkpoint, and each earlier round's records, against the
    digests recorded in its state."""
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
    try:
        rounds = store.history(state).rounds
    except ArkError as exc:
        raise fail(exc) from exc
    console.print(
        f"ok: round {state.round} adapter ({len(adapter)} tensors) matches its digest; "
        f"the records of {len(state.archived)} archived round(s) match theirs "
        f"({len(rounds)} rounds recorded); finished={state.finished}"
    )
