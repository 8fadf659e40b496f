"""One round of messages over the Flower Grid: push, then stream replies until a deadline.

Replies are handed out as they arrive, so the caller can fold each update into the
running sum and drop it. Nodes that have not answered by the deadline are reported
as missing; they do not fail the round.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from flwr.app import Message
from flwr.serverapp import Grid

POLL_SECONDS = 0.5


@dataclass
class RoundCall:
    """Messages of one round, tracked from push to the last reply or the deadline."""

    grid: Grid
    timeout: float
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep
    missing: set[int] = field(default_factory=set)

    def replies(self, messages: list[Message]) -> Iterator[tuple[int, Message]]:
        """Push ``messages`` and yield ``(node_id, reply)`` as replies come in.

        ``messages`` is emptied once they are pushed: the SuperLink holds them then, and
        the round keeps only their ids, not n sealed copies of the global adapter."""
        # Grids set each message's id in place while pushing and may return fewer ids than
        # messages (a failed push, or none at all for an oversized request): match by id.
        accepted = {message_id for message_id in self.grid.push_messages(messages) if message_id}
        node_of: dict[str, int] = {}
        for message in messages:
            message_id = message.metadata.message_id
            if message_id in accepted:
                node_of[message_id] = message.metadata.dst_node_id
            else:
                self.missing.add(message.metadata.dst_node_id)
        messages.clear()
        pending = set(node_of)
        deadline = self.clock() + self.timeout
        while pending and self.clock() < deadline:
            # Flower hands over every reply available at this pull; pop them one by one
            # so each can be dropped as soon as the caller has folded it in.
            batch = list(self.grid.pull_messages(sorted(pending)))
            while batch:
                reply = batch.pop(0)
                message_id = reply.metadata.reply_to_message_id
                if message_id in pending:
                    pending.discard(message_id)
                    yield node_of[message_id], reply
                del reply
            if pending:
                self.sleep(POLL_SECONDS)
        self.missing.update(node_of[m] for m in pending)


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
