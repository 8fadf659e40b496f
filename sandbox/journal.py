"""The node's own append-only, signed journal: what it received, sent or refused, as digests.

The ClientApp, its egress guard and the node's launcher all write here; an auditor
cross-checks it against the provider's transparency log (``ark audit crosscheck``).

Each line is RFC 8785 canonical JSON ``{"seq", "prev", "entry", "sig"}``: ``prev`` is
the SHA-256 of the previous line, and ``sig`` an Ed25519 signature over the line without
it. Line 0 opens the journal and names its public key. The key lives next to the journal
(``<journal>.key``, 0600), created with it. An edited, dropped, reordered or appended-to
line breaks the chain or a signature. (The node holds the key, so this proves what the
node wrote, and that nobody else changed it since; not that the node told the truth.)
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from sandbox import strictjson
from sandbox.canonical import canonical_entry
from sandbox.config import NodeConfig
from sandbox.errors import EventInvalid, JournalInvalid
from sandbox.events import JournalEntry, JournalOpened, Key, NodeEvent
from sandbox.keyfiles import load_private, private_pem, public_pem, write_private
from sandbox.strictjson import StrictJSONError

FORMAT = "ark-node-journal/v1"


def journal_key_path(journal: Path) -> Path:
    return journal.with_name(journal.name + ".key")


def journal_public_path(journal: Path) -> Path:
    """Where the journal's public key is kept, for the node operator to hand to auditors
    (``ark audit crosscheck --journal-key``)."""
    return journal.with_name(journal.name + ".pub")


def _journal_key(journal: Path) -> Ed25519PrivateKey:
    path = journal_key_path(journal)
    if not path.exists():
        write_private(path, private_pem(Ed25519PrivateKey.generate()))
    key = load_private(path)
    if not isinstance(key, Ed25519PrivateKey):
        raise JournalInvalid(f"{path}: the journal key must be Ed25519")
    public = journal_public_path(journal)
    if not public.exists():
        public.write_bytes(public_pem(key.public_key()))
    return key


def _raw(key: Ed25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _signed_line(key: Ed25519PrivateKey, seq: int, prev: str, entry: Mapping[str, Any]) -> bytes:
    body: dict[str, Any] = {"seq": seq, "prev": prev, "entry": dict(entry)}
    signature = key.sign(canonical_entry(body))
    return canonical_entry({**body, "sig": base64.b64encode(signature).decode()})


def _last_line(handle: BinaryIO) -> bytes | None:
    handle.seek(0, 2)
    end = handle.tell()
    if end == 0:
        return None
    chunk, start = b"", end
    while b"\n" not in chunk.rstrip(b"\n") and start > 0:
        start = max(0, start - 65536)
        handle.seek(start)
        chunk = handle.read(end - start)
    return chunk.rstrip(b"\n").rsplit(b"\n", 1)[-1]


def _parse_line(line: bytes, where: str) -> tuple[dict[str, Any], bytes]:
    """A line's signed body (``seq``, ``prev``, ``entry``) and its signature.

    Strict, because the chain hashes the line's bytes and the signature covers only the
    body: the JSON (:mod:`sandbox.strictjson`), exactly the four keys, their types, and the
    line must be the canonical encoding of what it holds, so no two byte strings carry
    one signed line. ``where`` names the file and line in the :class:`JournalInvalid`.
    """
    try:
        document = strictjson.loads(line)
    except StrictJSONError as exc:
        raise JournalInvalid(f"{where}: not a signed journal line: {exc}") from exc
    if not isinstance(document, dict) or document.keys() != _LINE_KEYS:
        raise JournalInvalid(f"{where}: not a signed journal line (keys {sorted(_LINE_KEYS)})")
    body = {key: document[key] for key in ("seq", "prev", "entry")}
    if type(body["seq"]) is not int or body["seq"] < 0:
        raise JournalInvalid(f"{where}: seq must be a non-negative integer")
    if not isinstance(body["prev"], str) or not isinstance(body["entry"], dict):
        raise JournalInvalid(f"{where}: prev must be a string and entry an object")
    try:
        signature = base64.b64decode(document["sig"], validate=True)
    except (ValueError, TypeError) as exc:
        raise JournalInvalid(f"{where}: sig must be base64") from exc
    if canonical_entry(document) != line:
        raise JournalInvalid(f"{where}: not canonical JSON (RFC 8785), as the journal writes it")
    return body, signature


_LINE_KEYS = frozenset({"seq", "prev", "entry", "sig"})


def _seq_of(line: bytes, path: Path) -> int:
    return int(_parse_line(line, f"{path}, last line")[0]["seq"])


def append_journal(node: NodeConfig, entry: NodeEvent | Mapping[str, Any]) -> None:
    """Append ``entry`` (stamped with the time and the node's name, a
    :class:`~sandbox.events.JournalEntry`) if the node keeps a journal. Every emitter
    passes a typed :class:`~sandbox.events.NodeEvent`; a mapping is written as it is
    (tests of the journal's own format write entries the schema would refuse).

    Safe across the node's processes: the file is locked from reading its last line
    until the new one is written.
    """
    path = node.journal_path
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    key = _journal_key(path)
    if isinstance(entry, NodeEvent):
        record = JournalEntry(time.time(), node.name, entry).to_json()
    else:
        record = {Key.TIME.value: time.time(), Key.NODE.value: node.name, **entry}
    with path.open("a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        last = _last_line(handle)
        if last is None:
            opened = JournalOpened(
                format=FORMAT,
                node=node.name,
                public_key=base64.b64encode(_raw(key.public_key())).decode(),
            )
            last = _signed_line(key, 0, "", opened.to_json())
            handle.write(last + b"\n")
        seq = _seq_of(last, path) + 1
        handle.write(_signed_line(key, seq, hashlib.sha256(last).hexdigest(), record) + b"\n")
        handle.flush()
        os.fsync(handle.fileno())  # the journal is the privacy ledger: it survives a crash


def read_journal(path: Path, *, public_key: Ed25519PublicKey | None = None) -> list[dict[str, Any]]:
    """The entries of a journal (without its opening line) once every line verifies.

    ``public_key`` pins the node's journal key; without it the key in the opening line
    is used. Raises :class:`JournalInvalid` naming the file and the line.
    """
    try:
        lines = path.read_bytes().splitlines()
    except OSError as exc:
        raise JournalInvalid(f"{path}: {exc.strerror or exc}") from exc
    if not lines:
        raise JournalInvalid(f"{path}: the journal is empty")
    entries: list[dict[str, Any]] = []
    key = public_key
    prev = ""
    for number, line in enumerate(lines, 1):
        where = f"{path}, line {number}"
        body, signature = _parse_line(line, where)
        if body["seq"] != number - 1 or body["prev"] != prev:
            raise JournalInvalid(f"{where}: breaks the chain (a line was removed or reordered)")
        entry = body["entry"]
        if number == 1:
            try:
                opened = JournalOpened.from_json(entry)
            except EventInvalid as exc:
                raise JournalInvalid(f"{where}: the journal does not start with its key") from exc
            if opened.format != FORMAT:
                raise JournalInvalid(f"{where}: the journal does not start with its key")
            try:
                named = Ed25519PublicKey.from_public_bytes(
                    base64.b64decode(opened.public_key, validate=True)
                )
            except ValueError as exc:
                raise JournalInvalid(f"{where}: the opening line has no usable key") from exc
            if key is not None and _raw(key) != _raw(named):
                raise JournalInvalid(f"{where}: the journal is signed by another key")
            key = named
        assert key is not None
        try:
            key.verify(signature, canonical_entry(body))
        except InvalidSignature as exc:
            raise JournalInvalid(f"{where}: the signature does not verify (edited?)") from exc
        if number > 1:
            entries.append(entry)
        prev = hashlib.sha256(line).hexdigest()
    return entries
