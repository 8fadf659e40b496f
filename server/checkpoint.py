"""Round checkpoints: the global adapter as safetensors plus a JSON state, written atomically.

After a restart the job resumes from the last finished round; a checkpoint written for
another job (different model, labels, LoRA shape or mode) is refused, not reused. The
state also keeps what bounds the nodes across a restart: each node's held update weight
and, per run, which node each attested TEE (ueid) was admitted as.

A round's records (every node's metrics) are final once the next round commits, which
brings the held-out metrics of its adapter: from then on they are a file of their own,
``history-NNNN.json``, named with its SHA-256 in the state, and leave the job's memory and
``state.json``. So neither grows with nodes times rounds during the run;
:meth:`CheckpointStore.history` reads them all back, checked, when the results are built
at its end. The digests catch a lost, damaged or mixed-up file (checked when the job
resumes, too); like the rest of ``state.json``, they are no defence against someone who
can write to the directory.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from sandbox.channel import adapter_bytes
from sandbox.digests import sha256_file, sha256_hex
from sandbox.errors import CheckpointError
from sandbox.files import write_atomic
from server.history import History, RoundRecord
from server.scratch import ScratchMap, json_text

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
    # accepted update got; later updates of that node weigh no more. Kept on disk while
    # the job runs (``server/scratch.py``), as a run's admissions are.
    weights: MutableMapping[str, float] = field(default_factory=ScratchMap)
    # Run id -> ueid -> the node id that ueid was admitted as in that run.
    admissions: dict[str, Mapping[str, int]] = field(default_factory=dict)
    # Rounds whose records were moved out of ``history`` into their own file: round ->
    # the file's SHA-256.
    archived: dict[int, str] = field(default_factory=dict)


class CheckpointStore:
    """Reads and writes the checkpoints of one job under ``directory``."""

    def __init__(self, directory: Path):
        self.directory = directory

    def adapter_path(self, server_round: int) -> Path:
        return self.directory / f"round-{server_round:04d}.safetensors"

    def adapter_digest(self, server_round: int) -> str:
        """SHA-256 of a round's checkpointed adapter file."""
        return sha256_file(self.adapter_path(server_round))[0]

    def history_path(self, server_round: int) -> Path:
        return self.directory / f"history-{server_round:04d}.json"

    def save(self, state: JobState, adapter: dict[str, np.ndarray]) -> str:
        """Write the round's adapter, the records of every round before it (final now) to
        their own files, then the state that points at all of them; return the adapter
        file's SHA-256. The archived rounds then leave ``state.history``."""
        archived = dict(state.archived)
        final = sorted(rnd for rnd in state.history.rounds if rnd < state.round)
        again = [rnd for rnd in final if rnd in archived]
        if again:
            # A record made again for a round already archived would replace it unseen;
            # refused before anything, the adapter included, is written.
            raise CheckpointError(f"round {again[0]}'s records were archived already")
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.adapter_path(state.round)
        write_atomic(path, adapter_bytes(adapter))
        for rnd in final:
            archived[rnd] = _write_json(self.history_path(rnd), state.history.rounds[rnd].to_json())
        kept = {r: record for r, record in state.history.rounds.items() if r not in final}
        document = {
            "format": STATE_FORMAT,
            "fingerprint": state.fingerprint,
            "round": state.round,
            "adapter": path.name,
            "adapter_sha256": sha256_file(path)[0],
            "history": History(kept).to_json(),
            "history_files": {str(rnd): archived[rnd] for rnd in sorted(archived)},
            "finished": state.finished,
            "weights": state.weights,
            "admissions": state.admissions,
        }
        _write_json(self.directory / STATE_FILE, document)
        state.history.rounds = kept
        state.archived = archived
        return str(document["adapter_sha256"])

    def history(self, state: JobState) -> History:
        """Every round's records, as plain values: those archived to their files (each
        checked against the digest the state names; CheckpointError naming the file
        otherwise) and those still in ``state.history``."""
        rounds: dict[int, RoundRecord] = {}
        for rnd, digest in sorted(state.archived.items()):
            path, data = self._archived_bytes(rnd, digest)
            try:
                rounds[rnd] = RoundRecord.from_json(json.loads(data), path.name)
            except (TypeError, ValueError) as exc:
                raise CheckpointError(f"{path}: malformed round records: {exc!r}") from exc
        for rnd, record in state.history.rounds.items():
            # Plain values, read off the disk-backed records of a round in flight.
            document = json.loads("".join(json_text(record.to_json())))
            rounds[rnd] = RoundRecord.from_json(document, f"round {rnd}")
        return History(dict(sorted(rounds.items())))

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
                weights=ScratchMap(_weights(document.get("weights", {}))),
                admissions={
                    run: ScratchMap(nodes)
                    for run, nodes in _admissions(document.get("admissions", {})).items()
                },
                archived=_archived(document.get("history_files", {})),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"{state_file}: malformed checkpoint state: {exc!r}") from exc
        self._check_archive(state, state_file)
        return state, load_file(str(adapter_file))

    def _check_archive(self, state: JobState, state_file: Path) -> None:
        """Refuse, naming the file, a state whose rounds do not add up (an archived round
        also inline, or not below the state's round; a round of 0..round-1 in neither) or
        whose archived files are missing or do not match their digests: found when the job
        resumes, not after its last round when the results are built."""
        inline, archived = set(state.history.rounds), set(state.archived)
        faults = [
            *(f"round {r} is both inline and archived" for r in sorted(inline & archived)),
            *(f"archived round {r} is not below round {state.round}"
              for r in sorted(archived) if r >= state.round),
            *(f"round {r}'s records are neither inline nor archived"
              for r in sorted(set(range(state.round)) - inline - archived)),
        ]  # fmt: skip
        if faults:
            raise CheckpointError(f"{state_file}: {faults[0]}")
        for rnd, digest in sorted(state.archived.items()):
            self._archived_bytes(rnd, digest)

    def _archived_bytes(self, rnd: int, digest: str) -> tuple[Path, bytes]:
        """Round ``rnd``'s records file and its bytes, if they match ``digest``;
        CheckpointError naming the file otherwise."""
        path = self.history_path(rnd)
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise CheckpointError(f"{path}: round {rnd}'s records are unreadable: {exc}") from exc
        if sha256_hex(data) != digest:
            raise CheckpointError(f"{path}: digest does not match {STATE_FILE}")
        return path, data


def _write_json(path: Path, document: Any) -> str:
    """Write ``document`` to ``path`` atomically as ``json.dumps(indent=2)`` would, a piece
    at a time (its per-node maps are read from disk as they are written: nothing the size
    of the federation is held); return the file's SHA-256."""
    digest = hashlib.sha256()

    def pieces() -> Iterator[bytes]:
        for text in json_text(document):
            data = text.encode()
            digest.update(data)
            yield data

    write_atomic(path, pieces())
    return digest.hexdigest()


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


def _archived(value: Any) -> dict[int, str]:
    """Round -> SHA-256 of its records' file: a round in canonical ASCII digits ("1", not
    "01": two spellings of one round would leave one unchecked) and 64 hex digits."""
    items = dict(value).items()
    odd = [
        r
        for r, _ in items
        if not (isinstance(r, str) and r.isascii() and r.isdigit() and str(int(r)) == r)
    ]
    if odd:
        raise ValueError(f"history file round {odd[0]!r} is not a round number")
    archived = {int(rnd): str(digest) for rnd, digest in items}
    bad = [d for d in archived.values() if len(d) != 64 or d.strip("0123456789abcdef")]
    if bad:
        raise ValueError(f"history file digest {bad[0]!r} is not a SHA-256")
    return archived
