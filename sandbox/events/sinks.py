"""Where provider events go: the one sink interface every service writes them to.

The key broker records each appraisal, release and denial here (and the ServerApp its
rounds); the transparency log is one more :class:`EventSink`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any, Protocol

from sandbox.events.provider import Event


class EventSink(Protocol):
    """Where events go. Implementations must persist an event before ``emit`` returns."""

    def emit(self, event: Event) -> None: ...

    def emit_many(self, events: Collection[Event]) -> None:
        """Persist ``events`` together, in order (one transaction where the sink has
        them: an event and the members it commits are never kept apart). ``events`` may
        make its entries as it is iterated (:class:`~sandbox.events.members.MemberEntries`):
        a sink iterates it once, and holds no more of it than it must."""
        ...


# The file, under a job's output directory, where the ServerApp writes the job's events.
JOB_EVENTS_FILE = "events.jsonl"


# What a batch of events may take in memory before it is spooled to a temporary file.
SPOOL_BYTES = 256 * 1024


class JsonlEventSink:
    """Appends each event as one JSON line and fsyncs it; safe across threads."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, event: Event) -> None:
        self.emit_many([event])

    def emit_many(self, events: Collection[Event]) -> None:
        # Made first (in memory up to SPOOL_BYTES, then in a temporary file), appended
        # after: entries that fail to be made leave nothing in the file.
        with tempfile.SpooledTemporaryFile(
            SPOOL_BYTES, mode="w+", encoding="utf-8", dir=str(self.path.parent)
        ) as spool:
            for event in events:
                spool.write(json.dumps(event.to_json(), sort_keys=True) + "\n")
            spool.seek(0)
            with self._lock, self.path.open("a", encoding="utf-8") as handle:
                shutil.copyfileobj(spool, handle)
                handle.flush()
                os.fsync(handle.fileno())

    def read(self) -> list[dict[str, Any]]:
        """Every event written so far, oldest first."""
        if not self.path.exists():
            return []
        lines = self.path.read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines if line]


class MemoryEventSink:
    """Keeps events in a list: for tests and for fan-out before a durable sink exists."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def emit_many(self, events: Collection[Event]) -> None:
        self.events.extend(events)

    def kinds(self) -> list[str]:
        return [event.kind for event in self.events]


class FanOutSink:
    """Emits every event to several sinks, in order."""

    def __init__(self, sinks: Sequence[EventSink]):
        self.sinks = list(sinks)

    def emit(self, event: Event) -> None:
        for sink in self.sinks:
            sink.emit(event)

    def emit_many(self, events: Collection[Event]) -> None:
        for sink in self.sinks:
            sink.emit_many(events)
