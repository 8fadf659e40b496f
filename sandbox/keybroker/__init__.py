"""The sandbox's side of key release (the provider's broker is ``sandbox.ops.keybroker``)."""

# A denial the broker answers while a client is over its flood limits: retry later. Sent
# as gRPC's RESOURCE_EXHAUSTED, since the proto's DenialCode has no such value.
RATE_LIMITED = "RATE_LIMITED"
