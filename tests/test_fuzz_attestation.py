"""Property-based fuzzing of the parsers of another party's attestation bytes.

Evidence (the verifier's entry point), EARs (``verify_result``) and HPKE envelopes and
public keys, each with arbitrary input and with structured mutations of a valid token
(character edits, claims of the wrong JSON type re-signed with the real key so that they
reach the claim checks, deep nesting, huge numbers, lone surrogates). The property is
the one in :mod:`tests.fuzzing`: only ``ArkError`` subclasses escape. Where a parser
accepts, what it returns must be usable without raising either.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import string
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import given
from hypothesis import strategies as st

from sandbox.attestation.evidence import b64url, b64url_decode, es256_sign
from sandbox.attestation.result import (
    PURPOSE_CHANNEL,
    AttestationResult,
    ResultContext,
    ResultSigner,
    verify_result,
)
from sandbox.attestation.stub import DevManufacturer, StubAttester
from sandbox.attestation.verifier import AppraisalPolicy, Verifier
from sandbox.seal.envelope import (
    SUITE_MLKEM768_X25519,
    SUITE_X25519,
    RecipientKey,
    load_public_key,
    open_envelope,
    seal_to,
)
from tests.fuzzing import fuzz_settings, typed_errors_only

NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
NONCE = bytes(range(32))
MEASUREMENTS = {"code": "ab" * 32, "config": "cd" * 32}
POLICY = AppraisalPolicy(
    policy_id="fuzz-policy/1",
    accepted_tees=frozenset({"stub"}),
    allow_stub=True,
    reference_values={name: frozenset({value}) for name, value in MEASUREMENTS.items()},
)
SUITES = [SUITE_X25519, SUITE_MLKEM768_X25519]
CONTEXT: dict[str, str | int] = {"run": "r1", "round": 1, "node": "n1"}
# A value a mutation puts in place of a claim: "delete" drops the claim instead.
DELETE = "delete"


@dataclasses.dataclass(frozen=True)
class Tokens:
    """A verifier, a result key, and one valid token of each kind to mutate."""

    attester: StubAttester
    verifier: Verifier
    tee_key: bytes
    evidence: str
    signer: ResultSigner
    ear: AttestationResult


@pytest.fixture(scope="module")
def tokens() -> Tokens:
    maker = DevManufacturer.create(now=NOW)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = maker.certify(key.public_key(), "node-1", now=NOW)
    attester = StubAttester(key=key, chain=[cert], ueid="node-1")
    verifier = Verifier({"stub": [maker.certificate]})
    tee_key = RecipientKey.generate().public_bytes
    evidence = attester.evidence(
        nonce=NONCE, tee_pubkey=tee_key, measurements=MEASUREMENTS, now=NOW
    )
    signer = ResultSigner(ec.generate_private_key(ec.SECP256R1()), {"developer": "fuzz"})
    appraisal = _appraise(verifier, evidence, tee_key)
    context = ResultContext(
        "s1", "stub", tee_key, SUITE_X25519, evidence, "p", POLICY.digest, PURPOSE_CHANNEL
    )
    ear = signer.affirm(appraisal, context, now=NOW)
    return Tokens(attester, verifier, tee_key, evidence, signer, ear)


def _appraise(verifier: Verifier, token: str, tee_key: bytes) -> Any:
    return verifier.appraise(token, nonce=NONCE, tee_pubkey=tee_key, policy=POLICY, now=NOW)


def _read_all(result: AttestationResult) -> None:
    """Every accessor of a result that verified: none may raise."""
    for name in (
        "status",
        "is_stub",
        "session_id",
        "tee_pubkey",
        "purpose",
        "hpke_suite",
        "ueid",
        "measurements",
        "tee",
        "policy_digest",
        "expires_at",
        "digest",
    ):
        getattr(result, name)


def test_the_tokens_fuzzed_below_start_out_valid(tokens: Tokens) -> None:
    """Without this the structured mutations would never reach the deeper checks."""
    assert _appraise(tokens.verifier, tokens.evidence, tokens.tee_key).tee == "stub"
    _read_all(verify_result(tokens.ear.token, tokens.signer.key.public_key(), now=NOW))


# -- strategies ------------------------------------------------------------------------------

# Characters that matter to the parsers, then any character at all, lone surrogates too.
_B64URL = string.ascii_letters + string.digits + "-_"
_CHARS = st.one_of(
    st.sampled_from(_B64URL),
    st.sampled_from(string.punctuation + string.whitespace),
    st.characters(exclude_categories=()),
    st.characters(categories=["Cs"]),
)
_JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(_CHARS, max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
).map(json.dumps)
# JSON text no encoder of ours would write: deep nesting, numbers past every limit,
# lone surrogates, the constants JSON does not have.
_HOSTILE = st.one_of(
    st.integers(500, 20_000).map(lambda n: "[" * n + "]" * n),
    st.integers(500, 5_000).map(lambda n: '{"a":' * n + "1" + "}" * n),
    st.integers(1, 6_000).map(lambda n: "9" * n),
    st.sampled_from(
        ['"\\ud800"', '"x\\udfffy"', "NaN", "-Infinity", "1e400", "-0", '"\\u0000"', "1.5", "-1"]
    ),
)
_VALUES = st.one_of(_JSON, _HOSTILE, st.just(DELETE))


@st.composite
def _edited(draw: st.DrawFn, text: str) -> str:
    """``text`` with one to four characters replaced, inserted or deleted."""
    chars = list(text)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(chars) - 1))
        edit = draw(st.sampled_from(["replace", "insert", "delete"]))
        if edit == "delete":
            del chars[at]
        else:
            chars[at : at + (edit == "replace")] = [draw(_CHARS)]
    return "".join(chars)


@st.composite
def _altered(draw: st.DrawFn, token: str) -> str:
    """``token`` edited anywhere, or in its signature: the one part the signature does
    not cover, where a lenient decoder lets a character in or ignores trailing bits."""
    signed, signature = token.rsplit(".", 1)
    where = draw(st.sampled_from(["anywhere", "signature", "last character"]), label="edit")
    if where == "anywhere":
        return draw(_edited(token))
    if where == "signature":
        at = draw(st.integers(0, len(signature)), label="at")
        return f"{signed}.{signature[:at]}{draw(_CHARS)}{signature[at:]}"
    return f"{signed}.{signature[:-1]}{draw(st.sampled_from(_B64URL))}"


def _with_value(claims: dict[str, Any], path: tuple[str, ...], raw: str) -> bytes:
    """The JSON text of ``claims`` with the member at ``path`` set to the JSON text
    ``raw`` (or dropped, for DELETE): hostile text no encoder would produce."""
    copy = json.loads(json.dumps(claims))
    parent = copy
    for step in path[:-1]:
        parent = parent[step]
    marker = "@@fuzzed-value@@"
    if raw == DELETE:
        parent.pop(path[-1], None)
    else:
        parent[path[-1]] = marker
    return json.dumps(copy).replace(json.dumps(marker), raw).encode("utf-8", "surrogatepass")


def _signed(key: ec.EllipticCurvePrivateKey, header: dict[str, Any], body: bytes) -> str:
    signing_input = f"{b64url(json.dumps(header).encode())}.{b64url(body)}"
    return f"{signing_input}.{b64url(es256_sign(key, signing_input.encode()))}"


def _parts(token: str) -> tuple[dict[str, Any], dict[str, Any]]:
    head, body, _ = token.split(".")
    return json.loads(b64url_decode(head)), json.loads(b64url_decode(body))


# -- base64url ------------------------------------------------------------------------------


@fuzz_settings
@given(st.text(_CHARS, max_size=64))
def test_b64url_has_one_encoding_per_byte_string(text: str) -> None:
    decoded = typed_errors_only(b64url_decode, text)
    if decoded is not None:
        assert b64url(decoded) == text


# -- evidence -------------------------------------------------------------------------------


@fuzz_settings
@given(st.one_of(st.text(_CHARS, max_size=300), st.binary(max_size=300).map(b64url)))
def test_evidence_from_arbitrary_text(tokens: Tokens, text: str) -> None:
    typed_errors_only(_appraise, tokens.verifier, text, tokens.tee_key)
    typed_errors_only(_appraise, tokens.verifier, f"{text}.{text}.{text}", tokens.tee_key)


@fuzz_settings
@given(st.data())
def test_evidence_with_characters_edited(tokens: Tokens, data: st.DataObject) -> None:
    token = data.draw(_altered(tokens.evidence))
    appraisal = typed_errors_only(_appraise, tokens.verifier, token, tokens.tee_key)
    assert appraisal is None or token == tokens.evidence, "an altered copy appraised"


@fuzz_settings
@given(st.data())
def test_evidence_claims_of_any_shape_signed_by_the_attester(
    tokens: Tokens, data: st.DataObject
) -> None:
    header, claims = _parts(tokens.evidence)
    name = data.draw(st.sampled_from([*sorted(claims), "dbgstat", "unknown"]), label="claim")
    body = _with_value(claims, (name,), data.draw(_VALUES, label="value"))
    token = _signed(tokens.attester.key, header, body)
    typed_errors_only(_appraise, tokens.verifier, token, tokens.tee_key)


@fuzz_settings
@given(st.data())
def test_evidence_headers_of_any_shape_signed_by_the_attester(
    tokens: Tokens, data: st.DataObject
) -> None:
    header, claims = _parts(tokens.evidence)
    name = data.draw(st.sampled_from([*sorted(header), "crit", "kid"]), label="header")
    value = data.draw(st.one_of(_JSON, st.just(DELETE)), label="value")
    if value == DELETE:
        header.pop(name, None)
    else:
        header[name] = json.loads(value)
    token = _signed(tokens.attester.key, header, json.dumps(claims).encode())
    typed_errors_only(_appraise, tokens.verifier, token, tokens.tee_key)


# -- attestation results (EARs) -------------------------------------------------------------


def _verify_and_read(token: str, key: ec.EllipticCurvePublicKey) -> None:
    result = typed_errors_only(verify_result, token, key, now=NOW)
    if result is not None:
        _read_all(result)


@fuzz_settings
@given(st.one_of(st.text(_CHARS, max_size=300), st.binary(max_size=300).map(b64url)))
def test_ear_from_arbitrary_text(tokens: Tokens, text: str) -> None:
    key = tokens.signer.key.public_key()
    _verify_and_read(text, key)
    _verify_and_read(f"{text}.{text}.{text}", key)


@fuzz_settings
@given(st.data())
def test_ear_with_characters_edited(tokens: Tokens, data: st.DataObject) -> None:
    token = data.draw(_altered(tokens.ear.token))
    result = typed_errors_only(verify_result, token, tokens.signer.key.public_key(), now=NOW)
    assert result is None or token == tokens.ear.token, "an altered copy verified"


@fuzz_settings
@given(st.data())
def test_ear_claims_of_any_shape_signed_by_the_result_key(
    tokens: Tokens, data: st.DataObject
) -> None:
    claims = tokens.ear.claims
    submod = claims["submods"]["ark-sandbox"]
    paths = [(name,) for name in sorted(claims)] + [
        ("submods", "ark-sandbox", name) for name in [*sorted(submod), "ark.unknown"]
    ]
    path = data.draw(st.sampled_from(paths), label="claim")
    body = _with_value(claims, path, data.draw(_VALUES, label="value"))
    token = _signed(tokens.signer.key, {"alg": "ES256", "typ": "JWT"}, body)
    _verify_and_read(token, tokens.signer.key.public_key())


# -- HPKE envelopes and public keys ---------------------------------------------------------


@pytest.fixture(scope="module")
def recipients() -> dict[str, RecipientKey]:
    return {suite: RecipientKey.generate(suite) for suite in SUITES}


def _open(recipient: RecipientKey, envelope: bytes) -> bytes:
    return open_envelope(
        recipient.private_key, envelope, purpose="update", context=CONTEXT, suite=recipient.suite
    )


@fuzz_settings
@given(st.sampled_from(SUITES), st.binary(max_size=1_200))
def test_envelope_from_arbitrary_bytes(
    recipients: dict[str, RecipientKey], suite: str, blob: bytes
) -> None:
    typed_errors_only(_open, recipients[suite], blob)


@fuzz_settings
@given(st.sampled_from(SUITES), st.data())
def test_envelope_with_bytes_edited(
    recipients: dict[str, RecipientKey], suite: str, data: st.DataObject
) -> None:
    recipient = recipients[suite]
    envelope = bytearray(
        seal_to(recipient.public_key(), b"update", purpose="update", context=CONTEXT, suite=suite)
    )
    at = data.draw(st.integers(0, len(envelope) - 1), label="at")
    edit = data.draw(st.sampled_from(["flip", "cut", "extend"]), label="edit")
    if edit == "flip":
        envelope[at] ^= data.draw(st.integers(1, 255), label="bits")
    elif edit == "cut":
        del envelope[at:]
    else:
        envelope += data.draw(st.binary(min_size=1, max_size=64), label="tail")
    assert typed_errors_only(_open, recipient, bytes(envelope)) is None, "an edit opened"


_KEY_BYTES = st.one_of(
    st.binary(max_size=1_300),
    st.binary(min_size=32, max_size=32),
    st.binary(min_size=1_216, max_size=1_216),
    st.tuples(st.binary(min_size=1_184, max_size=1_184), st.binary(min_size=32, max_size=32)).map(
        b"".join
    ),
)


@fuzz_settings
@given(st.sampled_from(SUITES), _KEY_BYTES)
def test_a_public_key_that_loads_can_be_sealed_to(suite: str, data: bytes) -> None:
    public = typed_errors_only(load_public_key, suite, data)
    if public is not None:
        seal_to(public, b"k", purpose="update", context=CONTEXT, suite=suite)


@fuzz_settings
@given(st.sampled_from(SUITES), st.binary(max_size=200))
def test_private_key_bytes_from_anywhere(suite: str, data: bytes) -> None:
    typed_errors_only(RecipientKey.from_private_bytes, suite, data)
