"""Writes ``scorecard/*.json``: held-out roots, and signed commitments and scorecards,
positive and negative.

Everything here is written out by hand and signed with :mod:`cryptography` and
:mod:`rfc8785` directly, never with :mod:`sandbox.scorecard`, so a changed domain, body
encoding or Merkle hash there fails the vectors. The signing keys come from fixed seeds
(test vectors only: production keys are random), and Ed25519 signatures are
deterministic, so the files are reproducible. Each negative case changes one thing in a
positive one and is signed again where its signature is not the point; ``error`` is text
the :class:`~sandbox.errors.ScorecardInvalid` message must hold; ``form`` "bytes" means
the record is given as its canonical JSON bytes, as it arrives from elsewhere.
Run ``python tests/vectors/scorecard_vectors.py`` to regenerate.
"""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import rfc8785
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

HERE = Path(__file__).parent / "scorecard"
COMMITMENT_DOMAIN = b"ark/v1/heldout-commitment\x00"
SCORECARD_DOMAIN = b"ark/v1/scorecard\x00"
KEY = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"ark test vector: signer").digest())
OTHER = Ed25519PrivateKey.from_private_bytes(hashlib.sha256(b"ark test vector: other").digest())
SALT = hashlib.sha256(b"ark test vector: salt").digest()
H = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
UEID = "0c1ec5a0c1ec5a0c1ec5a0c1ec5a0c1e"
FLOWER_RUN = "16401725734191279427"  # beyond 2**53: the log spells it as text
IDENTITY = bytes([1]) + bytes(31)  # the Ed25519 identity point: small order
P_PLUS_ONE = bytes([0xEE]) + b"\xff" * 30 + bytes([0x7F])  # y = p + 1: not canonical


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def raw(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes_raw()


def signed(
    body: Any, domain: bytes, key: Ed25519PrivateKey = KEY, signer: bytes | None = None
) -> dict[str, Any]:
    """``body`` signed by ``key`` under ``domain`` (``signer``: another key named)."""
    return {
        "body": body,
        "signer": b64url(raw(key) if signer is None else signer),
        "sig": b64url(key.sign(domain + rfc8785.dumps(body))),
    }


def mth(leaves: list[bytes]) -> bytes:
    """RFC 9162 Merkle tree hash, written out again here."""
    if len(leaves) == 1:
        return hashlib.sha256(b"\x00" + leaves[0]).digest()
    split = 1 << ((len(leaves) - 1).bit_length() - 1)
    return hashlib.sha256(b"\x01" + mth(leaves[:split]) + mth(leaves[split:])).digest()


def heldout() -> dict[str, Any]:
    sets = [
        ("one example", [("a single row", "positive")]),
        (
            "five examples, unicode",
            [
                ("the invoice is late", "billing"),
                ("mot de passe oublié", "account"),
                ("快递到哪里了", "shipping"),
                ("", "empty text"),
                ("the invoice is late", "billing"),
            ],
        ),
    ]
    valid = []
    for name, rows in sets:
        leaves = [
            rfc8785.dumps({"salt": b64url(SALT), "text": text, "label": label})
            for text, label in rows
        ]
        valid.append(
            {
                "name": name,
                "salt": SALT.hex(),
                "examples": [list(row) for row in rows],
                "leaves": [leaf.decode("utf-8") for leaf in leaves],
                "root": mth(leaves).hex(),
            }
        )
    return {
        "about": "Held-out leaves (JCS of the base64url salt, text and label) and their "
        "RFC 9162 Merkle tree hash, the root a node commits to.",
        "valid": valid,
    }


COMMITMENT: dict[str, Any] = {
    "format": "ark-heldout-commitment/1",
    "comparison": "cmp-1",
    "ueid": UEID,
    "root": H,
    "count": 40,
}
SCORECARD: dict[str, Any] = {
    "format": "ark-scorecard/1",
    "comparison": "cmp-1",
    "run": 7,
    "job": "demo",
    "ueid": UEID,
    "model_id": "minilm",
    "manifest_sha256": H,
    "adapter_sha256": H,
    "heldout_root": H,
    "heldout_count": 40,
    "before": {"accuracy": 0.5, "macro_f1": 0.25},
    "after": {"accuracy": 0.75, "macro_f1": 0.625},
    "cost": {
        "train_seconds_per_step": 0.25,
        "inference_ms_per_example": 3.5,
        "update_bytes_per_round": 306244,
        "adapter_bytes": 306244,
    },
}


def _record_cases(body: dict[str, Any], domain: bytes, other_domain: bytes) -> list[Any]:
    """The negatives every signed record has, whatever its body."""
    good = signed(body, domain)
    zero_sig = b64url(IDENTITY + bytes(32))  # R = identity, S = 0: verifies under IDENTITY
    first = next(k for k in body if k != "format")
    return [
        (
            "signed by another key than the one it names",
            {**good, "sig": signed(body, domain, OTHER)["sig"]},
            "signature does not verify",
        ),
        ("signed under the other domain", signed(body, other_domain), "signature does not verify"),
        (
            "signed with no domain",
            {**good, "sig": b64url(KEY.sign(rfc8785.dumps(body)))},
            "signature does not verify",
        ),
        (
            "the body changed after signing",
            {**good, "body": {**body, "ueid": "someone-else"}},
            "signature does not verify",
        ),
        (
            "the body lacks a field",
            signed({k: v for k, v in body.items() if k != first}, domain),
            f"body lacks '{first}'",
        ),
        (
            "the body has an extra field",
            signed({**body, "note": "x"}, domain),
            "unknown key 'note'",
        ),
        (
            "the body of another format",
            signed({**body, "format": "ark-other/1"}, domain),
            "body.format must be",
        ),
        ("the body is a list", signed([body], domain), "body must be a JSON object"),
        ("the record has an extra key", {**good, "note": "x"}, "unknown key 'note'"),
        ("the record lacks its signature", {"body": body, "signer": good["signer"]}, "lacks 'sig'"),
        ("the record as JSON text", json.dumps(good), "the signed record must be a JSON object"),
        (
            "the signer padded",
            {**good, "signer": good["signer"] + "="},
            "signer is not unpadded base64url",
        ),
        (
            "the signer in the standard base64 alphabet",
            {**good, "signer": "+/" + good["signer"][2:]},
            "signer is not unpadded base64url",
        ),
        ("a signer of 31 bytes", {**good, "signer": b64url(raw(KEY)[:31])}, "32 bytes, got 31"),
        (
            "a signer of small order (the identity) with a signature that verifies under it",
            {**good, "signer": b64url(IDENTITY), "sig": zero_sig},
            "small order",
        ),
        (
            "a signer not canonically encoded",
            {**good, "signer": b64url(P_PLUS_ONE)},
            "not canonically encoded",
        ),
        (
            "a signature of 63 bytes",
            {**good, "sig": b64url(base64.urlsafe_b64decode(good["sig"] + "==")[:63])},
            "64 bytes, got 63",
        ),
        ("a signature as a number", {**good, "sig": 7}, "sig is not unpadded base64url"),
    ]


def _commitment_cases() -> list[Any]:
    def body(**changes: Any) -> dict[str, Any]:
        return signed({**COMMITMENT, **changes}, COMMITMENT_DOMAIN)

    return [
        ("root in uppercase hex", body(root=H.upper()), "root must be a SHA-256 digest"),
        ("root of 63 characters", body(root=H[:63]), "root must be a SHA-256 digest"),
        ("count zero", body(count=0), "count must be an integer from 1"),
        ("count true", body(count=True), "count must be an integer"),
        ("count 2**32", body(count=2**32), "count must be an integer from 1 to 4294967295"),
        ("count as a float", body(count=40.5), "count must be an integer"),
        ("an empty ueid", body(ueid=""), "ueid must be printable text"),
        ("a comparison with a newline", body(comparison="cmp\n1"), "comparison must be printable"),
        (
            "a comparison of 257 characters",
            body(comparison="c" * 257),
            "comparison must be printable",
        ),
        ("a comparison as a number", body(comparison=1), "comparison must be printable"),
    ]


def _scorecard_cases() -> list[Any]:
    def body(**changes: Any) -> dict[str, Any]:
        return signed({**SCORECARD, **changes}, SCORECARD_DOMAIN)

    cost = SCORECARD["cost"]
    many = {f"m{n}": 0.5 for n in range(33)}
    return [
        ("a run id as text below 2**53", body(run="7"), "run must be an integer"),
        ("a run id as text from 2**64", body(run=str(2**64)), "run must be an integer"),
        ("a negative run id", body(run=-1), "run must be an integer from 0"),
        (
            "a metric as the log spells NaN",
            body(after={"accuracy": "nan"}),
            "after.accuracy must be a finite number",
        ),
        (
            "a metric true",
            body(before={"accuracy": True}),
            "before.accuracy must be a finite number",
        ),
        (
            "a metric name with a space",
            body(after={"the accuracy": 0.5}),
            "after metric name must be",
        ),
        ("33 metrics", body(after=many), "after must be an object of at most 32 metrics"),
        ("metrics as a list", body(before=[0.5]), "before must be an object"),
        (
            "cost lacks adapter_bytes",
            body(cost={k: v for k, v in cost.items() if k != "adapter_bytes"}),
            "body.cost lacks 'adapter_bytes'",
        ),
        (
            "cost with an extra key",
            body(cost={**cost, "gpu_hours": 1}),
            "body.cost has an unknown key 'gpu_hours'",
        ),
        (
            "a negative cost",
            body(cost={**cost, "train_seconds_per_step": -0.5}),
            "cost.train_seconds_per_step must be a finite number of at least 0",
        ),
        (
            "adapter bytes as a float",
            body(cost={**cost, "adapter_bytes": 1.5}),
            "cost.adapter_bytes must be an integer",
        ),
        (
            "a manifest digest not in hex",
            body(manifest_sha256="z" * 64),
            "manifest_sha256 must be a SHA-256 digest",
        ),
        ("a held-out count as text", body(heldout_count="40"), "heldout_count must be an integer"),
        (
            "a model id with a terminal escape",
            body(model_id="minilm\x1b[31m"),
            "model_id must be printable",
        ),
    ]


def _document(
    kind: str, domain: bytes, other: bytes, body: dict[str, Any], cases: list[Any]
) -> dict[str, Any]:
    valid = [{"name": "as signed", "record": signed(body, domain)}]
    if kind == "scorecard":
        valid.append(
            {
                "name": "a run id beyond 2**53, as text",
                "record": signed({**body, "run": FLOWER_RUN}, domain),
            }
        )
        valid.append(
            {
                "name": "no metrics, integer numbers",
                "record": signed({**body, "before": {}, "after": {"accuracy": 1}}, domain),
            }
        )
    for case in valid:
        case["signer_sha256"] = hashlib.sha256(raw(KEY)).hexdigest()
    oversize = {**signed(body, domain), "padding": "x" * (16 * 1024)}
    invalid = [
        {"name": name, "form": "object", "record": record, "error": error}
        for name, record, error in [*_record_cases(body, domain, other), *cases]
    ]
    invalid.append(
        {"name": "over 16 KiB", "form": "bytes", "record": oversize, "error": "over 16384"}
    )
    return {
        "about": f"Signed {kind} records: every valid one opens to its body and signer "
        "digest, every invalid one raises ScorecardInvalid whose message holds 'error'.",
        "kind": kind,
        "domain_hex": domain.hex(),
        "signer_public_key": raw(KEY).hex(),
        "valid": valid,
        "invalid": invalid,
    }


def main() -> None:
    HERE.mkdir(exist_ok=True)
    documents = {
        "heldout.json": heldout(),
        "commitment.json": _document(
            "commitment", COMMITMENT_DOMAIN, SCORECARD_DOMAIN, COMMITMENT, _commitment_cases()
        ),
        "scorecard.json": _document(
            "scorecard", SCORECARD_DOMAIN, COMMITMENT_DOMAIN, SCORECARD, _scorecard_cases()
        ),
    }
    for name, document in documents.items():
        text = json.dumps(document, indent=1, ensure_ascii=False) + "\n"
        (HERE / name).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
