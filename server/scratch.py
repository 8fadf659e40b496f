"""The ServerApp's scratch store: what this process keeps of each node, on disk.

At a thousand nodes, the records a coordinator keeps per node (each node's channel key
and nonce, the message ids a round waits on, each node's metrics, held weight and
admission) are most of what it holds; kept as Python objects they grow with n. They
live here instead: SQLite files in private temporary folders (mode 0700), removed when
their owner closes them or is collected, or when the process exits. SQLite's page cache
is capped (:data:`CACHE_KIB`), so what the process holds for them is the same whatever
the number of nodes.

Nothing here outlives the process, and nothing here is secret (public keys, nonces,
Flower message ids, nodes' metrics): a restarted ServerApp shakes hands anew, and what a
job must keep across restarts is the checkpoint's (``server/checkpoint.py``).
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import json
import os
import shutil
import sqlite3
import stat
import tempfile
import weakref
from collections.abc import ItemsView, Iterable, Iterator, Mapping, MutableMapping, ValuesView
from pathlib import Path
from typing import Any

from sandbox.errors import ConfigError

# SQLite's page cache per scratch store (KiB): what a store may hold in memory at most.
CACHE_KIB = 512


# Where new stores are made: the temporary directory, or the folder a job names
# (:func:`use_folder`), so that a job's stores sit with its outputs, not in a RAM-backed /tmp.
_root: Path | None = None
PREFIX = "ark-scratch-"
LOCK_FILE = "lock"
# The folder, under a job's output directory, its ServerApp's stores are made in.
JOB_FOLDER = "scratch"


def use_folder(folder: Path) -> None:
    """Make this process's new scratch stores under ``folder`` (made 0700 if missing; one
    that is a symlink, another user's, or open to others is refused with ConfigError).
    Stores left there by a process that no longer holds them (a ServerApp killed before
    its exit handlers ran) are removed first: each store holds a lock on its folder for
    its whole life, so one that can be locked is no one's."""
    global _root, _shared
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    found = folder.lstat()
    if (
        not stat.S_ISDIR(found.st_mode)
        or found.st_uid != os.geteuid()
        or stat.S_IMODE(found.st_mode) & 0o077
    ):
        raise ConfigError(
            f"{folder}: the ServerApp's scratch folder must be a directory of this user's "
            "that no one else may open (mode 0700)",
            key="output-dir",
        )
    for left in folder.glob(f"{PREFIX}*"):
        if _abandoned(left):
            shutil.rmtree(left, ignore_errors=True)
    if _root != folder:
        _root, _shared = folder, None  # the maps made from now on go there too


def _abandoned(store: Path) -> bool:
    """Whether ``store``'s lock can be taken now: no live process holds that store."""
    try:
        fd = os.open(store / LOCK_FILE, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError:
        return False  # not a store of ours (or not one yet): left alone
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    finally:
        os.close(fd)
    return True


def _remove(db: sqlite3.Connection, folder: Path, pid: int, lock: int) -> None:
    if os.getpid() != pid:
        return  # a forked child leaves its parent's store alone
    db.close()
    shutil.rmtree(folder, ignore_errors=True)
    os.close(lock)


class Scratch:
    """One SQLite file of per-node records, in a private folder removed on :meth:`close`."""

    def __init__(self, schema: Iterable[str]) -> None:
        # The job's folder if it is still there, else the temporary directory.
        root = _root if _root is not None and _root.is_dir() else None
        self.folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root))
        self.pid = os.getpid()
        # Held for the store's life: use_folder removes only stores whose lock is free.
        lock = os.open(self.folder / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        fcntl.flock(lock, fcntl.LOCK_EX)
        # Autocommit: every statement stands alone. Nothing needs to survive a crash, so
        # the file is neither synced nor journalled to disk.
        self.db = sqlite3.connect(
            self.folder / "records.sqlite", isolation_level=None, check_same_thread=False
        )
        self._finalizer = weakref.finalize(self, _remove, self.db, self.folder, self.pid, lock)
        for pragma in (f"cache_size=-{CACHE_KIB}", "synchronous=OFF", "journal_mode=MEMORY"):
            self.db.execute(f"PRAGMA {pragma}")
        for statement in schema:
            self.db.execute(statement)

    def close(self) -> None:
        """Close the database and remove its folder (once; later calls do nothing)."""
        self._finalizer()


# The store :class:`ScratchMap` tables live in: one per process, made on first use.
_shared: Scratch | None = None
_tables = itertools.count()
# Rows a map reads per query while it is iterated.
PAGE_ROWS = 256


def _shared_store() -> Scratch:
    global _shared
    # A forked child makes its own: an SQLite connection must not cross a fork.
    if _shared is None or _shared.pid != os.getpid():
        _shared = Scratch([])
    return _shared


def _drop(db: sqlite3.Connection, table: str, pid: int) -> None:
    if os.getpid() != pid:
        return  # a forked child's copy of a map: the table is its parent's
    # A store closed first (at exit) took its folder, and the table, with it.
    with contextlib.suppress(sqlite3.ProgrammingError):
        db.execute(f"DROP TABLE IF EXISTS {table}")


def _statements(table: str) -> dict[str, str]:
    """A map's SQL. Its table's name is made from a counter (:class:`ScratchMap`), never
    from input, so building the statements with it injects nothing."""
    return {
        "get": f"SELECT value FROM {table} WHERE key = ?",  # noqa: S608
        "put": f"INSERT INTO {table} (key, value) VALUES (?, ?) "  # noqa: S608
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        "delete": f"DELETE FROM {table} WHERE key = ?",  # noqa: S608
        "page": f"SELECT seq, key, value FROM {table} WHERE seq > ? ORDER BY seq LIMIT ?",  # noqa: S608
        "count": f"SELECT count(*) FROM {table}",  # noqa: S608
    }


class ScratchMap(MutableMapping[str, Any]):
    """A dict of JSON values by text key, kept in a table of this process's scratch store:
    a job's per-node records (each node's metrics in a round, its held weight, its
    admission) cost the process no memory per node.

    It iterates in insertion order, as a dict does; a value read is a fresh copy (change
    it by assigning it again). Keys are any text (kept as their JSON form, so that one
    with a lone surrogate, which SQLite's UTF-8 cannot hold, is kept as a dict keeps it);
    values are what the checkpoint's JSON holds: numbers (NaN included), text, and lists
    and mappings of them. The table is dropped when the map is collected (in the process
    that made it). Unlike a dict's, its views read the table as they go: keys added while
    it is iterated are seen, not refused.
    """

    def __init__(self, items: Mapping[str, Any] | Iterable[tuple[str, Any]] = ()) -> None:
        self._store = _shared_store()  # kept: the store lives as long as its maps
        self._db = self._store.db
        self._table = f"map_{next(_tables)}"
        self._db.execute(
            f"CREATE TABLE {self._table} "
            "(seq INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, value TEXT NOT NULL)"
        )
        weakref.finalize(self, _drop, self._db, self._table, os.getpid())
        self._sql = _statements(self._table)
        self.update(items)

    def __getitem__(self, key: str) -> Any:
        if not isinstance(key, str):
            raise KeyError(key)  # as a dict of text keys answers
        row = self._db.execute(self._sql["get"], (_key(key),)).fetchone()
        if row is None:
            raise KeyError(key)
        return json.loads(row[0])

    def __setitem__(self, key: str, value: Any) -> None:
        self._db.execute(self._sql["put"], (_key(key), json.dumps(value)))

    def __delitem__(self, key: str) -> None:
        if not isinstance(key, str) or (
            self._db.execute(self._sql["delete"], (_key(key),)).rowcount == 0
        ):
            raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return (key for key, _ in self._pairs())

    def items(self) -> ItemsView[str, Any]:
        return _Items(self)

    def values(self) -> ValuesView[Any]:
        return _Values(self)

    def _pairs(self) -> Iterator[tuple[str, Any]]:
        """Every key and value in insertion order, a page of rows per query."""
        after = -1
        while True:
            page = self._db.execute(self._sql["page"], (after, PAGE_ROWS)).fetchall()
            if not page:
                return
            after = page[-1][0]
            yield from ((json.loads(key), json.loads(value)) for _, key, value in page)

    def __len__(self) -> int:
        return int(self._db.execute(self._sql["count"]).fetchone()[0])

    def __repr__(self) -> str:
        return f"ScratchMap({len(self)} items)"


class _Items(ItemsView[str, Any]):
    _mapping: ScratchMap

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        return self._mapping._pairs()


class _Values(ValuesView[Any]):
    _mapping: ScratchMap

    def __iter__(self) -> Iterator[Any]:
        return (value for _, value in self._mapping._pairs())


def _key(key: object) -> str:
    """A map key as its table keeps it: its JSON form (ASCII, any text representable)."""
    return json.dumps(_text_key(key))


def _text_key(key: object) -> str:
    if not isinstance(key, str):
        raise TypeError(f"a scratch map's keys are text, not {type(key).__name__}")
    return key


def json_text(value: Any, level: int = 0) -> Iterator[str]:
    """``value``'s JSON text, exactly as ``json.dumps(value, indent=2)`` writes it, in
    pieces: a mapping's items are read one at a time, so a :class:`ScratchMap` is written
    without being held. Keys are text; every other value is written by ``json.dumps``."""
    if not isinstance(value, (Mapping, list, tuple)):
        yield json.dumps(value)
        return
    mapping = isinstance(value, Mapping)
    opening, closing = ("{", "}") if mapping else ("[", "]")
    inner = "\n" + "  " * (level + 1)
    empty = True
    items: Iterable[Any] = value.items() if isinstance(value, Mapping) else value
    for item in items:
        yield (opening if empty else ",") + inner
        empty = False
        if mapping:
            key, item = item
            yield json.dumps(_text_key(key)) + ": "
        yield from json_text(item, level + 1)
    yield opening + closing if empty else "\n" + "  " * level + closing
