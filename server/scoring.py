"""What the ServerApp does with a comparison run's signed records: log them, checked.

In a comparison (the run config's ``comparison``), each node's train replies carry its
signed commitment to its held-out set and its final evaluation's reply its signed
scorecard (``clients/scoring.py``). The aggregator cannot vouch for either; the auditor
verifies them from the log. So the ServerApp only refuses what is plainly not the
node's record of this run (it does not open, names another comparison, run or job, or
another TEE than the one admitted as that node), and logs the rest verbatim: the
node's commitment once per run, and every scorecard.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from logging import WARNING
from typing import Any

from flwr.app import RecordDict
from flwr.common.logger import log

from sandbox import events, strictjson
from sandbox.config import RunSpec
from sandbox.errors import ScorecardError
from sandbox.protocol import SIGNED_KEY
from sandbox.scorecard import open_commitment, open_scorecard

Emit = Callable[..., None]


def signed_record(content: RecordDict, key: str) -> bytes | None:
    """The signed record a reply's ``content`` carries under ``key``, or None when it
    carries none."""
    record = content.config_records.get(key)
    if record is None:
        return None
    blob = record.get(SIGNED_KEY)
    if set(record) != {SIGNED_KEY} or not isinstance(blob, bytes):
        raise ScorecardError(f"the {key} record must hold only {SIGNED_KEY!r} bytes")
    return blob


@dataclass
class ComparisonRecords:
    """A comparison run's records as the ServerApp logs them (``emit`` is the job's
    event function: ``emit(kind, **fields)``)."""

    spec: RunSpec
    run_id: int
    emit: Emit
    committed: set[int] = field(default_factory=set)

    def _parsed(self, blob: bytes) -> Any:
        return strictjson.loads(blob)

    def commitment(self, node_id: int, ueid: str | None, blob: bytes | None) -> None:
        """Log node ``node_id``'s commitment (the first of this run), when it is one."""
        if blob is None or node_id in self.committed:
            return
        try:
            commitment, _ = open_commitment(blob)
            if commitment.comparison != self.spec.comparison or commitment.ueid != ueid:
                raise ScorecardError("it names another comparison or TEE than this node's")
        except (ScorecardError, strictjson.StrictJSONError) as exc:
            log(WARNING, "[ark] node %s: held-out commitment not logged: %s", node_id, exc)
            return
        self.committed.add(node_id)
        self.emit(
            events.HeldoutCommitted,
            node=node_id,
            comparison=self.spec.comparison,
            commitment=self._parsed(blob),
        )

    def scorecard(self, node_id: int, ueid: str | None, blob: bytes | None) -> None:
        """Log node ``node_id``'s scorecard of this run, when it is one."""
        if blob is None:
            log(WARNING, "[ark] node %s sent no scorecard in comparison run", node_id)
            return
        try:
            scorecard, _ = open_scorecard(blob)
            if (
                scorecard.comparison != self.spec.comparison
                or scorecard.run != self.run_id
                or scorecard.job != self.spec.job_id
                or scorecard.ueid != ueid
            ):
                raise ScorecardError("it names another comparison, run, job or TEE")
        except (ScorecardError, strictjson.StrictJSONError) as exc:
            log(WARNING, "[ark] node %s: scorecard not logged: %s", node_id, exc)
            return
        self.emit(
            events.ScorecardLogged,
            node=node_id,
            comparison=self.spec.comparison,
            scorecard=self._parsed(blob),
        )
