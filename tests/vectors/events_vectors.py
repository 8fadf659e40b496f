"""Writes ``events/*.json``: positive and negative vectors for every event kind.

The positive cases are written out here by hand, as the services write them (they are
not built with :mod:`sandbox.events`, so a field renamed in the schema fails them). Each
negative case changes one thing in a positive one: a required field dropped, a field
added, a value of the wrong type, a ``null`` where a field is either present or left
out, or a kind that does not exist; its ``error`` names the kind and the key that the
parser's :class:`~sandbox.errors.EventInvalid` must name.
Run ``python tests/vectors/events_vectors.py`` to regenerate.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent / "events"
T = "2026-11-23T03:00:00+00:00"
H = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
UEID = "0c1ec5a0c1ec5a0c1ec5a0c1ec5a0c1e"
FLOWER_RUN = "16401725734191279427"  # beyond 2**53: the log spells it as text
# Flower node ids are random unsigned 64-bit too: one past 2**63, and the largest.
BIG_NODE = "9223372036854775803"
TOP_NODE = "18446744073709551615"
JOB = {"time": T, "run": 7, "job": "demo"}
CLIENT = {"time": 1764558000.25, "node": "alpine", "run_id": 7, "node_id": 3}

# (family, kind, [(name, positive record)]); "provider": events.jsonl and the log;
# "journal": entries of a node's journal.
POSITIVE: list[tuple[str, str, list[tuple[str, dict[str, Any]]]]] = [
    (
        "provider",
        "attestation_appraised",
        [
            (
                "affirming",
                {
                    "kind": "attestation_appraised",
                    "time": T,
                    "session": "s-1",
                    "key_id": "minilm-1",
                    "tee": "stub",
                    "purpose": "key-release",
                    "status": "affirming",
                    "ear_sha256": H,
                    "tee_pubkey_sha256": H,
                    "stub": True,
                    "policy_id": "ark-default",
                    "ueid": UEID,
                    "measurements": {"code": H, "config": H},
                    "trustworthiness": {"executables": 2},
                    "failure": None,
                },
            ),
            (
                "contraindicated, no ueid",
                {
                    "kind": "attestation_appraised",
                    "time": T,
                    "session": "s-2",
                    "key_id": "minilm-1",
                    "tee": "stub",
                    "purpose": "channel",
                    "status": "contraindicated",
                    "ear_sha256": H,
                    "tee_pubkey_sha256": H,
                    "stub": True,
                    "policy_id": "ark-default",
                    "ueid": None,
                    "measurements": {},
                    "trustworthiness": {"executables": 96},
                    "failure": "MeasurementRejected",
                },
            ),
        ],
    ),
    (
        "provider",
        "channel_certified",
        [
            (
                "certified",
                {
                    "kind": "channel_certified",
                    "time": T,
                    "session": "s-3",
                    "key_id": "minilm-1",
                    "tee": "stub",
                    "purpose": "channel",
                    "ueid": UEID,
                    "ear_sha256": H,
                    "tee_pubkey_sha256": H,
                },
            ),
        ],
    ),
    (
        "provider",
        "key_released",
        [
            (
                "after an appraisal",
                {
                    "kind": "key_released",
                    "time": T,
                    "session": "s-1",
                    "key_id": "minilm-1",
                    "tee": "stub",
                    "purpose": "key-release",
                    "model_id": "minilm",
                    "ueid": UEID,
                    "ear_sha256": H,
                    "tee_pubkey_sha256": H,
                },
            ),
            (
                "against a presented result",
                {
                    "kind": "key_released",
                    "time": T,
                    "session": "s-1",
                    "key_id": "minilm-2",
                    "result_sha256": H,
                    "model_id": "minilm",
                    "ueid": UEID,
                    "ear_sha256": H,
                    "tee_pubkey_sha256": H,
                },
            ),
        ],
    ),
    (
        "provider",
        "key_denied",
        [
            (
                "with known values",
                {
                    "kind": "key_denied",
                    "time": T,
                    "session": "s-1",
                    "key_id": "minilm-1",
                    "tee": "stub",
                    "purpose": "key-release",
                    "request": {"evidence": {"bytes": 900, "sha256": H}},
                    "client": "0123456789abcdef0123456789abcdef",
                    "code": "NONCE_MISMATCH",
                    "cause": "NonceMismatch",
                    "ear_sha256": H,
                },
            ),
            (
                "nothing known",
                {
                    "kind": "key_denied",
                    "time": T,
                    "request": {},
                    "client": "0123456789abcdef",
                    "code": "SESSION_UNKNOWN",
                    "cause": "SessionUnknown",
                    "ear_sha256": None,
                },
            ),
        ],
    ),
    (
        "provider",
        "denials_rate_limited",
        [
            (
                "one client",
                {
                    "kind": "denials_rate_limited",
                    "time": T,
                    "scope": "client",
                    "client": "0123456789abcdef",
                    "window_start": T,
                    "window_end": "2026-11-23T03:01:00+00:00",
                    "logged": 16,
                    "suppressed": 1000,
                    "codes": {"SESSION_UNKNOWN": 1000},
                },
            ),
            (
                "all clients",
                {
                    "kind": "denials_rate_limited",
                    "time": T,
                    "scope": "all",
                    "client": None,
                    "window_start": T,
                    "window_end": "2026-11-23T03:01:00.500000+00:00",
                    "logged": 0,
                    "suppressed": 3,
                    "codes": {"NONCE_MISMATCH": 1, "SESSION_UNKNOWN": 2},
                },
            ),
        ],
    ),
    (
        "provider",
        "model_published",
        [
            (
                "published",
                {
                    "kind": "model_published",
                    "time": T,
                    "model_id": "minilm",
                    "key_id": "minilm-1",
                    "files": [{"name": "model.safetensors", "sha256": H}],
                },
            ),
            (
                "listed in a signed catalog",
                {
                    "kind": "model_published",
                    "time": T,
                    "model_id": "minilm-l3",
                    "key_id": "minilm-l3-1",
                    "files": [{"name": "model.safetensors", "sha256": H}],
                    "manifest_sha256": H,
                    "catalog": H,
                },
            ),
        ],
    ),
    (
        "provider",
        "run_started",
        [
            (
                "started",
                {
                    **JOB,
                    "kind": "run_started",
                    "rounds": 3,
                    "resumed_after_round": 0,
                    "protection": "sealed",
                    "model_id": "minilm",
                    "min_nodes": 2,
                },
            ),
            (
                "a Flower-sized run id",
                {
                    **JOB,
                    "run": FLOWER_RUN,
                    "kind": "run_started",
                    "rounds": 3,
                    "resumed_after_round": 1,
                    "protection": "off",
                    "model_id": "minilm",
                    "min_nodes": 2,
                },
            ),
            (
                "asking record-level and client-level differential privacy",
                {
                    **JOB,
                    "kind": "run_started",
                    "rounds": 3,
                    "resumed_after_round": 0,
                    "protection": "sealed",
                    "model_id": "minilm",
                    "min_nodes": 2,
                    "dp_epsilon": 8.0,
                    "dp_client_noise": 1.1,
                },
            ),
        ],
    ),
    (
        "provider",
        "node_admitted",
        [
            (
                "admitted",
                {
                    **JOB,
                    "kind": "node_admitted",
                    "node": 3,
                    "ear_sha256": H,
                    "ueid": UEID,
                    "tee_pubkey_sha256": H,
                },
            ),
        ],
    ),
    (
        "provider",
        "node_refused",
        [
            ("refused", {**JOB, "kind": "node_refused", "node": 3, "reason": "NonceMismatch"}),
        ],
    ),
    (
        "provider",
        "node_declined",
        [
            (
                "declined",
                {
                    **JOB,
                    "kind": "node_declined",
                    "round": 2,
                    "node": 3,
                    "reason": "clientapp-failed",
                },
            ),
        ],
    ),
    (
        "provider",
        "round_started",
        [
            (
                "sealed",
                {
                    **JOB,
                    "kind": "round_started",
                    "round": 1,
                    "stage": "train",
                    "participants": [
                        {"node": 3, "instruction_sha256": H},
                        {"node": "9223372036854775803", "instruction_sha256": H},
                    ],
                },
            ),
            (
                "protection off",
                {
                    **JOB,
                    "kind": "round_started",
                    "round": 2,
                    "stage": "evaluate",
                    "participants": [{"node": 3, "instruction_sha256": None}],
                },
            ),
            (
                "700 participants, logged one entry each and committed",
                {
                    **JOB,
                    "kind": "round_started",
                    "round": 3,
                    "stage": "train",
                    "committed": {"participants": {"count": 700, "root": H}},
                },
            ),
        ],
    ),
    (
        "provider",
        "list_member",
        [
            (
                "a round's participant",
                {
                    **JOB,
                    "kind": "list_member",
                    "list": "round_started.participants",
                    "item": {"node": 3, "instruction_sha256": H},
                    "round": 3,
                    "stage": "train",
                    "index": 0,
                },
            ),
            (
                "a Flower-sized node of a secure-aggregation stage, in a Flower-sized run",
                {
                    **JOB,
                    "run": FLOWER_RUN,
                    "kind": "list_member",
                    "list": "secagg_stage.nodes",
                    "item": BIG_NODE,
                    "round": 1,
                    "stage": "mask",
                    "index": 699,
                },
            ),
            (
                "a node's final metrics (a map's member: a key and its value)",
                {
                    **JOB,
                    "kind": "list_member",
                    "list": "run_finished.metrics.final",
                    "item": [TOP_NODE, {"accuracy": 0.8}],
                    "index": 2,
                },
            ),
        ],
    ),
    (
        "provider",
        "update_accepted",
        [
            (
                "accepted",
                {
                    **JOB,
                    "kind": "update_accepted",
                    "round": 1,
                    "node": 3,
                    "envelope_sha256": H,
                    "envelope_bytes": 306244,
                    "examples": 40,
                },
            ),
            (
                "clipped",
                {
                    **JOB,
                    "kind": "update_accepted",
                    "round": 1,
                    "node": 3,
                    "envelope_sha256": H,
                    "envelope_bytes": 306244,
                    "examples": 50,
                    "declared_examples": 1000000,
                    "weight_bound": "max-examples-per-update",
                },
            ),
        ],
    ),
    (
        "provider",
        "update_rejected",
        [
            (
                "rejected",
                {
                    **JOB,
                    "kind": "update_rejected",
                    "round": 1,
                    "node": 3,
                    "envelope_sha256": "none",
                    "reason": "update norm 412.0 exceeds the bound 100.0",
                },
            ),
        ],
    ),
    (
        "provider",
        "aggregate_committed",
        [
            (
                "committed",
                {
                    **JOB,
                    "kind": "aggregate_committed",
                    "round": 1,
                    "adapter_sha256": H,
                    "updates": [H, "plaintext"],
                    "examples": 80.5,
                    "metrics": {"updates": 2, "local_accuracy": 0.75, "train_loss": 0.5},
                },
            ),
        ],
    ),
    (
        "provider",
        "secagg_advertised",
        [
            (
                "three nodes, two with Flower-sized ids",
                {
                    **JOB,
                    "kind": "secagg_advertised",
                    "round": 1,
                    "nodes": [
                        {"node": 3, "ueid": UEID, "signer_sha256": H},
                        {"node": BIG_NODE, "ueid": UEID, "signer_sha256": H},
                        {"node": TOP_NODE, "ueid": UEID, "signer_sha256": H},
                    ],
                },
            ),
        ],
    ),
    (
        "provider",
        "secagg_stage",
        [
            (
                "share",
                {
                    **JOB,
                    "kind": "secagg_stage",
                    "round": 1,
                    "stage": "share",
                    "nodes": [3, BIG_NODE, TOP_NODE],
                },
            ),
            (
                "mask, one node dropped",
                {
                    **JOB,
                    "kind": "secagg_stage",
                    "round": 1,
                    "stage": "mask",
                    "nodes": [3, TOP_NODE],
                    "envelopes": [H, H],
                },
            ),
            (
                "no node completed, in a Flower-sized run",
                {
                    **JOB,
                    "run": FLOWER_RUN,
                    "kind": "secagg_stage",
                    "round": 2,
                    "stage": "mask",
                    "nodes": [],
                    "envelopes": [],
                },
            ),
        ],
    ),
    (
        "provider",
        "secagg_unmasked",
        [
            (
                "one node dropped",
                {
                    **JOB,
                    "kind": "secagg_unmasked",
                    "round": 1,
                    "survivors": [3, TOP_NODE],
                    "dropped": [BIG_NODE],
                    "revealed_by": [3, TOP_NODE],
                },
            ),
            (
                "none dropped",
                {
                    **JOB,
                    "kind": "secagg_unmasked",
                    "round": 2,
                    "survivors": [3, BIG_NODE, TOP_NODE],
                    "dropped": [],
                    "revealed_by": [BIG_NODE, TOP_NODE],
                },
            ),
        ],
    ),
    (
        "provider",
        "dp_spent",
        [
            (
                "a node's second round under a budget of 8",
                {
                    **JOB,
                    "kind": "dp_spent",
                    "round": 2,
                    "node": TOP_NODE,
                    "noise_multiplier": 0.91,
                    "sample_rate": 0.125,
                    "steps": 12,
                    "clip": 1.0,
                    "delta": 1e-05,
                    "epsilon": 5.25,
                    "epsilon_total": 7.5,
                    "budget": 8.0,
                },
            ),
            (
                "a node that declares no budget of its own: the run's ask bounds it",
                {
                    **JOB,
                    "kind": "dp_spent",
                    "round": 1,
                    "node": 3,
                    "noise_multiplier": 1.2,
                    "sample_rate": 0.0625,
                    "steps": 12,
                    "clip": 0.5,
                    "delta": 1e-06,
                    "epsilon": 1.5,
                    "epsilon_total": 4.0,
                    "budget": None,
                },
            ),
        ],
    ),
    (
        "provider",
        "dp_aggregate",
        [
            (
                "client-level noise on three nodes' sum",
                {
                    **JOB,
                    "kind": "dp_aggregate",
                    "round": 1,
                    "nodes": 3,
                    "noise_multiplier": 1.1,
                    "clip": 1.0,
                    "delta": 1e-05,
                    "epsilon": 3.5,
                },
            ),
        ],
    ),
    (
        "provider",
        "run_finished",
        [
            (
                "finished",
                {
                    **JOB,
                    "kind": "run_finished",
                    "rounds": 3,
                    "adapter_sha256": H,
                    "metrics": {"final": {"3": {"accuracy": 0.8, "loss": "nan"}}},
                },
            ),
        ],
    ),
    (
        "provider",
        "comparison_started",
        [
            (
                "two catalog models",
                {
                    "kind": "comparison_started",
                    "time": T,
                    "comparison": "cmp-1",
                    "task": "sequence-classification",
                    "models": [
                        {"model_id": "minilm", "manifest_sha256": H},
                        {"model_id": "bert-tiny", "manifest_sha256": H},
                    ],
                },
            ),
        ],
    ),
    (
        "provider",
        "heldout_committed",
        [
            (
                "a signed record as the node sent it",
                {
                    **JOB,
                    "kind": "heldout_committed",
                    "node": 3,
                    "comparison": "cmp-1",
                    "commitment": {
                        "body": {
                            "format": "ark-heldout-commitment/1",
                            "comparison": "cmp-1",
                            "ueid": UEID,
                            "root": H,
                            "count": 40,
                        },
                        "signer": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
                        "sig": "not verified by the schema",
                    },
                },
            ),
            (
                "any JSON the node sent, carried as it came",
                {
                    **JOB,
                    "kind": "heldout_committed",
                    "node": 3,
                    "comparison": "cmp-1",
                    "commitment": {"body": [1, 2.5, None, True, {"x": "y"}], "extra": "z"},
                },
            ),
        ],
    ),
    (
        "provider",
        "scorecard_logged",
        [
            (
                "a signed record, its run beyond 2**53 as text",
                {
                    "time": T,
                    "run": FLOWER_RUN,
                    "job": "demo",
                    "kind": "scorecard_logged",
                    "node": 3,
                    "comparison": "cmp-1",
                    "scorecard": {
                        "body": {
                            "format": "ark-scorecard/1",
                            "comparison": "cmp-1",
                            "run": FLOWER_RUN,
                            "job": "demo",
                            "ueid": UEID,
                            "model_id": "minilm",
                            "manifest_sha256": H,
                            "adapter_sha256": H,
                            "heldout_root": H,
                            "heldout_count": 40,
                            "before": {"accuracy": 0.5},
                            "after": {"accuracy": 0.75},
                            "cost": {
                                "train_seconds_per_step": 0.25,
                                "inference_ms_per_example": 3.5,
                                "update_bytes_per_round": 306244,
                                "adapter_bytes": 306244,
                            },
                        },
                        "signer": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo",
                        "sig": "not verified by the schema",
                    },
                },
            ),
        ],
    ),
    (
        "provider",
        "comparison_finished",
        [
            (
                "finished",
                {
                    "kind": "comparison_finished",
                    "time": T,
                    "comparison": "cmp-1",
                    "runs": {"minilm": 7, "bert-tiny": FLOWER_RUN},
                },
            ),
        ],
    ),
    (
        "journal",
        "journal_opened",
        [
            (
                "opened",
                {
                    "kind": "journal_opened",
                    "format": "ark-node-journal/v1",
                    "node": "alpine",
                    "public_key": "Tm90IGEgcmVhbCBrZXkgYnV0IGJhc2U2NCBvZiAzMiBi",
                },
            ),
        ],
    ),
    (
        "journal",
        "app_approved",
        [
            (
                "approved",
                {
                    "time": 1764558000.25,
                    "node": "alpine",
                    "kind": "app_approved",
                    "app_sha256": H,
                    "run_id": 7,
                },
            ),
            (
                "run unknown",
                {
                    "time": 1764558000,
                    "node": "alpine",
                    "kind": "app_approved",
                    "app_sha256": H,
                    "run_id": None,
                },
            ),
        ],
    ),
    (
        "journal",
        "app_refused",
        [
            (
                "refused",
                {
                    "time": 1764558000.25,
                    "node": "alpine",
                    "kind": "app_refused",
                    "app_sha256": H,
                    "run_id": FLOWER_RUN,
                },
            ),
        ],
    ),
    (
        "journal",
        "aggregator_refused",
        [
            (
                "refused",
                {
                    **CLIENT,
                    "kind": "aggregator_refused",
                    "round": 1,
                    "reason": "the aggregator's attestation is contraindicated",
                },
            ),
        ],
    ),
    (
        "journal",
        "hello",
        [
            ("hello", {**CLIENT, "kind": "hello", "round": 1, "suite": "x25519-hkdf-sha256"}),
        ],
    ),
    (
        "journal",
        "heldout_commitment",
        [
            (
                "committed with round 1's update",
                {
                    **CLIENT,
                    "kind": "heldout_commitment",
                    "round": 1,
                    "comparison": "cmp-1",
                    "root": H,
                    "count": 40,
                    "record_sha256": H,
                },
            ),
        ],
    ),
    (
        "journal",
        "secagg_revealed",
        [
            (
                "seeds of the survivors, keys of a dropped node",
                {
                    **CLIENT,
                    "kind": "secagg_revealed",
                    "round": 1,
                    "seeds_of": [3, TOP_NODE],
                    "keys_of": [BIG_NODE],
                },
            ),
            (
                "a Flower-sized node in a Flower-sized run, none dropped",
                {
                    **CLIENT,
                    "run_id": FLOWER_RUN,
                    "node_id": TOP_NODE,
                    "kind": "secagg_revealed",
                    "round": 2,
                    "seeds_of": [3, BIG_NODE, TOP_NODE],
                    "keys_of": [],
                },
            ),
        ],
    ),
    (
        "journal",
        "dp_round",
        [
            (
                "a round of DP-SGD",
                {
                    **CLIENT,
                    "kind": "dp_round",
                    "round": 1,
                    "noise_multiplier": 0.91,
                    "sample_rate": 0.125,
                    "steps": 12,
                    "clip": 1.0,
                    "delta": 1e-05,
                    "epsilon": 2.5,
                    "epsilon_total": 4.75,
                    "budget": 8.0,
                },
            ),
            (
                "a Flower-sized node, every example in every step",
                {
                    **CLIENT,
                    "run_id": FLOWER_RUN,
                    "node_id": TOP_NODE,
                    "kind": "dp_round",
                    "round": 2,
                    "noise_multiplier": 2.0,
                    "sample_rate": 1.0,
                    "steps": 3,
                    "clip": 0.5,
                    "delta": 1e-06,
                    "epsilon": 1.0,
                    "epsilon_total": 1.0,
                    "budget": 1.0,
                },
            ),
        ],
    ),
    (
        "journal",
        "client_noise_added",
        [
            (
                "a noise share before masking",
                {
                    **CLIENT,
                    "kind": "client_noise_added",
                    "round": 1,
                    "noise_multiplier": 1.0,
                    "clip": 0.5,
                    "client_noise_std": 0.3535533905932738,
                },
            ),
        ],
    ),
    (
        "journal",
        "scorecard_signed",
        [
            (
                "signed at the final evaluation",
                {
                    **CLIENT,
                    "kind": "scorecard_signed",
                    "comparison": "cmp-1",
                    "model_id": "minilm-l3",
                    "heldout_root": H,
                    "record_sha256": H,
                },
            ),
        ],
    ),
    (
        "journal",
        "train",
        [
            (
                "sealed",
                {
                    **CLIENT,
                    "kind": "train",
                    "round": 1,
                    "attestation": {
                        "ear_sha256": H,
                        "status": "affirming",
                        "session": "s-1",
                        "stub": True,
                    },
                    "aggregator": {"ueid": UEID, "stub": True},
                    "received_sha256": H,
                    "sent_sha256": H,
                    "metrics": {"num-examples": 40, "train-loss": 0.5},
                    "tensors": ["base_model.lora_A.weight"],
                    "timings": {"handler_start": 1764558000.25, "handler_end": 1764558001.5},
                },
            ),
            (
                "unprotected",
                {
                    **CLIENT,
                    "kind": "train",
                    "round": 2,
                    "attestation": None,
                    "aggregator": None,
                    "received_sha256": None,
                    "sent_sha256": None,
                    "metrics": {"num-examples": 40},
                    "tensors": [],
                    "timings": {},
                },
            ),
        ],
    ),
    (
        "journal",
        "evaluate",
        [
            (
                "sealed",
                {
                    **CLIENT,
                    "kind": "evaluate",
                    "round": 3,
                    "attestation": {
                        "ear_sha256": H,
                        "status": "affirming",
                        "session": "s-1",
                        "stub": True,
                    },
                    "aggregator": {"ueid": None, "stub": True},
                    "received_sha256": H,
                    "metrics": {"num-examples": 10, "before-accuracy": 0.9},
                    "timings": {},
                },
            ),
        ],
    ),
    (
        "journal",
        "egress_blocked",
        [
            (
                "blocked",
                {
                    **CLIENT,
                    "kind": "egress_blocked",
                    "code": "egress-blocked",
                    "reason": "metric 'secret' is not on the egress allowlist",
                },
            ),
        ],
    ),
    (
        "journal",
        "clientapp_failed",
        [
            (
                "failed",
                {
                    **CLIENT,
                    "kind": "clientapp_failed",
                    "code": "clientapp-failed",
                    "reason": "ClientApp failed: DataError: row 3",
                },
            ),
        ],
    ),
    (
        "journal",
        "error_withheld",
        [
            (
                "withheld",
                {
                    **CLIENT,
                    "kind": "error_withheld",
                    "code": "clientapp-error",
                    "reason": "error reply 0: text the node chose",
                },
            ),
        ],
    ),
]


def _wrong_type(value: Any) -> Any:
    """A value of another JSON type than ``value``."""
    if isinstance(value, bool):
        return "yes"
    if isinstance(value, (list, dict)):
        return "x"
    return [value]


def _is_id(value: Any) -> bool:
    """Whether ``value`` is a Flower id as the log spells it: a number, or its decimal text."""
    if isinstance(value, str):
        return value.isdigit()
    return isinstance(value, int) and not isinstance(value, bool)


def _negatives(kind: str, record: dict[str, Any]) -> list[dict[str, Any]]:
    last = list(record)[-1]
    typed = [k for k, v in record.items() if k not in ("kind", "time") and v is not None][-1]
    cases = [
        ("a required field dropped", {k: v for k, v in record.items() if k != last}, last),
        ("an extra field", {**record, "comment": "hello"}, "comment"),
        (f"{typed} of the wrong type", {**record, typed: _wrong_type(record[typed])}, typed),
    ]
    if "time" in record and isinstance(record["time"], str):
        cases.append(("a time without its offset", {**record, "time": T[:19]}, "time"))
        cases.append(
            ("a time not as isoformat writes it", {**record, "time": T[:19] + "Z"}, "time")
        )
    if "run" in record:
        cases.append(("a run id as text below 2**53", {**record, "run": "7"}, "run"))
        cases.append(("a run id as text from 2**64", {**record, "run": str(2**64)}, "run"))
    for key, value in record.items():
        if isinstance(value, list) and value and all(map(_is_id, value)):
            for spelled, why in (("7", "below 2**53"), (str(2**64), "from 2**64"), (True, "")):
                what = f"as text {why}" if why else "as a boolean"
                broken = [*value[:-1], spelled]
                where = f"{key}[{len(value) - 1}]"
                cases.append((f"a node id in {key} {what}", {**record, key: broken}, where))
        if isinstance(value, list) and value and isinstance(value[0], dict):
            inner = next(iter(value[0]))
            broken = [{k: v for k, v in value[0].items() if k != inner}, *value[1:]]
            cases.append(
                (f"{key}[0] missing {inner}", {**record, key: broken}, f"{key}[0].{inner}")
            )
    return [
        {"name": name, "record": changed, "error": {"kind": kind, "key": key}}
        for name, changed, key in cases
    ]


OPTIONAL_NULL = {
    "key_released": "result_sha256",
    "key_denied": "session",
    "update_accepted": "weight_bound",
}


def main() -> None:
    HERE.mkdir(exist_ok=True)
    for family, kind, positives in POSITIVE:
        invalid = _negatives(kind, positives[0][1])
        if kind in OPTIONAL_NULL:
            key = OPTIONAL_NULL[kind]
            record = {**positives[0][1], key: None}
            invalid.append(
                {
                    "name": f"{key} null instead of left out",
                    "record": record,
                    "error": {"kind": kind, "key": key},
                }
            )
        document = {
            "about": f"Vectors for the {kind!r} event; every valid one round-trips to the "
            "same canonical bytes, every invalid one raises EventInvalid naming kind and key.",
            "family": family,
            "kind": kind,
            "valid": [{"name": name, "record": record} for name, record in positives],
            "invalid": invalid,
        }
        path = HERE / f"{kind}.json"
        path.write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n")
    any_kind = {
        "about": "Records no family accepts: the error names the kind (null when there is "
        "none) and the key.",
        "family": "any",
        "kind": None,
        "valid": [],
        "invalid": [
            {
                "name": "unknown kind",
                "record": {"kind": "mystery_event", "time": T},
                "error": {"kind": "mystery_event", "key": "kind"},
            },
            {
                "name": "no kind",
                "record": {"time": T, "run": 7},
                "error": {"kind": None, "key": "kind"},
            },
            {
                "name": "kind not a string",
                "record": {"kind": 7, "time": T},
                "error": {"kind": None, "key": "kind"},
            },
            {
                "name": "not an object",
                "record": ["kind", "run_started"],
                "error": {"kind": None, "key": None},
            },
            {
                "name": "a journal kind among provider events",
                "record": {"kind": "hello", "time": T},
                "error": {"kind": "hello", "key": "kind"},
                "family": "provider",
            },
            {
                "name": "a provider kind in a journal",
                "record": {**JOB, "kind": "node_refused", "node": 1, "reason": "x"},
                "error": {"kind": "node_refused", "key": "kind"},
                "family": "journal",
            },
            {
                "name": "an opening line stamped as an entry",
                "record": {
                    "time": 1.5,
                    "node": "alpine",
                    "kind": "journal_opened",
                    "format": "ark-node-journal/v1",
                    "public_key": "AA==",
                },
                "error": {"kind": "journal_opened", "key": "time"},
                "family": "journal",
            },
        ],
    }
    (HERE / "any.json").write_text(json.dumps(any_kind, indent=1, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
