"""Local inference with a stored adapter: the request's rules and the model's answers.

A request (the local HTTP API's body, ``clients/inference_api.py``) is a JSON object::

    {"texts": ["...", ...], "adapter": "final" | "baseline", "run_id": 7 | null,
     "max_new_tokens": 32}            # the last only for completions (causal-lm)

At most :data:`MAX_TEXTS` texts, each a non-empty string of at most the node's
``max-row-bytes`` (UTF-8); ``adapter`` defaults to ``final`` and ``run_id`` to the run
whose final adapter was stored last. Every bad request is an
:class:`~sandbox.errors.InferenceInputInvalid` whose message never quotes a text.

Classification answers each text's label and the softmax score of every label;
causal-lm answers each prompt's greedy completion (at most :data:`MAX_NEW_TOKENS` new
tokens). What runs the model is :meth:`clients.sandbox.NodeSandbox.infer`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from clients.adapters import FINAL, WHICH
from sandbox.config import TASK_CLASSIFICATION, RunSpec
from sandbox.digests import sha256_hex
from sandbox.errors import (
    AdapterStoreError,
    ArkError,
    AttestationError,
    InferenceError,
    InferenceInputInvalid,
    KeyBrokerUnavailable,
    KeyReleaseDenied,
    SealedModelError,
)
from sandbox.protocol import INFERENCE_MAX_NEW_TOKENS, INFERENCE_MAX_TEXTS

MAX_TEXTS = INFERENCE_MAX_TEXTS
MAX_NEW_TOKENS = INFERENCE_MAX_NEW_TOKENS
DEFAULT_NEW_TOKENS = 32
CLASSIFY = "classify"
COMPLETE = "complete"
_FIELDS = {CLASSIFY: {"texts", "adapter", "run_id"}}
_FIELDS[COMPLETE] = _FIELDS[CLASSIFY] | {"max_new_tokens"}
# A JSON string may take six bytes per UTF-8 byte (\u00XX escapes), plus the framing.
_JSON_OVERHEAD = 6
_FRAMING_BYTES = 4096
# Fixed codes the API answers with, for failures that are not an InferenceError.
ADAPTER_UNUSABLE = "adapter-unusable"
NOT_ATTESTED = "not-attested"
INFERENCE_FAILED = "inference-failed"


def max_body_bytes(max_row_bytes: int) -> int:
    """The largest request body worth reading: a full batch of the longest texts."""
    return MAX_TEXTS * (max_row_bytes * _JSON_OVERHEAD + 8) + _FRAMING_BYTES


@dataclass(frozen=True)
class InferenceRequest:
    """A validated request: the texts, which adapter of which run (None: the latest),
    the completion length, and the SHA-256 of the body as received (for the journal)."""

    texts: tuple[str, ...]
    which: str = FINAL
    run_id: int | None = None
    max_new_tokens: int = DEFAULT_NEW_TOKENS
    request_sha256: str = ""


def _integer(value: Any, name: str, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InferenceInputInvalid(f"{name!r} must be an integer >= {low}")
    if high is not None and value > high:
        raise InferenceInputInvalid(f"{name!r} must be at most {high}")
    return value


def parse_request(body: bytes, endpoint: str, *, max_row_bytes: int) -> InferenceRequest:
    """``body`` (hostile) as a request for ``endpoint`` (classify or complete)."""
    digest = sha256_hex(body)
    if len(body) > max_body_bytes(max_row_bytes):
        raise InferenceInputInvalid(
            f"the request is larger than {max_body_bytes(max_row_bytes)} bytes"
        )
    try:
        values = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise InferenceInputInvalid("the request body is not JSON") from None
    if not isinstance(values, dict):
        raise InferenceInputInvalid("the request body must be a JSON object")
    if set(values) - _FIELDS[endpoint]:  # the field's name is not echoed: it may be a text
        raise InferenceInputInvalid(f"unknown field; allowed: {sorted(_FIELDS[endpoint])}")
    texts = values.get("texts")
    if not isinstance(texts, list) or not 1 <= len(texts) <= MAX_TEXTS:
        raise InferenceInputInvalid(f"'texts' must be a list of 1 to {MAX_TEXTS} strings")
    for n, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            raise InferenceInputInvalid(f"text {n} must be a non-empty string")
        size = len(text.encode("utf-8", errors="surrogatepass"))
        if size > max_row_bytes:
            raise InferenceInputInvalid(
                f"text {n} is {size} bytes, more than node.max-row-bytes ({max_row_bytes})"
            )
    which = values.get("adapter", FINAL)
    if which not in WHICH:
        raise InferenceInputInvalid(f"'adapter' must be one of {list(WHICH)}")
    run_id = values.get("run_id")
    if run_id is not None:
        run_id = _integer(run_id, "run_id", 0, 2**64 - 1)
    tokens = _integer(
        values.get("max_new_tokens", DEFAULT_NEW_TOKENS), "max_new_tokens", 1, MAX_NEW_TOKENS
    )
    return InferenceRequest(tuple(texts), which, run_id, tokens, digest)


def failure_code(exc: BaseException) -> str:
    """The fixed code the local API answers a failure with (its detail stays here)."""
    if isinstance(exc, InferenceError):
        return exc.code
    if isinstance(exc, AdapterStoreError):
        return ADAPTER_UNUSABLE
    if isinstance(
        exc, AttestationError | KeyReleaseDenied | KeyBrokerUnavailable | SealedModelError
    ):
        return NOT_ATTESTED
    return INFERENCE_FAILED


def failure_message(exc: BaseException) -> str:
    """What the local caller reads: an Ark error's own message (never a text), or only
    the type of anything else (a library's message might quote its input)."""
    if isinstance(exc, ArkError):
        return f"{type(exc).__name__}: {exc}"
    return f"{type(exc).__name__}: internal error; see the sandbox log"


def classify(
    model: Any, tokenizer: Any, spec: RunSpec, texts: Sequence[str]
) -> list[dict[str, Any]]:
    """Each text's label and every label's softmax score."""
    import torch

    model.eval()
    with torch.no_grad():
        encoded = tokenizer(
            list(texts),
            truncation=True,
            max_length=spec.max_length,
            padding=True,
            return_tensors="pt",
        )
        scores = torch.softmax(model(**encoded).logits.float(), dim=-1).tolist()
    return [
        {
            "label": spec.labels[max(range(len(row)), key=row.__getitem__)],
            "scores": dict(zip(spec.labels, row, strict=True)),
        }
        for row in scores
    ]


def complete(
    model: Any, tokenizer: Any, spec: RunSpec, texts: Sequence[str], max_new_tokens: int
) -> list[dict[str, Any]]:
    """Each prompt's greedy completion (only the new tokens, decoded)."""
    import torch

    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    answers = []
    with torch.no_grad():
        for text in texts:  # one at a time: no padding side to get wrong
            encoded = tokenizer(
                text, truncation=True, max_length=spec.max_length, return_tensors="pt"
            )
            out = model.generate(
                **encoded, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad
            )
            new = out[0, encoded["input_ids"].shape[1] :]
            answers.append({"completion": tokenizer.decode(new, skip_special_tokens=True)})
    return answers


def is_classification(spec: RunSpec) -> bool:
    return spec.task == TASK_CLASSIFICATION
