"""Remote attestation (RFC 9334 roles): evidence, attesters, verifier, appraisal policy."""
