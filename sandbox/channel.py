"""Encrypted update channels: adapter tensors as safetensors bytes inside HPKE envelopes.

An envelope's ``info`` binds purpose and version, run id, round, node id, base-model
digest and direction, so an update replayed into another round, sent for another run or
model, reflected back down, or sealed to any key but the attested aggregator's does not
open. Opening failures are opaque (UpdateRejected); the cause stays in the local log.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load as load_tensors
from safetensors.numpy import save as save_tensors

from sandbox import canonical
from sandbox.digests import sha256_file, sha256_hex
from sandbox.errors import EnvelopeError, UpdateRejected
from sandbox.seal.envelope import SUITE_X25519, open_envelope, seal_to

PURPOSE_UPDATE = "update"
UPLINK = "uplink"
DOWNLINK = "downlink"
STAGE_TRAIN = "train"
STAGE_EVALUATE = "evaluate"
STAGES = (STAGE_TRAIN, STAGE_EVALUATE)
# Sealed inside every envelope's safetensors metadata: the aggregator's per-instruction
# ticket (the node proves it opened the downlink by returning it) and the example count
# (so no relay can change an update's weight).
TICKET = "ticket"
EXAMPLES = "num-examples"
MAX_UPDATE_BYTES = 256 * 1024 * 1024
WEIGHT_SUFFIX = ".safetensors"


def weights_digest(files: Mapping[str, str]) -> str:
    """The base-model digest envelopes bind: SHA-256 of JCS {weight file: its SHA-256}.

    The node takes the per-file digests from its sealed package's signed manifest, the
    aggregator hashes its plaintext copy; both name the same bytes.
    """
    weights = {name: digest for name, digest in files.items() if name.endswith(WEIGHT_SUFFIX)}
    if not weights:
        raise ValueError("no *.safetensors weight files to digest")
    return sha256_hex(canonical.dumps(weights))


def model_dir_digest(model_dir: Path) -> str:
    """:func:`weights_digest` of a plaintext model directory (hidden files skipped)."""
    return weights_digest(
        {
            path.name: sha256_file(path)[0]
            for path in sorted(model_dir.glob(f"*{WEIGHT_SUFFIX}"))
            if not path.name.startswith(".")
        }
    )


def adapter_bytes(adapter: Mapping[str, np.ndarray]) -> bytes:
    """Named arrays as safetensors bytes (no metadata): what a round's checkpoint holds,
    so the SHA-256 of these bytes is the one the run's events name."""
    return save_tensors({name: np.ascontiguousarray(value) for name, value in adapter.items()})


# What envelopes of a comparison's local-model run bind as their base model: the node's
# own model is one the provider never sees, so both ends bind this fixed value instead.
LOCAL_MODEL_DIGEST = sha256_hex(b"ark/v1/local-model")


def manifest_digest(manifest: Mapping[str, Any]) -> str:
    """:func:`weights_digest` of a verified sealed-package manifest."""
    return weights_digest({entry["name"]: entry["sha256"] for entry in manifest["files"]})


@dataclass(frozen=True)
class ChannelContext:
    """What one envelope is for; every field goes into the HPKE ``info``."""

    run_id: str
    round: int
    node_id: str
    model_digest: str
    direction: str
    # Which instruction: a train round's adapter must not open as the final evaluation's.
    stage: str = STAGE_TRAIN

    def __post_init__(self) -> None:
        if self.direction not in (UPLINK, DOWNLINK):
            raise ValueError(f"direction must be {UPLINK} or {DOWNLINK}, got {self.direction!r}")
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage!r}")
        if self.round < 0:
            raise ValueError(f"round must be >= 0, got {self.round}")

    def as_info(self) -> dict[str, str | int]:
        return {
            "run": self.run_id,
            "round": self.round,
            "node": self.node_id,
            "model": self.model_digest,
            "direction": self.direction,
            "stage": self.stage,
        }


def seal_tensors(
    tensors: Mapping[str, np.ndarray],
    recipient: Any,
    context: ChannelContext,
    *,
    allowed: frozenset[str] | None = None,
    suite: str = SUITE_X25519,
    metadata: Mapping[str, str] | None = None,
) -> bytes:
    """Seal ``tensors`` (only the ``allowed`` names, if given) and ``metadata`` to ``recipient``."""
    if allowed is not None:
        unknown = sorted(set(tensors) - allowed)
        if unknown:
            raise UpdateRejected(f"tensors outside the adapter allowlist: {unknown[:3]}")
    payload = save_tensors(
        {name: np.ascontiguousarray(a) for name, a in tensors.items()},
        metadata=dict(metadata) if metadata else None,
    )
    return seal_to(
        recipient, payload, purpose=PURPOSE_UPDATE, context=context.as_info(), suite=suite
    )


def open_sealed(
    envelope: bytes,
    private_key: Any,
    context: ChannelContext,
    *,
    suite: str = SUITE_X25519,
) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Tensors and metadata of an envelope made for exactly ``context``; UpdateRejected if not."""
    if len(envelope) > MAX_UPDATE_BYTES:
        raise UpdateRejected(f"sealed update larger than {MAX_UPDATE_BYTES} bytes")
    try:
        payload = open_envelope(
            private_key, envelope, purpose=PURPOSE_UPDATE, context=context.as_info(), suite=suite
        )
    except EnvelopeError as exc:
        raise UpdateRejected(
            "sealed update did not open (wrong key, run, round, stage, node, model or direction)"
        ) from exc
    try:
        return dict(load_tensors(payload)), _metadata(payload)
    except Exception as exc:  # safetensors raises its own error types
        raise UpdateRejected("sealed update is not valid safetensors") from exc


def open_tensors(
    envelope: bytes,
    private_key: Any,
    context: ChannelContext,
    *,
    suite: str = SUITE_X25519,
) -> dict[str, np.ndarray]:
    """Only the tensors of :func:`open_sealed`."""
    return open_sealed(envelope, private_key, context, suite=suite)[0]


def _metadata(payload: bytes) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors buffer (its 8-byte length, then JSON header)."""
    size = int.from_bytes(payload[:8], "little")
    if size > len(payload) - 8:
        raise ValueError("safetensors header longer than the payload")
    metadata = json.loads(payload[8 : 8 + size]).get("__metadata__") or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError("safetensors metadata must map strings to strings")
    return metadata
