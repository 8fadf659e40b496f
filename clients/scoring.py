"""A node's part in a model comparison: its held-out commitment and its scorecards.

When a run belongs to a comparison (the run config's ``comparison``), the node sandbox
commits to the held-out set it scores on before it sends any figure of the run: the
Merkle root of its held-out examples (``sandbox/scorecard.py``), each leaf salted with a
secret only this node keeps (``scoring/heldout.salt``), so the root says nothing about
rows one could guess. At the run's final evaluation it signs a scorecard: the model, its
manifest and final adapter digests, that root, the held-out metrics before and after,
and what the model cost here. Both are signed with a key the sandbox made in memory and
had certified by the key broker against its attestation (purpose ``signing``), so the
auditor can tell that an attested sandbox, and nobody else, scored each model.

This module keeps the tallies a scorecard needs across a run's messages (the sandbox
is the one long-lived process per node); the signing key is the sandbox's.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from clients.data import Example, Split
from sandbox.canonical import canonical_entry
from sandbox.channel import adapter_bytes
from sandbox.config import NodeConfig, RunSpec
from sandbox.digests import sha256_hex
from sandbox.errors import ConfigError
from sandbox.files import PRIVATE, create_new, read_regular
from sandbox.localsocket import private_folder
from sandbox.scorecard import (
    SALT_BYTES,
    Commitment,
    Cost,
    Scorecard,
    heldout_leaf,
    heldout_root,
    new_salt,
    sign_commitment,
    sign_scorecard,
)

if TYPE_CHECKING:
    from sandbox.lora import Adapter

# The most runs whose tallies a sandbox keeps at once (the oldest go first).
MAX_TALLIES = 64


def salt_path(node: NodeConfig) -> Path:
    """Where the node keeps the secret its held-out leaves are salted with."""
    return node.workspace() / "scoring" / "heldout.salt"


def heldout_salt(node: NodeConfig) -> bytes:
    """The node's held-out salt: 32 random bytes made on first use, 0600, in a private
    folder, never a symlink. It never leaves the node: with it and the rows, the node's
    operator can show an auditor that a root is of those rows."""
    path = salt_path(node)
    private_folder(path.parent, "the held-out salt folder", path=node.source)
    with contextlib.suppress(FileExistsError):  # made before: kept as it is
        create_new(path, new_salt(), PRIVATE)
    salt = read_regular(path, SALT_BYTES, lambda why: ConfigError(why, path=path))
    if len(salt) != SALT_BYTES:
        raise ConfigError(f"must hold {SALT_BYTES} bytes, holds {len(salt)}", path=path)
    return salt


def _keyed(salt: bytes, purpose: bytes, value: str) -> bytes:
    """HMAC-SHA256 under the node's salt of ``value``, for ``purpose``."""
    mac = hmac.HMAC(salt, hashes.SHA256())
    mac.update(purpose + value.encode("utf-8"))
    return mac.finalize()


def comparison_salt(salt: bytes, comparison: str) -> bytes:
    """The leaves' salt in one comparison: the node's salt keyed with the comparison, so
    the same held-out set has another root in each comparison (its roots cannot be
    linked across comparisons to tell whether the node's data changed)."""
    return _keyed(salt, b"ark/v1/heldout-salt\x00", comparison)


def own_model_digest(salt: bytes, weights_digest: str) -> str:
    """What a scorecard names the operator's own model by: its weights digest keyed with
    the node's salt, so the provider cannot match it against public checkpoints."""
    return _keyed(salt, b"ark/v1/local-model\x00", weights_digest).hex()


def commit_heldout(
    comparison: str, ueid: str, salt: bytes, heldout: tuple[Example, ...]
) -> Commitment:
    """The commitment to ``heldout`` (in file order) for ``comparison``."""
    keyed = comparison_salt(salt, comparison)
    leaves = [heldout_leaf(keyed, example.text, example.target) for example in heldout]
    return Commitment(
        comparison=comparison, ueid=ueid, root=heldout_root(leaves), count=len(leaves)
    )


@dataclass
class RunTally:
    """What a scorecard needs of a run's training rounds on this node."""

    before: dict[str, float] | None = None
    train_seconds: float = 0.0
    steps: int = 0
    update_bytes: int = 0
    updates: int = 0


class Scoring:
    """The sandbox's comparison bookkeeping: its held-out commitments and each run's
    tallies (in memory only; a restarted sandbox starts over and a
    run it cannot score whole gets no scorecard, which the audit then reports)."""

    def __init__(self, node: NodeConfig):
        self.node = node
        self._tallies: OrderedDict[int, RunTally] = OrderedDict()
        self._salt: bytes | None = None

    def salt(self) -> bytes:
        """The node's held-out salt, read from its file once per sandbox."""
        if self._salt is None:
            self._salt = heldout_salt(self.node)
        return self._salt

    def commitment(self, spec: RunSpec, split: Split) -> Commitment:
        """This node's commitment to the held-out set of ``split`` in the run's
        comparison (a few hundred hashes: computed each time, never stale)."""
        return commit_heldout(
            spec.comparison, self.node.require_sandbox().ueid, self.salt(), split.heldout
        )

    def tally(self, run_id: int) -> RunTally:
        tally = self._tallies.get(run_id)
        if tally is None:
            tally = self._tallies[run_id] = RunTally()
            while len(self._tallies) > MAX_TALLIES:
                self._tallies.popitem(last=False)
        return tally

    def trained(
        self,
        run_id: int,
        rnd: int,
        *,
        before: dict[str, float],
        seconds: float,
        steps: int,
        update_bytes: int,
    ) -> None:
        """Count one training round; round 1's held-out metrics are the model's before
        figures (the base model with the run's initial adapter)."""
        tally = self.tally(run_id)
        if rnd == 1:
            tally.before = dict(before)
        tally.train_seconds += seconds
        tally.steps += steps
        tally.update_bytes += update_bytes
        tally.updates += 1

    def scorecard(
        self,
        spec: RunSpec,
        run_id: int,
        *,
        model_id: str,
        manifest_sha256: str,
        adapter: Adapter,
        commitment: Commitment,
        after: dict[str, float],
        eval_seconds: float,
    ) -> Scorecard:
        """The run's scorecard from its tallies and the final evaluation."""
        tally = self._tallies.get(run_id) or RunTally()
        count = max(commitment.count, 1)
        return Scorecard(
            comparison=spec.comparison,
            run=run_id,
            job=spec.job_id,
            ueid=commitment.ueid,
            model_id=model_id,
            manifest_sha256=manifest_sha256,
            adapter_sha256=sha256_hex(adapter_bytes(adapter)),
            heldout_root=commitment.root,
            heldout_count=commitment.count,
            before=dict(tally.before or {}),
            after=dict(after),
            cost=Cost(
                train_seconds_per_step=tally.train_seconds / max(tally.steps, 1),
                inference_ms_per_example=1000.0 * eval_seconds / count,
                update_bytes_per_round=tally.update_bytes / max(tally.updates, 1),
                adapter_bytes=int(sum(np.asarray(v).nbytes for v in adapter.values())),
            ),
        )


def signed_bytes(record: dict[str, Any]) -> bytes:
    """A signed record as it travels: its canonical JSON, spelled as the log spells it."""
    return canonical_entry(record)


def sign_commitment_bytes(key: Ed25519PrivateKey, commitment: Commitment) -> bytes:
    return signed_bytes(sign_commitment(key, commitment))


def sign_scorecard_bytes(key: Ed25519PrivateKey, scorecard: Scorecard) -> bytes:
    return signed_bytes(sign_scorecard(key, scorecard))
