"""The transparency log: RFC 9162 Merkle tree, C2SP checkpoints, store, service, audit."""

# The audit holds every event in memory: ~300 bytes each, so this is a few GB at most.
MAX_AUDIT_ENTRIES = 10_000_000
