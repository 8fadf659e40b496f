"""The transparency log's SQLite store: entries, interior hashes and signed checkpoints.

Every entry is an RFC 8785 canonical JSON event (:func:`sandbox.canonical.canonical_entry`).
Appending leaf ``n`` also stores the root of every perfect subtree that leaf completes, so
the hash of any range the RFC 9162 proofs need is O(log n) lookups, and the tree is never
recomputed. Interior hashes are
immutable once written; a reader needs no lock to prove anything up to the size it saw.

Several provider processes (the key broker, the ServerApp) append to one database: each
append is one ``BEGIN IMMEDIATE`` transaction, so SQLite serialises them.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
import threading
from collections.abc import Collection, Iterable
from pathlib import Path
from typing import Any, Protocol

from sandbox.errors import EntryTampered, InclusionProofError, LogEntryTooLarge, LogUnavailable
from sandbox.events import Event
from sandbox.translog import merkle
from sandbox.translog.note import Checkpoint, NoteSigner

SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    idx   INTEGER PRIMARY KEY,
    entry BLOB NOT NULL,
    leaf  BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_by_leaf ON entries (leaf);
CREATE TABLE IF NOT EXISTS nodes (
    level INTEGER NOT NULL,
    idx   INTEGER NOT NULL,
    hash  BLOB NOT NULL,
    PRIMARY KEY (level, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoints (
    size      INTEGER PRIMARY KEY,
    note      TEXT NOT NULL,
    signed_at TEXT NOT NULL
);
"""
# Entries are small JSON events; one beyond this is a bug upstream, not something to keep.
MAX_ENTRY_BYTES = 64 * 1024


class LogReader(Protocol):
    """What an auditor reads from a log, locally (:class:`LogStore`) or over gRPC."""

    def checkpoint(self) -> str:
        """The latest signed checkpoint note."""
        ...

    def entries(self, start: int, end: int) -> list[bytes]:
        """Entries ``[start, end)``; fewer if the log has fewer."""
        ...

    def inclusion_proof(self, index: int, size: int) -> list[bytes]: ...

    def inclusion_proof_by_leaf(self, leaf: bytes, size: int) -> tuple[int, list[bytes]]:
        """The index of the entry whose leaf hash is ``leaf`` and its audit path."""
        ...

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]: ...


def _check_entry(entry: object) -> None:
    if not isinstance(entry, bytes):
        raise TypeError(f"a log entry is bytes, not {type(entry).__name__}")
    if len(entry) > MAX_ENTRY_BYTES:
        raise LogEntryTooLarge(
            f"a log entry of {len(entry)} bytes is over the limit of {MAX_ENTRY_BYTES} "
            f"(it begins {entry[:80]!r})"
        )


class LogStore:
    """One log in one SQLite file. ``readonly`` opens it for an auditor, never creating it.

    Appends are safe from many threads and processes. Reads through a writable store's
    connection are not isolated from a batch another thread is committing on it, so a
    service reads through its own read-only store (as the log service does).
    """

    def __init__(self, path: Path, *, readonly: bool = False, durable: bool = True):
        self.path = path
        self.readonly = readonly
        if readonly and not path.is_file():
            raise LogUnavailable(f"{path}: no such log database")
        try:
            if readonly:
                self._db = sqlite3.connect(
                    f"file:{path}?mode=ro", uri=True, check_same_thread=False
                )
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(path, check_same_thread=False, timeout=30.0)
                self._db.execute("PRAGMA journal_mode=WAL")
                # FULL: an appended event is on disk when append returns.
                self._db.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
                self._db.executescript(SCHEMA)
                path.chmod(0o600)
            self._db.execute("SELECT 1 FROM entries LIMIT 1").fetchall()
        except sqlite3.Error as exc:
            raise LogUnavailable(f"{path}: {exc}") from exc
        self._db.isolation_level = None  # transactions are explicit
        self._lock = threading.Lock()
        # Group commit: appends waiting for the transaction that will carry them.
        self._commit = threading.Condition()
        self._queue: list[tuple[bytes, list[int | BaseException]]] = []
        self._leader = False
        # The right border of the tree as this process last appended it.
        self._border = merkle.CompactRange()

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> LogStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading ----------------------------------------------------------------------

    # Reads treat the file as untrusted (an auditor may open a provider's copy): a damaged
    # database is LogUnavailable, a value of the wrong type or size a verification error.

    def _rows(self, sql: str, params: tuple[Any, ...] = ()) -> list[Any]:
        try:
            return self._db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise LogUnavailable(f"{self.path}: {exc}") from exc

    def size(self) -> int:
        (row,) = self._rows("SELECT MAX(idx) FROM entries")
        if row[0] is not None and not isinstance(row[0], int):
            raise EntryTampered(f"{self.path}: an entry index is not an integer")
        return 0 if row[0] is None else int(row[0]) + 1

    def _node(self, level: int, index: int) -> bytes:
        if level == 0:
            rows = self._rows("SELECT leaf FROM entries WHERE idx = ?", (index,))
        else:
            rows = self._rows("SELECT hash FROM nodes WHERE level = ? AND idx = ?", (level, index))
        if not rows:
            raise InclusionProofError(f"{self.path}: no stored hash at level {level}, {index}")
        value = rows[0][0]
        if not isinstance(value, bytes) or len(value) != merkle.HASH_SIZE:
            raise InclusionProofError(f"{self.path}: the hash at level {level}, {index} is damaged")
        return value

    def subtree(self, lo: int, hi: int) -> bytes:
        """The hash of leaves ``[lo, hi)`` from stored nodes (``lo`` aligned as RFC 9162's
        subtrees always are)."""
        width = hi - lo
        if width & (width - 1) == 0:
            level = width.bit_length() - 1
            return self._node(level, lo >> level)
        k = merkle.split_point(width)
        return merkle.node_hash(self.subtree(lo, lo + k), self.subtree(lo + k, hi))

    def root(self, size: int | None = None) -> bytes:
        size = self.size() if size is None else size
        return merkle.EMPTY_ROOT if size == 0 else self.subtree(0, size)

    def entries(self, start: int, end: int) -> list[bytes]:
        """Entries ``[start, end)``, stopping early at the end of the log or at a gap (a
        reader must never see a later entry in a missing one's place)."""
        rows = self._rows(
            "SELECT idx, entry FROM entries WHERE idx >= ? AND idx < ? ORDER BY idx", (start, end)
        )
        out: list[bytes] = []
        for expected, (index, entry) in enumerate(rows, start):
            if index != expected:
                break
            if not isinstance(entry, bytes) or len(entry) > MAX_ENTRY_BYTES:
                raise EntryTampered(f"{self.path}: entry {index} is not a stored event (edited)")
            out.append(entry)
        return out

    def index_of(self, leaf: bytes) -> int | None:
        """The first index whose leaf hash is ``leaf``."""
        (row,) = self._rows("SELECT MIN(idx) FROM entries WHERE leaf = ?", (leaf,))
        return None if row[0] is None else int(row[0])

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        self._check_size(size)
        return merkle.inclusion_proof(index, size, self.subtree)

    def inclusion_proof_by_leaf(self, leaf: bytes, size: int) -> tuple[int, list[bytes]]:
        index = self.index_of(leaf)
        if index is None or index >= size:
            raise InclusionProofError(f"no entry with leaf hash {leaf.hex()[:16]}… in size {size}")
        return index, self.inclusion_proof(index, size)

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        self._check_size(size2)
        return merkle.consistency_proof(size1, size2, self.subtree)

    def _check_size(self, size: int) -> None:
        current = self.size()
        if size > current:
            raise InclusionProofError(f"the log has {current} entries, not {size}")

    def checkpoint(self) -> str:
        """The latest signed checkpoint note kept in the store."""
        rows = self._rows("SELECT note FROM checkpoints ORDER BY size DESC LIMIT 1")
        if not rows:
            raise LogUnavailable(f"{self.path}: the log has no signed checkpoint yet")
        note = rows[0][0]
        return note if isinstance(note, str) else repr(note)  # garbage then fails as a note

    # -- writing ----------------------------------------------------------------------

    def _load_border(self, size: int) -> merkle.CompactRange:
        roots, start = [], 0
        for level in reversed(range(size.bit_length())):
            if size >> level & 1:
                roots.append(self._node(level, start >> level))
                start += 1 << level
        return merkle.CompactRange(size, roots)

    def append(self, entry: bytes) -> int:
        """Append one entry and return its index once it is committed (on disk, for a
        durable store).

        Threads appending at the same time share a transaction (group commit): the
        first becomes the leader and commits every entry queued meanwhile in one go, so
        a busy service pays one fsync per batch, not per entry.
        """
        if self.readonly:
            raise RuntimeError("this log store is open read-only")
        _check_entry(entry)
        slot: list[int | BaseException] = []
        with self._commit:
            self._queue.append((entry, slot))
            while not slot:
                if self._leader:
                    self._commit.wait()
                    continue
                self._leader = True
                batch, self._queue = self._queue, []
                self._commit.release()
                interrupted: BaseException | None = None
                try:
                    results: list[int | BaseException] = list(
                        self.append_many(item for item, _ in batch)
                    )
                except Exception as exc:  # every waiter learns its entry was not kept
                    results = [exc] * len(batch)
                except BaseException as exc:  # Ctrl-C in the leader: waiters still wake
                    results, interrupted = [exc] * len(batch), exc
                finally:
                    self._commit.acquire()
                    self._leader = False
                for (_, waiting), result in zip(batch, results, strict=True):
                    waiting.append(result)
                self._commit.notify_all()
                if interrupted is not None:
                    raise interrupted
        result = slot[0]
        if isinstance(result, BaseException):
            raise LogUnavailable(
                f"{self.path}: the entry was not appended ({type(result).__name__}: {result})"
            ) from result
        return result

    def append_many(self, entries: Iterable[bytes]) -> range:
        """Append entries in one transaction, taking them as they come; return their
        indexes (a range: nothing here grows with the number of entries)."""
        if self.readonly:
            raise RuntimeError("this log store is open read-only")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                size = self.size()
                if size != self._border.size:  # another process appended meanwhile
                    self._border = self._load_border(size)
                for entry in entries:
                    self._append_one(entry)
                indexes = range(size, self._border.size)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                self._border = merkle.CompactRange()  # reload from disk next time
                raise
            return indexes

    def _append_one(self, entry: bytes) -> int:
        _check_entry(entry)
        index, leaf = self._border.size, merkle.leaf_hash(entry)
        self._db.execute(
            "INSERT INTO entries (idx, entry, leaf) VALUES (?, ?, ?)", (index, entry, leaf)
        )
        self._db.executemany(
            "INSERT INTO nodes (level, idx, hash) VALUES (?, ?, ?)", self._border.append(leaf)
        )
        return index

    def sign_checkpoint(self, signer: NoteSigner, *, now: dt.datetime | None = None) -> str:
        """Sign (and keep) a checkpoint of the log as it is now; the note's origin is the
        signer's name. Signing the same size twice returns the same note."""
        if self.readonly:
            raise RuntimeError("this log store is open read-only")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                size = self.size()
                row = self._db.execute(
                    "SELECT note FROM checkpoints WHERE size = ?", (size,)
                ).fetchone()
                if row is None:
                    note = signer.sign(Checkpoint(signer.name, size, self.root(size)).to_text())
                    stamp = (now or dt.datetime.now(dt.UTC)).isoformat()
                    self._db.execute(
                        "INSERT INTO checkpoints (size, note, signed_at) VALUES (?, ?, ?)",
                        (size, note, stamp),
                    )
                else:
                    note = str(row[0])
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            return note


class LogSink:
    """An :class:`~sandbox.events.EventSink` that appends each event to a log store."""

    def __init__(self, store: LogStore):
        self.store = store

    def emit(self, event: Event) -> None:
        self.emit_many([event])

    def emit_many(self, events: Collection[Event]) -> None:
        """Append ``events`` in one transaction, made as it goes; one over the entry
        limit appends none and raises :class:`LogEntryTooLarge` naming its kind."""
        if len(events) == 1:
            (entry,) = (_within_limit(event) for event in events)
            self.store.append(entry)  # shares a group commit with other threads
        else:
            self.store.append_many(_within_limit(event) for event in events)


def _within_limit(event: Event) -> bytes:
    entry = event.canonical()
    if len(entry) > MAX_ENTRY_BYTES:
        raise LogEntryTooLarge(
            f"a {event.kind} event of {len(entry)} bytes is over the log's entry "
            f"limit of {MAX_ENTRY_BYTES}; nothing of this batch was appended"
        )
    return entry
