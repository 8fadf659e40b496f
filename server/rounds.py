"""One round of messages over the Flower Grid: push, then stream replies until a deadline.

Replies are handed out as they arrive, so the caller can fold each update into the
running sum and drop it. Nodes that have not answered by the deadline are reported
as missing; they do not fail the round.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

from server.scratch import Scratch

POLL_SECONDS = 0.5
# Messages pushed, and message ids pulled, per call to the Grid.
BATCH = 100


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

    def replies(self, messages: list[Message]) -> Iterator[tuple[int, Message]]:
        """Push ``messages`` and yield ``(node_id, reply)`` as replies come in.

        ``messages`` is emptied as they are pushed, a batch at a time: the SuperLink holds
        them then, and the round keeps only their ids, not n sealed copies of the global
        adapter."""
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

    def _push(self, messages: list[Message], db: sqlite3.Connection) -> None:
        messages.reverse()  # pushed in their order, taken off the list's end
        while messages:
            batch = messages[-BATCH:][::-1]
            del messages[-BATCH:]
            # Grids set each message's id in place while pushing and may return fewer ids
            # than messages (a failed push, or none at all for an oversized request).
            accepted = {message_id for message_id in self.grid.push_messages(batch) if message_id}
            sent = []
            for message in batch:
                message_id = message.metadata.message_id
                if message_id in accepted:
                    sent.append((message_id, str(message.metadata.dst_node_id)))
                else:
                    self.missing.add(message.metadata.dst_node_id)
            db.executemany("INSERT OR IGNORE INTO pending VALUES (?, ?)", sent)

    def _pull(self, db: sqlite3.Connection) -> Iterator[tuple[int, Message]]:
        """One pass over the pending ids, a batch per pull; each reply yielded as it is
        taken off the batch, so that it can be dropped once the caller has folded it in."""
        after = ""
        while True:
            batch = db.execute(
                "SELECT id FROM pending WHERE id > ? ORDER BY id LIMIT ?", (after, BATCH)
            ).fetchall()
            if not batch:
                return
            after = batch[-1][0]
            replies = list(self.grid.pull_messages([message_id for (message_id,) in batch]))
            while replies:
                reply = replies.pop(0)
                message_id = reply.metadata.reply_to_message_id
                row = db.execute("SELECT node FROM pending WHERE id = ?", (message_id,)).fetchone()
                if row is not None:
                    db.execute("DELETE FROM pending WHERE id = ?", (message_id,))
                    yield int(row[0]), reply
                del reply

    @staticmethod
    def _count(db: sqlite3.Connection) -> int:
        return int(db.execute("SELECT count(*) FROM pending").fetchone()[0])


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
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= target:
            return nodes
        if clock() >= deadline:
            return nodes if len(nodes) >= minimum else []
        sleep(1.0)
