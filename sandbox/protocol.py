"""The message contract between the ServerApp and ClientApps (content keys and codecs).

Both sides import it, so the names cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    MessageType,
    MetricRecord,
    MetricRecordValues,
    RecordDict,
)

from sandbox.channel import STAGE_EVALUATE, STAGE_TRAIN
from sandbox.digests import sha256_hex
from sandbox.errors import ProtocolError

GLOBAL_KEY = "global"
UPDATE_KEY = "update"
METRICS_KEY = "metrics"
# The one record an update may leave a node in: a ConfigRecord holding the HPKE envelope.
SEALED_KEY = "sealed"
SEALED_UPDATE_KEY = "update"
# Downlink: the global adapter sealed to the node's attested channel key.
SEALED_GLOBAL_KEY = "global"
# The handshake a node answers before its first instruction of a run (passport model):
# a nonce it chose, its channel public key, and the key broker's result binding that key.
HELLO_KEY = "hello"
HELLO_NONCE = "nonce"
HELLO_NODE_KEY = "node-key"
HELLO_RESULT = "ear"
# What every sealed instruction carries: the aggregator's evidence over the node's nonce.
AGGREGATOR_KEY = "aggregator"
AGGREGATOR_TEE = "tee"
AGGREGATOR_EVIDENCE = "evidence"
AGGREGATOR_PUBLIC_KEY = "key"
AGGREGATOR_SUITE = "suite"
# In a comparison: the node's signed held-out commitment (train replies) and its signed
# scorecard (the final evaluation's reply), each one ConfigRecord holding the signed
# record's canonical JSON as bytes under SIGNED_KEY.
COMMITMENT_KEY = "commitment"
SCORECARD_KEY = "scorecard"
SIGNED_KEY = "signed"
CONFIG_KEY = "config"
# Secure aggregation: one ConfigRecord holding the stage's message (ark-secagg/1 JSON) as
# bytes; instructions also name the stage. Stages after the training instruction travel
# as queries of this action.
SECAGG_KEY = "secagg"
SECAGG_PAYLOAD = "payload"
SECAGG_STAGE = "stage"
SECAGG_ACTION = "secagg"
SECAGG_MESSAGE_TYPE = f"{MessageType.QUERY}.{SECAGG_ACTION}"
ROUND_KEY = "server-round"
NUM_EXAMPLES = "num-examples"
NODE_CONFIG_KEY = "node-config"
# The node sandbox's local inference API: texts per request, new tokens per completion.
INFERENCE_MAX_TEXTS = 64
INFERENCE_MAX_NEW_TOKENS = 128
# What `ark node sandbox` prints once its socket accepts requests.
SANDBOX_READY = "sandbox ready on"
# What a starting sandbox logs each time the key broker cannot be reached (the node's
# start command relays these lines to its operator).
BROKER_RETRY = "key broker unreachable"


def stage_of(message_type: str) -> str:
    """The channel stage an instruction of ``message_type`` is for (train or evaluate)."""
    return STAGE_TRAIN if message_type == MessageType.TRAIN else STAGE_EVALUATE


def to_record(tensors: Mapping[str, np.ndarray]) -> ArrayRecord:
    """Pack named arrays into a Flower ArrayRecord (numpy serialization, no pickle)."""
    return ArrayRecord({name: Array(np.ascontiguousarray(a)) for name, a in tensors.items()})


def from_record(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Unpack an ArrayRecord into named numpy arrays."""
    return {name: record[name].numpy() for name in record}


def round_config(rnd: int) -> ConfigRecord:
    """The config record every instruction carries: the server round it is for."""
    return ConfigRecord({ROUND_KEY: rnd})


def secagg_record(payload: bytes) -> ConfigRecord:
    """A secure-aggregation message as the record it travels in."""
    return ConfigRecord({SECAGG_PAYLOAD: payload})


def round_of(content: RecordDict) -> int:
    """The server round an instruction message is for."""
    try:
        value = content.config_records[CONFIG_KEY][ROUND_KEY]
    except KeyError as exc:
        raise ProtocolError(f"message has no {CONFIG_KEY}.{ROUND_KEY}") from exc
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError(f"{CONFIG_KEY}.{ROUND_KEY} must be an integer, got {value!r}")
    return value


def metric_record(values: Mapping[str, float]) -> MetricRecord:
    """Scalar metrics as a Flower MetricRecord."""
    record: dict[str, MetricRecordValues] = dict(values)
    return MetricRecord(record)


def sealed_digest(content: RecordDict, field: str = SEALED_GLOBAL_KEY) -> str | None:
    """SHA-256 of a message's sealed envelope (``field`` of its sealed record), the name
    both the provider's log and the node's journal give it; None if it carries none."""
    record = content.config_records.get(SEALED_KEY)
    blob = None if record is None else record.get(field)
    return sha256_hex(blob) if isinstance(blob, bytes) else None
