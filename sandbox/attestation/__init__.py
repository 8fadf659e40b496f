"""Remote attestation (RFC 9334 roles): evidence, attesters, verifier, appraisal policy.

The built-in backends register their TEE kinds (:mod:`sandbox.attestation.kinds`) here,
so whichever module of the package a caller imports, the registry already knows them.
"""

from sandbox.attestation import stub  # noqa: F401  (registers the development stub kind)
