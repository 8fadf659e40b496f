"""The transparency log: C2SP notes, the SQLite store, the gRPC service over TLS, and the
auditor's CLI against each attack, with its own error and exit code."""

from __future__ import annotations

import base64
import hashlib
import multiprocessing
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from sandbox.canonical import canonical_entry
from sandbox.config import NodeConfig
from sandbox.errors import (
    AggregateUnaccepted,
    ConsistencyProofError,
    EntryMissing,
    EntryTampered,
    InclusionProofError,
    JournalInvalid,
    JournalMismatch,
    LogEntryTooLarge,
    LogFork,
    LogRollback,
    LogUnavailable,
    NodeAdmittedTwice,
    NoteMalformed,
    NoteSignatureInvalid,
    NoteUnknownSigner,
    OriginMismatch,
    PolicyViolation,
    ReleaseWithoutAppraisal,
    UpdateFromUnattested,
)
from sandbox.journal import append_journal, journal_public_path, read_journal
from sandbox.ops.cli import app
from sandbox.ops.federation import free_port
from sandbox.ops.tls import issue_loopback_tls
from sandbox.ops.translog.audit import AuditorState, check_policy, crosscheck, verify_log
from sandbox.ops.translog.client import LogClient
from sandbox.ops.translog.service import TransparencyLogServicer, serve_log
from sandbox.translog import merkle
from sandbox.translog.note import (
    Checkpoint,
    NoteSigner,
    NoteVerifier,
    open_note,
    sign_checkpoint,
    verify_checkpoint,
)
from sandbox.translog.store import LogStore
from tests.loghistory import (
    admission,
    attestation,
    build_log,
    denial_flood,
    digest,
    honest_history,
    new_signer,
    node_declined,
    node_journal,
    rejected,
    release,
    run_events,
    write_journal,
)

runner = CliRunner()


# -- C2SP notes and checkpoints ---------------------------------------------------------


def test_checkpoint_round_trips_in_the_c2sp_layout() -> None:
    root = bytes(range(32))
    checkpoint = Checkpoint("example.com/log", 42, root, ("ext one",))
    text = checkpoint.to_text()
    assert text == f"example.com/log\n42\n{base64.b64encode(root).decode()}\next one\n"
    assert Checkpoint.from_text(text) == checkpoint


@pytest.mark.parametrize(
    "text",
    [
        "",
        "origin\n42\n",
        "\n42\nAAAA\n",
        "origin\n042\n" + base64.b64encode(bytes(32)).decode() + "\n",
        "origin\n-1\n" + base64.b64encode(bytes(32)).decode() + "\n",
        "origin\n4 2\n" + base64.b64encode(bytes(32)).decode() + "\n",
        "origin\n42\n" + base64.b64encode(bytes(31)).decode() + "\n",
        "origin\n42\nnot base64!\n",
        "origin\n42\n" + base64.b64encode(bytes(32)).decode(),
        "origin\n42\n" + base64.b64encode(bytes(32)).decode() + "\n\n",
        "origin\n" + "9" * 5000 + "\n" + base64.b64encode(bytes(32)).decode() + "\n",
        f"origin\n{2**64}\n" + base64.b64encode(bytes(32)).decode() + "\n",
    ],
)
def test_malformed_checkpoints_are_refused(text: str) -> None:
    with pytest.raises(NoteMalformed):
        Checkpoint.from_text(text)


def test_note_key_id_and_vkey_follow_c2sp() -> None:
    signer = new_signer()
    vkey = signer.verifier.vkey()
    name, key_hex, blob = vkey.split("+", 2)
    raw = base64.b64decode(blob)
    assert name == signer.name
    assert raw[0] == 1
    assert len(raw) == 33

    assert bytes.fromhex(key_hex) == hashlib.sha256(name.encode() + b"\n" + raw).digest()[:4]
    assert NoteVerifier.from_vkey(vkey).key_id == signer.verifier.key_id
    with pytest.raises(NoteMalformed):
        NoteVerifier.from_vkey(f"{name}+00000000+{blob}")


def test_note_signature_line_and_verification() -> None:
    signer = new_signer()
    note = signer.sign("hello\n")
    text, signature = note.split("\n\n")
    assert text == "hello"
    assert signature.startswith(f"\u2014 {signer.name} ")
    assert open_note(note, [signer.verifier]) == "hello\n"
    other = new_signer()
    cosigned = note + other.signature_line("hello\n")
    assert open_note(cosigned, [other.verifier]) == "hello\n"
    with pytest.raises(NoteUnknownSigner):
        open_note(note, [other.verifier])
    tampered = note.replace("hello", "hellp", 1)
    with pytest.raises(NoteSignatureInvalid):
        open_note(tampered, [signer.verifier])


@pytest.mark.parametrize(
    "mangle",
    [
        lambda n: n.replace("\n\n", "\n"),  # no blank line
        lambda n: n.replace("\u2014 ", "- "),  # not an em dash
        lambda n: n[:-1],  # no final newline
        lambda n: n.replace("\n\n", "\x07\n\n"),  # control character in the text
        lambda n: n + "\u2014 x AAAA\n",  # signature too short for a key id
        lambda n: n.replace(" ", "  ", 1) if n.count(" ") else n,  # extra field
        lambda n: b"\xff" + n.encode(),  # not UTF-8
    ],
)
def test_malformed_notes_are_refused(mangle: Any) -> None:
    signer = new_signer()
    note = sign_checkpoint(Checkpoint(signer.name, 1, bytes(32)), signer)
    with pytest.raises(NoteMalformed):
        open_note(mangle(note), [signer.verifier])


def test_checkpoint_for_another_origin_is_refused() -> None:
    signer = new_signer()
    note = signer.sign(Checkpoint("another.example/log", 1, bytes(32)).to_text())
    with pytest.raises(OriginMismatch):
        verify_checkpoint(note, signer.verifier)


# -- the store ---------------------------------------------------------------------------


def test_store_proofs_match_the_pure_tree_at_every_size(tmp_path: Path) -> None:
    entries = [canonical_entry({"kind": "x", "i": i}) for i in range(70)]
    store = LogStore(tmp_path / "log.db")
    for entry in entries[:5]:
        store.append(entry)
    store.append_many(entries[5:])
    assert store.size() == 70
    for size in (1, 2, 5, 31, 32, 33, 64, 70):
        assert store.root(size) == merkle.root_hash(entries[:size])
        for index in {0, size // 2, size - 1}:
            assert store.inclusion_proof(index, size) == merkle.inclusion_proof(
                index, size, entries
            )
        for first in sorted({1, min(3, size), max(1, size // 2), size}):
            assert store.consistency_proof(first, size) == merkle.consistency_proof(
                first, size, entries
            )
    with pytest.raises(InclusionProofError):
        store.inclusion_proof(0, 71)


def test_store_never_recomputes_the_tree(tmp_path: Path) -> None:
    """A proof reads O(log n) stored hashes, never the entries beyond its own leaf."""
    store = LogStore(tmp_path / "log.db", durable=False)
    store.append_many(canonical_entry({"i": i}) for i in range(5000))
    calls: list[tuple[int, int]] = []
    original = store._node

    def counting(level: int, index: int) -> bytes:
        calls.append((level, index))
        return original(level, index)

    store._node = counting  # type: ignore[method-assign]
    store.inclusion_proof(1234, 4999)
    assert 0 < len(calls) <= 2 * 13


def test_threads_appending_at_once_share_commits_and_lose_nothing(tmp_path: Path) -> None:
    store = LogStore(tmp_path / "log.db")
    transactions: list[int] = []
    original = store.append_many

    def counting(entries: Any) -> range:
        indexes = original(entries)
        transactions.append(len(indexes))
        return indexes

    store.append_many = counting  # type: ignore[method-assign]
    entries = [canonical_entry({"thread": t, "i": i}) for t in range(8) for i in range(40)]
    # Hold the first commit until every other thread has queued its entry behind it.
    first = threading.Event()
    original_batch = counting

    def held(batch: Any) -> range:
        if not first.is_set():
            first.set()
            deadline = time.monotonic() + 10
            while len(store._queue) < 7 and time.monotonic() < deadline:
                time.sleep(0.01)
        return original_batch(batch)

    store.append_many = held  # type: ignore[method-assign, assignment]
    with futures.ThreadPoolExecutor(max_workers=8) as pool:
        indexes = list(pool.map(store.append, entries))
    assert max(transactions) >= 7, transactions  # the queued ones shared one commit
    assert sorted(indexes) == list(range(len(entries)))
    stored = store.entries(0, len(entries))
    assert [stored[i] for i in indexes] == entries
    assert store.root() == merkle.root_hash(stored)
    assert sum(transactions) == len(entries)
    with pytest.raises(LogEntryTooLarge, match="65537 bytes is over the limit of 65536"):
        store.append(b"x" * (64 * 1024 + 1))
    assert store.size() == len(entries)


def _append_from_process(path: str, worker: int) -> None:
    store = LogStore(Path(path))
    for i in range(50):
        store.append(canonical_entry({"worker": worker, "i": i}))
    store.close()


def test_provider_processes_append_to_one_log_safely(tmp_path: Path) -> None:
    path = tmp_path / "log.db"
    LogStore(path).close()
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_from_process, args=(str(path), w)) for w in range(3)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    store = LogStore(path, readonly=True)
    entries = store.entries(0, 1000)
    assert len(entries) == 150
    assert store.root() == merkle.root_hash(entries)


def test_readonly_store_refuses_to_append_and_missing_db_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(LogUnavailable):
        LogStore(tmp_path / "absent.db", readonly=True)
    LogStore(tmp_path / "log.db").close()
    with pytest.raises(RuntimeError):
        LogStore(tmp_path / "log.db", readonly=True).append(b"{}")


def test_checkpoint_is_signed_once_per_size(tmp_path: Path) -> None:
    signer = new_signer()
    store = build_log(tmp_path / "log.db", honest_history(), signer)
    assert store.sign_checkpoint(signer) == store.checkpoint()
    with sqlite3.connect(store.path) as db:
        rows = db.execute("SELECT size, signed_at FROM checkpoints").fetchall()
    assert len(rows) == 1
    store.sign_checkpoint(signer)
    with sqlite3.connect(store.path) as db:
        assert db.execute("SELECT size, signed_at FROM checkpoints").fetchall() == rows
    checkpoint = verify_checkpoint(store.checkpoint(), signer.verifier)
    assert checkpoint.size == store.size()
    assert checkpoint.root == store.root()


# -- the gRPC service over TLS -------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[LogClient, LogStore, NoteSigner, Path]]:
    signer = new_signer()
    store = build_log(tmp_path / "log.db", honest_history(runs=3), signer)
    tls = issue_loopback_tls(tmp_path / "tls", common_name="test-log", valid_days=1)
    server, port = serve_log(
        store, signer, address="127.0.0.1:0", cert=tls.server_cert, key=tls.server_key
    )
    client = LogClient(f"127.0.0.1:{port}", ca_cert=tls.ca_cert)
    try:
        yield client, store, signer, tls.ca_cert
    finally:
        client.close()
        server.stop(0).wait()


def test_service_answers_as_the_store_does(served: Any) -> None:
    client, store, signer, _ = served
    size = store.size()
    checkpoint = verify_checkpoint(client.checkpoint(), signer.verifier)
    assert checkpoint.size == size
    assert client.entries(0, size) == store.entries(0, size)
    assert client.inclusion_proof(7, size) == store.inclusion_proof(7, size)
    leaf = merkle.leaf_hash(store.entries(9, 10)[0])
    assert client.inclusion_proof_by_leaf(leaf, size) == (9, store.inclusion_proof(9, size))
    assert client.consistency_proof(5, size) == store.consistency_proof(5, size)
    with pytest.raises(InclusionProofError):
        client.inclusion_proof(0, size + 10)
    store.append(canonical_entry({"kind": "later"}))
    assert verify_checkpoint(client.checkpoint(), signer.verifier).size == size + 1


def test_service_has_no_append_rpc() -> None:
    from protos.ark.v1 import translog_pb2

    methods = translog_pb2.DESCRIPTOR.services_by_name["TransparencyLog"].methods_by_name
    assert sorted(methods) == [
        "GetCheckpoint",
        "GetConsistencyProof",
        "GetEntries",
        "GetInclusionProof",
    ]


def test_audit_verify_over_tls_and_an_unreachable_log(served: Any, tmp_path: Path) -> None:
    client, store, signer, ca = served
    vkey = _vkey(tmp_path, signer)
    result = _audit("verify", "--log", client.address, "--key", vkey, "--ca", ca)
    assert result.exit_code == 0, result.output
    assert f"at size {store.size()}" in result.output
    closed = f"127.0.0.1:{free_port()}"
    result = _audit("verify", "--log", closed, "--key", vkey, "--ca", ca)
    assert result.exit_code == LogUnavailable.exit_code == 40, result.output


# -- the auditor: positive path and attacks, through the CLI -------------------------------


def _vkey(tmp_path: Path, signer: NoteSigner) -> Path:
    path = tmp_path / "log.vkey"
    path.write_text(signer.verifier.vkey() + "\n", encoding="utf-8")
    return path


def _audit(*args: object) -> Any:
    return runner.invoke(app, ["audit", *map(str, args)])


class World:
    """An honest provider's log plus an auditor who already verified it once (--state)."""

    def __init__(self, tmp_path: Path, events: list[dict[str, Any]] | None = None):
        self.tmp = tmp_path
        self.signer = new_signer()
        self.events = honest_history(runs=2) if events is None else events
        self.db = tmp_path / "provider" / "translog.db"
        self.store = build_log(self.db, self.events, self.signer)
        self.vkey = _vkey(tmp_path, self.signer)
        self.state = tmp_path / "auditor"

    def verify(self, *extra: object) -> Any:
        return _audit("verify", "--log", self.db, "--key", self.vkey, "--state", self.state, *extra)

    def crosscheck(self, journal: Path, *extra: object) -> Any:
        return _audit(
            "crosscheck", "--log", self.db, "--key", self.vkey, "--journal", journal, *extra
        )

    def sql(self, statement: str, *params: Any) -> None:
        with sqlite3.connect(self.db) as db:
            db.execute(statement, params)

    def replace_checkpoint(self, note: str) -> None:
        self.sql("DELETE FROM checkpoints")
        self.sql("INSERT INTO checkpoints VALUES (?, ?, 'now')", self.store.size(), note)

    def rewrite(self, events: list[dict[str, Any]]) -> None:
        """The provider rebuilds the log from ``events`` and signs it with its real key."""
        self.store.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{self.db}{suffix}").unlink(missing_ok=True)
        self.store = build_log(self.db, events, self.signer)


@pytest.fixture
def world(tmp_path: Path) -> World:
    world = World(tmp_path)
    first = world.verify()
    assert first.exit_code == 0, first.output
    assert "ok: Policy across events" in first.output
    return world


def test_an_honest_log_verifies_and_grows(world: World) -> None:
    world.store.append_many(canonical_entry(e) for e in run_events(3))
    world.store.sign_checkpoint(world.signer)
    result = world.verify()
    assert result.exit_code == 0, result.output
    assert f"size {len(world.events)} → {world.store.size()}" in result.output
    history = (world.state / "history.log").read_text().splitlines()
    assert len(history) == 2


def test_edited_entry(world: World) -> None:
    edited = canonical_entry({**world.events[5], "status": "affirming", "ueid": "someone-else"})
    world.sql("UPDATE entries SET entry = ? WHERE idx = 5", edited)
    result = world.verify()
    assert result.exit_code == EntryTampered.exit_code == 23, result.output
    assert "EntryTampered: entry 5 " in result.output


def test_deleted_entry(world: World) -> None:
    world.sql("DELETE FROM entries WHERE idx = 12")
    result = world.verify()
    assert result.exit_code == EntryMissing.exit_code == 24, result.output
    assert "EntryMissing" in result.output


def test_truncated_log_is_a_rollback(world: World) -> None:
    world.rewrite(world.events[:-4])
    result = world.verify()
    assert result.exit_code == LogRollback.exit_code == 21, result.output
    assert "rolled back" in result.output


def test_forked_log_same_size_other_root(world: World) -> None:
    forked = list(world.events)
    forked[3] = {**forked[3], "status": "contraindicated"}
    world.rewrite(forked)
    result = world.verify()
    assert result.exit_code == LogFork.exit_code == 22, result.output
    assert "forked log" in result.output


def test_rewritten_history_that_grew_fails_consistency(world: World) -> None:
    rewritten = [e for i, e in enumerate(world.events) if i != 2] + honest_history(runs=1)
    world.rewrite(rewritten)
    result = world.verify()
    assert result.exit_code == ConsistencyProofError.exit_code == 20, result.output
    assert "history rewritten" in result.output


def test_checkpoint_signed_only_by_an_unknown_key(world: World) -> None:
    stranger = NoteSigner(world.signer.name, Ed25519PrivateKey.generate())
    world.replace_checkpoint(
        sign_checkpoint(
            Checkpoint(world.signer.name, world.store.size(), world.store.root()), stranger
        )
    )
    result = world.verify()
    assert result.exit_code == NoteUnknownSigner.exit_code == 11, result.output


def test_checkpoint_with_a_bad_signature_by_the_log_key(world: World) -> None:
    note = world.store.checkpoint()
    text, signature = note.split("\n\n")
    name, blob = signature.removeprefix("\u2014 ").split(" ")
    raw = bytearray(base64.b64decode(blob))
    raw[10] ^= 1
    world.replace_checkpoint(f"{text}\n\n\u2014 {name} {base64.b64encode(bytes(raw)).decode()}\n")
    result = world.verify()
    assert result.exit_code == NoteSignatureInvalid.exit_code == 10, result.output


def test_malformed_note(world: World) -> None:
    world.replace_checkpoint(world.store.checkpoint().replace("\n\n", "\n", 1))
    result = world.verify()
    assert result.exit_code == NoteMalformed.exit_code == 12, result.output


def test_wrong_origin(world: World) -> None:
    other = Checkpoint("ark-sandbox.local/log/another", world.store.size(), world.store.root())
    world.replace_checkpoint(world.signer.sign(other.to_text()))
    result = world.verify()
    assert result.exit_code == OriginMismatch.exit_code == 13, result.output


def test_key_release_with_no_affirming_appraisal_before_it(tmp_path: Path) -> None:
    events = honest_history()
    events.append(release("never-appraised", "node-9"))
    world = World(tmp_path, events)
    result = world.verify()
    assert result.exit_code == ReleaseWithoutAppraisal.exit_code == 31, result.output
    assert "session 'never-appraised'" in result.output


def test_key_release_after_a_contraindicated_appraisal(tmp_path: Path) -> None:
    events = honest_history()
    appraisal = _first_index(events, "attestation_appraised")
    events[appraisal] = {**events[appraisal], "status": "contraindicated"}
    assert [type(v) for v in check_policy(events)] == [ReleaseWithoutAppraisal]


def test_update_accepted_from_a_node_never_attested(tmp_path: Path) -> None:
    events = honest_history()
    accepted = events[_first_index(events, "update_accepted")]
    events.append({**accepted, "node": 99, "envelope_sha256": digest("rogue")})
    world = World(tmp_path, events)
    result = world.verify()
    assert result.exit_code == UpdateFromUnattested.exit_code == 32, result.output
    assert "node 99" in result.output


def test_aggregate_listing_an_update_that_was_not_accepted(tmp_path: Path) -> None:
    events = honest_history()
    commit = _first_index(events, "aggregate_committed")
    events[commit] = {**events[commit], "updates": [*events[commit]["updates"], digest("x")]}
    violations = check_policy(events)
    assert [type(v) for v in violations] == [AggregateUnaccepted]
    assert AggregateUnaccepted.exit_code == 33


def test_crosscheck_of_honest_journals(world: World, tmp_path: Path) -> None:
    journal = write_journal(
        tmp_path, [*node_journal(1, 2), {"kind": "egress_blocked", "reason": "no digests"}]
    )
    pinned = journal_public_path(journal)
    result = world.crosscheck(
        journal,
        "--journal-key",
        pinned,
    )
    assert result.exit_code == 0, result.output
    assert "3 journal entries, 0 missing" in result.output


def test_journal_entry_missing_from_the_providers_log(world: World, tmp_path: Path) -> None:
    hidden = digest("up", 1, 2, 3) + "0"
    journal = write_journal(
        tmp_path, [{"kind": "train", "run_id": 1, "round": 2, "sent_sha256": hidden}]
    )
    result = world.crosscheck(journal)
    assert result.exit_code == JournalMismatch.exit_code == 34, result.output
    assert "not in the provider's log" in result.output
    assert [type(m) for m in crosscheck(world.events, read_journal(journal), "j")] == [
        JournalMismatch
    ]


def test_tampered_journal(world: World, tmp_path: Path) -> None:
    journal = write_journal(tmp_path, [{"kind": "train", "run_id": 1, "sent_sha256": "aa"}] * 3)
    lines = journal.read_text().splitlines()
    journal.write_text("\n".join([lines[0], lines[1], lines[3]]) + "\n")
    result = world.crosscheck(journal)
    assert result.exit_code == JournalInvalid.exit_code == 35, result.output
    assert "line 3" in result.output
    journal.write_text("\n".join([lines[0], lines[1].replace('"aa"', '"ab"'), *lines[2:]]) + "\n")
    with pytest.raises(JournalInvalid, match="signature"):
        read_journal(journal)


def test_audit_inclusion_of_one_entry(world: World, tmp_path: Path) -> None:
    entry = tmp_path / "entry.json"
    entry.write_bytes(canonical_entry(world.events[4]))
    result = _audit("inclusion", "--log", world.db, "--key", world.vkey, "--entry", entry)
    assert result.exit_code == 0, result.output
    assert "entry 4 " in result.output
    entry.write_bytes(canonical_entry({**world.events[4], "status": "none"}))
    result = _audit("inclusion", "--log", world.db, "--key", world.vkey, "--entry", entry)
    assert result.exit_code == InclusionProofError.exit_code == 25, result.output


def test_report_is_written_and_says_what_failed(world: World, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    result = _audit("report", "--log", world.db, "--key", world.vkey, "--html", out)
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert "<svg" in page
    assert world.signer.name in page
    world.sql("DELETE FROM entries WHERE idx = 3")
    result = _audit("report", "--log", world.db, "--key", world.vkey, "--html", out)
    assert result.exit_code == 24
    assert "EntryMissing" in out.read_text()


def test_verify_log_api_reports_violations_beside_a_sound_log(world: World) -> None:
    events = [*world.events, release("nobody", "node-7")]
    world.rewrite(events)
    audit = verify_log(
        LogStore(world.db, readonly=True),
        world.signer.verifier,
        previous=AuditorState(world.state).load(world.signer.verifier),
    )
    assert not audit
    assert [type(v) for v in audit.violations] == [ReleaseWithoutAppraisal]


def test_flower_sized_ids_and_non_finite_metrics_are_logged_as_text(tmp_path: Path) -> None:
    run, node = 16401725734191279427, 2**63 - 5
    assert canonical_entry({"run": run, "node": node, "loss": float("nan"), "n": 3}) == (
        b'{"loss":"nan","n":3,"node":"9223372036854775803","run":"16401725734191279427"}'
    )
    journal = write_journal(tmp_path, [{"kind": "train", "run_id": run, "node_id": node}])
    (entry,) = read_journal(journal)
    assert entry["run_id"] == str(run)


# -- review follow-ups: hostile inputs, policy edges, journals -----------------------------


def test_deeply_nested_entry_is_a_malformed_event(tmp_path: Path) -> None:
    events: list[Any] = honest_history()
    world = World(tmp_path, events)
    world.store.close()
    world.store = LogStore(world.db)
    world.store.append(b"[" * 5000 + b"]" * 5000)
    world.store.append(b'{"kind":"x","kind":"y"}')
    world.store.sign_checkpoint(world.signer)
    result = world.verify()
    assert result.exit_code == PolicyViolation.exit_code == 30, result.output
    assert "not canonical" in result.output


def test_a_stored_entry_of_the_wrong_type_is_tampering(world: World) -> None:
    world.sql("UPDATE entries SET entry = 'abc' WHERE idx = 2")
    result = world.verify()
    assert result.exit_code == EntryTampered.exit_code, result.output


def test_a_damaged_database_is_unreadable_not_a_crash(world: World) -> None:
    world.sql("DROP TABLE checkpoints")
    result = world.verify()
    assert result.exit_code == LogUnavailable.exit_code, result.output


def test_a_log_too_large_for_the_audit_is_refused(world: World) -> None:
    result = world.verify("--max-entries", 10)
    assert result.exit_code == 2, result.output
    assert "--max-entries" in result.output


def test_first_audit_without_state_says_rollback_was_not_checked(world: World) -> None:
    result = _audit("verify", "--log", world.db, "--key", world.vkey)
    assert result.exit_code == 0, result.output
    assert "SKIPPED: Consistent with the last checkpoint seen" in result.output


def test_inclusion_and_crosscheck_also_catch_a_rollback(world: World, tmp_path: Path) -> None:
    world.rewrite(world.events[:-4])
    inclusion = _audit(
        "inclusion", "--log", world.db, "--key", world.vkey, "--index", 0, "--state", world.state
    )
    assert inclusion.exit_code == LogRollback.exit_code, inclusion.output
    journal = write_journal(tmp_path, node_journal(1, 1))
    crosschecked = world.crosscheck(
        journal,
        "--state",
        world.state,
    )
    assert crosschecked.exit_code == LogRollback.exit_code, crosschecked.output


def _first_index(events: list[dict[str, Any]], kind: str, **match: Any) -> int:
    return next(
        i
        for i, e in enumerate(events)
        if e["kind"] == kind and all(e.get(k) == v for k, v in match.items())
    )


def test_admission_ends_when_a_node_declines() -> None:
    events = honest_history()
    second_round = _first_index(events, "round_started", round=2)
    declined = node_declined(1, 1, 2)
    events.insert(second_round, declined)
    assert [type(v) for v in check_policy(events)] == [UpdateFromUnattested]


def test_one_channel_attestation_admits_one_node() -> None:
    events = honest_history()
    admitted = events[_first_index(events, "node_admitted", node=1)]
    at = _first_index(events, "round_started", round=1)
    events.insert(at, {**admitted, "node": 9})
    accepted = events[_first_index(events, "update_accepted", round=1, node=1)]
    events.insert(at + 2, {**accepted, "node": 9, "envelope_sha256": digest("nine")})
    kinds = {type(v) for v in check_policy(events)}
    assert UpdateFromUnattested in kinds


def test_release_and_appraisal_missing_their_fields_do_not_match() -> None:
    events = [
        {"kind": "attestation_appraised", "status": "affirming"},
        {"kind": "key_released"},
    ]
    assert [type(v) for v in check_policy(events)] == [ReleaseWithoutAppraisal]


def test_an_update_counted_twice_or_accepted_twice_is_a_violation() -> None:
    events = honest_history()
    commit = _first_index(events, "aggregate_committed", round=1)
    twice = {
        **events[commit],
        "updates": [*events[commit]["updates"], events[commit]["updates"][0]],
    }
    assert [type(v) for v in check_policy([*events[:commit], twice])] == [AggregateUnaccepted]
    accepted = events[_first_index(events, "update_accepted", round=1, node=1)]
    again = [*events[:commit], rejected(accepted)]
    assert [type(v) for v in check_policy(again)] == [PolicyViolation]


def test_an_update_from_a_node_outside_the_round_is_a_violation() -> None:
    events = honest_history()
    start = _first_index(events, "round_started", round=1)
    events[start] = {**events[start], "participants": events[start]["participants"][:2]}
    assert [type(v) for v in check_policy(events)] == [UpdateFromUnattested]


def _sybil(events: list[dict[str, Any]], run: int, node: int, tee: str) -> list[dict[str, Any]]:
    """``events`` with node ``node`` admitted to ``run`` before its first round, under a
    channel attestation of its own that the broker appraised for the TEE of ``tee``."""
    session = f"r{run}-sybil-{node}"
    at = _first_index(events, "round_started", run=run, round=1)
    extra = [attestation(session, "channel", tee), admission(run, node, session, tee)]
    return [*events[:at], *extra, *events[at:]]


def test_one_ueid_admitted_as_two_nodes_in_one_run(tmp_path: Path) -> None:
    """Node 9 runs in node 1's TEE: its own channel key, certified with node 1's ueid."""
    events = _sybil(honest_history(), 1, 9, "node-1")
    assert [type(v) for v in check_policy(events)] == [NodeAdmittedTwice]
    result = World(tmp_path, events).verify()
    assert result.exit_code == NodeAdmittedTwice.exit_code == 36, result.output
    assert "admitted node 9" in result.output
    assert "already admitted in that run as node 1" in result.output


def test_a_ueid_may_come_back_as_its_node_or_as_another_node_in_another_run() -> None:
    events = honest_history()
    second_round = _first_index(events, "round_started", round=2)
    declined = node_declined(1, 1, 2)
    rejoined = [attestation("r1-n2-again", "channel", "node-2")]
    rejoined.append(admission(1, 2, "r1-n2-again", "node-2"))
    events[second_round:second_round] = [declined, *rejoined]
    # Run 2 (say, resumed after node 2's SuperNode restarted) admits that TEE as node 9.
    events += [attestation("r2-n9", "channel", "node-2"), admission(2, 9, "r2-n9", "node-2")]
    assert check_policy(events) == []


def test_crosscheck_binds_round_and_node_and_checks_both_ways(world: World, tmp_path: Path) -> None:
    honest = node_journal(1, 2)
    moved = [{**honest[0], "round": 2}, honest[1]]
    found = crosscheck(world.events, moved, "j")
    assert found
    assert all(isinstance(m, JournalMismatch) for m in found)
    # The provider's log says node 2 sent a round-2 update its own journal never sent.
    assert [type(m) for m in crosscheck(world.events, honest[:1], "j")] == [JournalMismatch]


def test_a_journal_signed_by_another_key_fails_when_the_key_is_pinned(
    world: World, tmp_path: Path
) -> None:
    journal = write_journal(tmp_path, node_journal(1, 2))
    other = write_journal(tmp_path / "other", node_journal(1, 2))
    result = world.crosscheck(
        journal,
        "--journal-key",
        journal_public_path(other),
    )
    assert result.exit_code == JournalInvalid.exit_code, result.output


class _LyingLog(TransparencyLogServicer):
    """A log service that answers every page with more entries than were asked for."""

    def GetEntries(self, request: Any, context: Any) -> Any:
        from protos.ark.v1 import translog_pb2 as pb

        entries = self.reader.entries(0, self.reader.size())
        return pb.Entries(start=0, entries=entries + entries)


def test_a_log_that_serves_extra_entries_is_caught(tmp_path: Path) -> None:
    signer = new_signer()
    store = build_log(tmp_path / "log.db", honest_history(), signer)
    tls = issue_loopback_tls(tmp_path / "tls", common_name="liar", valid_days=1)
    server, port = serve_log(
        store,
        signer,
        address="127.0.0.1:0",
        cert=tls.server_cert,
        key=tls.server_key,
        servicer=_LyingLog,
    )
    try:
        result = _audit(
            "verify",
            "--log",
            f"127.0.0.1:{port}",
            "--key",
            _vkey(tmp_path, signer),
            "--ca",
            tls.ca_cert,
        )
    finally:
        server.stop(0).wait()
    assert result.exit_code == InclusionProofError.exit_code, result.output
    assert "entries" in result.output


# -- strict parsing: hostile journal lines, notes and entries end in typed errors ---------

HOSTILE_JSON = {
    "nested-2000-deep": b'{"seq":1,"x":' + b"[" * 2000 + b"]" * 2000 + b"}",
    "5000-digit-integer": b'{"seq":' + b"9" * 5000 + b"}",
    "nan": b'{"seq":NaN}',
    "duplicate-key": b'{"seq":1,"seq":2}',
    "lone-surrogate": b'{"seq":1,"x":"\\ud800"}',
    "nul": b'{"seq":1,"x":"\\u0000"}',
}


@pytest.mark.parametrize("line", HOSTILE_JSON.values(), ids=HOSTILE_JSON)
def test_a_hostile_journal_line_is_invalid_naming_the_line(tmp_path: Path, line: bytes) -> None:
    journal = write_journal(tmp_path, node_journal(1, 2))
    lines = journal.read_bytes().splitlines()
    journal.write_bytes(b"\n".join([lines[0], line, *lines[2:]]) + b"\n")
    with pytest.raises(JournalInvalid, match=f"{journal}, line 2: not a signed journal line"):
        read_journal(journal)
    # The writer reads the last line for its sequence number: the same error, no other.
    journal.write_bytes(b"\n".join([*lines, line]) + b"\n")
    node = NodeConfig(name="alpine", data_path=tmp_path / "d.jsonl", journal_path=journal)
    with pytest.raises(JournalInvalid, match="last line: not a signed journal line"):
        append_journal(node, {"kind": "train"})


def test_a_journal_line_is_only_its_canonical_bytes(tmp_path: Path) -> None:
    """The signature covers the body only, so a re-encoded or extended last line was
    accepted: neither the chain nor the signature saw the change."""
    journal = write_journal(tmp_path, node_journal(1, 2))
    lines = journal.read_bytes().splitlines()
    spaced = lines[-1].replace(b'"seq":', b'"seq": ')
    extended = lines[-1][:-1] + b',"z":"unsigned"}'
    for last, message in ((spaced, "not canonical JSON"), (extended, "not a signed journal")):
        journal.write_bytes(b"\n".join([*lines[:-1], last]) + b"\n")
        with pytest.raises(JournalInvalid, match=f"line {len(lines)}: {message}"):
            read_journal(journal)


def test_hostile_text_in_notes_checkpoints_and_keys_is_malformed() -> None:
    signer = new_signer()
    verifier = signer.verifier
    root = base64.b64encode(bytes(32)).decode()
    blob = verifier.vkey().split("+", 2)[2]
    # A signature line by the trusted key (id and all), so the text reaches verification.
    signature = base64.b64encode(verifier.key_id + bytes(64)).decode()
    surrogate_note = f"{signer.name}\n1\n{root}\n\ud800\n\n\u2014 {signer.name} {signature}\n"
    hostile: list[tuple[Any, Any]] = [
        (open_note, surrogate_note),  # UnicodeEncodeError before
        (Checkpoint.from_text, f"\ud800\n1\n{root}\n"),  # accepted before
        (Checkpoint.from_text, f"origin\x00\n1\n{root}\n"),  # accepted before
        (NoteVerifier.from_vkey, f"\ud800+00000000+{blob}"),  # UnicodeEncodeError before
        (NoteVerifier.from_vkey, f"log\x00+00000000+{blob}"),
    ]
    for parse, text in hostile:
        with pytest.raises(NoteMalformed):
            parse(*([text, [verifier]] if parse is open_note else [text]))


def test_hostile_log_entries_are_malformed_events_reported_by_policy(tmp_path: Path) -> None:
    world = World(tmp_path, honest_history())
    world.store.close()
    world.store = LogStore(world.db)
    for entry in HOSTILE_JSON.values():
        world.store.append(entry)
    world.store.sign_checkpoint(world.signer)
    result = world.verify()
    assert result.exit_code == PolicyViolation.exit_code == 30, result.output
    for reason in ("nested more than 64", "out of range", "NaN", "duplicate key", "surrogate"):
        assert reason in result.output
    assert "holds NUL" in result.output


def test_a_denial_flood_leaves_an_auditable_log_within_max_entries(tmp_path: Path) -> None:
    """The key broker's flood limit: a budget of denials and one summary per window. The
    auditor accepts the summary's kind and the bounded, hashed denials."""
    events = [*honest_history(1), *denial_flood(budget=16)]
    world = World(tmp_path, events)
    result = world.verify("--max-entries", len(events))
    assert result.exit_code == 0, result.output
    assert "ok: Policy across events" in result.output
    assert all(len(canonical_entry(event)) < 2048 for event in denial_flood())
    assert check_policy(denial_flood()) == []
