"""RFC 9162 Merkle trees: hashes, inclusion and consistency proofs, and their verifiers.

Pure functions with no I/O. Leaves hash as ``SHA-256(0x00 || entry)`` and interior nodes
as ``SHA-256(0x01 || left || right)``; proofs follow RFC 9162 §2.1.3 and §2.1.4.

Proof *generation* takes its tree either as the list of entries (tests, small logs) or as
a :data:`SubtreeHash` callable, ``subtree(lo, hi)`` returning the hash of the leaves
``[lo, hi)``. A store answers that from interior hashes it keeps, so a proof costs
O(log n) lookups and never recomputes the tree.

The verifiers return ``None`` on success and raise :class:`InclusionProofError` or
:class:`ConsistencyProofError` on any malformed or wrong input.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

from sandbox.errors import ConsistencyProofError, InclusionProofError, LogVerificationError

HASH_SIZE = 32
# A tree of 2**64 leaves has a 64-step path; anything longer is malformed.
MAX_PROOF_LENGTH = 64
EMPTY_ROOT = hashlib.sha256(b"").digest()

SubtreeHash = Callable[[int, int], bytes]


def leaf_hash(entry: bytes) -> bytes:
    """The RFC 9162 hash of one log entry."""
    return hashlib.sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """The RFC 9162 hash of an interior node."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def split_point(size: int) -> int:
    """The largest power of two smaller than ``size`` (``size`` > 1)."""
    return 1 << ((size - 1).bit_length() - 1)


def root_hash(entries: Sequence[bytes]) -> bytes:
    """The Merkle tree hash of ``entries`` (RFC 9162 MTH)."""
    return root_of_leaf_hashes(leaf_hash(entry) for entry in entries)


class CompactRange:
    """The roots of the perfect subtrees that cover leaves ``[0, size)``, left to right:
    all a log needs to append the next leaf and to hash its whole tree."""

    def __init__(self, size: int = 0, roots: Sequence[bytes] = ()):
        levels = [level for level in reversed(range(size.bit_length())) if size >> level & 1]
        if len(levels) != len(roots):
            raise ValueError(f"a tree of {size} leaves has {len(levels)} perfect subtrees")
        self.size = size
        self._roots = list(zip(levels, roots, strict=True))

    def append(self, leaf: bytes) -> list[tuple[int, int, bytes]]:
        """Add the next leaf hash; return the interior nodes it completes as
        ``(level, index at that level, hash)``."""
        completed: list[tuple[int, int, bytes]] = []
        level, value = 0, leaf
        while self._roots and self._roots[-1][0] == level:
            value = node_hash(self._roots.pop()[1], value)
            level += 1
            completed.append((level, self.size >> level, value))
        self._roots.append((level, value))
        self.size += 1
        return completed

    def root(self) -> bytes:
        """The tree hash of the leaves so far."""
        if not self._roots:
            return EMPTY_ROOT
        value = self._roots[-1][1]
        for _, left in reversed(self._roots[:-1]):
            value = node_hash(left, value)
        return value


def root_of_leaf_hashes(leaves: Iterable[bytes]) -> bytes:
    """The tree hash over leaf hashes, in one pass with O(log n) memory."""
    compact = CompactRange()
    for leaf in leaves:
        compact.append(leaf)
    return compact.root()


def entries_subtree(entries: Sequence[bytes]) -> SubtreeHash:
    """A :data:`SubtreeHash` over an in-memory list of entries."""
    leaves = [leaf_hash(entry) for entry in entries]
    return lambda lo, hi: root_of_leaf_hashes(leaves[lo:hi])


def _subtree_of(source: Sequence[bytes] | SubtreeHash) -> SubtreeHash:
    return source if callable(source) else entries_subtree(source)


def _check_size(name: str, value: object, error: type[LogVerificationError]) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise error(f"{name} must be a non-negative integer, got {value!r}")
    return value


def inclusion_proof(index: int, size: int, source: Sequence[bytes] | SubtreeHash) -> list[bytes]:
    """The audit path of leaf ``index`` in the tree of the first ``size`` leaves.

    ``source`` is the list of entries or a :data:`SubtreeHash`. Raises
    :class:`InclusionProofError` if ``index`` is not a leaf of that tree.
    """
    _check_size("size", size, InclusionProofError)
    _check_size("index", index, InclusionProofError)
    if index >= size:
        raise InclusionProofError(f"index {index} is not in a tree of size {size}")
    subtree = _subtree_of(source)
    proof: list[bytes] = []
    lo, hi = 0, size
    while hi - lo > 1:  # walk down from the root, collecting siblings
        k = split_point(hi - lo)
        if index < lo + k:
            proof.append(subtree(lo + k, hi))
            hi = lo + k
        else:
            proof.append(subtree(lo, lo + k))
            lo += k
    proof.reverse()
    return proof


def consistency_proof(size1: int, size2: int, source: Sequence[bytes] | SubtreeHash) -> list[bytes]:
    """The proof that the tree of ``size1`` leaves is a prefix of the tree of ``size2``.

    Empty when ``size1`` is 0 or equals ``size2``. Raises :class:`ConsistencyProofError`
    if ``size1 > size2``.
    """
    _check_size("size1", size1, ConsistencyProofError)
    _check_size("size2", size2, ConsistencyProofError)
    if size1 > size2:
        raise ConsistencyProofError(f"size1 {size1} is larger than size2 {size2}")
    if size1 == 0 or size1 == size2:
        return []
    subtree = _subtree_of(source)
    proof: list[bytes] = []
    lo, hi, m, complete = 0, size2, size1, True  # SUBPROOF(m, D[lo:hi], complete)
    while m != hi - lo:
        k = split_point(hi - lo)
        if m <= k:
            proof.append(subtree(lo + k, hi))
            hi = lo + k
        else:
            proof.append(subtree(lo, lo + k))
            lo, m, complete = lo + k, m - k, False
    if not complete:
        proof.append(subtree(lo, hi))
    proof.reverse()
    return proof


def _check_hashes(proof: object, error: type[LogVerificationError], **named: object) -> list[bytes]:
    for name, value in named.items():
        if not isinstance(value, bytes) or len(value) != HASH_SIZE:
            raise error(f"{name} must be {HASH_SIZE} bytes, got {_describe(value)}")
    if isinstance(proof, (bytes, str)) or not isinstance(proof, Sequence):
        raise error(f"proof must be a sequence of hashes, got {type(proof).__name__}")
    if len(proof) > MAX_PROOF_LENGTH:
        raise error(f"proof has {len(proof)} hashes, more than any tree needs")
    for position, item in enumerate(proof):
        if not isinstance(item, bytes) or len(item) != HASH_SIZE:
            raise error(f"proof[{position}] must be {HASH_SIZE} bytes, got {_describe(item)}")
    return list(proof)


def _describe(value: object) -> str:
    if isinstance(value, bytes):
        return f"{len(value)} bytes"
    return type(value).__name__


def _shift_until_odd(fn: int, sn: int) -> tuple[int, int]:
    while fn & 1 == 0 and fn != 0:
        fn, sn = fn >> 1, sn >> 1
    return fn, sn


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf_hash`` is leaf ``index`` of the tree of ``size`` with ``root``.

    RFC 9162 §2.1.3.2. Returns ``None``; raises :class:`InclusionProofError`.
    """
    _check_size("index", index, InclusionProofError)
    _check_size("size", size, InclusionProofError)
    hashes = _check_hashes(proof, InclusionProofError, leaf_hash=leaf_hash, root=root)
    if index >= size:
        raise InclusionProofError(f"index {index} is not in a tree of size {size}")
    fn, sn, value = index, size - 1, leaf_hash
    for sibling in hashes:
        if sn == 0:
            raise InclusionProofError("proof is longer than the path to the root")
        if fn & 1 or fn == sn:
            value = node_hash(sibling, value)
            if fn & 1 == 0:
                fn, sn = _shift_until_odd(fn, sn)
        else:
            value = node_hash(value, sibling)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise InclusionProofError("proof is shorter than the path to the root")
    if value != root:
        raise InclusionProofError(f"leaf {index} does not lead to the root of size {size}")


def verify_consistency(
    size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes
) -> None:
    """Check that the tree of ``size1`` with ``root1`` is a prefix of the one of ``size2``.

    RFC 9162 §2.1.4.2. Returns ``None``; raises :class:`ConsistencyProofError`.
    """
    _check_size("size1", size1, ConsistencyProofError)
    _check_size("size2", size2, ConsistencyProofError)
    hashes = _check_hashes(proof, ConsistencyProofError, root1=root1, root2=root2)
    if size1 > size2:
        raise ConsistencyProofError(f"size1 {size1} is larger than size2 {size2}")
    if size1 == size2:
        if hashes:
            raise ConsistencyProofError("trees of the same size take an empty proof")
        if root1 != root2:
            raise ConsistencyProofError(f"two different roots for the same size {size1}")
        return
    if size1 == 0:
        if hashes:
            raise ConsistencyProofError("the empty tree takes an empty proof")
        if root1 != EMPTY_ROOT:
            raise ConsistencyProofError("root1 is not the empty tree's root")
        return
    if not hashes:
        raise ConsistencyProofError(f"empty proof between sizes {size1} and {size2}")
    if size1 & (size1 - 1) == 0:  # size1 is a power of two: its root is the first node
        hashes = [root1, *hashes]
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn, sn = fn >> 1, sn >> 1
    first = second = hashes[0]
    for node in hashes[1:]:
        if sn == 0:
            raise ConsistencyProofError("proof is longer than the trees need")
        if fn & 1 or fn == sn:
            first = node_hash(node, first)
            second = node_hash(node, second)
            if fn & 1 == 0:
                fn, sn = _shift_until_odd(fn, sn)
        else:
            second = node_hash(second, node)
        fn, sn = fn >> 1, sn >> 1
    if sn != 0:
        raise ConsistencyProofError("proof is shorter than the trees need")
    if first != root1:
        raise ConsistencyProofError(f"proof does not lead to root1 of size {size1}")
    if second != root2:
        raise ConsistencyProofError(f"proof does not lead to root2 of size {size2}")
