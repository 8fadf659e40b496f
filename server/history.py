"""What a job keeps of its rounds: typed records with their checkpoint JSON form.

The checkpoint (``server/checkpoint.py``) stores a :class:`History` as JSON and the
results (``server/results.py``) are built from it. Nodes are keyed by their Flower node
id as text, as in ``results.json``. The JSON form is the one checkpoints always had:
``{"rounds": {"<round>": {"local", "train_loss", "rejected", "examples", "missing",
"seconds", "global"}}}``, where round 0 (never trained) holds only ``global``.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")
Metrics = dict[str, float]
# The keys a trained round adds to its JSON entry, in the order they are written.
TRAINING_KEYS = ("local", "train_loss", "rejected", "examples", "missing", "seconds")
HELD_OUT_KEY = "global"


@dataclass
class Training:
    """What the nodes' replies to one round's training instruction left."""

    # Held-out metrics of each node's locally trained adapter.
    # Any mutable mapping: a round in flight keeps them on disk (``server/scratch.py``).
    local: MutableMapping[str, Metrics] = field(default_factory=dict)
    train_loss: MutableMapping[str, float] = field(default_factory=dict)
    # Why a node's reply counted for nothing (a node error's code, or the rejection).
    rejected: MutableMapping[str, str] = field(default_factory=dict)
    # The weight each accepted update got.
    examples: MutableMapping[str, float] = field(default_factory=dict)
    # Nodes sent an instruction that did not answer before the deadline.
    missing: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self) -> dict[str, float]:
        """The round's headline numbers for the log: mean local accuracy and training loss."""
        # Running sums: the per-node records are read one at a time (they may be on disk).
        accuracy = _Mean()
        for metrics in self.local.values():
            value = metrics.get("accuracy")
            if isinstance(value, (int, float)):
                accuracy.add(float(value))
        loss = _Mean()
        for value in self.train_loss.values():
            if value == value:
                loss.add(float(value))
        out: dict[str, float] = {"updates": float(len(self.examples))}
        if accuracy.count:
            out["local_accuracy"] = accuracy.mean()
        if loss.count:
            out["train_loss"] = loss.mean()
        return out

    def to_json(self) -> dict[str, Any]:
        return {
            "local": self.local,
            "train_loss": self.train_loss,
            "rejected": self.rejected,
            "examples": self.examples,
            "missing": self.missing,
            "seconds": self.seconds,
        }

    @classmethod
    def from_json(cls, entry: dict[str, Any]) -> Training:
        return cls(
            local=_per_node(entry["local"], _metrics),
            train_loss=_per_node(entry["train_loss"], float),
            rejected=_per_node(entry["rejected"], _text),
            examples=_per_node(entry["examples"], float),
            missing=[int(node) for node in _list(entry["missing"], "missing")],
            seconds=float(entry["seconds"]),
        )


@dataclass
class RoundRecord:
    """One round: its training (none for round 0) and how its global adapter did."""

    # Each node's held-out metrics of the global adapter this round produced, as the
    # node reported them when the next round (or the final evaluation) sent it.
    held_out: MutableMapping[str, Metrics] = field(default_factory=dict)
    training: Training | None = None

    def to_json(self) -> dict[str, Any]:
        entry = {} if self.training is None else self.training.to_json()
        if self.held_out:
            entry[HELD_OUT_KEY] = self.held_out
        return entry

    @classmethod
    def from_json(cls, entry: Any, where: str) -> RoundRecord:
        entry = _mapping(entry, where)
        unknown = sorted(set(entry) - {HELD_OUT_KEY, *TRAINING_KEYS})
        if unknown:
            raise ValueError(f"{where}: unknown key {unknown[0]!r}")
        present = [key for key in TRAINING_KEYS if key in entry]
        if present and len(present) != len(TRAINING_KEYS):
            missing = next(key for key in TRAINING_KEYS if key not in entry)
            raise ValueError(f"{where}: training record without {missing!r}")
        return cls(
            held_out=_per_node(entry.get(HELD_OUT_KEY, {}), _metrics),
            training=Training.from_json(entry) if present else None,
        )


@dataclass
class History:
    """Every round the job has records of, by round number (0: the initial adapter)."""

    rounds: dict[int, RoundRecord] = field(default_factory=dict)

    def round(self, rnd: int) -> RoundRecord:
        """Round ``rnd``'s record, started empty if there is none yet."""
        return self.rounds.setdefault(rnd, RoundRecord())

    def held_out(self, rnd: int) -> MutableMapping[str, Metrics]:
        """How round ``rnd``'s global adapter did on each node (empty if unknown)."""
        record = self.rounds.get(rnd)
        return {} if record is None else record.held_out

    def to_json(self) -> dict[str, Any]:
        return {"rounds": {str(rnd): record.to_json() for rnd, record in self.rounds.items()}}

    @classmethod
    def from_json(cls, value: Any) -> History:
        """Parse a checkpoint's ``history``; TypeError or ValueError names what is wrong."""
        document = _mapping(value, "history")
        unknown = sorted(set(document) - {"rounds"})
        if unknown:
            raise ValueError(f"history: unknown key {unknown[0]!r}")
        rounds = _mapping(document.get("rounds", {}), "history.rounds")
        return cls(
            {
                int(rnd): RoundRecord.from_json(entry, f"history.rounds.{rnd}")
                for rnd, entry in rounds.items()
            }
        )


@dataclass
class _Mean:
    total: float = 0.0
    count: int = 0

    def add(self, value: float) -> None:
        self.total += value
        self.count += 1

    def mean(self) -> float:
        return self.total / self.count


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise TypeError(f"{where} must be a mapping, not {type(value).__name__}")
    return value


def _list(value: Any, where: str) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"{where} must be a list, not {type(value).__name__}")
    return value


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not text")
    return value


def _metrics(value: Any) -> Metrics:
    return {str(name): float(number) for name, number in _mapping(value, "metrics").items()}


def _per_node(value: Any, parse: Callable[[Any], T]) -> dict[str, T]:
    return {str(node): parse(item) for node, item in _mapping(value, "per-node record").items()}
