"""The node operator's client of its sandbox's local inference API (``ark node infer``,
the demo): finds the API's address and token in the node's workspace, and turns the
API's fixed error codes back into typed errors."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil

from sandbox.config import NodeConfig
from sandbox.errors import (
    DataError,
    InferenceError,
    InferenceInputInvalid,
    InferenceTaskMismatch,
    InferenceUnavailable,
    NoAdapterStored,
    SandboxUnavailable,
)
from sandbox.protocol import INFERENCE_MAX_TEXTS

TIMEOUT_SECONDS = 300.0
_ERRORS: dict[str, type[InferenceError]] = {
    kind.code: kind
    for kind in (
        InferenceInputInvalid,
        InferenceUnavailable,
        NoAdapterStored,
        InferenceTaskMismatch,
    )
}


def _check_listener(address: Path, url: str, pid: int) -> None:
    """SandboxUnavailable unless the published sandbox process is alive, this user's,
    and the one listening at ``url``: a file left by a sandbox that was killed must not
    send the operator's texts (and the token) to whoever took its port since."""
    port = httpx.URL(url).port
    try:
        proc = psutil.Process(pid)
        ours = proc.uids().real == os.getuid()
        listening = any(
            c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
            for c in proc.net_connections(kind="tcp4")
        )
    except (psutil.Error, OSError):
        ours = listening = False
    if not (ours and listening):
        raise SandboxUnavailable(
            f"{address}: the sandbox that published {url} (pid {pid}) is not serving it "
            "any more; restart `ark node sandbox`"
        )


class InferenceClient:
    """Requests to one node's inference API at ``url`` with ``token``."""

    def __init__(self, url: str, token: str, *, timeout: float = TIMEOUT_SECONDS):
        self.url = url
        self._client = httpx.Client(
            base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=timeout
        )

    @classmethod
    def for_node(cls, node: NodeConfig) -> InferenceClient:
        """The API of ``node``'s running sandbox; SandboxUnavailable if it publishes none."""
        address, token = node.inference_address_path(), node.inference_token_path()
        try:
            published = json.loads(address.read_text(encoding="utf-8"))
            url, pid = str(published["url"]), int(published["pid"])
            secret = token.read_text(encoding="ascii").strip()
        except (OSError, ValueError, KeyError, TypeError):
            raise SandboxUnavailable(
                f"{address}: no inference API published; is `ark node sandbox --config "
                f"{node.source}` running?"
            ) from None
        _check_listener(address, url, pid)
        return cls(url, secret)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> InferenceClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _request(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            reply = self._client.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise SandboxUnavailable(
                f"the inference API at {self.url} did not answer ({type(exc).__name__}); "
                "is `ark node sandbox` running?"
            ) from None
        try:
            payload = reply.json()
        except ValueError:
            payload = {}
        if reply.is_success:
            return payload
        code = str(payload.get("error", "")) if isinstance(payload, dict) else ""
        message = str(payload.get("message", "")) if isinstance(payload, dict) else ""
        message = message or f"HTTP {reply.status_code}"
        if code == "unauthorized":
            raise SandboxUnavailable(
                f"the inference API at {self.url} refused the token: {message} (a restarted "
                "sandbox draws a new one)"
            )
        raise _ERRORS.get(code, InferenceError)(message)

    def status(self) -> dict[str, Any]:
        return dict(self._request("GET", "/v1/status"))

    def classify(
        self, texts: list[str], adapter: str = "final", run_id: int | None = None
    ) -> dict[str, Any]:
        return dict(
            self._request(
                "POST", "/v1/classify", {"texts": texts, "adapter": adapter, "run_id": run_id}
            )
        )

    def complete(
        self,
        prompts: list[str],
        adapter: str = "final",
        run_id: int | None = None,
        max_new_tokens: int = 32,
    ) -> dict[str, Any]:
        body = {
            "texts": prompts,
            "adapter": adapter,
            "run_id": run_id,
            "max_new_tokens": max_new_tokens,
        }
        return dict(self._request("POST", "/v1/complete", body))


@dataclass(frozen=True)
class InferenceInput:
    """One line of an input file: the text (or prompt), whether it is a prompt, and the
    label or completion the line expects (shown beside the answer; "" when none)."""

    text: str
    prompt: bool
    expected: str


def read_inputs(path: Path, *, limit: int) -> list[InferenceInput]:
    """An input file for ``ark node infer``: JSONL, one object per line with ``text``
    (classify) or ``prompt`` (complete), optionally ``label``/``completion``; blank lines
    are skipped. At most :data:`INFERENCE_MAX_TEXTS` lines of one kind; DataError names the line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(path, f"cannot read: {exc}") from None
    inputs: list[InferenceInput] = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise DataError(path, "not a JSON object", row=number) from None
        if not isinstance(row, dict):
            raise DataError(path, "not a JSON object", row=number)
        prompt = "prompt" in row
        text = row.get("prompt" if prompt else "text")
        if not isinstance(text, str) or not text.strip():
            raise DataError(path, 'needs a non-empty "text" or "prompt"', row=number)
        if len(text.encode("utf-8")) > limit:
            raise DataError(path, f"longer than node.max-row-bytes ({limit})", row=number)
        if inputs and inputs[0].prompt != prompt:
            raise DataError(path, 'mixes "text" and "prompt" lines', row=number)
        expected = row.get("completion" if prompt else "label", "")
        inputs.append(InferenceInput(text, prompt, str(expected)))
    if not inputs:
        raise DataError(path, "holds no text")
    if len(inputs) > INFERENCE_MAX_TEXTS:
        raise DataError(
            path, f"holds {len(inputs)} texts; at most {INFERENCE_MAX_TEXTS} per request"
        )
    return inputs
