"""The one loader for test vectors: every file under ``tests/vectors/`` is read here.

Vectors are JSON (the RFC 9162 Merkle proofs, the STREAM layout, the event schema), read
with :mod:`sandbox.strictjson` so that a vector file with a duplicate key or a number no
parser agrees on fails loudly instead of testing something else. :func:`vector_cases` turns a
list of vectors into ``pytest.param`` values with readable ids.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from sandbox import strictjson

VECTORS = Path(__file__).parent / "vectors"


def vector_path(*parts: str) -> Path:
    """A file or folder under ``tests/vectors``."""
    return VECTORS.joinpath(*parts)


def load_vector(*parts: str) -> Any:
    """One vector file, parsed strictly."""
    return strictjson.loads(vector_path(*parts).read_bytes())


def load_vectors(*parts: str, pattern: str = "*.json") -> list[Any]:
    """Every file matching ``pattern`` under a folder of ``tests/vectors``, in name order."""
    return [
        strictjson.loads(path.read_bytes()) for path in sorted(vector_path(*parts).glob(pattern))
    ]


def vector_cases(vectors: Iterable[Any], name: Callable[[Any], str]) -> list[Any]:
    """``vectors`` as parameters for ``pytest.mark.parametrize``, each named by ``name``."""
    return [pytest.param(vector, id=name(vector)) for vector in vectors]
