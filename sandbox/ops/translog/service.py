"""The transparency log over gRPC with TLS: read-only, a thin layer over :class:`LogStore`.

Nothing here appends. Provider processes append by writing the log's database; the
service signs a fresh checkpoint whenever a reader asks and the log has grown.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import grpc

from protos.ark.v1 import translog_pb2 as pb
from protos.ark.v1 import translog_pb2_grpc as pb_grpc
from sandbox.errors import LogVerificationError
from sandbox.ops.tls import start_tls_server
from sandbox.translog.note import NoteSigner
from sandbox.translog.store import LogStore

log = logging.getLogger("ark.translog")
# Entries per GetEntries reply: a few hundred KiB at the events' usual size.
MAX_PAGE = 1000


class TransparencyLogServicer(pb_grpc.TransparencyLogServicer):
    """Answers from a read-only view of the store; signs checkpoints with ``signer``."""

    def __init__(self, reader: LogStore, writer: LogStore, signer: NoteSigner):
        self.reader = reader
        self.writer = writer
        self.signer = signer
        self._lock = threading.Lock()

    def GetCheckpoint(
        self, request: pb.GetCheckpointRequest, context: grpc.ServicerContext
    ) -> pb.SignedCheckpoint:
        with self._lock:
            return pb.SignedCheckpoint(note=self.writer.sign_checkpoint(self.signer))

    def GetEntries(
        self, request: pb.GetEntriesRequest, context: grpc.ServicerContext
    ) -> pb.Entries:
        if request.end < request.start:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "end is before start")
        end = min(request.end, request.start + MAX_PAGE)
        with self._lock:
            entries = self.reader.entries(request.start, end)
        return pb.Entries(start=request.start, entries=entries)

    def GetInclusionProof(
        self, request: pb.GetInclusionProofRequest, context: grpc.ServicerContext
    ) -> pb.InclusionProof:
        with self._lock:
            if request.WhichOneof("leaf") == "leaf_hash":
                found = self.reader.index_of(request.leaf_hash)
                if found is None or found >= request.tree_size:
                    context.abort(grpc.StatusCode.NOT_FOUND, "no such leaf in that tree")
                index = int(found or 0)
            else:
                index = request.index
            try:
                hashes = self.reader.inclusion_proof(index, request.tree_size)
            except LogVerificationError as exc:
                context.abort(grpc.StatusCode.OUT_OF_RANGE, str(exc))
        return pb.InclusionProof(index=index, tree_size=request.tree_size, hashes=hashes)

    def GetConsistencyProof(
        self, request: pb.GetConsistencyProofRequest, context: grpc.ServicerContext
    ) -> pb.ConsistencyProof:
        with self._lock:
            try:
                hashes = self.reader.consistency_proof(request.first, request.second)
            except LogVerificationError as exc:
                context.abort(grpc.StatusCode.OUT_OF_RANGE, str(exc))
        return pb.ConsistencyProof(first=request.first, second=request.second, hashes=hashes)


def add_log_service(
    server: grpc.Server,
    writer: LogStore,
    signer: NoteSigner,
    servicer: type[TransparencyLogServicer] = TransparencyLogServicer,
) -> None:
    """Register the log on ``server``, reading through a read-only connection.
    ``servicer`` lets a test stage a lying log."""
    reader = LogStore(writer.path, readonly=True)
    pb_grpc.add_TransparencyLogServicer_to_server(servicer(reader, writer, signer), server)


def serve_log(
    store: LogStore,
    signer: NoteSigner,
    *,
    address: str,
    cert: Path,
    key: Path,
    servicer: type[TransparencyLogServicer] = TransparencyLogServicer,
) -> tuple[grpc.Server, int]:
    """The log alone on a TLS gRPC server (tests and the bench; ``ark provider serve``
    puts it beside the key broker)."""
    return start_tls_server(
        [lambda server: add_log_service(server, store, signer, servicer)],
        address=address,
        cert=cert,
        key=key,
        workers=2,
    )
