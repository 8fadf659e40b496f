"""RFC 9162 Merkle core against the public vectors, our negative vectors and a brute force."""

from __future__ import annotations

import base64
from typing import Any

import pytest

from sandbox.errors import ConsistencyProofError, InclusionProofError, LogVerificationError
from sandbox.translog import merkle
from tests.vectorload import load_vector, load_vectors, vector_path

LEAVES = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]


def _load(kind: str) -> list[dict[str, Any]]:
    return load_vectors("rfc9162", kind, pattern="*/happy-path.json")


def _negative(kind: str) -> list[dict[str, Any]]:
    negative: list[dict[str, Any]] = load_vector("rfc9162-negative.json")[kind]
    return negative


def _b(value: str) -> bytes:
    return base64.b64decode(value)


def _proof(vector: dict[str, Any]) -> list[bytes]:
    return [_b(item) for item in vector["proof"] or []]


def test_roots_of_the_public_leaves() -> None:
    readme = vector_path("rfc9162", "README.md").read_text()
    rows = [line.split("|") for line in readme.splitlines() if line.startswith("| ")]
    expected = {int(r[1]): r[2].strip() for r in rows if r[1].strip().isdigit()}
    assert len(expected) == 9
    for size, root in expected.items():
        assert merkle.root_hash(LEAVES[:size]).hex() == root


@pytest.mark.parametrize(
    "vector", _load("inclusion"), ids=lambda v: f"{v['leafIdx']}/{v['treeSize']}"
)
def test_inclusion_vectors(vector: dict[str, Any]) -> None:
    index, size = vector["leafIdx"], vector["treeSize"]
    assert merkle.leaf_hash(LEAVES[index]) == _b(vector["leafHash"])
    assert merkle.inclusion_proof(index, size, LEAVES) == _proof(vector)
    merkle.verify_inclusion(_b(vector["leafHash"]), index, size, _proof(vector), _b(vector["root"]))


@pytest.mark.parametrize(
    "vector", _load("consistency"), ids=lambda v: f"{v['size1']}->{v['size2']}"
)
def test_consistency_vectors(vector: dict[str, Any]) -> None:
    size1, size2 = vector["size1"], vector["size2"]
    assert merkle.consistency_proof(size1, size2, LEAVES) == _proof(vector)
    merkle.verify_consistency(
        size1, size2, _proof(vector), _b(vector["root1"]), _b(vector["root2"])
    )


@pytest.mark.parametrize("case", _negative("inclusion"), ids=lambda c: f"{c['from']}: {c['desc']}")
def test_inclusion_negative_vectors(case: dict[str, Any]) -> None:
    with pytest.raises(InclusionProofError):
        merkle.verify_inclusion(
            _b(case["leafHash"]), case["leafIdx"], case["treeSize"], _proof(case), _b(case["root"])
        )


@pytest.mark.parametrize(
    "case", _negative("consistency"), ids=lambda c: f"{c['from']}: {c['desc']}"
)
def test_consistency_negative_vectors(case: dict[str, Any]) -> None:
    with pytest.raises(ConsistencyProofError):
        merkle.verify_consistency(
            case["size1"], case["size2"], _proof(case), _b(case["root1"]), _b(case["root2"])
        )


def test_every_proof_up_to_33_leaves_round_trips_and_rejects_a_neighbour() -> None:
    entries = [f"entry-{i}".encode() for i in range(33)]
    roots = [merkle.root_hash(entries[:n]) for n in range(len(entries) + 1)]
    subtree = merkle.entries_subtree(entries)
    for size in range(1, len(entries) + 1):
        for index in range(size):
            proof = merkle.inclusion_proof(index, size, subtree)
            leaf = merkle.leaf_hash(entries[index])
            merkle.verify_inclusion(leaf, index, size, proof, roots[size])
            if size > 1:  # the same path claimed for the neighbouring leaf
                with pytest.raises(InclusionProofError):
                    merkle.verify_inclusion(
                        leaf, index ^ 1 if index ^ 1 < size else index - 1, size, proof, roots[size]
                    )
        for size1 in range(0, size + 1):
            proof = merkle.consistency_proof(size1, size, subtree)
            merkle.verify_consistency(size1, size, proof, roots[size1], roots[size])
            if 0 < size1 < size:
                with pytest.raises(ConsistencyProofError):
                    merkle.verify_consistency(size1, size, proof, roots[size1 - 1], roots[size])


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((b"x", 0, 1, [], bytes(32)), InclusionProofError),
        ((bytes(32), 0, 1, "notalist", bytes(32)), InclusionProofError),
        ((bytes(32), 0, 1, [None], bytes(32)), InclusionProofError),
        ((bytes(32), True, 2, [bytes(32)], bytes(32)), InclusionProofError),
        ((bytes(32), 0, 2, [bytes(32)] * 65, bytes(32)), InclusionProofError),
        ((bytes(32), 0, 0, [], bytes(32)), InclusionProofError),
    ],
)
def test_inclusion_rejects_malformed_input_with_its_own_error(
    args: tuple[Any, ...], error: type[Exception]
) -> None:
    with pytest.raises(error):
        merkle.verify_inclusion(*args)


@pytest.mark.parametrize(
    "args",
    [
        (1, 2, [b"short"], bytes(32), bytes(32)),
        (1, 2, [bytes(32)], "root", bytes(32)),
        (2, 1, [], bytes(32), bytes(32)),
        (1.0, 2, [bytes(32)], bytes(32), bytes(32)),
        (1, 2, None, bytes(32), bytes(32)),
        (0, 3, [], bytes(32), bytes(32)),
    ],
)
def test_consistency_rejects_malformed_input_with_its_own_error(args: tuple[Any, ...]) -> None:
    with pytest.raises(ConsistencyProofError) as caught:
        merkle.verify_consistency(*args)
    assert isinstance(caught.value, LogVerificationError)


def test_proof_generation_rejects_out_of_range_requests() -> None:
    with pytest.raises(InclusionProofError):
        merkle.inclusion_proof(3, 3, LEAVES)
    with pytest.raises(ConsistencyProofError):
        merkle.consistency_proof(4, 3, LEAVES)
