"""The node's check of the aggregator (passport model): before it sends anything, a node
appraises the aggregator's evidence over a nonce the node chose, against its own policy.

The policy (``[node.sandbox] aggregator-policy``) and the roots it trusts
(``trusted-roots``) are the node operator's; the provider's code cannot change them.
The policy always pins the aggregator's ueid (``allowed-nodes``).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from sandbox.attestation.backends import load_trusted_roots, verifiers_for
from sandbox.attestation.verifier import Appraisal, AppraisalPolicy
from sandbox.config import NodeConfig
from sandbox.errors import ConfigError


def verify_aggregator(
    node: NodeConfig,
    *,
    tee: str,
    evidence: str,
    aggregator_key: bytes,
    nonce: bytes,
    now: dt.datetime,
) -> Appraisal:
    """Raise an AttestationError unless the aggregator's evidence passes the node's policy.

    ``nonce`` is the one this node chose; ``aggregator_key`` is the HPKE public key the
    node will seal its update to, which the evidence must bind.
    """
    sandbox = node.require_sandbox()
    if sandbox.aggregator_policy is None or sandbox.trusted_roots is None:
        raise ConfigError(
            "no aggregator-policy / trusted-roots: this node cannot verify an aggregator, "
            "so it does not train",
            path=node.source,
            key="node.sandbox.aggregator-policy",
        )
    policy = load_aggregator_policy(sandbox.aggregator_policy)
    registry = verifiers_for(load_trusted_roots(sandbox.trusted_roots))
    return registry.appraise(
        tee, evidence, nonce=nonce, tee_pubkey=aggregator_key, policy=policy, now=now
    )


def load_aggregator_policy(path: Path) -> AppraisalPolicy:
    """The node's appraisal policy for the aggregator, which must pin its ueid.

    Without ``allowed-nodes`` any TEE instance the trusted roots certify (another
    node's key, say) would pass as the aggregator, and the node would seal its update
    to it; ``ark node init`` always writes the ueid from the provider's public bundle.
    """
    policy = AppraisalPolicy.load(path)
    if not policy.allowed_nodes:
        found = "nothing" if policy.allowed_nodes is None else "an empty list"
        raise ConfigError(
            "must pin the aggregator's ueid (the provider's public aggregator-ueid), "
            f"found {found}",
            path=path,
            key="policy.allowed-nodes",
        )
    return policy
