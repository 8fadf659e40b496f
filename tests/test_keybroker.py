"""The key broker over real gRPC + TLS: the release path and one test per attack.

Every attack must end in a typed denial (the broker's cause and the wire code), no key
released, and a ``key_denied`` event. Floods (sessions, denials) end in the broker's
limits, with honest nodes still served and the log still auditable.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import socket
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from typer.testing import CliRunner

from sandbox import strictjson
from sandbox.attestation.backends import VerifierRegistry
from sandbox.attestation.evidence import b64url, b64url_decode, encode_jws, es256_sign
from sandbox.attestation.result import (
    AFFIRMING,
    CONTRAINDICATED,
    PURPOSE_CHANNEL,
    PURPOSE_KEY_RELEASE,
    PURPOSE_SIGNING,
    SIGNING_SUITE,
    WARNING,
    ResultSigner,
    verify_result,
)
from sandbox.attestation.stub import DevManufacturer, StubAttester
from sandbox.attestation.verifier import AppraisalPolicy, Verifier
from sandbox.digests import sha256_hex
from sandbox.errors import (
    ConfigError,
    KeyReleaseDenied,
    ReleaseWithoutAppraisal,
    ResultExpired,
    ResultInvalid,
)
from sandbox.events import (
    ComparedModel,
    ComparisonFinished,
    ComparisonStarted,
    Event,
    FanOutSink,
    HeldoutCommitted,
    MemoryEventSink,
)
from sandbox.keybroker import RATE_LIMITED
from sandbox.keybroker.client import (
    KeyBrokerClient,
    certify_channel_key,
    certify_signing_key,
    obtain_content_key,
)
from sandbox.keybroker.transport import Certification, KeyBrokerTransport, KeyRelease
from sandbox.ops.cli import app
from sandbox.ops.keybroker.broker import ContentKey, KeyBroker, KeyStore
from sandbox.ops.keybroker.inprocess import InProcessTransport
from sandbox.ops.keybroker.limits import DEFAULT_LIMITS, Limits
from sandbox.ops.keybroker.service import client_of, serve
from sandbox.ops.tls import TlsFiles, issue_loopback_tls
from sandbox.ops.translog.audit import check_policy, verify_log
from sandbox.scorecard import Commitment, sign_commitment, signer_sha256
from sandbox.seal.envelope import SUITE_MLKEM768_X25519, SUITE_X25519, RecipientKey
from sandbox.translog.store import MAX_ENTRY_BYTES, LogSink, LogStore
from tests.loghistory import (
    build_log,
    denial,
    denials_rate_limited,
    digest,
    heldout_set,
    new_signer,
    scorecard,
    scored,
)

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
CODE = "ab" * 32
CONFIG = "cd" * 32
MEASUREMENTS = {"code": CODE, "config": CONFIG}
KEY_ID = "minilm-k1"
OTHER_KEY_ID = "minilm-k2"
MODEL_ID = "minilm"
CONTENT_KEY = bytes(range(32))
POLICY = AppraisalPolicy(
    policy_id="provider-policy/1",
    accepted_tees=frozenset({"stub"}),
    allow_stub=True,
    reference_values={"code": frozenset({CODE})},
    allowed_nodes=frozenset({"node-1"}),
)


class Clock:
    """A frozen clock that tests move forward explicitly."""

    def __init__(self) -> None:
        self.now = NOW

    def __call__(self) -> dt.datetime:
        return self.now


@dataclasses.dataclass
class Deployment:
    broker: KeyBroker
    client: KeyBrokerClient
    events: MemoryEventSink
    clock: Clock
    maker: DevManufacturer
    attester: StubAttester
    result_key: ec.EllipticCurvePublicKey


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsFiles:
    return issue_loopback_tls(tmp_path_factory.mktemp("tls"), now=NOW)


@pytest.fixture(scope="module")
def maker() -> DevManufacturer:
    return DevManufacturer.create(now=NOW)


def _attester(maker: DevManufacturer, ueid: str = "node-1", **changes: Any) -> StubAttester:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = maker.certify(key.public_key(), ueid, now=NOW)
    return dataclasses.replace(StubAttester(key=key, chain=[cert], ueid=ueid), **changes)


def _deploy(
    tmp_path: Path,
    tls: TlsFiles,
    maker: DevManufacturer,
    policy: AppraisalPolicy,
    *,
    limits: Limits = DEFAULT_LIMITS,
    log: LogStore | None = None,
    address: str = "127.0.0.1:0",
    host: str = "localhost",
) -> Any:
    keystore = KeyStore(tmp_path / "keys")
    keystore.put(ContentKey(KEY_ID, MODEL_ID, CONTENT_KEY))
    keystore.put(ContentKey(OTHER_KEY_ID, MODEL_ID, CONTENT_KEY[::-1]))
    signer = ResultSigner(
        ec.generate_private_key(ec.SECP256R1()), {"developer": "ark-sandbox", "build": "test"}
    )
    events = MemoryEventSink()
    clock = Clock()
    broker = KeyBroker(
        verifiers=VerifierRegistry({"stub": Verifier({"stub": [maker.certificate]})}),
        policy=policy,
        signer=signer,
        keystore=keystore,
        events=events if log is None else FanOutSink([events, LogSink(log)]),
        clock=clock,
        limits=limits,
    )
    server, port = serve(broker, address=address, cert=tls.server_cert, key=tls.server_key)
    client = KeyBrokerClient(f"{host}:{port}", ca_cert=tls.ca_cert, timeout=10)
    deployment = Deployment(
        broker, client, events, clock, maker, _attester(maker), signer.key.public_key()
    )
    return deployment, server


@pytest.fixture
def kb(tmp_path: Path, tls: TlsFiles, maker: DevManufacturer) -> Iterator[Deployment]:
    deployment, server = _deploy(tmp_path, tls, maker, POLICY)
    yield deployment
    deployment.client.close()
    server.stop(grace=None)
    for event in deployment.events.events:  # what the broker logged reads back as it was
        assert Event.from_json(strictjson.loads(event.canonical())).canonical() == event.canonical()


def _attest(
    kb: Deployment,
    evidence: str,
    session_id: str,
    tee_pubkey: bytes,
    suite: str = SUITE_X25519,
    purpose: str = PURPOSE_KEY_RELEASE,
    *,
    client: KeyBrokerClient | None = None,
    key_id: str = KEY_ID,
) -> Any:
    return (client or kb.client).attest(
        session_id=session_id,
        tee="stub",
        evidence=evidence,
        tee_pubkey=tee_pubkey,
        hpke_suite=suite,
        key_id=key_id,
        purpose=purpose,
    )


def _evidence(attester: StubAttester, nonce: bytes, tee_pubkey: bytes, **claims: Any) -> str:
    measurements = claims.pop("measurements", MEASUREMENTS)
    return attester.evidence(nonce=nonce, tee_pubkey=tee_pubkey, measurements=measurements, now=NOW)


def _denied(kb: Deployment, code: str, cause: str, action: Any) -> KeyReleaseDenied:
    """Run ``action``; it must be denied with ``code``, release nothing, and be recorded."""
    releases_before = kb.events.kinds().count("key_released")
    with pytest.raises(KeyReleaseDenied) as caught:
        action()
    assert caught.value.code == code
    assert kb.events.kinds().count("key_released") == releases_before
    denial = kb.events.events[-1]
    assert denial.kind == "key_denied"
    assert denial.fields["code"] == code
    assert denial.fields["cause"] == cause
    return caught.value


def _attack(kb: Deployment, code: str, cause: str, attester: StubAttester | None = None) -> None:
    """Fresh challenge, evidence from ``attester`` with honest nonce and key, then denial."""
    sandbox = RecipientKey.generate()
    challenge = kb.client.challenge(KEY_ID)
    token = _evidence(attester or kb.attester, challenge.nonce, sandbox.public_bytes)
    _denied(kb, code, cause, lambda: _attest(kb, token, challenge.session_id, sandbox.public_bytes))


@pytest.mark.parametrize("suite", [SUITE_X25519, SUITE_MLKEM768_X25519])
def test_affirming_stub_evidence_releases_the_key_to_the_sandbox_only(
    kb: Deployment, suite: str
) -> None:
    released = obtain_content_key(
        kb.client,
        kb.attester,
        key_id=KEY_ID,
        measurements=MEASUREMENTS,
        result_key=kb.result_key,
        suite=suite,
        clock=kb.clock,
    )
    assert released.content_key == CONTENT_KEY
    assert released.model_id == MODEL_ID
    result = released.result
    assert result.status == AFFIRMING
    assert result.is_stub, "a result from stub evidence must say so"
    assert result.submod["ark.tee"] == "stub"
    assert result.submod["ear.appraisal-policy-id"] == "provider-policy/1"
    assert set(result.submod["ear.trustworthiness-vector"].values()) == {2}
    assert result.claims["exp"] > result.claims["iat"]
    assert kb.events.kinds() == ["attestation_appraised", "key_released"]
    appraised, release = (e.fields for e in kb.events.events)
    assert appraised["ear_sha256"] == release["ear_sha256"] == result.digest
    assert appraised["measurements"] == MEASUREMENTS
    assert CONTENT_KEY.hex() not in json.dumps([e.to_json() for e in kb.events.events])


def test_a_channel_attestation_certifies_the_key_and_releases_nothing(kb: Deployment) -> None:
    """A node's channel key is attested for the update channel only: no content key goes
    out with it, and its result cannot be traded for one later through Release."""
    channel_key = RecipientKey.generate()
    result = certify_channel_key(
        kb.client,
        kb.attester,
        channel_key,
        key_id=KEY_ID,
        measurements=MEASUREMENTS,
        result_key=kb.result_key,
        clock=kb.clock,
    )
    assert result.purpose == "channel"
    assert result.tee_pubkey == channel_key.public_bytes
    assert kb.events.kinds() == ["attestation_appraised", "channel_certified"]
    _denied(
        kb,
        "RESULT_INVALID",
        "ResultInvalid",
        lambda: kb.client.release(attestation_result=result.token, key_id=KEY_ID),
    )


def test_an_unknown_attestation_purpose_is_a_bad_request(kb: Deployment) -> None:
    sandbox = RecipientKey.generate()
    challenge = kb.client.challenge(KEY_ID)
    token = _evidence(kb.attester, challenge.nonce, sandbox.public_bytes)
    _denied(
        kb,
        "BAD_REQUEST",
        "BadRequest",
        lambda: _attest(
            kb, token, challenge.session_id, sandbox.public_bytes, purpose="everything"
        ),
    )


# --- one exchange over either transport -----------------------------------------------------


def _answers(kb: Deployment, transport: KeyBrokerTransport) -> list[Any]:
    """What ``transport`` answers for a release, a certification, and four refusals."""
    channel_key = RecipientKey.generate()
    released = obtain_content_key(
        transport,
        kb.attester,
        key_id=KEY_ID,
        measurements=MEASUREMENTS,
        result_key=kb.result_key,
        clock=kb.clock,
    )
    certified = certify_channel_key(
        transport,
        kb.attester,
        channel_key,
        key_id=KEY_ID,
        measurements=MEASUREMENTS,
        result_key=kb.result_key,
        clock=kb.clock,
    )
    challenge = transport.challenge(KEY_ID)
    granted = transport.attest(
        session_id=challenge.session_id,
        tee="stub",
        evidence=_evidence(kb.attester, challenge.nonce, channel_key.public_bytes),
        tee_pubkey=channel_key.public_bytes,
        hpke_suite=SUITE_X25519,
        key_id=KEY_ID,
        purpose=PURPOSE_CHANNEL,
    )
    refusals: list[tuple[str, str]] = []
    for refused in (
        lambda: transport.challenge("no-such-key"),
        lambda: transport.release(attestation_result=certified.token, key_id=KEY_ID),
        lambda: transport.release(attestation_result=released.result.token, key_id="no-such-key"),
        lambda: transport.attest(
            session_id="never-issued",
            tee="stub",
            evidence="x.y.z",
            tee_pubkey=bytes(32),
            hpke_suite=SUITE_X25519,
            key_id=KEY_ID,
        ),
    ):
        with pytest.raises(KeyReleaseDenied) as caught:
            refused()
        refusals.append((caught.value.code, caught.value.reason))
    again = transport.release(attestation_result=released.result.token, key_id=KEY_ID)
    return [
        released.content_key,
        certified.purpose,
        type(granted),
        type(again),
        refusals,
    ]


def test_the_in_process_transport_answers_as_the_grpc_service(kb: Deployment) -> None:
    """Tests and tooling attest over the in-process adapter: it must answer what the
    service sends over the wire, for releases, certifications and denials alike."""
    over_grpc = _answers(kb, kb.client)
    in_process = _answers(kb, InProcessTransport(kb.broker))
    assert over_grpc == in_process
    assert over_grpc[:4] == [CONTENT_KEY, PURPOSE_CHANNEL, Certification, KeyRelease]
    assert [code for code, _ in over_grpc[4]] == [
        "UNKNOWN_KEY",
        "RESULT_INVALID",
        "UNKNOWN_KEY",
        "SESSION_UNKNOWN",
    ]
    assert kb.events.kinds().count("key_released") == 4


def test_the_transports_answer_rate_limited_alike(
    tmp_path: Path, tls: TlsFiles, maker: DevManufacturer
) -> None:
    """RATE_LIMITED, sent as a gRPC status rather than a denial, reads the same in-process."""
    deployment, server = _deploy(tmp_path, tls, maker, POLICY, limits=Limits(denials_per_client=1))
    try:
        answers = []
        for transport in (deployment.client, InProcessTransport(deployment.broker)):
            denials = [_bogus_attest(transport) for _ in range(2)]
            with pytest.raises(KeyReleaseDenied) as caught:
                transport.challenge("no-such-key")
            answers.append([(d.code, d.reason) for d in (*denials, caught.value)])
        assert answers[0] == answers[1]
        assert [code for code, _ in answers[0]] == ["SESSION_UNKNOWN", *[RATE_LIMITED] * 2]
    finally:
        deployment.client.close()
        server.stop(grace=None)


# --- nonce and session -------------------------------------------------------------------


def test_evidence_replayed_after_a_new_challenge(kb: Deployment) -> None:
    sandbox = RecipientKey.generate()
    first = kb.client.challenge(KEY_ID)
    token = _evidence(kb.attester, first.nonce, sandbox.public_bytes)
    assert _attest(kb, token, first.session_id, sandbox.public_bytes).wrapped_key
    second = kb.client.challenge(KEY_ID)
    kb.events.events.clear()
    _denied(
        kb,
        "NONCE_MISMATCH",
        "NonceMismatch",
        lambda: _attest(kb, token, second.session_id, sandbox.public_bytes),
    )
    _denied(
        kb,
        "SESSION_USED",
        "SessionUsed",
        lambda: _attest(kb, token, first.session_id, sandbox.public_bytes),
    )


def test_nonce_of_another_session(kb: Deployment) -> None:
    sandbox = RecipientKey.generate()
    mine, theirs = kb.client.challenge(KEY_ID), kb.client.challenge(KEY_ID)
    token = _evidence(kb.attester, theirs.nonce, sandbox.public_bytes)
    _denied(
        kb,
        "NONCE_MISMATCH",
        "NonceMismatch",
        lambda: _attest(kb, token, mine.session_id, sandbox.public_bytes),
    )


def test_expired_session(kb: Deployment) -> None:
    sandbox = RecipientKey.generate()
    challenge = kb.client.challenge(KEY_ID)
    token = _evidence(kb.attester, challenge.nonce, sandbox.public_bytes)
    kb.clock.now = NOW + dt.timedelta(seconds=61)
    _denied(
        kb,
        "SESSION_EXPIRED",
        "SessionExpired",
        lambda: _attest(kb, token, challenge.session_id, sandbox.public_bytes),
    )


def test_unknown_session(kb: Deployment) -> None:
    sandbox = RecipientKey.generate()
    token = _evidence(kb.attester, bytes(32), sandbox.public_bytes)
    _denied(
        kb,
        "SESSION_UNKNOWN",
        "SessionUnknown",
        lambda: _attest(kb, token, "never-issued", sandbox.public_bytes),
    )


def test_nonce_shorter_than_8_bytes(kb: Deployment) -> None:
    sandbox = RecipientKey.generate()
    challenge = kb.client.challenge(KEY_ID)
    token = _evidence(kb.attester, challenge.nonce[:7], sandbox.public_bytes)
    _denied(
        kb,
        "NONCE_MISMATCH",
        "NonceMismatch",
        lambda: _attest(kb, token, challenge.session_id, sandbox.public_bytes),
    )


# --- key binding, measurement, debug ---------------------------------------------------


def test_swapped_tee_pubkey(kb: Deployment) -> None:
    attested, swapped = RecipientKey.generate(), RecipientKey.generate()
    challenge = kb.client.challenge(KEY_ID)
    token = _evidence(kb.attester, challenge.nonce, attested.public_bytes)
    _denied(
        kb,
        "REPORT_DATA_MISMATCH",
        "ReportDataMismatch",
        lambda: _attest(kb, token, challenge.session_id, swapped.public_bytes),
    )


def test_modified_client_code(kb: Deployment) -> None:
    sandbox = RecipientKey.generate()
    challenge = kb.client.challenge(KEY_ID)
    token = _evidence(
        kb.attester,
        challenge.nonce,
        sandbox.public_bytes,
        measurements={"code": "ee" * 32, "config": CONFIG},
    )
    _denied(
        kb,
        "MEASUREMENT_REJECTED",
        "MeasurementRejected",
        lambda: _attest(kb, token, challenge.session_id, sandbox.public_bytes),
    )


@pytest.mark.parametrize("dbgstat", ["enabled", None], ids=["enabled", "absent"])
def test_debug_enabled_or_absent(kb: Deployment, dbgstat: str | None) -> None:
    _attack(kb, "DEBUG_ENABLED", "DebugEnabled", dataclasses.replace(kb.attester, dbgstat=dbgstat))


# --- signature and chain -----------------------------------------------------------------


def _resigned(kb: Deployment, header_change: dict[str, Any], sign: Any) -> Any:
    """An attack whose evidence is re-signed by ``sign`` with a changed JWS header."""
    sandbox = RecipientKey.generate()
    challenge = kb.client.challenge(KEY_ID)
    head, body, _ = _evidence(kb.attester, challenge.nonce, sandbox.public_bytes).split(".")
    header = {**json.loads(b64url_decode(head)), **header_change}
    token = encode_jws(header, json.loads(b64url_decode(body)), sign)
    return lambda: _attest(kb, token, challenge.session_id, sandbox.public_bytes)


def test_bad_signature(kb: Deployment) -> None:
    sandbox = RecipientKey.generate()
    challenge = kb.client.challenge(KEY_ID)
    head, body, sig = _evidence(kb.attester, challenge.nonce, sandbox.public_bytes).split(".")
    raw = bytearray(b64url_decode(sig))
    raw[7] ^= 1
    token = f"{head}.{body}.{b64url(bytes(raw))}"
    _denied(
        kb,
        "SIGNATURE_INVALID",
        "SignatureInvalid",
        lambda: _attest(kb, token, challenge.session_id, sandbox.public_bytes),
    )


def test_alg_none(kb: Deployment) -> None:
    action = _resigned(kb, {"alg": "none"}, lambda data: b"")
    _denied(kb, "EVIDENCE_MALFORMED", "EvidenceFormatError", action)


def test_alg_hs256(kb: Deployment) -> None:
    public_pem = (
        kb.attester.chain[0]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )

    def hs256(data: bytes) -> bytes:
        mac = hmac.HMAC(public_pem, hashes.SHA256())
        mac.update(data)
        return mac.finalize()

    _denied(kb, "EVIDENCE_MALFORMED", "EvidenceFormatError", _resigned(kb, {"alg": "HS256"}, hs256))


def test_self_asserted_key_with_no_chain(kb: Deployment) -> None:
    key = kb.attester.key
    action = _resigned(kb, {"x5c": []}, lambda data: es256_sign(key, data))
    _denied(kb, "CHAIN_UNTRUSTED", "ChainUntrusted", action)


def test_chain_to_an_untrusted_root(kb: Deployment) -> None:
    rogue = DevManufacturer.create(now=NOW)
    _attack(kb, "CHAIN_UNTRUSTED", "ChainUntrusted", _attester(rogue))


def test_expired_attestation_certificate(kb: Deployment) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = kb.maker.certify(
        key.public_key(), "node-1", now=NOW - dt.timedelta(days=400), valid_days=30
    )
    attester = StubAttester(key=key, chain=[cert], ueid="node-1")
    _attack(kb, "CHAIN_UNTRUSTED", "ChainUntrusted", attester)


# --- policy ----------------------------------------------------------------------------


def test_stub_evidence_when_policy_disallows_stubs(
    tmp_path: Path, tls: TlsFiles, maker: DevManufacturer
) -> None:
    strict = dataclasses.replace(POLICY, allow_stub=False)
    deployment, server = _deploy(tmp_path, tls, maker, strict)
    try:
        _attack(deployment, "TEE_NOT_ACCEPTED", "TeeNotAccepted")
        appraised = deployment.events.events[0].fields
        assert appraised["status"] == CONTRAINDICATED
        assert appraised["trustworthiness"]["hardware"] == 96
    finally:
        deployment.client.close()
        server.stop(grace=None)


def test_node_not_allowlisted(kb: Deployment) -> None:
    _attack(kb, "NODE_NOT_ALLOWED", "NodeNotAllowed", _attester(kb.maker, ueid="node-7"))


def test_warning_result_releases_nothing(
    tmp_path: Path, tls: TlsFiles, maker: DevManufacturer
) -> None:
    advisory = dataclasses.replace(POLICY, advisory_values={"config": frozenset({"00" * 32})})
    deployment, server = _deploy(tmp_path, tls, maker, advisory)
    try:
        _attack(deployment, "NOT_AFFIRMING", "NotAffirming")
        assert deployment.events.events[0].fields["status"] == WARNING
    finally:
        deployment.client.close()
        server.stop(grace=None)


# --- attestation results presented back ---------------------------------------------------


def _affirming_result(kb: Deployment) -> str:
    released = obtain_content_key(
        kb.client,
        kb.attester,
        key_id=KEY_ID,
        measurements=MEASUREMENTS,
        result_key=kb.result_key,
        clock=kb.clock,
    )
    return released.result.token


def test_unexpired_result_presented_back_releases_again(kb: Deployment) -> None:
    token = _affirming_result(kb)
    release = kb.client.release(attestation_result=token, key_id=KEY_ID)
    assert release.wrapped_key
    assert release.session_id == verify_result(token, kb.result_key, now=NOW).session_id


def test_expired_result_presented_back(kb: Deployment) -> None:
    token = _affirming_result(kb)
    kb.clock.now = NOW + dt.timedelta(minutes=11)
    with pytest.raises(ResultExpired):
        verify_result(token, kb.result_key, now=kb.clock.now)
    _denied(
        kb,
        "RESULT_EXPIRED",
        "ResultExpired",
        lambda: kb.client.release(attestation_result=token, key_id=KEY_ID),
    )


def test_tampered_result_presented_back(kb: Deployment) -> None:
    head, body, sig = _affirming_result(kb).split(".")
    claims = json.loads(b64url_decode(body))
    claims["exp"] += 86_400
    token = f"{head}.{b64url(json.dumps(claims).encode())}.{sig}"
    with pytest.raises(ResultInvalid):
        verify_result(token, kb.result_key, now=NOW)
    _denied(
        kb,
        "RESULT_INVALID",
        "ResultInvalid",
        lambda: kb.client.release(attestation_result=token, key_id=KEY_ID),
    )


def test_result_signed_by_another_verifier_presented_back(kb: Deployment) -> None:
    token = _affirming_result(kb)
    claims = json.loads(b64url_decode(token.split(".")[1]))
    forger = ec.generate_private_key(ec.SECP256R1())
    forged = encode_jws(
        {"alg": "ES256", "typ": "JWT"}, claims, lambda data: es256_sign(forger, data)
    )
    _denied(
        kb,
        "RESULT_INVALID",
        "ResultInvalid",
        lambda: kb.client.release(attestation_result=forged, key_id=KEY_ID),
    )


def test_unknown_key_id(kb: Deployment) -> None:
    _denied(kb, "UNKNOWN_KEY", "UnknownKey", lambda: kb.client.challenge("no-such-key"))
    assert len(kb.broker._sessions) == 0, "an unknown key id must not open a session"


def test_keystore_files_are_private(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys")
    path = store.put(ContentKey("k1", "m", CONTENT_KEY))
    assert path.stat().st_mode & 0o777 == 0o600
    assert store.get("k1").key == CONTENT_KEY


def test_result_presented_back_after_the_policy_changed(kb: Deployment) -> None:
    token = _affirming_result(kb)
    kb.broker.policy = dataclasses.replace(POLICY, allowed_nodes=frozenset({"node-2"}))
    _denied(
        kb,
        "RESULT_INVALID",
        "ResultInvalid",
        lambda: kb.client.release(attestation_result=token, key_id=KEY_ID),
    )


def _raw_token(header: dict[str, Any], body: bytes) -> str:
    return f"{b64url(json.dumps(header).encode())}.{b64url(body)}.{b64url(bytes(64))}"


@pytest.mark.parametrize(
    "body",
    [b"[" * 5_000 + b"]" * 5_000, b'{"iat": ' + b"9" * 5000 + b"}", b"\xff\xfe"],
    ids=["deeply-nested", "huge-number", "not-utf8"],
)
def test_hostile_encodings_are_recorded_denials(kb: Deployment, body: bytes) -> None:
    sandbox = RecipientKey.generate()
    challenge = kb.client.challenge(KEY_ID)
    token = _raw_token({"alg": "ES256", "x5c": []}, body)
    _denied(
        kb,
        "EVIDENCE_MALFORMED",
        "EvidenceFormatError",
        lambda: _attest(kb, token, challenge.session_id, sandbox.public_bytes),
    )


def test_non_ascii_measurements_are_refused(kb: Deployment) -> None:
    """A lone surrogate in a validly signed measurement cannot reach the result encoder."""
    sandbox = RecipientKey.generate()
    challenge = kb.client.challenge(KEY_ID)
    head, body, _ = _evidence(kb.attester, challenge.nonce, sandbox.public_bytes).split(".")
    claims = json.loads(b64url_decode(body))
    claims["measurements"]["config"] = "\ud800"
    signing_input = f"{head}.{b64url(json.dumps(claims).encode())}"
    token = f"{signing_input}.{b64url(es256_sign(kb.attester.key, signing_input.encode()))}"
    _denied(
        kb,
        "EVIDENCE_MALFORMED",
        "EvidenceFormatError",
        lambda: _attest(kb, token, challenge.session_id, sandbox.public_bytes),
    )


def test_key_material_stays_out_of_reprs(kb: Deployment) -> None:
    released = obtain_content_key(
        kb.client,
        kb.attester,
        key_id=KEY_ID,
        measurements=MEASUREMENTS,
        result_key=kb.result_key,
        clock=kb.clock,
    )
    assert repr(CONTENT_KEY) not in repr(released)
    assert repr(CONTENT_KEY) not in repr(ContentKey(KEY_ID, MODEL_ID, CONTENT_KEY))


# --- one EAR, one identity in the log ------------------------------------------------------


def _malleated(token: str, how: str) -> str:
    """A copy of ``token`` that a lenient verifier reads as the same signed result."""
    head, body, sig = token.split(".")
    if how == "inserted-characters":
        return f"{head}.{body}.{sig[:40]}!!!!{sig[40:]}"
    if how == "trailing-bits":  # 64 bytes end in 4 unused bits; set the lowest
        alphabet = string.ascii_uppercase + string.ascii_lowercase + string.digits + "-_"
        return f"{head}.{body}.{sig[:-1]}{alphabet[alphabet.index(sig[-1]) ^ 1]}"
    raw = b64url_decode(sig)  # "high-s": (r, n - s) verifies under plain ECDSA too
    s = ec.SECP256R1.group_order - int.from_bytes(raw[32:], "big")
    return f"{head}.{body}.{b64url(raw[:32] + s.to_bytes(32, 'big'))}"


@pytest.mark.parametrize("how", ["inserted-characters", "trailing-bits", "high-s"])
def test_an_altered_copy_of_an_ear_presented_to_release_keeps_the_audit_clean(
    kb: Deployment, tmp_path: Path, how: str
) -> None:
    """The log knows an EAR by the SHA-256 of its text. A node that presented an altered
    copy of its own affirming EAR, had it verified, would get a key released under an
    EAR no appraisal names, and ``ark audit verify`` would report the provider."""
    token = _affirming_result(kb)
    altered = _malleated(token, how)
    assert sha256_hex(altered.encode()) != sha256_hex(token.encode())
    _denied(
        kb,
        "RESULT_INVALID",
        "ResultInvalid",
        lambda: kb.client.release(attestation_result=altered, key_id=KEY_ID),
    )
    assert kb.client.release(attestation_result=token, key_id=KEY_ID).wrapped_key

    events = [event.to_json() for event in kb.events.events]
    assert check_policy(events) == []
    signer = new_signer()
    build_log(tmp_path / "translog.db", events, signer).close()
    (tmp_path / "log.vkey").write_text(signer.verifier.vkey() + "\n", encoding="utf-8")
    audit = CliRunner().invoke(
        app,
        [
            "audit",
            "verify",
            "--log",
            str(tmp_path / "translog.db"),
            "--key",
            str(tmp_path / "log.vkey"),
        ],
    )
    assert audit.exit_code == 0, audit.output
    assert "ok: Policy across events" in audit.output
    # Negative control: the release the altered copy would have bought is a violation.
    bought = {**events[-1], "ear_sha256": sha256_hex(altered.encode())}
    assert [type(v) for v in check_policy([*events, bought])] == [ReleaseWithoutAppraisal]


# --- channel keys of small order -------------------------------------------------------------


@pytest.mark.parametrize("purpose", [PURPOSE_CHANNEL, PURPOSE_KEY_RELEASE])
@pytest.mark.parametrize(
    ("suite", "u"),
    [(SUITE_X25519, 0), (SUITE_X25519, 2**255 - 20), (SUITE_MLKEM768_X25519, 1)],
    ids=["zero", "p-1", "hybrid-one"],
)
def test_a_small_order_key_is_neither_certified_nor_sent_a_key(
    kb: Deployment, purpose: str, suite: str, u: int
) -> None:
    """Honest evidence binding a key whose shared secrets are all zeros: the broker
    certifies nothing (the aggregator would seal to it) and releases nothing."""
    key = RecipientKey.generate(suite).public_bytes[:-32] + u.to_bytes(32, "little")
    challenge = kb.client.challenge(KEY_ID)
    token = _evidence(kb.attester, challenge.nonce, key)
    _denied(
        kb,
        "BAD_REQUEST",
        "BadRequest",
        lambda: _attest(kb, token, challenge.session_id, key, suite=suite, purpose=purpose),
    )
    assert kb.events.kinds() == ["key_denied"], "refused as a request, before any appraisal"


# --- signing keys (held-out commitments and scorecards) ---------------------------------


def _certify_signing(kb: Deployment, transport: KeyBrokerTransport, key: Ed25519PrivateKey) -> Any:
    return certify_signing_key(
        transport,
        kb.attester,
        key.public_key(),
        key_id=KEY_ID,
        measurements=MEASUREMENTS,
        result_key=kb.result_key,
        clock=kb.clock,
    )


def test_a_signing_key_is_certified_logged_by_its_digest_and_releases_nothing(
    kb: Deployment,
) -> None:
    """A sandbox's Ed25519 key is certified for signing: the log names it by its digest,
    so the auditor accepts what it signs, and its result is never traded for a key."""
    key = Ed25519PrivateKey.generate()
    raw = key.public_key().public_bytes_raw()
    result = _certify_signing(kb, kb.client, key)
    assert (result.purpose, result.hpke_suite, result.tee_pubkey) == (
        PURPOSE_SIGNING,
        SIGNING_SUITE,
        raw,
    )
    assert kb.events.kinds() == ["attestation_appraised", "channel_certified"]
    certified = kb.events.events[-1].fields
    assert certified["purpose"] == PURPOSE_SIGNING
    assert certified["tee_pubkey_sha256"] == sha256_hex(raw) == signer_sha256(key.public_key())
    assert (certified["ueid"], certified["ear_sha256"]) == ("node-1", result.digest)
    # What the certified key signs in node-1's name passes the audit after this log.
    root, count = heldout_set("node-1")
    commitment = Commitment(comparison="cmp-1", ueid="node-1", root=root, count=count)
    card = dataclasses.replace(scorecard("node-1", MODEL_ID, run=7), ueid="node-1")
    comparison = [
        ComparisonStarted(
            time=NOW,
            comparison="cmp-1",
            task="sequence-classification",
            models=[ComparedModel(model_id=MODEL_ID, manifest_sha256=digest("manifest", MODEL_ID))],
        ).to_json(),
        HeldoutCommitted(
            time=NOW,
            run=7,
            job="demo",
            node=1,
            comparison="cmp-1",
            commitment=sign_commitment(key, commitment),
        ).to_json(),
        scored(1, card, key),
        ComparisonFinished(time=NOW, comparison="cmp-1", runs={MODEL_ID: 7}).to_json(),
    ]
    assert check_policy([e.to_json() for e in kb.events.events] + comparison) == []
    assert [type(v).__name__ for v in check_policy(comparison)] == ["ScorecardUnattested"] * 2
    _denied(
        kb,
        "RESULT_INVALID",
        "ResultInvalid",
        lambda: kb.client.release(attestation_result=result.token, key_id=KEY_ID),
    )


def test_the_in_process_transport_certifies_a_signing_key_as_the_grpc_service(
    kb: Deployment,
) -> None:
    answers = []
    for transport in (kb.client, InProcessTransport(kb.broker)):
        result = _certify_signing(kb, transport, Ed25519PrivateKey.generate())
        with pytest.raises(KeyReleaseDenied) as caught:
            transport.release(attestation_result=result.token, key_id=KEY_ID)
        answers.append((result.purpose, result.hpke_suite, caught.value.code))
    assert answers == [(PURPOSE_SIGNING, SIGNING_SUITE, "RESULT_INVALID")] * 2
    assert kb.events.kinds().count("channel_certified") == 2


_ED25519 = Ed25519PrivateKey.from_private_bytes(bytes(32)).public_key().public_bytes_raw()


@pytest.mark.parametrize(
    ("tee_pubkey", "suite", "purpose"),
    [
        (_ED25519[:31], SIGNING_SUITE, PURPOSE_SIGNING),
        (_ED25519 + b"\0", SIGNING_SUITE, PURPOSE_SIGNING),
        (bytes([1]) + bytes(31), SIGNING_SUITE, PURPOSE_SIGNING),
        (bytes([0xEE]) + b"\xff" * 30 + bytes([0x7F]), SIGNING_SUITE, PURPOSE_SIGNING),
        (RecipientKey.generate().public_bytes, SUITE_X25519, PURPOSE_SIGNING),
        (RecipientKey.generate(SUITE_MLKEM768_X25519).public_bytes, SIGNING_SUITE, PURPOSE_SIGNING),
        (_ED25519, SIGNING_SUITE, PURPOSE_CHANNEL),
        (_ED25519, SIGNING_SUITE, PURPOSE_KEY_RELEASE),
    ],
    ids=[
        "31 bytes",
        "33 bytes",
        "identity (small order)",
        "y = p + 1 (not canonical)",
        "an X25519 key under its HPKE suite",
        "an ML-KEM hybrid key",
        "an Ed25519 key for a channel",
        "an Ed25519 key for a key release",
    ],
)
def test_a_key_that_is_not_ed25519_is_never_certified_for_signing(
    kb: Deployment, tee_pubkey: bytes, suite: str, purpose: str
) -> None:
    """Honest evidence binding the key, but the key is not a usable Ed25519 key (or an
    Ed25519 key is presented for an HPKE purpose): refused before appraisal."""
    challenge = kb.client.challenge(KEY_ID)
    token = _evidence(kb.attester, challenge.nonce, tee_pubkey)
    _denied(
        kb,
        "BAD_REQUEST",
        "BadRequest",
        lambda: _attest(kb, token, challenge.session_id, tee_pubkey, suite=suite, purpose=purpose),
    )
    assert kb.events.kinds() == ["key_denied"], "refused as a request, before any appraisal"


# --- floods: sessions and denials ------------------------------------------------------


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@dataclasses.dataclass
class TwoPeers:
    """A broker on every loopback address, logging to a transparency log: ``kb.client``
    connects from 127.0.0.1 (the flooder) and ``honest`` from ::1, another client."""

    kb: Deployment
    honest: KeyBrokerClient
    log: LogStore

    def release(self, client: KeyBrokerClient, key_id: str = KEY_ID) -> bytes:
        return obtain_content_key(
            client,
            self.kb.attester,
            key_id=key_id,
            measurements=MEASUREMENTS,
            result_key=self.kb.result_key,
            clock=self.kb.clock,
        ).content_key

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(entry) for entry in self.log.entries(0, self.log.size())]

    def kinds(self) -> list[str]:
        return [record["kind"] for record in self.records()]


@contextlib.contextmanager
def _two_peers(
    tmp_path: Path, tls: TlsFiles, maker: DevManufacturer, limits: Limits
) -> Iterator[TwoPeers]:
    if not _ipv6_loopback():
        pytest.skip("needs IPv6 loopback: the second client connects from ::1")
    log = LogStore(tmp_path / "translog.db", durable=False)
    deployment, server = _deploy(
        tmp_path, tls, maker, POLICY, limits=limits, log=log, address="[::]:0", host="127.0.0.1"
    )
    port = deployment.client.address.rsplit(":", 1)[1]
    honest = KeyBrokerClient(f"[::1]:{port}", ca_cert=tls.ca_cert, timeout=10)
    try:
        yield TwoPeers(deployment, honest, log)
    finally:
        honest.close()
        deployment.client.close()
        server.stop(grace=None)
        log.close()


def _bogus_attest(client: KeyBrokerTransport, **fields: Any) -> KeyReleaseDenied:
    """An attest for a session that was never issued; returns the denial."""
    request: dict[str, Any] = {
        "session_id": "never-issued",
        "tee": "stub",
        "evidence": "x.y.z",
        "tee_pubkey": bytes(32),
        "hpke_suite": SUITE_X25519,
        "key_id": KEY_ID,
        **fields,
    }
    with pytest.raises(KeyReleaseDenied) as caught:
        client.attest(**request)
    return caught.value


@pytest.mark.parametrize(
    ("peer", "client"),
    [
        ("ipv4:127.0.0.1:50123", "127.0.0.1"),
        ("ipv6:[::1]:50123", "::/64"),
        ("ipv6:%5B2001:db8:1:2:aa::7%5D:443", "2001:db8:1:2::/64"),
        ("ipv6:[::ffff:10.0.0.8]:9", "10.0.0.8"),
        ("unix:/run/ark.sock", "unix"),
        ("ipv4:not-an-address:1", "ipv4"),
    ],
)
def test_a_client_is_its_address_without_the_port(peer: str, client: str) -> None:
    assert client_of(peer) == client


def test_limits_are_validated() -> None:
    with pytest.raises(ConfigError, match="sessions_per_client"):
        Limits(sessions_per_client=0)
    with pytest.raises(ConfigError, match="open_sessions 8"):
        Limits(open_sessions=8, sessions_per_client=9)
    with pytest.raises(ConfigError, match="window"):
        Limits(window=dt.timedelta(0))


def test_a_challenge_flood_from_one_peer_does_not_lock_out_an_honest_node(
    tmp_path: Path, tls: TlsFiles, maker: DevManufacturer
) -> None:
    """Finding: 10,000 challenges filled the one shared session table. Now a client
    holds at most its cap, and its flood only evicts its own oldest sessions."""
    limits = Limits(open_sessions=16, sessions_per_client=4)
    with _two_peers(tmp_path, tls, maker, limits) as peers:
        kb, table = peers.kb, peers.kb.broker._sessions
        sandbox = RecipientKey.generate()
        pending = peers.honest.challenge(KEY_ID)  # opened before the flood, used after it
        first = kb.client.challenge(KEY_ID)
        for _ in range(10 * limits.sessions_per_client):
            last = kb.client.challenge(KEY_ID)
        assert table.held_by("127.0.0.1") == limits.sessions_per_client
        assert len(table) == limits.sessions_per_client + 1

        token = _evidence(kb.attester, pending.nonce, sandbox.public_bytes)
        released = _attest(kb, token, pending.session_id, sandbox.public_bytes, client=peers.honest)
        assert released.wrapped_key
        assert peers.release(peers.honest) == CONTENT_KEY
        # The flooder's own oldest session went first; its newest still works.
        stale = _evidence(kb.attester, first.nonce, sandbox.public_bytes)
        with pytest.raises(KeyReleaseDenied, match="SESSION_UNKNOWN"):
            _attest(kb, stale, first.session_id, sandbox.public_bytes)
        fresh = _evidence(kb.attester, last.nonce, sandbox.public_bytes)
        assert _attest(kb, fresh, last.session_id, sandbox.public_bytes).wrapped_key


def test_a_flood_on_one_public_key_id_does_not_lock_out_another(
    tmp_path: Path, tls: TlsFiles, maker: DevManufacturer
) -> None:
    """A full table takes the slot from the key id holding the most: a flood on one key
    id (here one peer may hold the whole table) displaces only that key id's sessions."""
    limits = Limits(open_sessions=8, sessions_per_client=8)
    with _two_peers(tmp_path, tls, maker, limits) as peers:
        kb, table = peers.kb, peers.kb.broker._sessions
        sandbox = RecipientKey.generate()
        other = peers.honest.challenge(OTHER_KEY_ID)
        for _ in range(100):
            kb.client.challenge(KEY_ID)
        assert len(table) == limits.open_sessions
        assert table.held_for(OTHER_KEY_ID) == 1
        token = _evidence(kb.attester, other.nonce, sandbox.public_bytes)
        released = _attest(
            kb,
            token,
            other.session_id,
            sandbox.public_bytes,
            client=peers.honest,
            key_id=OTHER_KEY_ID,
        )
        assert released.key_id == OTHER_KEY_ID
        # Other peers still get sessions on the flooded key id: the table never refuses.
        assert peers.release(peers.honest) == CONTENT_KEY


def test_a_denial_with_oversized_fields_reaches_the_log_hashed_and_bounded(
    tmp_path: Path, tls: TlsFiles, maker: DevManufacturer
) -> None:
    """Finding: a denial copied request fields of up to 64 KiB each, so one over the
    log's entry limit reached events.jsonl but never translog.db."""
    big = 70_000
    with _two_peers(tmp_path, tls, maker, DEFAULT_LIMITS) as peers:
        kb = peers.kb
        fields = {"session_id": "s" * big, "tee": "t" * big, "key_id": "k" * big}
        assert _bogus_attest(kb.client, **fields).code == "SESSION_UNKNOWN"
        # A live session with an oversized TEE kind: refused before any appraisal.
        challenge = kb.client.challenge(KEY_ID)
        refused = _bogus_attest(kb.client, session_id=challenge.session_id, tee="t" * big)
        assert refused.code == "TEE_NOT_ACCEPTED"
        with pytest.raises(KeyReleaseDenied, match="UNKNOWN_KEY"):
            kb.client.challenge("k" * big)

        entries = peers.log.entries(0, peers.log.size())
        assert [json.loads(e)["kind"] for e in entries] == ["key_denied"] * 3
        assert all(len(entry) < 2048 < MAX_ENTRY_BYTES for entry in entries)
        assert not any(b"s" * 100 in e or b"t" * 100 in e or b"k" * 100 in e for e in entries)
        first, second, third = (json.loads(e) for e in entries)
        assert first["request"]["session"] == {
            "bytes": big,
            "sha256": hashlib.sha256(b"s" * big).hexdigest(),
        }
        assert first["request"]["tee"]["bytes"] == first["request"]["key_id"]["bytes"] == big
        assert not {"session", "key_id", "tee"} & set(first), "only values the broker holds"
        assert second["session"] == challenge.session_id
        assert second["key_id"] == KEY_ID
        assert second["cause"] == "TeeNotAccepted"
        assert "tee" not in second
        assert third["request"] == {
            "key_id": {"bytes": big, "sha256": hashlib.sha256(b"k" * big).hexdigest()}
        }
        # The fixture the auditor's tests use carries these fields (and a known TEE kind).
        assert set(second) | {"tee"} == set(denial("s", "TEE_NOT_ACCEPTED", "TeeNotAccepted"))


def test_a_denial_flood_is_summarised_and_the_log_still_audits(
    tmp_path: Path, tls: TlsFiles, maker: DevManufacturer
) -> None:
    """Finding: every bogus Attest appended an entry, enough to outgrow --max-entries.
    Now a client's denials past its budget are answered RATE_LIMITED and counted into
    one summary per window."""
    limits = Limits(denials_per_client=5)
    flood = 40
    with _two_peers(tmp_path, tls, maker, limits) as peers:
        kb = peers.kb
        codes = [_bogus_attest(kb.client).code for _ in range(flood)]
        assert codes == ["SESSION_UNKNOWN"] * 5 + ["RATE_LIMITED"] * (flood - 5)
        with pytest.raises(KeyReleaseDenied, match="RATE_LIMITED"):
            kb.client.challenge("no-such-key")  # an unknown key id is a denial too
        # Only denials are limited: an honest node behind the flooder's address (one
        # NAT) still gets its key, and so does another client.
        assert peers.release(kb.client) == CONTENT_KEY
        assert peers.release(peers.honest) == CONTENT_KEY
        assert peers.kinds().count("key_denied") == 5
        assert "denials_rate_limited" not in peers.kinds()

        kb.clock.now = NOW + limits.window  # the window ends; the next call summarises it
        assert _bogus_attest(kb.client).code == "SESSION_UNKNOWN"
        records = peers.records()
        summaries = [r for r in records if r["kind"] == "denials_rate_limited"]
        assert len(summaries) == 1
        summary = summaries[0]
        denied = [r for r in records if r["kind"] == "key_denied"]
        assert summary["scope"] == "client"
        assert summary["client"] == denied[0]["client"], "one pseudonym per client"
        assert "127.0.0.1" not in json.dumps(records)
        assert summary["logged"] == 5
        assert summary["suppressed"] == flood - 5 + 1
        assert summary["codes"] == {"SESSION_UNKNOWN": flood - 5, "UNKNOWN_KEY": 1}
        assert summary["window_start"] == NOW.isoformat()
        assert summary["window_end"] == (NOW + limits.window).isoformat()
        assert set(summary) == set(denials_rate_limited())

        # At most the budget, its summary and the honest entries: the audit passes.
        honest_entries = 4  # two appraisals, two releases
        assert len(records) == 5 + 1 + honest_entries + 1
        signer = new_signer()
        peers.log.sign_checkpoint(signer)
        audit = verify_log(peers.log, signer.verifier, max_entries=len(records))
        assert audit, audit.violations


def test_a_flood_from_many_clients_is_bounded_by_the_shared_budget(
    tmp_path: Path, tls: TlsFiles, maker: DevManufacturer
) -> None:
    """Addresses are cheap for some attackers: past ``denials_in_all`` in a window, the
    denials of every client are counted into one shared summary."""
    limits = Limits(denials_per_client=4, denials_in_all=6)
    with _two_peers(tmp_path, tls, maker, limits) as peers:
        kb = peers.kb
        flooder = [_bogus_attest(kb.client).code for _ in range(10)]
        other = [_bogus_attest(peers.honest).code for _ in range(5)]
        assert flooder == ["SESSION_UNKNOWN"] * 4 + ["RATE_LIMITED"] * 6
        assert other == ["SESSION_UNKNOWN"] * 2 + ["RATE_LIMITED"] * 3
        kb.broker.flush()  # as on shutdown: the open windows are summarised now
        summaries = [r for r in peers.records() if r["kind"] == "denials_rate_limited"]
        assert sorted((s["scope"], s["suppressed"]) for s in summaries) == [
            ("all", 3),
            ("client", 6),
        ]
        assert peers.kinds().count("key_denied") == limits.denials_in_all
        signer = new_signer()
        peers.log.sign_checkpoint(signer)
        assert verify_log(peers.log, signer.verifier, max_entries=limits.denials_in_all + 2)
