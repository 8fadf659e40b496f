"""The transparency log's core: RFC 9162 Merkle tree, C2SP checkpoints, the SQLite store."""
