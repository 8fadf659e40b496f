"""How an event is defined: a frozen dataclass whose typed fields are its JSON form.

Every event kind (:mod:`.provider` for the key broker, provisioning and the ServerApp,
:mod:`.node` for a node's journal) is a subclass of :class:`Record` with a ``kind`` and
typed fields. :meth:`Record.to_json` gives the JSON object the services have always
written (``events.jsonl`` lines, transparency-log entries, journal entries); its
canonical bytes are :func:`sandbox.canonical.canonical_entry` of that object.
:meth:`Record.from_json` is the strict inverse: an unknown kind, a missing field, an
extra field or a value of the wrong type raises :class:`~sandbox.errors.EventInvalid`
naming the kind and the key, so that a parsed record re-serialises to the same bytes.
Building an event checks its fields the same way, so no emitter writes what the parser
would refuse.

Field names are members of :class:`Key`, checked when a class is defined: readers that
must tolerate incomplete records (the auditor's policy, the report) look fields up by
``Key`` and kinds by ``SomeEvent.kind``, never by spelling them again.

Values follow the log's spelling: an ``int`` field also accepts the decimal text the
log writes for an integer beyond 2**53 - 1, and a ``float`` field the text of a
non-finite number (:func:`sandbox.canonical.as_text_beyond_jcs`); a time is the exact
``isoformat()`` text of a timezone-aware datetime. A field typed ``Any`` holds any JSON
value (a record another party signed, carried as it came; its own reader parses it).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import inspect
import math
import re
import types
import typing
from collections.abc import Mapping
from enum import StrEnum
from typing import Any, ClassVar, Self

from sandbox.canonical import MAX_SAFE_INTEGER, canonical_entry
from sandbox.errors import EventInvalid
from sandbox.strictjson import INT_LIMIT, StrictJSONError, check_text

_OMIT = "omit-when-none"
_BIG_INT = re.compile(r"-?[1-9][0-9]*")
_ID_CHARS = len(str(-INT_LIMIT))
_NON_FINITE = {str(math.inf), str(-math.inf), str(math.nan)}
_SHOWN = 64  # characters of an untrusted kind or key an error message repeats


class Key(StrEnum):
    """Every field name an event or journal entry has, spelled once."""

    KIND = "kind"
    TIME = "time"
    # who and where
    RUN = "run"
    JOB = "job"
    NODE = "node"
    ROUND = "round"
    STAGE = "stage"
    RUN_ID = "run_id"
    NODE_ID = "node_id"
    CLIENT = "client"
    SCOPE = "scope"
    # attestation and keys
    SESSION = "session"
    KEY_ID = "key_id"
    TEE = "tee"
    PURPOSE = "purpose"
    STATUS = "status"
    EAR_SHA256 = "ear_sha256"
    TEE_PUBKEY_SHA256 = "tee_pubkey_sha256"
    RESULT_SHA256 = "result_sha256"
    STUB = "stub"
    POLICY_ID = "policy_id"
    UEID = "ueid"
    MEASUREMENTS = "measurements"
    TRUSTWORTHINESS = "trustworthiness"
    FAILURE = "failure"
    MODEL_ID = "model_id"
    REQUEST = "request"
    CODE = "code"
    CODES = "codes"
    CAUSE = "cause"
    REASON = "reason"
    WINDOW_START = "window_start"
    WINDOW_END = "window_end"
    LOGGED = "logged"
    SUPPRESSED = "suppressed"
    BYTES = "bytes"
    SHA256 = "sha256"
    NAME = "name"
    FILES = "files"
    MANIFEST_SHA256 = "manifest_sha256"
    CATALOG = "catalog"
    # runs and rounds
    ROUNDS = "rounds"
    RESUMED_AFTER_ROUND = "resumed_after_round"
    PROTECTION = "protection"
    MIN_NODES = "min_nodes"
    PARTICIPANTS = "participants"
    INSTRUCTION_SHA256 = "instruction_sha256"
    ENVELOPE_SHA256 = "envelope_sha256"
    ENVELOPE_BYTES = "envelope_bytes"
    EXAMPLES = "examples"
    DECLARED_EXAMPLES = "declared_examples"
    WEIGHT_BOUND = "weight_bound"
    ADAPTER_SHA256 = "adapter_sha256"
    UPDATES = "updates"
    METRICS = "metrics"
    FINAL = "final"
    # a node's journal
    FORMAT = "format"
    PUBLIC_KEY = "public_key"
    APP_SHA256 = "app_sha256"
    SUITE = "suite"
    ATTESTATION = "attestation"
    AGGREGATOR = "aggregator"
    RECEIVED_SHA256 = "received_sha256"
    SENT_SHA256 = "sent_sha256"
    TENSORS = "tensors"
    TIMINGS = "timings"
    # a node's local inference API
    ADAPTER = "adapter"
    COUNT = "count"
    REQUEST_SHA256 = "request_sha256"
    RESPONSE_SHA256 = "response_sha256"
    # comparisons (1+N) and their signed records
    COMPARISON = "comparison"
    TASK = "task"
    MODELS = "models"
    COMMITMENT = "commitment"
    SCORECARD = "scorecard"
    RUNS = "runs"
    ROOT = "root"
    # a list logged one entry per member
    COMMITTED = "committed"
    LIST = "list"
    INDEX = "index"
    ITEM = "item"
    HELDOUT_ROOT = "heldout_root"
    RECORD_SHA256 = "record_sha256"
    # secure aggregation
    NODES = "nodes"
    ENVELOPES = "envelopes"
    SIGNER_SHA256 = "signer_sha256"
    SURVIVORS = "survivors"
    DROPPED = "dropped"
    REVEALED_BY = "revealed_by"
    SEEDS_OF = "seeds_of"
    KEYS_OF = "keys_of"
    # differential privacy
    DP_EPSILON = "dp_epsilon"
    DP_CLIENT_NOISE = "dp_client_noise"
    NOISE_MULTIPLIER = "noise_multiplier"
    SAMPLE_RATE = "sample_rate"
    STEPS = "steps"
    CLIP = "clip"
    DELTA = "delta"
    EPSILON = "epsilon"
    EPSILON_TOTAL = "epsilon_total"
    BUDGET = "budget"
    CLIENT_NOISE_STD = "client_noise_std"


_KEYS = frozenset(Key)


def omitted() -> Any:
    """A field left out of the JSON form when it is None (the services write it only when
    it applies); any other field is always written, ``null`` included."""
    return dataclasses.field(default=None, metadata={_OMIT: True})


def _shown(text: str) -> str:
    return text if len(text) <= _SHOWN else text[:_SHOWN] + "…"


@dataclasses.dataclass(frozen=True, kw_only=True)
class JsonObject:
    """A frozen dataclass with a strict JSON object form: nested values and events."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name, annotation in inspect.get_annotations(cls).items():
            if not str(annotation).startswith("ClassVar") and name not in _KEYS:
                raise TypeError(f"{cls.__name__}.{name} is not a sandbox.events.Key")

    def __post_init__(self) -> None:
        """Check every field against its type, as :meth:`_parse` would: an emitter that
        builds an event the schema cannot read back fails here, not in the audit."""
        kind = getattr(self, "kind", None)
        hints = _hints(type(self))
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if value is not None or not spec.metadata.get(_OMIT):
                decode_value(_encode(value), hints[spec.name], kind, spec.name)

    def to_json(self) -> dict[str, Any]:
        """The JSON object this value is written as."""
        out: dict[str, Any] = {}
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if value is None and spec.metadata.get(_OMIT):
                continue
            out[spec.name] = _encode(value)
        return out

    @classmethod
    def _parse(cls, value: Any, kind: str | None, at: str, skip: frozenset[str]) -> Self:
        """``value`` as this class: exactly its fields (plus ``skip``, read by the caller),
        each of its type; ``at`` prefixes the keys named in errors."""
        if not isinstance(value, dict):
            raise EventInvalid("must be a JSON object", kind=kind, key=at or None)
        specs = {spec.name: spec for spec in dataclasses.fields(cls)}
        for name in value:
            if name not in specs and name not in skip:
                shown = _shown(str(name))
                raise EventInvalid("is not a field of this event", kind=kind, key=at + shown)
        hints = _hints(cls)
        parsed: dict[str, Any] = {}
        for name, spec in specs.items():
            if name not in value:
                if spec.metadata.get(_OMIT):
                    continue
                raise EventInvalid("is missing", kind=kind, key=at + name)
            if value[name] is None and spec.metadata.get(_OMIT):
                raise EventInvalid("is written only when it has a value", kind=kind, key=at + name)
            parsed[name] = decode_value(value[name], hints[name], kind, at + name)
        return cls(**parsed)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Record(JsonObject):
    """An event kind: its ``kind`` and typed fields. Subclasses that set ``kind`` register
    themselves in their family's table (``registry``), which :meth:`from_json` dispatches
    on."""

    kind: ClassVar[str]
    registry: ClassVar[dict[str, type[Record]]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "registry" in cls.__dict__:
            return
        if "kind" in cls.__dict__:
            if cls.kind in cls.registry:
                raise TypeError(f"two event classes of kind {cls.kind!r}")
            cls.registry[cls.kind] = cls

    def to_json(self) -> dict[str, Any]:
        return {Key.KIND.value: self.kind, **super().to_json()}

    @property
    def fields(self) -> dict[str, Any]:
        """The JSON form without the kind and time: what the event says."""
        return {k: v for k, v in self.to_json().items() if k not in (Key.KIND, Key.TIME)}

    def canonical(self) -> bytes:
        """The canonical bytes (RFC 8785, big values as text) the log and journal hash."""
        return canonical_entry(self.to_json())

    @classmethod
    def from_json(cls, record: Any) -> Self:
        """Parse ``record`` strictly as this class, or (on a family's base class) as the
        kind it names; :class:`EventInvalid` names the kind and the key at fault."""
        if not isinstance(record, dict):
            raise EventInvalid("must be a JSON object", kind=None)
        kind = record.get(Key.KIND)
        if Key.KIND not in record:
            raise EventInvalid("is missing", kind=None, key=Key.KIND)
        if not isinstance(kind, str):
            raise EventInvalid("must be a string", kind=None, key=Key.KIND)
        target = cls.registry.get(kind)
        if target is None:
            raise EventInvalid(f"is not a kind of {cls.__name__}", kind=_shown(kind), key=Key.KIND)
        if not issubclass(target, cls):
            raise EventInvalid(f"is not a {cls.__name__}", kind=kind, key=Key.KIND)
        return target._parse(record, kind, "", frozenset({Key.KIND}))


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The resolved field types of ``cls`` (resolved once: annotations are strings)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _encode(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.isoformat()
    if isinstance(value, JsonObject):
        return value.to_json()
    if isinstance(value, (list, tuple)):
        return [_encode(v) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _encode(v) for k, v in value.items()}  # a Key becomes its name
    return value


def decode_value(value: Any, hint: Any, kind: str | None, key: str) -> Any:
    """``value`` checked against the type ``hint``; raises :class:`EventInvalid`."""
    if hint is Any:
        return _free_json(value, kind, key)
    origin = typing.get_origin(hint)
    if origin in (types.UnionType, typing.Union):
        options = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if value is None and len(options) < len(typing.get_args(hint)):
            return None
        (single,) = options  # the schema only uses ``X | None``
        return decode_value(value, single, kind, key)
    if origin is list:
        if not isinstance(value, list):
            raise EventInvalid("must be a list", kind=kind, key=key)
        (item,) = typing.get_args(hint)
        return [decode_value(v, item, kind, f"{key}[{n}]") for n, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise EventInvalid("must be a JSON object", kind=kind, key=key)
        _, member = typing.get_args(hint)
        if not all(isinstance(k, str) for k in value):
            raise EventInvalid("must have text keys", kind=kind, key=key)
        return {k: decode_value(v, member, kind, f"{key}.{_shown(k)}") for k, v in value.items()}
    if isinstance(hint, type) and issubclass(hint, JsonObject):
        return hint._parse(value, kind, f"{key}.", frozenset())
    return _scalar(value, hint, kind, key)


def _free_json(value: Any, kind: str | None, key: str) -> Any:
    """``value`` checked as any JSON value the log can write (an ``Any`` field: a record
    another party signed, carried as it came and parsed strictly by whoever reads it)."""
    pending = [value]
    while pending:
        item = pending.pop()
        if isinstance(item, str):
            try:
                check_text(item)
            except StrictJSONError as exc:
                raise EventInvalid(str(exc), kind=kind, key=key) from None
        elif isinstance(item, dict):
            if not all(isinstance(k, str) for k in item):
                raise EventInvalid("must have text keys", kind=kind, key=key)
            pending.extend(item)
            pending.extend(item.values())
        elif isinstance(item, list):
            pending.extend(item)
        elif item is not None and not isinstance(item, (bool, int, float)):
            raise EventInvalid(f"holds a {type(item).__name__}, not JSON", kind=kind, key=key)
    return value


def _scalar(value: Any, hint: Any, kind: str | None, key: str) -> Any:
    if hint is str and isinstance(value, str):
        return value
    if hint is bool and isinstance(value, bool):
        return value
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        # The log's spelling of an id beyond 2**53 (Flower's are unsigned 64-bit).
        if isinstance(value, str) and len(value) <= _ID_CHARS and _BIG_INT.fullmatch(value):
            number = int(value)
            if MAX_SAFE_INTEGER < abs(number) < INT_LIMIT:
                return number
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value in _NON_FINITE:
            return float(value)
    if hint is dt.datetime and isinstance(value, str):
        try:
            stamp = dt.datetime.fromisoformat(value)
        except ValueError:
            stamp = None
        if stamp is not None and stamp.tzinfo is not None and stamp.isoformat() == value:
            return stamp
        raise EventInvalid("must be an ISO 8601 time with its offset", kind=kind, key=key)
    name = getattr(hint, "__name__", str(hint))
    raise EventInvalid(f"must be of type {name}", kind=kind, key=key)
