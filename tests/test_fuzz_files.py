"""Fuzzing the readers of files another party wrote: only typed errors may escape.

Each parser gets arbitrary bytes and documents mutated from a valid one (values replaced
with hostile ones, keys dropped or repeated, fragments such as 2,000 brackets or a
5,000-digit integer spliced into the bytes). Where a signature would stop the parser
first, the test signs the mutated bytes with the right key, so the parser is what is
exercised: the sealed-package manifest (the provider's key), journal lines (the node's
journal key) and checkpoints (the log's key). The property is always the one in
``tests/fuzzing.py``: the parser returns, or raises an ``ArkError``.
"""

from __future__ import annotations

import base64
import copy
import csv
import io
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import event, given
from hypothesis import strategies as st

from clients.data import load_examples
from sandbox import canonical
from sandbox.canonical import canonical_entry
from sandbox.config import TASK_CAUSAL_LM, TASK_CLASSIFICATION, NodeConfig
from sandbox.journal import append_journal, journal_key_path, read_journal
from sandbox.keyfiles import load_private
from sandbox.ops.translog.audit import check_policy, crosscheck, decode
from sandbox.seal.package import open_sealed_package, read_manifest
from sandbox.translog.note import Checkpoint, NoteVerifier, open_note, verify_checkpoint
from tests.fuzzing import fuzz_settings, typed_errors_only
from tests.loghistory import (
    honest_history,
    new_signer,
    node_journal,
    secure_node_journal,
    secure_run_events,
)
from tests.test_seal import valid_manifest, write_signed_manifest

# -- strategies: hostile JSON values, mutated documents, spliced bytes ---------------------

# Every code point, lone surrogates included (hypothesis leaves them out by default).
ANY_CHAR = st.characters(exclude_categories=())
ANY_TEXT = st.text(ANY_CHAR, max_size=24)
HOSTILE_SCALARS = st.sampled_from(
    [2**63, 2**64, -(2**64), -1, 0, True, False, None, "", "\x00", "\ud800", "x.sealed", "0" * 64]
)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT | HOSTILE_SCALARS
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=12,
)
# Spliced into a document's bytes: what broke the readers before, and JSON's odd corners.
FRAGMENTS = st.sampled_from(
    [
        b"[" * 2000,
        b"{" * 2000,
        b"[" * 2000 + b"]" * 2000,
        b"9" * 5000,
        b"-" + b"9" * 5000,
        b"1e999",
        b"NaN",
        b"-Infinity",
        b'"\\ud800"',
        b'"\\u0000"',
        b"\\ud800",
        b"\x00",
        b"\xff",
        b"\xed\xa0\x80",  # a surrogate encoded as UTF-8
        b'"name":"a","name":"b",',
        b"\n",
        b'"',
        b",",
    ]
)


def _containers(document: Any) -> list[Any]:
    """Every dict and list in ``document``, outermost first."""
    found: list[Any] = []
    pending = [document]
    while pending:
        item = pending.pop()
        if isinstance(item, dict):
            found.append(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            found.append(item)
            pending.extend(item)
    return found


@st.composite
def mutated(draw: st.DrawFn, document: Any) -> Any:
    """``document`` with one to three values replaced, keys removed or added, or list
    members removed, repeated or appended."""
    result = copy.deepcopy(document)
    for _ in range(draw(st.integers(1, 3))):
        containers = _containers(result)
        if not containers:
            return draw(VALUES)
        container = draw(st.sampled_from(containers))
        operation = draw(st.sampled_from(["replace", "remove", "add", "repeat"]))
        if isinstance(container, dict):
            keys = list(container)
            if operation == "add" or not keys:
                container[draw(ANY_TEXT | st.sampled_from(keys or ["x"]))] = draw(VALUES)
                continue
            key = draw(st.sampled_from(keys))
            if operation == "remove":
                del container[key]
            else:
                container[key] = draw(VALUES)
        else:
            if operation == "add" or not container:
                container.append(draw(VALUES))
                continue
            index = draw(st.integers(0, len(container) - 1))
            if operation == "remove":
                del container[index]
            elif operation == "repeat":
                container.append(copy.deepcopy(container[index]))
            else:
                container[index] = draw(VALUES)
    return result


def dumps(document: Any, *, canonical: bool = False) -> bytes:
    """``document`` as bytes the way a writer might have produced them: RFC 8785 where
    it can be (so a canonical-only reader sees it), else ``json.dumps``, with lone
    surrogates passed through as (invalid) UTF-8 bytes."""
    if canonical:
        try:
            return canonical_entry(document)
        except (ValueError, TypeError):
            pass
    return json.dumps(document, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def spliced(draw: st.DrawFn, data: bytes) -> bytes:
    """``data`` with up to two fragments inserted, or a stretch cut out, at random places."""
    for _ in range(draw(st.integers(0, 2))):
        at = draw(st.integers(0, len(data)))
        if draw(st.booleans()):
            data = data[:at] + draw(FRAGMENTS | st.binary(max_size=8)) + data[at:]
        else:
            data = data[:at] + data[at + draw(st.integers(1, 16)) :]
    return data


def documents(valid: Any, *, canonical: bool = False) -> st.SearchStrategy[bytes]:
    """Bytes of ``valid`` mutated, then spliced; or of any JSON value; or any bytes."""
    changed = mutated(valid).map(lambda d: dumps(d, canonical=canonical))
    return (
        changed.flatmap(spliced)
        | st.just(dumps(valid, canonical=canonical)).flatmap(spliced)
        | VALUES.map(dumps)
        | st.binary(max_size=256)
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder per module: hypothesis runs many examples in one test call."""
    return tmp_path_factory.mktemp("fuzz")


# -- sealed-package manifests ---------------------------------------------------------------

PROVIDER_KEY = Ed25519PrivateKey.generate()


@fuzz_settings
@given(body=documents(valid_manifest()))
def test_fuzz_manifest(workdir: Path, body: bytes) -> None:
    """A manifest signed with the provider's key is still parsed strictly, and a manifest
    that passes is opened against files that do not match it: typed errors only."""
    package = write_signed_manifest(workdir / "package", PROVIDER_KEY, body)
    (package / "config.json").write_bytes(b"{}")
    (package / "model.safetensors.sealed").write_bytes(b"\x00" * 64)
    manifest = typed_errors_only(read_manifest, package, PROVIDER_KEY.public_key())
    event(f"manifest {'accepted' if manifest is not None else 'refused'}")
    if manifest is not None:
        typed_errors_only(
            open_sealed_package,
            package,
            content_key=bytes(32),
            verify_key=PROVIDER_KEY.public_key(),
            model_id=manifest["model_id"],
            key_id=manifest["key_id"],
        )


# -- private data ----------------------------------------------------------------------------

ROW = {"text": "ticket text", "label": "a"}
LM_ROW = {"prompt": "q", "completion": "a"}
LABELS = st.none() | st.just(["a", "b"])


VALID_ROWS = {TASK_CLASSIFICATION: ROW, TASK_CAUSAL_LM: LM_ROW}


@fuzz_settings
@given(data=st.data(), task=st.sampled_from(sorted(VALID_ROWS)), labels=LABELS)
def test_fuzz_jsonl_data(
    workdir: Path, data: st.DataObject, task: str, labels: list[str] | None
) -> None:
    """Valid rows of the task with hostile ones among them."""
    valid = dumps(VALID_ROWS[task])
    lines = data.draw(st.lists(st.just(valid) | documents(VALID_ROWS[task]), max_size=4))
    path = workdir / "private.jsonl"
    path.write_bytes(b"\n".join([valid, *lines]) + b"\n")
    labels = labels if task == TASK_CLASSIFICATION else None
    examples = typed_errors_only(load_examples, path, task, labels=labels, max_row_bytes=16384)
    event(f"jsonl {'loaded' if examples is not None else 'refused'}")


def _csv(rows: list[list[str]]) -> bytes:
    out = io.StringIO(newline="")
    csv.writer(out).writerows(rows)
    return out.getvalue().encode("utf-8", "surrogatepass")


FIELDS = ANY_TEXT | st.sampled_from(["text", "label", "prompt", "completion", "a", " text"])
CSV_FILES = st.lists(st.lists(FIELDS, min_size=1, max_size=4), min_size=1, max_size=5).map(_csv)


@fuzz_settings
@given(
    data=CSV_FILES.flatmap(spliced)
    | st.just(_csv([["text", "label"], ["t", "a"], ["u", "b"]])).flatmap(spliced)
    | st.binary(max_size=256),
    task=st.sampled_from([TASK_CLASSIFICATION, TASK_CAUSAL_LM]),
    labels=LABELS,
)
def test_fuzz_csv_data(workdir: Path, data: bytes, task: str, labels: list[str] | None) -> None:
    path = workdir / "private.csv"
    path.write_bytes(data)
    labels = labels if task == TASK_CLASSIFICATION else None
    examples = typed_errors_only(load_examples, path, task, labels=labels, max_row_bytes=16384)
    event(f"csv {'loaded' if examples is not None else 'refused'}")


# -- node journals, as the auditor's crosscheck reads them -----------------------------------


@pytest.fixture(scope="module")
def journal(workdir: Path) -> tuple[Path, list[bytes], Ed25519PrivateKey]:
    """An honest journal: its path, its lines and the node's journal key."""
    node = NodeConfig(
        name="alpine", data_path=workdir / "d.jsonl", journal_path=workdir / "honest.jsonl"
    )
    for entry in node_journal(1, 2):
        append_journal(node, entry)
    assert node.journal_path is not None
    key = load_private(journal_key_path(node.journal_path))
    return node.journal_path, node.journal_path.read_bytes().splitlines(), key


def _resigned(document: Any, key: Ed25519PrivateKey) -> Any:
    """A mutated journal line with its signature made over whatever body it now has."""
    if not isinstance(document, dict):
        return document
    body = {k: document[k] for k in ("seq", "prev", "entry") if k in document}
    try:
        signature = key.sign(canonical_entry(body))
    except (ValueError, TypeError):  # a body that cannot be canonicalised cannot be signed
        return document
    return {**document, "sig": base64.b64encode(signature).decode()}


@fuzz_settings
@given(data=st.data(), line=st.integers(0, 2))
def test_fuzz_journal_lines(
    workdir: Path,
    journal: tuple[Path, list[bytes], Ed25519PrivateKey],
    data: st.DataObject,
    line: int,
) -> None:
    """One line of an honest journal replaced, re-signed with the node's key; then the
    auditor's crosscheck of what reads back against an honest log."""
    _, lines, key = journal
    honest = json.loads(lines[line])
    document = data.draw(mutated(honest).map(lambda d: _resigned(d, key)))
    hostile = data.draw(st.just(dumps(document, canonical=True)).flatmap(spliced))
    path = workdir / "journal.jsonl"
    path.write_bytes(b"\n".join([*lines[:line], hostile, *lines[line + 1 :]]) + b"\n")
    entries = typed_errors_only(read_journal, path)
    event(f"journal {'read' if entries is not None else 'refused'}")
    if entries is not None:
        crosscheck(honest_history(), entries, "fuzzed")


@fuzz_settings
@given(data=st.binary(max_size=512) | documents({"seq": 0, "prev": "", "entry": {}, "sig": ""}))
def test_fuzz_journal_bytes(workdir: Path, data: bytes) -> None:
    """Any bytes as a journal, read by the auditor and appended to by the node (which
    reads the last line for its sequence number)."""
    path = workdir / "journal-bytes.jsonl"
    path.write_bytes(data)
    typed_errors_only(read_journal, path)
    node = NodeConfig(name="alpine", data_path=workdir / "d.jsonl", journal_path=path)
    typed_errors_only(append_journal, node, {"kind": "train"})


# -- signed notes and checkpoints ------------------------------------------------------------

LOG = new_signer()
CHECKPOINT = Checkpoint(LOG.name, 7, bytes(range(32)), ("extension",)).to_text()


@st.composite
def mutated_text(draw: st.DrawFn, text: str) -> str:
    """``text`` with characters inserted (hostile ones among them) or cut out."""
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(text)))
        insert = draw(
            ANY_TEXT | st.sampled_from(["\n", "\n\n", "\x00", "\ud800", "\u2014 ", "+", "9" * 30])
        )
        cut = draw(st.integers(0, 4))
        text = text[:at] + insert + text[at + cut :]
    return text


NOTES = (
    mutated_text(CHECKPOINT).map(lambda t: ("signed", t))
    | mutated_text(LOG.sign(CHECKPOINT)).map(lambda t: ("raw", t))
    | st.text(ANY_CHAR, max_size=200).map(lambda t: ("raw", t))
)


@fuzz_settings
@given(note=NOTES, as_bytes=st.booleans())
def test_fuzz_notes_and_checkpoints(note: tuple[str, str], as_bytes: bool) -> None:
    """Checkpoint text signed by the log's key (so the checkpoint parser is reached), a
    signed note with its signature block mangled, or any text; as text or as bytes."""
    kind, text = note
    if kind == "signed":
        signed = typed_errors_only(LOG.sign, text)
        text = signed if signed is not None else text
    raw: str | bytes = text.encode("utf-8", "surrogatepass") if as_bytes else text
    typed_errors_only(open_note, raw, [LOG.verifier])
    checkpoint = typed_errors_only(verify_checkpoint, raw, LOG.verifier)
    event(f"checkpoint {'verified' if checkpoint is not None else 'refused'}")
    typed_errors_only(Checkpoint.from_text, text)


@fuzz_settings
@given(vkey=mutated_text(LOG.verifier.vkey()) | st.text(ANY_CHAR, max_size=120))
def test_fuzz_verifier_keys(vkey: str) -> None:
    typed_errors_only(NoteVerifier.from_vkey, vkey)


# -- log entries, as the auditor decodes and judges them -------------------------------------

HISTORY = honest_history() + secure_run_events(rounds=1, dropped={1: 2})


@fuzz_settings
@given(data=st.data())
def test_fuzz_log_entries(data: st.DataObject) -> None:
    """Entries of an honest log with some replaced by hostile ones, through the auditor's
    decoder, its policy and its crosscheck against an honest journal."""
    entries = [canonical_entry(event) for event in HISTORY]
    for _ in range(data.draw(st.integers(1, 3))):
        index = data.draw(st.integers(0, len(entries) - 1))
        entries[index] = data.draw(documents(HISTORY[index], canonical=True))
    records = typed_errors_only(decode, entries)
    if records is not None:
        event(f"{sum(r.get('kind') is None for r in records)} entries without a kind")
        typed_errors_only(check_policy, records)
        typed_errors_only(crosscheck, records, node_journal(1, 2), "honest")
        secure = secure_node_journal(1, rounds=1, dropped={1: 2})
        typed_errors_only(crosscheck, records, secure, "honest, secure")


def test_the_strategies_reach_past_the_signatures(workdir: Path) -> None:
    """A negative control: an unmutated manifest, journal line and checkpoint pass, so
    the fuzzers start from input the parsers accept."""
    body = canonical.dumps(valid_manifest())
    package = write_signed_manifest(workdir / "control", PROVIDER_KEY, body)
    assert read_manifest(package, PROVIDER_KEY.public_key()) == valid_manifest()
    assert verify_checkpoint(LOG.sign(CHECKPOINT), LOG.verifier).size == 7
    assert len(decode([canonical_entry(e) for e in HISTORY])) == len(HISTORY)
    assert check_policy(decode([canonical_entry(e) for e in HISTORY])) == []
