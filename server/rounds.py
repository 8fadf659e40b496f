"""One round of messages over the Flower Grid: push, then stream replies until a deadline.

A round's instructions wait in an :class:`Outbox` on disk from the moment each is made
until the log has named them all, and go out a batch at a time. Replies are handed out
as they arrive, so the caller can fold each update into the running sum and drop it.
Nodes that have not answered by the deadline are reported as missing; they do not fail
the round.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from flwr.app import Message, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict
from flwr.serverapp import Grid

from server.scratch import Scratch

POLL_SECONDS = 0.5
# Messages pushed per call to the Grid (each a sealed copy of the global adapter), and
# message ids pulled per call (so at most that many replies, each an update, at once).
PUSH_BATCH = 8
PULL_BATCH = 16


class Outbox:
    """A round's instructions, spooled to a scratch store (``server/scratch.py``) as each
    is made, so that the round never holds n sealed copies of the global adapter. Each
    keeps its destination, type and group id; its content is kept as Flower's protobuf
    form (no pickle), once for consecutive messages that share one content object (a
    plaintext round's, which is handed back shared too). :meth:`batches` hands them back
    in order and drops them, and each content once no message left refers to it (the
    file keeps its pages for reuse, so its size peaks at the round's sealed instructions,
    one global adapter each, until the store is closed): on disk, with the job's outputs
    (``server/scratch.py``)."""

    def __init__(self) -> None:
        self._store = Scratch(
            [
                "CREATE TABLE contents (id INTEGER PRIMARY KEY, content BLOB NOT NULL)",
                "CREATE TABLE outbox (seq INTEGER PRIMARY KEY, node TEXT NOT NULL, "
                "type TEXT NOT NULL, grp TEXT NOT NULL, content INTEGER NOT NULL)",
                "CREATE INDEX outbox_content ON outbox (content)",
            ]
        )
        self._db = self._store.db
        self._last: tuple[RecordDict, int] | None = None

    def add(self, message: Message) -> None:
        content = message.content
        if self._last is None or self._last[0] is not content:
            blob = recorddict_to_proto(content).SerializeToString()
            row = self._db.execute("INSERT INTO contents (content) VALUES (?)", (blob,))
            self._last = (content, int(row.lastrowid or 0))
        metadata = message.metadata
        self._db.execute(
            "INSERT INTO outbox (node, type, grp, content) VALUES (?, ?, ?, ?)",
            (str(metadata.dst_node_id), metadata.message_type, metadata.group_id, self._last[1]),
        )

    def __len__(self) -> int:
        return int(self._db.execute("SELECT count(*) FROM outbox").fetchone()[0])

    def batches(self, size: int) -> Iterator[list[Message]]:
        """The messages in the order they were added, ``size`` at a time, each batch
        dropped from the store as it is handed out."""
        self._last = None
        read: tuple[int, RecordDict] | None = None
        while True:
            rows = self._db.execute(
                "SELECT seq, node, type, grp, content FROM outbox ORDER BY seq LIMIT ?", (size,)
            ).fetchall()
            if not rows:
                return
            batch = []
            for _, node, kind, group, content_id in rows:
                if read is None or read[0] != content_id:
                    read = (content_id, self._content(content_id))
                batch.append(Message(read[1], int(node), kind, group_id=group))
            self._db.execute("DELETE FROM outbox WHERE seq <= ?", (rows[-1][0],))
            self._db.execute("DELETE FROM contents WHERE id NOT IN (SELECT content FROM outbox)")
            yield batch

    def _content(self, content_id: int) -> RecordDict:
        (blob,) = self._db.execute(
            "SELECT content FROM contents WHERE id = ?", (content_id,)
        ).fetchone()
        return recorddict_from_proto(ProtoRecordDict.FromString(blob))

    def close(self) -> None:
        self._store.close()


@dataclass
class RoundCall:
    """Messages of one round, tracked from push to the last reply or the deadline.

    The ids of the messages a round waits on are kept in a scratch store on disk
    (``server/scratch.py``), not in memory, and are pushed and pulled in batches, so
    that what the call holds is the same whatever the number of nodes.
    """

    grid: Grid
    timeout: float
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    missing: set[int] = field(default_factory=set)

    def replies(self, messages: Outbox | list[Message]) -> Iterator[tuple[int, Message]]:
        """Push ``messages`` and yield ``(node_id, reply)`` as replies come in.

        ``messages`` is emptied as they are pushed, a batch at a time (an Outbox is closed
        then): the SuperLink holds them then, and the round keeps only their ids, not n
        sealed copies of the global adapter."""
        store = Scratch(["CREATE TABLE pending (id TEXT PRIMARY KEY, node TEXT NOT NULL)"])
        try:
            self._push(messages, store.db)
            deadline = self.clock() + self.timeout
            while self._count(store.db) and self.clock() < deadline:
                yield from self._pull(store.db)
                if self._count(store.db):
                    self.sleep(POLL_SECONDS)
            for (node_id,) in store.db.execute("SELECT node FROM pending"):
                self.missing.add(int(node_id))
        finally:
            store.close()

    def _push(self, messages: Outbox | list[Message], db: sqlite3.Connection) -> None:
        for batch in _batches(messages):
            # Grids set each message's id in place while pushing and may return fewer ids
            # than messages (a failed push, or none at all for an oversized request).
            accepted = {message_id for message_id in self.grid.push_messages(batch) if message_id}
            for message in batch:
                message_id, node_id = message.metadata.message_id, message.metadata.dst_node_id
                # Not stored, or an id the grid gave twice (the later message's node cannot
                # be told apart from the earlier one's): that node counts as missing.
                if message_id not in accepted or not _pending(db, message_id, node_id):
                    self.missing.add(node_id)

    def _pull(self, db: sqlite3.Connection) -> Iterator[tuple[int, Message]]:
        """One pass over the pending ids, a batch per pull; each reply yielded as it is
        taken off the batch, so that it can be dropped once the caller has folded it in."""
        after = ""
        while True:
            batch = db.execute(
                "SELECT id FROM pending WHERE id > ? ORDER BY id LIMIT ?", (after, PULL_BATCH)
            ).fetchall()
            if not batch:
                return
            after = batch[-1][0]
            replies = list(self.grid.pull_messages([message_id for (message_id,) in batch]))
            while replies:
                reply = replies.pop(0)
                message_id = reply.metadata.reply_to_message_id
                row = db.execute("SELECT node FROM pending WHERE id = ?", (message_id,)).fetchone()
                # Only a reply to a message still pending, from the node it was sent to
                # (or the SuperLink's own error for it: node or reply unavailable).
                sender = reply.metadata.src_node_id
                superlink = sender == SUPERLINK_NODE_ID and reply.has_error()
                if row is not None and (str(sender) == row[0] or superlink):
                    db.execute("DELETE FROM pending WHERE id = ?", (message_id,))
                    yield int(row[0]), reply
                del reply

    @staticmethod
    def _count(db: sqlite3.Connection) -> int:
        return int(db.execute("SELECT count(*) FROM pending").fetchone()[0])


def _pending(db: sqlite3.Connection, message_id: str, node_id: int) -> bool:
    """Wait on ``message_id`` from ``node_id``; False if the id is waited on already."""
    try:
        db.execute("INSERT INTO pending VALUES (?, ?)", (message_id, str(node_id)))
    except sqlite3.IntegrityError:
        return False
    return True


def _batches(messages: Outbox | list[Message]) -> Iterator[list[Message]]:
    """``messages`` in order, :data:`PUSH_BATCH` at a time, each taken out as it goes."""
    if isinstance(messages, Outbox):
        yield from messages.batches(PUSH_BATCH)
        messages.close()
        return
    messages.reverse()  # taken off the list's end
    while messages:
        batch = messages[-PUSH_BATCH:][::-1]
        del messages[-PUSH_BATCH:]
        yield batch


def wait_for_nodes(
    grid: Grid,
    *,
    minimum: int,
    expected: int,
    timeout: float,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[int]:
    """Online node ids once ``expected`` are online, or at least ``minimum`` at the deadline.

    Returns an empty list if fewer than ``minimum`` nodes are online by the deadline.
    """
    target = max(minimum, expected)
    deadline = clock() + timeout
    while True:
        nodes = sorted(set(grid.get_node_ids()))  # each node once, whatever the grid says
        if len(nodes) >= target:
            return nodes
        if clock() >= deadline:
            return nodes if len(nodes) >= minimum else []
        sleep(1.0)
