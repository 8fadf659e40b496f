"""The provider's log service and the auditor's side: the read-only gRPC service and its
client, the auditor's checks and the HTML report."""

# The audit holds every event in memory: ~300 bytes each, so this is a few GB at most.
MAX_AUDIT_ENTRIES = 10_000_000
