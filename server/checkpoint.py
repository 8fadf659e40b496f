"""Round checkpoints: the global adapter as safetensors plus a JSON state, written atomically.

After a restart the job resumes from the last finished round; a checkpoint written for
another job (different model, labels, LoRA shape or mode) is refused, not reused. The
state also keeps what bounds the nodes across a restart: each node's held update weight
and, per run, which node each attested TEE (ueid) was admitted as.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from sandbox.channel import adapter_bytes
from sandbox.digests import sha256_file
from sandbox.errors import CheckpointError
from sandbox.files import write_atomic
from server.history import History

STATE_FORMAT = "ark-checkpoint/1"
STATE_FILE = "state.json"


@dataclass
class JobState:
    """Progress of a federated job, saved after every round."""

    fingerprint: str
    round: int
    history: History = field(default_factory=History)
    finished: bool = False
    # Node identity (its ueid; "node-<id>" with protection off) -> the weight its first
    # accepted update got; later updates of that node weigh no more.
    weights: dict[str, float] = field(default_factory=dict)
    # Run id -> ueid -> the node id that ueid was admitted as in that run.
    admissions: dict[str, dict[str, int]] = field(default_factory=dict)


class CheckpointStore:
    """Reads and writes the checkpoints of one job under ``directory``."""

    def __init__(self, directory: Path):
        self.directory = directory

    def adapter_path(self, server_round: int) -> Path:
        return self.directory / f"round-{server_round:04d}.safetensors"

    def adapter_digest(self, server_round: int) -> str:
        """SHA-256 of a round's checkpointed adapter file."""
        return sha256_file(self.adapter_path(server_round))[0]

    def save(self, state: JobState, adapter: dict[str, np.ndarray]) -> str:
        """Write the round's adapter, then the state that points at it; return the
        adapter file's SHA-256."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.adapter_path(state.round)
        write_atomic(path, adapter_bytes(adapter))
        document = {
            "format": STATE_FORMAT,
            "fingerprint": state.fingerprint,
            "round": state.round,
            "adapter": path.name,
            "adapter_sha256": sha256_file(path)[0],
            "history": state.history.to_json(),
            "finished": state.finished,
            "weights": state.weights,
            "admissions": state.admissions,
        }
        write_atomic(self.directory / STATE_FILE, json.dumps(document, indent=2).encode())
        return str(document["adapter_sha256"])

    def load(self, fingerprint: str) -> tuple[JobState, dict[str, np.ndarray]] | None:
        """The last saved state and adapter, or None for a fresh job."""
        state_file = self.directory / STATE_FILE
        if not state_file.exists():
            return None
        try:
            document = json.loads(state_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CheckpointError(f"{state_file}: unreadable checkpoint state: {exc}") from exc
        if not isinstance(document, dict) or document.get("format") != STATE_FORMAT:
            raise CheckpointError(f"{state_file}: not an {STATE_FORMAT} state")
        if document.get("fingerprint") != fingerprint:
            raise CheckpointError(
                f"{state_file}: checkpoint belongs to a different job configuration "
                "(model, labels, LoRA or mode changed); use a new job id or output dir"
            )
        adapter_file = self.directory / str(document.get("adapter", ""))
        if adapter_file.parent != self.directory or not adapter_file.is_file():
            raise CheckpointError(f"{state_file}: adapter file {adapter_file.name!r} is missing")
        if sha256_file(adapter_file)[0] != document.get("adapter_sha256"):
            raise CheckpointError(f"{adapter_file}: digest does not match {state_file}")
        try:
            state = JobState(
                fingerprint=fingerprint,
                round=int(document["round"]),
                history=History.from_json(document.get("history", {})),
                finished=bool(document.get("finished", False)),
                weights=_weights(document.get("weights", {})),
                admissions=_admissions(document.get("admissions", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{state_file}: malformed checkpoint state: {exc!r}") from exc
        return state, load_file(str(adapter_file))


def _weights(value: Any) -> dict[str, float]:
    """Held weights: positive finite numbers, or the state is malformed."""
    weights = {str(node): float(weight) for node, weight in dict(value).items()}
    bad = [w for w in weights.values() if not (w > 0 and math.isfinite(w))]
    if bad:
        raise ValueError(f"held weight {bad[0]!r} is not a positive finite number")
    return weights


def _admissions(value: Any) -> dict[str, dict[str, int]]:
    return {
        str(run): {str(ueid): int(node) for ueid, node in dict(nodes).items()}
        for run, nodes in dict(value).items()
    }
