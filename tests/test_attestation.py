"""Stub attester and verifier: the positive path and one test per attack on evidence."""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import json
import re
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, hmac, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from sandbox import canonical
from sandbox.attestation.evidence import b64url, b64url_decode, encode_jws, es256_sign
from sandbox.attestation.result import (
    AFFIRMING,
    PURPOSE_CHANNEL,
    AttestationResult,
    ResultContext,
    ResultSigner,
    verify_result,
)
from sandbox.attestation.stub import DevManufacturer, StubAttester
from sandbox.attestation.verifier import AppraisalPolicy, Verifier
from sandbox.errors import (
    AttestationError,
    ChainUntrusted,
    ConfigError,
    DebugEnabled,
    EvidenceFormatError,
    MeasurementRejected,
    NonceMismatch,
    ReportDataMismatch,
    ResultInvalid,
    SignatureInvalid,
    TeeNotAccepted,
)
from sandbox.seal.envelope import SUITE_X25519, RecipientKey

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
CODE = "ab" * 32
CONFIG = "cd" * 32
NONCE = bytes(range(32))
TEE_KEY = b"\x04" + bytes(64)
POLICY = AppraisalPolicy(
    policy_id="test-policy/1",
    accepted_tees=frozenset({"stub"}),
    allow_stub=True,
    reference_values={"code": frozenset({CODE}), "config": frozenset({CONFIG})},
)


@dataclasses.dataclass
class World:
    maker: DevManufacturer
    attester: StubAttester
    verifier: Verifier


def _attester(maker: DevManufacturer, **changes: Any) -> StubAttester:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = maker.certify(key.public_key(), "node-1", now=NOW)
    return dataclasses.replace(StubAttester(key=key, chain=[cert], ueid="node-1"), **changes)


@pytest.fixture(scope="module")
def world() -> World:
    maker = DevManufacturer.create(now=NOW)
    return World(maker, _attester(maker), Verifier({"stub": [maker.certificate]}))


def _evidence(attester: StubAttester, **kwargs: Any) -> str:
    values: dict[str, Any] = {
        "nonce": NONCE,
        "tee_pubkey": TEE_KEY,
        "measurements": {"code": CODE, "config": CONFIG},
        "now": NOW,
    }
    values.update(kwargs)
    return attester.evidence(**values)


def _appraise(world: World, token: str, **kwargs: Any) -> Any:
    values: dict[str, Any] = {"nonce": NONCE, "tee_pubkey": TEE_KEY, "policy": POLICY, "now": NOW}
    values.update(kwargs)
    return world.verifier.appraise(token, **values)


def test_valid_stub_evidence_is_affirmed_and_says_stub(world: World) -> None:
    appraisal = _appraise(world, _evidence(world.attester))
    assert appraisal.is_stub
    assert appraisal.policy_id == "test-policy/1"
    assert appraisal.claims["measurements"] == {"code": CODE, "config": CONFIG}


def test_replayed_evidence_after_a_new_challenge(world: World) -> None:
    old = _evidence(world.attester, nonce=NONCE)
    with pytest.raises(NonceMismatch):
        _appraise(world, old, nonce=bytes(reversed(NONCE)))


def test_nonce_shorter_than_8_bytes(world: World) -> None:
    with pytest.raises(NonceMismatch, match="shorter than 8"):
        _appraise(world, _evidence(world.attester, nonce=b"short"), nonce=b"short")


def test_swapped_tee_pubkey_breaks_report_data(world: World) -> None:
    with pytest.raises(ReportDataMismatch):
        _appraise(world, _evidence(world.attester), tee_pubkey=b"\x04" + bytes(63) + b"\x01")


def test_modified_client_code_is_rejected(world: World) -> None:
    token = _evidence(world.attester, measurements={"code": "ee" * 32, "config": CONFIG})
    with pytest.raises(MeasurementRejected, match="'code'"):
        _appraise(world, token)


@pytest.mark.parametrize("dbgstat", ["enabled", None])
def test_debug_enabled_or_absent(world: World, dbgstat: str | None) -> None:
    attester = dataclasses.replace(world.attester, dbgstat=dbgstat)
    with pytest.raises(DebugEnabled):
        _appraise(world, _evidence(attester))


def test_bad_signature(world: World) -> None:
    head, body, sig = _evidence(world.attester).split(".")
    raw = bytearray(b64url_decode(sig))
    raw[5] ^= 1
    with pytest.raises(SignatureInvalid):
        _appraise(world, f"{head}.{body}.{b64url(bytes(raw))}")


def test_claims_edited_after_signing(world: World) -> None:
    head, body, sig = _evidence(world.attester).split(".")
    claims = json.loads(b64url_decode(body))
    # Re-encoding unchanged claims the signer's way keeps the signature valid ...
    assert b64url(canonical.dumps(claims)) == body
    claims["swversion"] = "9.9.9"
    # ... so it is the edit, not the encoding, that the verifier catches.
    with pytest.raises(SignatureInvalid):
        _appraise(world, f"{head}.{b64url(canonical.dumps(claims))}.{sig}")


def _resigned(world: World, header_change: dict[str, Any], sign: Any) -> str:
    """Evidence re-signed by ``sign`` under a changed header (a None value drops the name)."""
    head, body, _ = _evidence(world.attester).split(".")
    header = {**json.loads(b64url_decode(head)), **header_change}
    header = {name: value for name, value in header.items() if value is not None}
    return encode_jws(header, json.loads(b64url_decode(body)), sign)


def test_alg_none(world: World) -> None:
    with pytest.raises(EvidenceFormatError, match="alg"):
        _appraise(world, _resigned(world, {"alg": "none"}, lambda data: b""))


def test_alg_hs256_keyed_with_the_public_key(world: World) -> None:
    public_pem = (
        world.attester.chain[0]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )

    def hs256(data: bytes) -> bytes:
        mac = hmac.HMAC(public_pem, hashes.SHA256())
        mac.update(data)
        return mac.finalize()

    with pytest.raises(EvidenceFormatError, match="alg"):
        _appraise(world, _resigned(world, {"alg": "HS256"}, hs256))


def test_self_asserted_key_without_chain(world: World) -> None:
    key = world.attester.key
    with pytest.raises(ChainUntrusted, match="no x5c"):
        _appraise(world, _resigned(world, {"x5c": []}, lambda data: es256_sign(key, data)))


def test_chain_to_an_untrusted_root(world: World) -> None:
    rogue = DevManufacturer.create(now=NOW)
    with pytest.raises(ChainUntrusted, match="trusted root"):
        _appraise(world, _evidence(_attester(rogue)))


def test_self_signed_leaf_is_not_a_root(world: World) -> None:
    rogue = DevManufacturer.create(now=NOW)
    attester = StubAttester(key=rogue.key, chain=[rogue.certificate], ueid="rogue")
    with pytest.raises(ChainUntrusted):
        _appraise(world, _evidence(attester))


def test_expired_attestation_certificate(world: World) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    old = NOW - dt.timedelta(days=400)
    cert = world.maker.certify(key.public_key(), "node-1", now=old, valid_days=30)
    attester = StubAttester(key=key, chain=[cert], ueid="node-1")
    with pytest.raises(ChainUntrusted, match="expired"):
        _appraise(world, _evidence(attester))


def test_stub_evidence_when_policy_disallows_stubs(world: World) -> None:
    strict = dataclasses.replace(POLICY, allow_stub=False)
    with pytest.raises(TeeNotAccepted, match="does not allow stubs"):
        _appraise(world, _evidence(world.attester), policy=strict)


def test_tee_kind_not_accepted(world: World) -> None:
    tdx_only = dataclasses.replace(POLICY, accepted_tees=frozenset({"tdx"}))
    with pytest.raises(TeeNotAccepted, match="'stub'"):
        _appraise(world, _evidence(world.attester), policy=tdx_only)


@pytest.mark.parametrize("token", ["", "a.b", "not.base64!.x", "e30.e30.AA"])
def test_garbage_is_a_format_error(world: World, token: str) -> None:
    with pytest.raises(EvidenceFormatError):
        _appraise(world, token)


def test_every_failure_is_an_attestation_error() -> None:
    for error in (
        ChainUntrusted,
        DebugEnabled,
        EvidenceFormatError,
        MeasurementRejected,
        NonceMismatch,
        ReportDataMismatch,
        SignatureInvalid,
        TeeNotAccepted,
    ):
        assert issubclass(error, AttestationError)


def test_policy_file_round_trip_and_errors(tmp_path: Path) -> None:
    path = tmp_path / "policy.toml"
    path.write_text(
        '[policy]\nid = "p/1"\naccepted-tees = ["stub"]\nallow-stub = true\n'
        f'[policy.reference-values]\ncode = ["{CODE.upper()}"]\n'
    )
    policy = AppraisalPolicy.load(path)
    assert policy.reference_values == {"code": frozenset({CODE})}
    assert policy.allow_stub
    path.write_text('[policy]\nid = "p/1"\naccepted-tees = ["stub"]\nallow-stub = "yes"\n')
    with pytest.raises(ConfigError, match=r"policy\.toml: key 'policy\.allow-stub'.*'yes'"):
        AppraisalPolicy.load(path)
    path.write_text(
        '[policy]\nid = "p/1"\naccepted-tees = ["stub"]\n[policy.reference-values]\ncode = ["zz"]\n'
    )
    with pytest.raises(ConfigError, match=r"key 'policy\.reference-values\.code'"):
        AppraisalPolicy.load(path)


def test_x5c_is_standard_base64_der(world: World) -> None:
    head = _evidence(world.attester).split(".")[0]
    x5c = json.loads(b64url_decode(head))["x5c"]
    der = world.attester.chain[0].public_bytes(serialization.Encoding.DER)
    assert base64.b64decode(x5c[0]) == der


def test_stub_key_cannot_claim_to_be_real_hardware(world: World) -> None:
    tdx_policy = AppraisalPolicy("tdx/1", frozenset({"tdx"}), False, {})
    verifier = Verifier({"stub": [world.maker.certificate], "tdx": []})
    forged = dataclasses.replace(world.attester, extra_claims={"tee": "tdx", "hwmodel": "intel"})
    with pytest.raises(TeeNotAccepted, match="certified by a 'stub' root"):
        verifier.appraise(
            _evidence(forged), nonce=NONCE, tee_pubkey=TEE_KEY, policy=tdx_policy, now=NOW
        )


def test_stub_evidence_claiming_another_hardware_model(world: World) -> None:
    forged = dataclasses.replace(world.attester, extra_claims={"hwmodel": "intel-tdx"})
    with pytest.raises(TeeNotAccepted, match="hardware model"):
        _appraise(world, _evidence(forged))


def test_node_key_cannot_claim_another_ueid(world: World) -> None:
    spoof = dataclasses.replace(world.attester, ueid="node-99")
    with pytest.raises(ChainUntrusted, match="ueid"):
        _appraise(world, _evidence(spoof))


@pytest.mark.parametrize(
    "claims",
    [
        {"tee": ["stub"]},
        {"dbgstat": ["disabled"]},
        {"report_data": "é" * 96},
        {"measurements": ["code"]},
        {"measurements": {"code": 1}},
        {"iat": "yesterday"},
        {"iat": 2**52},
        {"iat": int(NOW.timestamp()) + 3600},
    ],
    ids=[
        "tee-list",
        "dbgstat-list",
        "non-ascii-report-data",
        "measurements-list",
        "measurement-int",
        "iat-string",
        "iat-overflow",
        "iat-future",
    ],
)
def test_hostile_claim_types_are_format_errors(world: World, claims: dict[str, Any]) -> None:
    dbgstat = None if "dbgstat" in claims else world.attester.dbgstat
    hostile = dataclasses.replace(world.attester, extra_claims=claims, dbgstat=dbgstat)
    with pytest.raises(EvidenceFormatError):
        _appraise(world, _evidence(hostile))


# --- one encoding per token ------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["QUJD!!!!", "QU!!!!JD", "QUJD====", "QUI=", "QUJ", "Q", "QU+/", "QUJD\n", " QUJD", "ＱＵＪＤ"],
    ids=[
        "appended-bang",
        "inserted-bang",
        "padding",
        "one-pad",
        "trailing-bits",
        "one-char",
        "std-alphabet",
        "newline",
        "space",
        "fullwidth",
    ],
)
def test_b64url_decoding_is_strict(text: str) -> None:
    with pytest.raises(EvidenceFormatError, match="field x"):
        b64url_decode(text, "field x")


def test_b64url_round_trips_every_length() -> None:
    for size in range(40):
        data = bytes(range(size))
        assert b64url_decode(b64url(data)) == data


def _high_s(signature_b64: str) -> str:
    """The same ES256 signature as (r, n - s): a second signature ECDSA also accepts."""
    raw = b64url_decode(signature_b64)
    s = int.from_bytes(raw[32:], "big")
    return b64url(raw[:32] + (ec.SECP256R1.group_order - s).to_bytes(32, "big"))


def test_signatures_are_made_with_low_s_only() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    for i in range(32):  # half of raw ECDSA signatures have a high S
        s = int.from_bytes(es256_sign(key, bytes([i]))[32:], "big")
        assert s <= ec.SECP256R1.group_order // 2


def test_evidence_with_characters_inserted_into_its_signature(world: World) -> None:
    head, body, sig = _evidence(world.attester).split(".")
    with pytest.raises(EvidenceFormatError, match="JWS signature"):
        _appraise(world, f"{head}.{body}.{sig[:20]}!!!!{sig[20:]}")


def test_evidence_with_a_high_s_signature(world: World) -> None:
    head, body, sig = _evidence(world.attester).split(".")
    _appraise(world, f"{head}.{body}.{sig}")
    with pytest.raises(SignatureInvalid, match="high S"):
        _appraise(world, f"{head}.{body}.{_high_s(sig)}")


# --- headers and profile the verifier does not know ---------------------------------------


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"typ": "JWT"}, "'typ'"),
        ({"typ": None}, "'typ'"),
        ({"crit": ["exp"]}, "'crit'"),
        ({"crit": []}, "'crit'"),
    ],
    ids=["typ-jwt", "typ-absent", "crit", "crit-empty"],
)
def test_unknown_typ_or_any_crit_header_is_refused(
    world: World, change: dict[str, Any], named: str
) -> None:
    key = world.attester.key
    token = _resigned(world, change, lambda data: es256_sign(key, data))
    with pytest.raises(EvidenceFormatError, match=named):
        _appraise(world, token)


def test_unknown_eat_profile_is_refused(world: World) -> None:
    other = dataclasses.replace(world.attester, extra_claims={"eat_profile": "tag:other,2026:x"})
    with pytest.raises(EvidenceFormatError, match="'eat_profile'"):
        _appraise(world, _evidence(other))


@pytest.mark.parametrize(
    "body",
    [b'{"iat": 1, "iat": 2}', b'{"iat": NaN}', b'{"iat": Infinity}'],
    ids=["duplicate-name", "nan", "infinity"],
)
def test_claims_that_two_json_readers_could_read_apart(world: World, body: bytes) -> None:
    head = _evidence(world.attester).split(".")[0]
    with pytest.raises(EvidenceFormatError, match="not JSON"):
        _appraise(world, _signed(world.attester.key, head, body))


def _signed(key: ec.EllipticCurvePrivateKey, head: str, body: bytes) -> str:
    """A compact JWS over the encoded header ``head`` and the raw claims text ``body``."""
    signing_input = f"{head}.{b64url(body)}"
    return f"{signing_input}.{b64url(es256_sign(key, signing_input.encode()))}"


# --- attestation results (EARs): one encoding, a checked shape ------------------------------

EAR_SIGNER = ResultSigner(ec.generate_private_key(ec.SECP256R1()), {"developer": "test"})
EAR_KEY = EAR_SIGNER.key.public_key()
CHANNEL_KEY = RecipientKey.generate().public_bytes


def _ear(world: World) -> AttestationResult:
    """An affirming channel EAR for honest evidence, as the key broker signs it."""
    evidence = _evidence(world.attester, tee_pubkey=CHANNEL_KEY)
    appraisal = _appraise(world, evidence, tee_pubkey=CHANNEL_KEY)
    context = ResultContext(
        "session-1",
        "stub",
        CHANNEL_KEY,
        SUITE_X25519,
        evidence,
        POLICY.policy_id,
        POLICY.digest,
        PURPOSE_CHANNEL,
    )
    return EAR_SIGNER.affirm(appraisal, context, now=NOW)


def _resigned_ear(claims: dict[str, Any], header: dict[str, Any] | None = None) -> str:
    """``claims`` signed by the result key, as plain JSON (JCS refuses huge integers)."""
    header = {"alg": "ES256", "typ": "JWT"} if header is None else header
    return _signed(EAR_SIGNER.key, b64url(json.dumps(header).encode()), json.dumps(claims).encode())


def test_an_ear_reads_back_whole(world: World) -> None:
    result = verify_result(_ear(world).token, EAR_KEY, now=NOW)
    assert (result.status, result.purpose, result.tee_pubkey) == (
        AFFIRMING,
        PURPOSE_CHANNEL,
        CHANNEL_KEY,
    )
    assert (result.is_stub, result.session_id, result.hpke_suite, result.ueid, result.tee) == (
        True,
        "session-1",
        SUITE_X25519,
        "node-1",
        "stub",
    )
    assert result.measurements == {"code": CODE, "config": CONFIG}
    assert result.policy_digest == POLICY.digest
    assert result.expires_at > NOW


@pytest.mark.parametrize(
    "malleate",
    [
        lambda sig: f"{sig[:30]}!!!!{sig[30:]}",
        lambda sig: f"{sig}==",
        lambda sig: _high_s(sig),
    ],
    ids=["inserted-characters", "padded", "high-s"],
)
def test_an_altered_copy_of_an_ear_does_not_verify(world: World, malleate: Any) -> None:
    head, body, sig = _ear(world).token.split(".")
    with pytest.raises(ResultInvalid):
        verify_result(f"{head}.{body}.{malleate(sig)}", EAR_KEY, now=NOW)


@pytest.mark.parametrize(
    ("header", "named"),
    [
        ({"alg": "ES256", "typ": "JWT", "crit": ["exp"]}, "'crit'"),
        ({"alg": "ES256", "typ": "eat+jwt"}, "'typ'"),
        ({"alg": "ES256"}, "'typ'"),
    ],
    ids=["crit", "evidence-typ", "no-typ"],
)
def test_an_ear_with_an_unknown_header_does_not_verify(
    world: World, header: dict[str, Any], named: str
) -> None:
    token = _resigned_ear(_ear(world).claims, header)
    with pytest.raises(ResultInvalid, match=named):
        verify_result(token, EAR_KEY, now=NOW)


_SUBMOD = "submods.ark-sandbox."


@pytest.mark.parametrize(
    ("claim", "value"),
    [
        ("eat_profile", "tag:other,2026:ear"),
        ("exp", "soon"),
        ("exp", True),
        ("exp", 10**30),
        ("exp", 2**70),
        ("ear.verifier-id", "me"),
        ("submods", ["ark-sandbox"]),
        ("submods.ark-sandbox", "affirming"),
        (_SUBMOD + "ear.status", "great"),
        (_SUBMOD + "ear.status", None),
        (_SUBMOD + "ear.trustworthiness-vector", {"executables": "2"}),
        (_SUBMOD + "ear.appraisal-policy-id", 1),
        (_SUBMOD + "ark.stub", "yes"),
        (_SUBMOD + "ark.session", 5),
        (_SUBMOD + "ark.tee", None),
        (_SUBMOD + "ark.tee-pubkey", 7),
        (_SUBMOD + "ark.tee-pubkey", "!!!!"),
        (_SUBMOD + "ark.tee-pubkey", "AB=="),
        (_SUBMOD + "ark.hpke-suite", None),
        (_SUBMOD + "ark.hpke-suite", ["x25519"]),
        (_SUBMOD + "ark.purpose", ["channel"]),
        (_SUBMOD + "ark.purpose", "everything"),
        (_SUBMOD + "ark.ueid", 1),
        (_SUBMOD + "ark.measurements", ["code"]),
        (_SUBMOD + "ark.measurements", {"code": 1}),
        (_SUBMOD + "ark.policy-digest", {}),
    ],
)
def test_an_ear_of_the_wrong_shape_is_invalid_naming_the_claim(
    world: World, claim: str, value: Any
) -> None:
    """Each was once a TypeError, KeyError or OverflowError from an accessor; ``None``
    drops the claim. The signature is the result key's: only the shape is wrong."""
    claims = _ear(world).claims
    *path, name = claim.split(".", 2) if claim.startswith("submods.") else [claim]
    parent = claims
    for step in path:
        parent = parent[step]
    if value is None:
        del parent[name]
    else:
        parent[name] = value
    with pytest.raises(ResultInvalid, match=re.escape(repr(claim))):
        verify_result(_resigned_ear(claims), EAR_KEY, now=NOW)
