"""Writes ``rfc9162-negative.json``: wrong variants of the public RFC 9162 happy paths.

Each case changes one thing in a happy-path inclusion or consistency vector: a bit flip
in a hash, a truncated or extended proof, a size or index off by one or doubled,
swapped roots, or bytes of garbage before or after a hash. Every case must fail.
Run ``python tests/vectors/rfc9162_negative.py`` to regenerate.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
GARBAGE = bytes(range(0xA0, 0xC0))  # 32 bytes of a fixed, obviously foreign pattern


def _b(value: str) -> bytes:
    return base64.b64decode(value)


def _s(value: bytes) -> str:
    return base64.b64encode(value).decode()


def _flip(value: str, bit: int = 0) -> str:
    raw = bytearray(_b(value))
    raw[bit // 8 % len(raw)] ^= 1 << (bit % 8)
    return _s(bytes(raw))


def _split(size: int) -> int:
    return 1 << ((size - 1).bit_length() - 1)


def _path_shape(index: int, size: int) -> tuple[str, ...] | None:
    """Which side each sibling of the RFC 9162 PATH sits on (None: not a leaf)."""
    if not 0 <= index < size:
        return None
    if size == 1:
        return ()
    k = _split(size)
    if index < k:
        return (*(_path_shape(index, k) or ()), "right")
    return (*(_path_shape(index - k, size - k) or ()), "left")


def _consistency_shape(m: int, n: int, complete: bool = True) -> tuple[str, ...] | None:
    """The steps of the RFC 9162 SUBPROOF (None: not a valid pair of sizes)."""
    if not 0 < m <= n:
        return None
    if m == n:
        return () if complete else ("self",)
    k = _split(n)
    if m <= k:
        return (*(_consistency_shape(m, k, complete) or ()), "right")
    return (*(_consistency_shape(m - k, n - k, False) or ()), "left")


def _proof_variants(proof: list[str]) -> list[tuple[str, list[str]]]:
    variants = [
        ("proof extended with garbage after", [*proof, _s(GARBAGE)]),
        ("proof extended with garbage before", [_s(GARBAGE), *proof]),
        ("proof with a duplicated last hash", [*proof, proof[-1]] if proof else [_s(GARBAGE)]),
    ]
    if proof:
        variants += [
            ("proof truncated at the end", proof[:-1]),
            ("proof truncated at the start", proof[1:]),
            ("proof reversed", list(reversed(proof)) if len(proof) > 1 else [_flip(proof[0])]),
            ("garbage byte before a hash", [_s(b"\x00" + _b(proof[0])), *proof[1:]]),
            ("garbage byte after a hash", [*proof[:-1], _s(_b(proof[-1]) + b"\x00")]),
            ("hash cut to 31 bytes", [_s(_b(proof[0])[:31]), *proof[1:]]),
        ]
        for position in range(len(proof)):
            flipped = list(proof)
            flipped[position] = _flip(proof[position], 8 * position + 3)
            variants.append((f"bit flip in proof[{position}]", flipped))
    return variants


def inclusion_cases(vector: dict[str, Any]) -> list[dict[str, Any]]:
    proof = vector["proof"] or []
    base = {
        "leafIdx": vector["leafIdx"],
        "treeSize": vector["treeSize"],
        "root": vector["root"],
        "leafHash": vector["leafHash"],
        "proof": proof,
    }
    idx, size = vector["leafIdx"], vector["treeSize"]
    cases = [{**base, "proof": variant, "desc": desc} for desc, variant in _proof_variants(proof)]
    cases += [
        {**base, "leafHash": _flip(vector["leafHash"], 7), "desc": "bit flip in the leaf hash"},
        {**base, "root": _flip(vector["root"], 255), "desc": "bit flip in the root"},
        {
            **base,
            "root": vector["leafHash"],
            "leafHash": vector["root"],
            "desc": "root and leaf swapped",
        },
        {**base, "leafIdx": idx + 1, "desc": "index + 1"},
        {**base, "leafIdx": size, "desc": "index equal to the size"},
        {**base, "treeSize": size + 1, "desc": "size + 1"},
        {**base, "treeSize": size - 1, "desc": "size - 1"},
        {**base, "treeSize": size * 2, "desc": "size x 2"},
        {**base, "leafIdx": -1, "desc": "negative index"},
    ]
    if idx > 0:
        cases.append({**base, "leafIdx": idx - 1, "desc": "index - 1"})
    # A size or index change that keeps the path's shape is a valid proof of another
    # tree (proof hashes are opaque), so it is no negative case.
    shape = _path_shape(idx, size)
    cases = [
        case
        for case in cases
        if case["proof"] != proof
        or case["leafHash"] != base["leafHash"]
        or case["root"] != base["root"]
        or _path_shape(case["leafIdx"], case["treeSize"]) != shape
    ]
    return [{**case, "from": f"inclusion {idx}/{size}"} for case in cases]


def consistency_cases(vector: dict[str, Any]) -> list[dict[str, Any]]:
    proof = vector["proof"] or []
    size1, size2 = vector["size1"], vector["size2"]
    base = {
        "size1": size1,
        "size2": size2,
        "root1": vector["root1"],
        "root2": vector["root2"],
        "proof": proof,
    }
    cases = [{**base, "proof": variant, "desc": desc} for desc, variant in _proof_variants(proof)]
    cases += [
        {**base, "root1": _flip(vector["root1"], 9), "desc": "bit flip in root1"},
        {**base, "root2": _flip(vector["root2"], 100), "desc": "bit flip in root2"},
        {**base, "size1": size1 + 1, "desc": "size1 + 1"},
        {**base, "size1": size1 - 1, "desc": "size1 - 1"},
        {**base, "size2": size2 + 1, "desc": "size2 + 1"},
        {**base, "size2": size2 * 2, "desc": "size2 x 2"},
        {**base, "size1": size1 * 2, "desc": "size1 x 2"},
        {**base, "size1": -1, "desc": "negative size1"},
    ]
    if size1 != size2:
        cases += [
            {**base, "root1": vector["root2"], "root2": vector["root1"], "desc": "roots swapped"},
            {**base, "size1": size2, "size2": size1, "desc": "sizes swapped"},
            {**base, "size2": size2 - 1, "desc": "size2 - 1"},
        ]
    shape = _consistency_shape(size1, size2)
    cases = [
        case
        for case in cases
        if case["proof"] != proof
        or case["root1"] != base["root1"]
        or case["root2"] != base["root2"]
        or _consistency_shape(case["size1"], case["size2"]) != shape
    ]
    return [{**case, "from": f"consistency {size1}->{size2}"} for case in cases]


def main() -> None:
    source = HERE / "rfc9162"
    inclusion = [
        case
        for path in sorted(source.glob("inclusion/*/happy-path.json"))
        for case in inclusion_cases(json.loads(path.read_text()))
    ]
    consistency = [
        case
        for path in sorted(source.glob("consistency/*/happy-path.json"))
        for case in consistency_cases(json.loads(path.read_text()))
    ]
    document = {
        "about": "Wrong variants of tests/vectors/rfc9162 happy paths; every case must fail.",
        "inclusion": inclusion,
        "consistency": consistency,
    }
    (HERE / "rfc9162-negative.json").write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
