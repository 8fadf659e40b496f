"""The key broker: attestation-gated release of sealed-model content keys."""
