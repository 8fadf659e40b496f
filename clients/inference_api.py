"""The node sandbox's local inference API: HTTP on 127.0.0.1 only, behind a bearer token.

The sandbox process (``clients/service.py``) serves it beside its gRPC socket, on
``[node] inference-port`` (0: an ephemeral port). At each start it draws a new token (32
random bytes, hex) and writes it 0600 to ``<workspace>/sandbox/inference.token``, and
its address to ``<workspace>/sandbox/inference.json`` (``{"url", "pid"}``); both are
removed when it stops. Only the node's user can read the token, so only the node's
operator (``ark node infer``) can ask.

Endpoints (every one needs ``Authorization: Bearer <token>``)::

    POST /v1/classify  {"texts": [...], "adapter": "final"|"baseline", "run_id": N|null}
        -> {"run_id", "adapter", "predictions": [{"label", "scores": {label: p}}]}
    POST /v1/complete  (the same, plus "max_new_tokens" <= 128)
        -> {"run_id", "adapter", "completions": [{"completion"}]}
    GET  /v1/status    -> {"node", "attested", "adapters": {"final": [...], "baseline": [...]}}

An error is ``{"error": code, "message": ...}`` with a 4xx status (:data:`STATUS`); no
response, log line or journal entry ever echoes a request's text. The access log is off.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from clients import inference
from clients.adapters import BASELINE, FINAL, AdapterStore, stored_runs
from clients.sandbox import NodeSandbox
from sandbox.errors import (
    ConfigError,
    InferenceInputInvalid,
    InferenceTaskMismatch,
    NoAdapterStored,
)
from sandbox.files import PRIVATE, write_atomic

log = logging.getLogger("ark.sandbox.inference")
LOOPBACK = "127.0.0.1"
TOKEN_BYTES = 32
START_SECONDS = 10.0
UNAUTHORIZED = "unauthorized"
TOO_LARGE = "too-large"
# Fixed code -> HTTP status.
STATUS = {
    InferenceInputInvalid.code: 400,
    UNAUTHORIZED: 401,
    inference.NOT_ATTESTED: 403,
    NoAdapterStored.code: 404,
    inference.ADAPTER_UNUSABLE: 409,
    TOO_LARGE: 413,
    InferenceTaskMismatch.code: 422,
    inference.INFERENCE_FAILED: 500,
}


def _error(code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": code, "message": message}, status_code=STATUS.get(code, 500))


def _authorized(request: Request, token: str) -> bool:
    given = request.headers.get("authorization", "")
    return hmac.compare_digest(given.encode(), f"Bearer {token}".encode())


async def _body(request: Request, limit: int) -> bytes | None:
    """The request body, or None once it is longer than ``limit`` (read no further)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        return None
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def create_app(sandbox: NodeSandbox, token: str) -> FastAPI:
    """The API's routes over ``sandbox``; every request must carry ``token``."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    limit = inference.max_body_bytes(sandbox.node.max_row_bytes)

    @app.middleware("http")
    async def require_token(request: Request, call_next: Any) -> Any:
        if not _authorized(request, token):
            log.warning("inference API: a request without the right token was refused")
            return _error(UNAUTHORIZED, "a valid bearer token is required")
        return await call_next(request)

    async def answer(request: Request, endpoint: str) -> JSONResponse:
        body = await _body(request, limit)
        if body is None:
            return _error(TOO_LARGE, f"the request is larger than {limit} bytes")
        try:
            reply = await run_in_threadpool(sandbox.infer, body, endpoint)
        except Exception as exc:  # journaled and logged by the sandbox; a code leaves
            return _error(inference.failure_code(exc), inference.failure_message(exc))
        return JSONResponse(reply)

    @app.post("/v1/classify")
    async def classify(request: Request) -> JSONResponse:
        return await answer(request, inference.CLASSIFY)

    @app.post("/v1/complete")
    async def complete(request: Request) -> JSONResponse:
        return await answer(request, inference.COMPLETE)

    @app.get("/v1/status")
    async def status() -> JSONResponse:
        folder = AdapterStore.directory_of(sandbox.node.workspace())
        return JSONResponse(
            {
                "node": sandbox.node.name,
                "attested": sandbox.attestation is not None,
                "adapters": {which: stored_runs(folder, which) for which in (FINAL, BASELINE)},
                "max_texts": inference.MAX_TEXTS,
                "max_text_bytes": sandbox.node.max_row_bytes,
            }
        )

    return app


@dataclass
class InferenceServer:
    """The API served by uvicorn in a thread of the sandbox process (see the module
    docstring); :meth:`start` returns its URL, :meth:`stop` ends it and removes the
    token and address files."""

    sandbox: NodeSandbox
    token: str = field(default_factory=lambda: secrets.token_hex(TOKEN_BYTES), repr=False)
    url: str = ""
    _server: Any = None
    _thread: threading.Thread | None = None

    def start(self) -> str:
        import uvicorn

        node = self.sandbox.node
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind((LOOPBACK, node.inference_port))
        except OSError as exc:
            listener.close()
            raise ConfigError(
                f"cannot listen on {LOOPBACK}:{node.inference_port}: {exc.strerror}",
                path=node.source,
                key="node.inference-port",
            ) from None
        port = listener.getsockname()[1]
        config = uvicorn.Config(
            create_app(self.sandbox, self.token),
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",
            server_header=False,
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run,
            kwargs={"sockets": [listener]},
            name="ark-inference",
            daemon=True,
        )
        self._thread.start()
        deadline = time.monotonic() + START_SECONDS
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise ConfigError(
                    f"the inference API did not start on {LOOPBACK}:{port}",
                    path=node.source,
                    key="node.inference-port",
                )
            time.sleep(0.02)
        self.url = f"http://{LOOPBACK}:{port}"
        node.inference_token_path().parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        write_atomic(node.inference_token_path(), self.token.encode("ascii"), PRIVATE)
        write_atomic(
            node.inference_address_path(),
            json.dumps({"url": self.url, "pid": os.getpid()}).encode("utf-8"),
            PRIVATE,
        )
        log.info("inference API of %s on %s", node.name, self.url)
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=START_SECONDS)
        if self.url:
            self.sandbox.node.inference_token_path().unlink(missing_ok=True)
            self.sandbox.node.inference_address_path().unlink(missing_ok=True)
            self.url = ""
