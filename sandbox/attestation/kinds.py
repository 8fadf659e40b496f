"""TEE kinds: what each attestation backend says about its own kind of evidence.

The verifier and the attestation results ask this registry, never a particular backend,
whether a kind is a development one (its evidence proves no hardware isolation; results
say so in ``ark.stub`` and policies admit it only under ``allow-stub``), which hardware
model its evidence claims, and how its attestation-key certificate names the TEE
instance (ueid). A backend registers its kind when it is imported; the package imports
the built-in ones (:mod:`sandbox.attestation`), so every caller sees the same registry.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cryptography import x509

from sandbox.errors import TeeNotAccepted


@dataclass(frozen=True)
class TeeKind:
    """One TEE kind as its backend describes it."""

    name: str
    # A development kind (the stub) proves no hardware isolation: results say so, and a
    # policy admits it only when it allows stubs.
    development: bool
    # The ``hwmodel`` claim this kind's evidence must carry.
    hwmodel: str
    # The TEE instances (ueids) an attestation-key certificate of this kind is issued to;
    # evidence whose ueid claim is not among them is refused.
    certified_ueids: Callable[[x509.Certificate], frozenset[str]]


_KINDS: dict[str, TeeKind] = {}


def register_kind(kind: TeeKind) -> None:
    """Make ``kind`` known; RuntimeError if another backend already registered its name."""
    known = _KINDS.setdefault(kind.name, kind)
    if known is not kind:
        raise RuntimeError(f"TEE kind {kind.name!r} is already registered by another backend")


def unregister_kind(name: str) -> None:
    """Forget a kind (a backend that is unloaded, a test's own kind). A development kind
    is never forgotten: its results would then no longer have to say they are one."""
    kind = _KINDS.get(name)
    if kind is not None and kind.development:
        raise RuntimeError(f"TEE kind {name!r} is a development kind; it cannot be unregistered")
    _KINDS.pop(name, None)


def registered_kinds() -> list[str]:
    return sorted(_KINDS)


def tee_kind(name: str) -> TeeKind:
    """The registered kind ``name``; TeeNotAccepted for a kind no backend registered."""
    kind = _KINDS.get(name)
    if kind is None:
        raise TeeNotAccepted(
            f"no backend registered for TEE kind {name!r}; known: {registered_kinds()}"
        )
    return kind


def is_development(name: str) -> bool:
    """Whether ``name`` is a development kind, as its backend says.

    A kind no backend registered is not known to be one; its evidence cannot pass
    appraisal either, since the verifier looks its kind up with :func:`tee_kind`.
    """
    kind = _KINDS.get(name)
    return kind is not None and kind.development
