"""The provider's key broker: sessions and decisions (no I/O), flood limits, the gRPC service."""
