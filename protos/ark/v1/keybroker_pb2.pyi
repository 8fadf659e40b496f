from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DenialCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DENIAL_CODE_UNSPECIFIED: _ClassVar[DenialCode]
    DENIAL_CODE_BAD_REQUEST: _ClassVar[DenialCode]
    DENIAL_CODE_UNKNOWN_KEY: _ClassVar[DenialCode]
    DENIAL_CODE_SESSION_UNKNOWN: _ClassVar[DenialCode]
    DENIAL_CODE_SESSION_EXPIRED: _ClassVar[DenialCode]
    DENIAL_CODE_SESSION_USED: _ClassVar[DenialCode]
    DENIAL_CODE_EVIDENCE_MALFORMED: _ClassVar[DenialCode]
    DENIAL_CODE_SIGNATURE_INVALID: _ClassVar[DenialCode]
    DENIAL_CODE_CHAIN_UNTRUSTED: _ClassVar[DenialCode]
    DENIAL_CODE_NONCE_MISMATCH: _ClassVar[DenialCode]
    DENIAL_CODE_REPORT_DATA_MISMATCH: _ClassVar[DenialCode]
    DENIAL_CODE_DEBUG_ENABLED: _ClassVar[DenialCode]
    DENIAL_CODE_MEASUREMENT_REJECTED: _ClassVar[DenialCode]
    DENIAL_CODE_TEE_NOT_ACCEPTED: _ClassVar[DenialCode]
    DENIAL_CODE_NODE_NOT_ALLOWED: _ClassVar[DenialCode]
    DENIAL_CODE_RESULT_INVALID: _ClassVar[DenialCode]
    DENIAL_CODE_RESULT_EXPIRED: _ClassVar[DenialCode]
    DENIAL_CODE_NOT_AFFIRMING: _ClassVar[DenialCode]
DENIAL_CODE_UNSPECIFIED: DenialCode
DENIAL_CODE_BAD_REQUEST: DenialCode
DENIAL_CODE_UNKNOWN_KEY: DenialCode
DENIAL_CODE_SESSION_UNKNOWN: DenialCode
DENIAL_CODE_SESSION_EXPIRED: DenialCode
DENIAL_CODE_SESSION_USED: DenialCode
DENIAL_CODE_EVIDENCE_MALFORMED: DenialCode
DENIAL_CODE_SIGNATURE_INVALID: DenialCode
DENIAL_CODE_CHAIN_UNTRUSTED: DenialCode
DENIAL_CODE_NONCE_MISMATCH: DenialCode
DENIAL_CODE_REPORT_DATA_MISMATCH: DenialCode
DENIAL_CODE_DEBUG_ENABLED: DenialCode
DENIAL_CODE_MEASUREMENT_REJECTED: DenialCode
DENIAL_CODE_TEE_NOT_ACCEPTED: DenialCode
DENIAL_CODE_NODE_NOT_ALLOWED: DenialCode
DENIAL_CODE_RESULT_INVALID: DenialCode
DENIAL_CODE_RESULT_EXPIRED: DenialCode
DENIAL_CODE_NOT_AFFIRMING: DenialCode

class ChallengeRequest(_message.Message):
    __slots__ = ("key_id",)
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    key_id: str
    def __init__(self, key_id: _Optional[str] = ...) -> None: ...

class ChallengeReply(_message.Message):
    __slots__ = ("session_id", "nonce", "expires_at")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    nonce: bytes
    expires_at: int
    def __init__(self, session_id: _Optional[str] = ..., nonce: _Optional[bytes] = ..., expires_at: _Optional[int] = ...) -> None: ...

class AttestRequest(_message.Message):
    __slots__ = ("session_id", "tee", "evidence", "tee_pubkey", "hpke_suite", "key_id", "purpose")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TEE_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    TEE_PUBKEY_FIELD_NUMBER: _ClassVar[int]
    HPKE_SUITE_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    PURPOSE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tee: str
    evidence: str
    tee_pubkey: bytes
    hpke_suite: str
    key_id: str
    purpose: str
    def __init__(self, session_id: _Optional[str] = ..., tee: _Optional[str] = ..., evidence: _Optional[str] = ..., tee_pubkey: _Optional[bytes] = ..., hpke_suite: _Optional[str] = ..., key_id: _Optional[str] = ..., purpose: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("attestation_result", "key_id")
    ATTESTATION_RESULT_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    attestation_result: str
    key_id: str
    def __init__(self, attestation_result: _Optional[str] = ..., key_id: _Optional[str] = ...) -> None: ...

class KeyRelease(_message.Message):
    __slots__ = ("attestation_result", "wrapped_key", "key_id", "model_id", "session_id", "hpke_suite")
    ATTESTATION_RESULT_FIELD_NUMBER: _ClassVar[int]
    WRAPPED_KEY_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    HPKE_SUITE_FIELD_NUMBER: _ClassVar[int]
    attestation_result: str
    wrapped_key: bytes
    key_id: str
    model_id: str
    session_id: str
    hpke_suite: str
    def __init__(self, attestation_result: _Optional[str] = ..., wrapped_key: _Optional[bytes] = ..., key_id: _Optional[str] = ..., model_id: _Optional[str] = ..., session_id: _Optional[str] = ..., hpke_suite: _Optional[str] = ...) -> None: ...

class Denial(_message.Message):
    __slots__ = ("code", "reason", "attestation_result")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ATTESTATION_RESULT_FIELD_NUMBER: _ClassVar[int]
    code: DenialCode
    reason: str
    attestation_result: str
    def __init__(self, code: _Optional[_Union[DenialCode, str]] = ..., reason: _Optional[str] = ..., attestation_result: _Optional[str] = ...) -> None: ...

class AttestReply(_message.Message):
    __slots__ = ("released", "denied")
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    DENIED_FIELD_NUMBER: _ClassVar[int]
    released: KeyRelease
    denied: Denial
    def __init__(self, released: _Optional[_Union[KeyRelease, _Mapping]] = ..., denied: _Optional[_Union[Denial, _Mapping]] = ...) -> None: ...
