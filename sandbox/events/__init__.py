"""One typed schema for every event Ark records, and the sinks provider events go to.

Every kind is a frozen dataclass (:mod:`.provider`: the key broker, provisioning and
the ServerApp; :mod:`.node`: a node's journal) with its fields, its JSON form
(``to_json``; canonical bytes ``canonical()``) and a strict parser (``from_json``,
raising :class:`~sandbox.errors.EventInvalid` that names the kind and the key). Emitters
build these classes; the auditor, the report and the tests read kinds as
``SomeEvent.kind`` and fields by :class:`Key`. See :mod:`.schema` for the rules.
"""

from __future__ import annotations

from sandbox.events.node import (
    AggregatorRefused,
    AggregatorSeen,
    AppApproved,
    AppRefused,
    ClientappFailed,
    EgressBlocked,
    ErrorWithheld,
    Evaluate,
    Hello,
    InRun,
    JournalEntry,
    JournalOpened,
    KeyAttestation,
    NodeEvent,
    Train,
    Withheld,
    parse_journal_entry,
)
from sandbox.events.provider import (
    PLAINTEXT,
    AggregateCommitted,
    AttestationAppraised,
    ChannelCertified,
    DenialsRateLimited,
    Event,
    FileDigest,
    KeyDenied,
    KeyReleased,
    ModelPublished,
    NodeAdmitted,
    NodeDeclined,
    NodeRefused,
    Participant,
    RoundStarted,
    RunEvent,
    RunFinished,
    RunStarted,
    SentDigest,
    UpdateAccepted,
    UpdateRejected,
)
from sandbox.events.schema import JsonObject, Key, Record
from sandbox.events.sinks import EventSink, FanOutSink, JsonlEventSink, MemoryEventSink

__all__ = [
    "PLAINTEXT",
    "AggregateCommitted",
    "AggregatorRefused",
    "AggregatorSeen",
    "AppApproved",
    "AppRefused",
    "AttestationAppraised",
    "ChannelCertified",
    "ClientappFailed",
    "DenialsRateLimited",
    "EgressBlocked",
    "ErrorWithheld",
    "Evaluate",
    "Event",
    "EventSink",
    "FanOutSink",
    "FileDigest",
    "Hello",
    "InRun",
    "JournalEntry",
    "JournalOpened",
    "JsonObject",
    "JsonlEventSink",
    "Key",
    "KeyAttestation",
    "KeyDenied",
    "KeyReleased",
    "MemoryEventSink",
    "ModelPublished",
    "NodeAdmitted",
    "NodeDeclined",
    "NodeEvent",
    "NodeRefused",
    "Participant",
    "Record",
    "RoundStarted",
    "RunEvent",
    "RunFinished",
    "RunStarted",
    "SentDigest",
    "Train",
    "UpdateAccepted",
    "UpdateRejected",
    "Withheld",
    "parse_journal_entry",
]
