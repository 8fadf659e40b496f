"""TEE kinds: the verifier and the results know no backend; each backend says what its
kind is (development or not, its hardware model, how its certificate names the TEE).

A second, non-development x5c kind is registered here with its own vendor root and its
own way of naming the instance (the certificate subject's serial number, as vendors'
attestation certificates do); it goes through the same attester, verifier, result
signer and result check as the stub, and is never taken for one.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime as dt
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sandbox.attestation.attester import X5cAttester
from sandbox.attestation.backends import Attester, verifiers_for
from sandbox.attestation.evidence import encode_jws, es256_sign
from sandbox.attestation.kinds import TeeKind, is_development, register_kind, unregister_kind
from sandbox.attestation.result import (
    PURPOSE_CHANNEL,
    SUBMOD,
    AttestationResult,
    ResultContext,
    ResultSigner,
    verify_result,
)
from sandbox.attestation.stub import STUB, DevManufacturer, StubAttester, ueid_uri
from sandbox.attestation.verifier import Appraisal, AppraisalPolicy
from sandbox.errors import ChainUntrusted, ConfigError, ResultInvalid, TeeNotAccepted
from sandbox.ops.provision import init_aggregator, init_provider
from sandbox.seal.envelope import SUITE_X25519, RecipientKey
from server.sandbox import AggregatorSandbox

ROOT = Path(__file__).resolve().parents[1]
NOW = dt.datetime(2026, 11, 22, 12, 0, tzinfo=dt.UTC)
CODE = "ab" * 32
NONCE = bytes(range(32))
TEE_KEY = RecipientKey.generate().public_bytes
TEST_TEE = "test-tee"
# Accepts both kinds, allows no stubs.
STRICT = AppraisalPolicy(
    policy_id="strict/1",
    accepted_tees=frozenset({STUB.name, TEST_TEE}),
    allow_stub=False,
    reference_values={"code": frozenset({CODE})},
)
EAR_SIGNER = ResultSigner(ec.generate_private_key(ec.SECP256R1()), {"developer": "test"})


# --- the modules that must know no backend ------------------------------------------------


def _imported(path: Path) -> set[str]:
    """Every module (and ``module.name``) that ``path`` imports."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


@pytest.mark.parametrize(
    "module",
    [
        "sandbox/attestation/verifier.py",
        "sandbox/attestation/result.py",
        "sandbox/attestation/kinds.py",
        "sandbox/attestation/attester.py",
        *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "server").glob("*.py")),
    ],
)
def test_the_verifier_results_and_server_import_no_stub(module: str) -> None:
    imported = _imported(ROOT / module)
    assert not {n for n in imported if n.startswith("sandbox.attestation.stub")}, imported
    names = {
        node.id
        for node in ast.walk(ast.parse((ROOT / module).read_text()))
        if isinstance(node, ast.Name)
    }
    assert not {n for n in names if n.startswith("STUB")}, names


def test_the_import_check_sees_an_import_of_the_stub(tmp_path: Path) -> None:
    """Negative control: the check above finds both spellings of importing the stub."""
    source = tmp_path / "m.py"
    source.write_text(
        "from sandbox.attestation.stub import STUB_TEE\nfrom sandbox.attestation import stub\n"
    )
    assert {"sandbox.attestation.stub.STUB_TEE", "sandbox.attestation.stub"} <= _imported(source)


# --- a second, non-development kind -------------------------------------------------------


def _serial_numbers(cert: x509.Certificate) -> frozenset[str]:
    """The test vendor names the TEE instance in its certificate subject's serial number."""
    return frozenset(
        str(a.value) for a in cert.subject.get_attributes_for_oid(NameOID.SERIAL_NUMBER)
    )


TEST_KIND = TeeKind(
    name=TEST_TEE,
    development=False,
    hwmodel="ark-test-vendor/2",
    certified_ueids=_serial_numbers,
)


@dataclasses.dataclass(frozen=True)
class Vendor:
    """A manufacturer root for a kind: it certifies attestation keys as its kind does."""

    key: ec.EllipticCurvePrivateKey
    root: x509.Certificate

    @classmethod
    def create(cls, name: str) -> Vendor:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        root = (
            _valid(x509.CertificateBuilder().subject_name(subject).issuer_name(subject))
            .public_key(key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .sign(key, hashes.SHA256())
        )
        return cls(key, root)

    def certify(
        self, key: ec.EllipticCurvePrivateKey, *, serial: str | None, san_ueid: str | None
    ) -> x509.Certificate:
        """An attestation-key certificate naming an instance in either or both ways."""
        subject = [x509.NameAttribute(NameOID.COMMON_NAME, "attestation key")]
        if serial is not None:
            subject.append(x509.NameAttribute(NameOID.SERIAL_NUMBER, serial))
        builder = (
            _valid(x509.CertificateBuilder().subject_name(x509.Name(subject)))
            .issuer_name(self.root.subject)
            .public_key(key.public_key())
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        )
        if san_ueid is not None:
            builder = builder.add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ueid_uri(san_ueid))]),
                critical=False,
            )
        return builder.sign(self.key, hashes.SHA256())


def _valid(builder: x509.CertificateBuilder) -> x509.CertificateBuilder:
    return (
        builder.serial_number(x509.random_serial_number())
        .not_valid_before(NOW - dt.timedelta(days=1))
        .not_valid_after(NOW + dt.timedelta(days=30))
    )


@dataclasses.dataclass(frozen=True)
class World:
    vendor: Vendor
    maker: DevManufacturer

    def attester(
        self, kind: TeeKind, *, serial: str | None = "node-1", san_ueid: str | None = None
    ) -> X5cAttester:
        key = ec.generate_private_key(ec.SECP256R1())
        return X5cAttester(
            kind=kind,
            key=key,
            chain=[self.vendor.certify(key, serial=serial, san_ueid=san_ueid)],
            ueid="node-1",
        )

    def stub(self) -> StubAttester:
        key = ec.generate_private_key(ec.SECP256R1())
        return StubAttester(
            key=key, chain=[self.maker.certify(key.public_key(), "node-1", now=NOW)], ueid="node-1"
        )

    def appraise(self, attester: Attester, policy: AppraisalPolicy = STRICT) -> Appraisal:
        registry = verifiers_for(
            {TEST_TEE: [self.vendor.root], STUB.name: [self.maker.certificate]}
        )
        return registry.appraise(
            attester.tee,
            _evidence(attester),
            nonce=NONCE,
            tee_pubkey=TEE_KEY,
            policy=policy,
            now=NOW,
        )


def _evidence(attester: Attester) -> str:
    return attester.evidence(nonce=NONCE, tee_pubkey=TEE_KEY, measurements={"code": CODE}, now=NOW)


@pytest.fixture
def world() -> Iterator[World]:
    register_kind(TEST_KIND)
    try:
        yield World(Vendor.create("test TEE vendor root"), DevManufacturer.create(now=NOW))
    finally:
        unregister_kind(TEST_TEE)


def _ear(appraisal: Appraisal) -> AttestationResult:
    context = ResultContext(
        "session-1",
        appraisal.tee,
        TEE_KEY,
        SUITE_X25519,
        "evidence",
        appraisal.policy_id,
        STRICT.digest,
        PURPOSE_CHANNEL,
    )
    return EAR_SIGNER.affirm(appraisal, context, now=NOW)


def test_a_non_development_kind_passes_a_policy_without_stubs_and_is_no_stub(
    world: World,
) -> None:
    appraisal = world.appraise(world.attester(TEST_KIND))
    assert (appraisal.tee, appraisal.is_stub, appraisal.claims["hwmodel"]) == (
        TEST_TEE,
        False,
        TEST_KIND.hwmodel,
    )
    result = verify_result(_ear(appraisal).token, EAR_SIGNER.key.public_key(), now=NOW)
    assert (result.tee, result.is_stub, result.submod["ark.stub"]) == (TEST_TEE, False, False)
    # Negative control: the same policy refuses the development kind, whose results say so.
    with pytest.raises(TeeNotAccepted, match="does not allow stubs"):
        world.appraise(world.stub())
    lenient = dataclasses.replace(STRICT, allow_stub=True)
    stub_result = _ear(world.appraise(world.stub(), lenient))
    assert (stub_result.is_stub, stub_result.submod["ark.stub"]) == (True, True)
    assert is_development(STUB.name)
    assert not is_development(TEST_TEE)


def test_the_kind_says_how_its_certificate_names_the_instance(world: World) -> None:
    # A test-vendor certificate that names node-1 the stub's way (SAN URI) does not
    # name it for the test kind; the test kind's own way does, without a SAN.
    misnamed = world.attester(TEST_KIND, serial="node-2", san_ueid="node-1")
    with pytest.raises(ChainUntrusted, match="ueid"):
        world.appraise(misnamed)
    assert world.appraise(world.attester(TEST_KIND, serial="node-1")).claims["ueid"] == "node-1"
    # The stub's root issuing the test kind's naming does not name node-1 for the stub.
    key = ec.generate_private_key(ec.SECP256R1())
    maker = Vendor(world.maker.key, world.maker.certificate)
    serial_only = StubAttester(
        key=key, chain=[maker.certify(key, serial="node-1", san_ueid=None)], ueid="node-1"
    )
    with pytest.raises(ChainUntrusted, match="ueid"):
        world.appraise(serial_only, dataclasses.replace(STRICT, allow_stub=True))


def test_the_kind_says_its_hardware_model_and_its_root_its_kind(world: World) -> None:
    honest = world.attester(TEST_KIND)
    as_stub_hardware = dataclasses.replace(honest, extra_claims={"hwmodel": STUB.hwmodel})
    with pytest.raises(TeeNotAccepted, match=f"{TEST_TEE} evidence claims hardware model"):
        world.appraise(as_stub_hardware)
    # Evidence under the test vendor's root cannot present itself as the stub, nor the
    # stub's as the test kind.
    with pytest.raises(TeeNotAccepted, match="certified by a 'test-tee' root"):
        world.appraise(dataclasses.replace(honest, extra_claims={"tee": STUB.name}))
    with pytest.raises(TeeNotAccepted, match="certified by a 'stub' root"):
        world.appraise(dataclasses.replace(world.stub(), extra_claims={"tee": TEST_TEE}))


@pytest.mark.parametrize("kind", [TEST_TEE, STUB.name])
def test_a_result_whose_stub_claim_disagrees_with_its_kind_is_invalid(
    world: World, kind: str
) -> None:
    attester = world.attester(TEST_KIND) if kind == TEST_TEE else world.stub()
    lenient = dataclasses.replace(STRICT, allow_stub=True)
    claims = _ear(world.appraise(attester, lenient)).claims
    claims["submods"][SUBMOD]["ark.stub"] = not claims["submods"][SUBMOD]["ark.stub"]
    token = encode_jws(
        {"alg": "ES256", "typ": "JWT"}, claims, lambda data: es256_sign(EAR_SIGNER.key, data)
    )
    with pytest.raises(ResultInvalid, match="stub"):
        verify_result(token, EAR_SIGNER.key.public_key(), now=NOW)


def test_an_unregistered_kind_is_refused_even_under_a_trusted_root(world: World) -> None:
    """A root filed under a kind no backend registered vouches for nothing: there is no
    backend to say how its certificates name an instance or what hardware it is."""
    unknown = dataclasses.replace(TEST_KIND, name="unknown-tee")
    registry = verifiers_for({"unknown-tee": [world.vendor.root]})
    policy = dataclasses.replace(STRICT, accepted_tees=frozenset({"unknown-tee"}))
    with pytest.raises(TeeNotAccepted, match="no backend registered for TEE kind 'unknown-tee'"):
        registry.appraise(
            "unknown-tee",
            _evidence(world.attester(unknown)),
            nonce=NONCE,
            tee_pubkey=TEE_KEY,
            policy=policy,
            now=NOW,
        )
    assert not is_development("unknown-tee")


def test_a_kind_is_registered_by_one_backend_only(world: World) -> None:
    register_kind(STUB)  # the same backend again: nothing changes
    with pytest.raises(RuntimeError, match="'stub' is already registered"):
        register_kind(dataclasses.replace(STUB, development=False))
    assert is_development(STUB.name)


# --- the aggregator's identity names its kind --------------------------------------------


def test_the_aggregator_identity_names_its_tee_kind(tmp_path: Path) -> None:
    ws = init_provider(tmp_path / "provider")
    init_aggregator(ws, tmp_path / "manufacturer")
    tee_file = ws.aggregator / "tee"
    assert tee_file.read_text(encoding="utf-8") == f"{STUB.name}\n"

    def load() -> AggregatorSandbox:
        return AggregatorSandbox.load(ws.aggregator, run_id=1, model_digest="00" * 32)

    assert load().attester.tee == STUB.name
    tee_file.write_text("sev-snp\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"aggregator/tee: no attester backend for .*'sev-snp'"):
        load()
    tee_file.unlink()
    with pytest.raises(ConfigError, match=r"aggregator/tee: no aggregator identity"):
        load()


def test_a_development_kind_cannot_be_unregistered() -> None:
    """Were the stub forgotten, its results would no longer have to say they are stubs."""
    with pytest.raises(RuntimeError, match="development kind"):
        unregister_kind("stub")
    assert is_development("stub")
