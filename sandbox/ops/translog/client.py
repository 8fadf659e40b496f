"""Reading a transparency log over gRPC with TLS, as a :class:`LogReader`."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import grpc

from protos.ark.v1 import translog_pb2 as pb
from protos.ark.v1 import translog_pb2_grpc as pb_grpc
from sandbox.errors import (
    ArkError,
    ConsistencyProofError,
    EntryTampered,
    InclusionProofError,
    LogUnavailable,
)
from sandbox.tls import TlsChannel
from sandbox.translog.store import MAX_ENTRY_BYTES

DEFAULT_TIMEOUT = 30.0
Request = TypeVar("Request")
Reply = TypeVar("Reply")


class LogClient(TlsChannel):
    """A TLS gRPC client of the log, which it does not trust.

    Failures to reach it raise :class:`LogUnavailable`. A log that refuses a proof for a
    tree it signed raises the error of that proof (:class:`InclusionProofError` or
    :class:`ConsistencyProofError`); a page of entries that is not the one asked for
    raises :class:`InclusionProofError`.
    """

    def __init__(self, address: str, *, ca_cert: Path | bytes, timeout: float = DEFAULT_TIMEOUT):
        super().__init__(
            address, ca_cert=ca_cert, timeout=timeout, max_receive_bytes=64 * 1024 * 1024
        )
        self._stub = pb_grpc.TransparencyLogStub(self._channel)

    def _call(
        self,
        method: grpc.UnaryUnaryMultiCallable[Request, Reply],
        request: Request,
        refused: type[ArkError] = LogUnavailable,
    ) -> Reply:
        """Call ``method``; a NOT_FOUND or OUT_OF_RANGE answer raises ``refused``."""
        try:
            return method(request, timeout=self.timeout)
        except grpc.RpcError as exc:
            detail = exc.details() if isinstance(exc, grpc.Call) else str(exc)
            code = exc.code() if isinstance(exc, grpc.Call) else None
            if code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.OUT_OF_RANGE):
                raise refused(f"log at {self.address}: {detail}") from exc
            raise LogUnavailable(f"log at {self.address}: {detail}") from exc

    def checkpoint(self) -> str:
        reply = self._call(self._stub.GetCheckpoint, pb.GetCheckpointRequest())
        return reply.note

    def entries(self, start: int, end: int) -> list[bytes]:
        """Entries ``[start, end)``, fetched page by page; fewer if the log has fewer."""
        out: list[bytes] = []
        while start + len(out) < end:
            asked = start + len(out)
            reply = self._call(self._stub.GetEntries, pb.GetEntriesRequest(start=asked, end=end))
            if not reply.entries:
                break
            if reply.start != asked or len(reply.entries) > end - asked:
                raise InclusionProofError(
                    f"log at {self.address} answered {len(reply.entries)} entries from "
                    f"{reply.start} when asked for [{asked}, {end})"
                )
            for offset, entry in enumerate(reply.entries):
                if len(entry) > MAX_ENTRY_BYTES:
                    raise EntryTampered(
                        f"log at {self.address}: entry {asked + offset} is {len(entry)} "
                        f"bytes, more than any event ({MAX_ENTRY_BYTES})"
                    )
            out.extend(reply.entries)
        return out

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        return self._inclusion(pb.GetInclusionProofRequest(tree_size=size, index=index))[1]

    def inclusion_proof_by_leaf(self, leaf: bytes, size: int) -> tuple[int, list[bytes]]:
        """The index of the entry with leaf hash ``leaf`` and its audit path."""
        return self._inclusion(pb.GetInclusionProofRequest(tree_size=size, leaf_hash=leaf))

    def _inclusion(self, request: pb.GetInclusionProofRequest) -> tuple[int, list[bytes]]:
        reply = self._call(self._stub.GetInclusionProof, request, InclusionProofError)
        return reply.index, list(reply.hashes)

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        reply = self._call(
            self._stub.GetConsistencyProof,
            pb.GetConsistencyProofRequest(first=size1, second=size2),
            ConsistencyProofError,
        )
        return list(reply.hashes)
