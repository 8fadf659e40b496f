"""A sandbox's TLS client channel to one of the provider's gRPC services."""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Self

import grpc


class TlsChannel:
    """A gRPC channel to one TLS service, trusting only ``ca_cert``; subclasses add their
    stub and calls. Closes with ``close()`` or as a context manager."""

    def __init__(
        self,
        address: str,
        *,
        ca_cert: Path | bytes,
        timeout: float,
        max_receive_bytes: int | None = None,
    ):
        roots = ca_cert if isinstance(ca_cert, bytes) else ca_cert.read_bytes()
        options = (
            []
            if max_receive_bytes is None
            else [("grpc.max_receive_message_length", max_receive_bytes)]
        )
        self.address = address
        self.timeout = timeout
        self._channel = grpc.secure_channel(
            address, grpc.ssl_channel_credentials(roots), options=options
        )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()
