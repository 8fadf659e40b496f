"""Lists that grow with the number of nodes, logged one entry per member.

A round's participants, the updates its aggregate counts, the nodes of each secure
aggregation stage and each node's final metrics grow with the federation: inline, a round
of about 650 nodes passes the log's 64 KiB entry limit. So the ServerApp logs each such
list as one ``list_member`` entry per member, followed by the event itself, which holds
``committed`` in the lists' place: per list, the member count and the RFC 9162 Merkle tree
hash over the members' canonical JSON, in order. Every entry stays the same size whatever
the number of nodes; the members and their event are appended in one transaction, so a
crash never leaves members without their event; and each node's membership is an entry
of its own, whose inclusion proof a node operator can ask for.

The auditor reads both forms (:func:`expand`): lists inline (logs written before this)
and lists committed. It rebuilds each committed list from its members, checks count,
order and root, and hands every other check the event with its lists inline again, so no
rule is written twice. A committed list whose members do not add up is left out (the
rules that need it then fail closed) and reported.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sandbox.canonical import as_text_beyond_jcs, dumps
from sandbox.events.provider import Event, ListCommitment, ListMember, PerMember
from sandbox.events.schema import Key
from sandbox.translog.merkle import EMPTY_ROOT, CompactRange, leaf_hash, root_hash

# The event kinds that log lists per member, by kind.
PER_MEMBER_KINDS: dict[str, type[PerMember]] = {
    kind: cls
    for kind, cls in Event.registry.items()
    if isinstance(cls, type) and issubclass(cls, PerMember) and "PER_MEMBER" in cls.__dict__
}
_SHOWN = 80  # characters of a list name a message repeats
_WHERE = (Key.ROUND, Key.STAGE)  # an event's fields its members repeat, when it has them


def members_root(items: Iterable[Any]) -> str:
    """The RFC 9162 Merkle tree hash (hex) over the canonical JSON of each item."""
    return root_hash([_leaf_entry(item) for item in items]).hex()


def _leaf_entry(item: Any) -> bytes:
    """A member as its list's Merkle tree hashes it: its canonical JSON."""
    return dumps(as_text_beyond_jcs(item))


def list_name(kind: str, path: str) -> str:
    return f"{kind}.{path}"


def _parent(record: dict[str, Any], path: str) -> tuple[dict[str, Any] | None, str]:
    """The object holding the field at dotted ``path`` in ``record`` (None if a step on
    the way is not an object), and the field's name."""
    *steps, name = path.split(".")
    parent: Any = record
    for step in steps:
        parent = parent.get(step) if isinstance(parent, dict) else None
    return (parent if isinstance(parent, dict) else None), name


@dataclass(frozen=True)
class Streamed:
    """A list logged per member without being held: how many members it has, and a way to
    read them (in their JSON form, in order) each time its entries are written."""

    count: int
    items: Callable[[], Iterable[Any]]


class MemberEntries(Collection[Event]):
    """An event as it is logged, its lists (``lists``: path -> :class:`Streamed`) read as
    their ``list_member`` entries are made, the event last with ``committed`` in their
    place. The Merkle root is built as the members go by (:class:`CompactRange`), so
    writing the entries holds one member at a time; every sink iterates them anew.
    ``record`` is the event's JSON form without those lists; ``event`` gives its kind,
    time, run and job."""

    def __init__(self, event: PerMember, record: dict[str, Any], lists: Mapping[str, Streamed]):
        self.event, self.record, self.lists = event, record, lists

    def __len__(self) -> int:
        return sum(listed.count for listed in self.lists.values()) + 1

    def __contains__(self, entry: object) -> bool:
        return any(entry == mine for mine in self)

    def __iter__(self) -> Iterator[Event]:
        event, record = self.event, self.record
        where = {key.value: record[key] for key in _WHERE if key in record}
        committed: dict[str, Any] = {}
        for path, listed in self.lists.items():
            tree, name = CompactRange(), list_name(event.kind, path)
            for index, item in enumerate(listed.items()):
                tree.append(leaf_hash(_leaf_entry(item)))
                yield ListMember(
                    time=event.time, run=event.run, job=event.job,
                    list=name, index=index, item=item, **where,
                )  # fmt: skip
            if tree.size != listed.count:
                raise RuntimeError(f"{name} changed while it was logged")
            committed[path] = ListCommitment(count=tree.size, root=tree.root().hex()).to_json()
        yield type(event).from_json({**record, Key.COMMITTED: committed})


def per_member(event: Event) -> list[Event]:
    """``event`` as it is logged: its growing lists as ``list_member`` entries, then the
    event with ``committed`` in their place. Other events are logged as they are."""
    if not isinstance(event, PerMember):
        return [event]
    record = event.to_json()
    lists: dict[str, Streamed] = {}
    for path in event.PER_MEMBER:
        parent, name = _parent(record, path)
        value = None if parent is None else parent.pop(name, None)
        if value is None:
            continue
        items = list(value) if isinstance(value, list) else [[k, v] for k, v in value.items()]
        lists[path] = Streamed(len(items), functools.partial(iter, items))
    return list(MemberEntries(event, record, lists))


def streamed(kind: type[PerMember], lists: Mapping[str, Streamed], **fields: Any) -> MemberEntries:
    """An event of ``kind`` with ``fields``, its ``lists`` logged per member as they are
    read (:class:`MemberEntries`): for lists too long to hold (a round's participants)."""
    pending = {path: ListCommitment(count=0, root=EMPTY_ROOT.hex()) for path in lists}
    event = kind(committed=pending, **fields)
    record = event.to_json()
    del record[Key.COMMITTED]
    return MemberEntries(event, record, lists)


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def listed_count(record: Mapping[str, Any], name: str) -> int:
    """How many members the list ``name`` of a logged event has, in either form (0 when
    it has neither)."""
    value = record.get(name)
    if isinstance(value, list):
        return len(value)
    committed = record.get(Key.COMMITTED)
    commitment = committed.get(name) if isinstance(committed, dict) else None
    count = commitment.get(Key.COUNT) if isinstance(commitment, dict) else None
    return count if isinstance(count, int) and not isinstance(count, bool) else 0


@dataclass
class Expanded:
    """A log's events with every committed list inline again, and what did not add up:
    ``(index of the entry at fault, what)``."""

    records: list[dict[str, Any]]
    problems: list[tuple[int, str]] = field(default_factory=list)


def _member_key(record: Mapping[str, Any], name: Any) -> tuple[str, ...]:
    return (_text(record.get(Key.RUN)), *(_text(record.get(k)) for k in _WHERE), _text(name))


def _described(key: tuple[str, ...]) -> str:
    run, rnd, stage, name = key
    name = name if len(name) <= _SHOWN else name[:_SHOWN] + "…"  # another party's text
    where = f"run {run}" + (f" round {rnd}" if rnd else "") + (f" {stage}" if stage else "")
    return f"{name} of {where}"


class _Lists:
    """The members :func:`expand` has read and not yet matched to their event."""

    def __init__(self) -> None:
        self.pending: dict[tuple[str, ...], dict[int, tuple[int, Any]]] = {}
        self.problems: list[tuple[int, str]] = []

    def member(self, index: int, record: Mapping[str, Any]) -> None:
        position, name = record.get(Key.INDEX), record.get(Key.LIST)
        if not isinstance(name, str) or not isinstance(position, int) or position < 0:
            self.problems.append((index, "a list_member without a list name and an index"))
            return
        if isinstance(position, bool) or Key.ITEM not in record:
            self.problems.append((index, f"a list_member of {name} without an item"))
            return
        key = _member_key(record, name)
        members = self.pending.setdefault(key, {})
        if position in members:
            self.problems.append((index, f"member {position} of {_described(key)} is logged twice"))
            return
        members[position] = (index, record[Key.ITEM])

    def expand(self, index: int, record: dict[str, Any], kind: type[PerMember]) -> dict[str, Any]:
        """``record`` with its committed lists inline again (a copy); a list it must have
        and has in neither form is noted."""
        out = self._expanded(index, record, kind.PER_MEMBER)
        committed = record.get(Key.COMMITTED)
        for path in sorted(kind.required_lists(record.get(Key.STAGE))):
            parent, name = _parent(out, path)
            if isinstance(committed, dict) and path in committed:
                continue  # a commitment that did not add up is noted already
            if parent is None or name not in parent:
                self.problems.append((index, f"{kind.kind} has no {path}, inline or committed"))
        return out

    def _expanded(self, index: int, record: dict[str, Any], paths: Sequence[str]) -> dict[str, Any]:
        committed = record.get(Key.COMMITTED)
        if committed is None:
            return record
        kind = _text(record.get(Key.KIND))
        if not isinstance(committed, dict) or not set(committed) <= set(paths):
            self.problems.append((index, f"{kind} commits lists it does not have: {committed!r}"))
            return record
        out = copy.deepcopy(record)
        for path, commitment in committed.items():
            items = self._matched(index, record, path, commitment)
            rebuilt = items if items is None or "." not in path else self._map(index, kind, items)
            parent, name = _parent(out, path)
            if parent is None:
                self.problems.append((index, f"{kind} has no object to hold {path}"))
            elif name in parent and (rebuilt is None or parent[name] != rebuilt):
                # Inline as well: read only when it is exactly what the members say (an
                # event this function already expanded), so expanding twice changes nothing.
                self.problems.append((index, f"{kind} has {path} inline unlike its members"))
                parent.pop(name)
            elif rebuilt is not None:
                parent[name] = rebuilt
        return out

    def _map(self, index: int, kind: str, items: list[Any]) -> dict[str, Any] | None:
        """A map's members (``[key, value]`` pairs with distinct keys) as the map."""
        pairs = dict(_pairs(items))
        if len(pairs) != len(items):
            self.problems.append((index, f"{kind}: a map's members are not distinct pairs"))
            return None
        return pairs

    def _matched(
        self, index: int, record: Mapping[str, Any], path: str, commitment: Any
    ) -> list[Any] | None:
        """The members of ``path`` in order if they are exactly what ``commitment`` says,
        else None (and the problem noted)."""
        key = _member_key(record, list_name(_text(record.get(Key.KIND)), path))
        members = self.pending.pop(key, {})
        count = commitment.get(Key.COUNT) if isinstance(commitment, dict) else None
        root = commitment.get(Key.ROOT) if isinstance(commitment, dict) else None
        if not isinstance(count, int) or isinstance(count, bool) or not isinstance(root, str):
            self.problems.append((index, f"{_described(key)}: commitment {commitment!r}"))
            return None
        # Bounded by the members logged, never by the count the event claims.
        if len(members) != count or any(position not in members for position in range(count)):
            probe = range(min(max(count, 0), len(members) + 5))
            missing = [position for position in probe if position not in members][:5]
            extra = sorted(position for position in members if position >= count)[:5]
            self.problems.append(
                (
                    index,
                    f"{_described(key)} commits {count} members but {len(members)} are "
                    f"logged before it (missing {missing or 'none'}, beyond {extra or 'none'})",
                )
            )
            return None
        items = [members[position][1] for position in range(count)]
        if members_root(items) != root:
            self.problems.append(
                (index, f"{_described(key)}: its members do not hash to the committed root")
            )
            return None
        return items


def _pairs(items: Sequence[Any]) -> Iterable[tuple[str, Any]]:
    for item in items:
        if isinstance(item, list) and len(item) == 2 and isinstance(item[0], str):
            yield item[0], item[1]


def expand(records: Sequence[Mapping[str, Any]]) -> Expanded:
    """The log's events with their committed lists inline again, in log order and at the
    same indexes (members stay in place), and what did not add up: members missing,
    extra, changed, reordered or duplicated, members no event commits, a list in both
    forms. Expanding expanded events changes nothing."""
    lists = _Lists()
    out: list[dict[str, Any]] = []
    for index, record in enumerate(records):
        kind = record.get(Key.KIND)
        current = dict(record)
        if kind == ListMember.kind:
            lists.member(index, record)
        elif isinstance(kind, str) and kind in PER_MEMBER_KINDS:
            current = lists.expand(index, current, PER_MEMBER_KINDS[kind])
        out.append(current)
    for key, members in lists.pending.items():
        first = min(at for at, _ in members.values())
        lists.problems.append(
            (first, f"{len(members)} members of {_described(key)} are committed by no event")
        )
    return Expanded(out, sorted(lists.problems))


def inline(events: Iterable[Event]) -> list[Event]:
    """Typed events as their emitter built them: each committed list inline again, the
    members dropped. For readers of a job's own events (``events.jsonl``, a test's sink);
    the auditor reads the log with :func:`expand`. A committed list whose members do not
    add up leaves its event without it, which raises EventInvalid naming the list."""
    out: list[Event] = []
    for record in expand([event.to_json() for event in events]).records:
        if record.get(Key.KIND) != ListMember.kind:
            record.pop(Key.COMMITTED, None)
            out.append(Event.from_json(record))
    return out
