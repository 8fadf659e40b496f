"""The node sandbox's on-prem inference figures (issue 14), side by side in one run.

One node is provisioned for the pretrained MiniLM (``sandbox.models.default_model_dir()``),
sealed by a loopback provider whose key broker serves over TLS in this process; the
node's in-process :class:`~clients.sandbox.NodeSandbox` attests, and a short sealed run
(``tests/sealed_run.py``: hello, one training step, the final evaluation, each
instruction sealed by the real aggregator sandbox) leaves its final adapter stored
encrypted at rest. The texts are the first rows of the node's demo data. Then:

1. **Latency of one ticket**: the real ``ark node sandbox`` process serves the local
   HTTP API; the operator's client (``sandbox/ops/inference_client.py``, one keep-alive
   connection) posts ``/v1/classify`` with one text, :data:`LATENCY_REQUESTS` times after
   :data:`WARMUP` requests; p50 and p90 of the client's wall time per request.
2. **Throughput**: the same API, :data:`BATCHES` requests of :data:`BATCH` texts;
   texts per second of each, the median.
3. **Sandbox ÷ bare forward**: in this process, on the same batch, ``NodeSandbox.infer``
   (what the HTTP handler calls: parse the request, decrypt and verify the stored adapter,
   load it into the held model, tokenize, forward, softmax, journal) against a bare
   model built with transformers and peft from the plaintext model directory with the
   same adapter (tokenize, forward, softmax under ``torch.inference_mode``), same
   tokenizer, inputs and thread count. Interleaved bare, sandbox, bare-merged; the
   ratio is bare time ÷ sandbox time (1.0: no overhead), median of :data:`PAIRS` pairs
   (and, less sensitive to a shared machine's bursts, fastest bare ÷ fastest sandbox).
   Bare-merged is the same adapter merged into the weights (``merge_and_unload``). The
   bare and sandbox scores must agree (:data:`SCORE_TOLERANCE`), or the bench fails.
   ``NodeSandbox.infer`` with one ticket, in this process, is timed beside (p50, p90).
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from clients.data import load_examples
from clients.sandbox import NodeSandbox
from sandbox.config import TASK_CLASSIFICATION, NodeConfig, RunSpec
from sandbox.lora import Adapter, target_modules
from sandbox.models import default_model_dir, inspect_model_dir
from sandbox.ops.demo_data import DEMO_LABELS, write_demo_data
from sandbox.ops.federation import Federation, free_port
from sandbox.ops.inference_client import InferenceClient
from sandbox.ops.provision import provision_loopback
from tests.sealed_run import drive_sealed_run, key_broker

RUN_ID = 1
MODEL_ID = "all-MiniLM-L6-v2"
WARMUP = 5
LATENCY_REQUESTS = 50
BATCH = 64
BATCHES = 7
PAIRS = 15
# Bare and sandbox answers to the same batch must agree this closely, or the two did
# not run the same model and adapter and the ratio means nothing.
SCORE_TOLERANCE = 1e-4


def _percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def _timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    started = time.perf_counter()
    result = fn()
    return time.perf_counter() - started, result


def http_figures(node: NodeConfig, config: Path, workdir: Path, texts: list[str]) -> dict[str, Any]:
    """Latency of one ticket and throughput of batches through the real sandbox process's
    local HTTP API."""
    fed = Federation(workdir)
    try:
        started = time.perf_counter()
        fed.start_sandbox(node.name, config)
        ready = time.perf_counter() - started
        batch = texts[:BATCH]
        with InferenceClient.for_node(node) as client:
            first, _ = _timed(lambda: client.classify(batch[:1], run_id=RUN_ID))
            for n in range(WARMUP):
                client.classify([texts[n]], run_id=RUN_ID)
            latency = []
            for n in range(LATENCY_REQUESTS):
                text = texts[(WARMUP + n) % len(texts)]
                seconds, reply = _timed(partial(client.classify, [text], run_id=RUN_ID))
                assert len(reply["predictions"]) == 1
                latency.append(seconds)
            client.classify(batch, run_id=RUN_ID)  # warm the batch shape
            batches = []
            for _ in range(BATCHES):
                seconds, reply = _timed(lambda: client.classify(batch, run_id=RUN_ID))
                assert len(reply["predictions"]) == BATCH
                batches.append(seconds)
    finally:
        leftovers = fed.stop()
    if leftovers:
        raise RuntimeError(f"sandbox processes outlived the bench: {leftovers}")
    return {
        "sandbox_ready_seconds": ready,
        "first_request_seconds": first,
        "latency": {
            "requests": LATENCY_REQUESTS,
            "warmup": WARMUP,
            "p50_ms": _percentile(latency, 50) * 1e3,
            "p90_ms": _percentile(latency, 90) * 1e3,
            "min_ms": min(latency) * 1e3,
            "max_ms": max(latency) * 1e3,
        },
        "throughput": {
            "batch": BATCH,
            "batches": BATCHES,
            "texts_per_second_median": statistics.median(BATCH / s for s in batches),
            "batch_seconds": batches,
        },
    }


def _bare_models(spec: RunSpec, adapter: Adapter) -> tuple[Any, Any, Any]:
    """The same classifier and adapter, built with transformers and peft directly from the
    plaintext model directory: unmerged (as peft loads it) and merged into the weights."""
    from peft import LoraConfig, TaskType, get_peft_model, set_peft_model_state_dict
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    info = inspect_model_dir(spec.model_path, spec.task)
    tensors = {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in adapter.items()}

    def build() -> Any:
        base = AutoModelForSequenceClassification.from_pretrained(
            str(spec.model_path), num_labels=len(spec.labels)
        )
        config = LoraConfig(
            task_type=TaskType.SEQ_CLS,
            r=spec.lora.r,
            lora_alpha=spec.lora.alpha,
            lora_dropout=spec.lora.dropout,
            target_modules=list(target_modules(spec.lora, info.model_type)),
        )
        model = get_peft_model(base, config)
        set_peft_model_state_dict(model, tensors)
        return model.eval()

    tokenizer = AutoTokenizer.from_pretrained(str(spec.model_path))
    return build(), build().merge_and_unload().eval(), tokenizer


def overhead(
    sandbox: NodeSandbox, spec: RunSpec, adapter: Adapter, texts: list[str]
) -> dict[str, Any]:
    """In-process NodeSandbox.infer against a bare transformers+peft forward, one batch."""
    peft_model, merged, tokenizer = _bare_models(spec, adapter)
    batch = texts[:BATCH]
    body = json.dumps({"texts": batch, "run_id": RUN_ID}).encode("utf-8")

    def in_sandbox() -> list[list[float]]:
        reply = sandbox.infer(body, "classify")
        return [[p["scores"][label] for label in spec.labels] for p in reply["predictions"]]

    def bare(model: Any) -> Callable[[], list[list[float]]]:
        def run() -> list[list[float]]:
            with torch.inference_mode():
                encoded = tokenizer(
                    batch,
                    truncation=True,
                    max_length=spec.max_length,
                    padding=True,
                    return_tensors="pt",
                )
                scores: list[list[float]] = torch.softmax(
                    model(**encoded).logits.float(), dim=-1
                ).tolist()
            return scores

        return run

    # One ticket in-process, the HTTP latency's counterpart without HTTP or a process hop.
    single = []
    for n in range(WARMUP + LATENCY_REQUESTS):
        one = json.dumps({"texts": [texts[n % len(texts)]], "run_id": RUN_ID}).encode("utf-8")
        seconds, _ = _timed(partial(sandbox.infer, one, "classify"))
        single.append(seconds)
    single = single[WARMUP:]
    runners = {"bare": bare(peft_model), "sandbox": in_sandbox, "bare_merged": bare(merged)}
    answers = {name: np.asarray(fn()) for name, fn in runners.items()}  # warm-up
    differences = {
        name: float(np.abs(answers[name] - answers["sandbox"]).max())
        for name in ("bare", "bare_merged")
    }
    if max(differences.values()) > SCORE_TOLERANCE:
        raise RuntimeError(f"bare and sandbox scores differ by {differences}: not the same model")
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(PAIRS):
        for name, fn in runners.items():
            times[name].append(_timed(fn)[0])
    ratios = [b / s for b, s in zip(times["bare"], times["sandbox"], strict=True)]
    merged_ratios = [b / s for b, s in zip(times["bare_merged"], times["sandbox"], strict=True)]
    return {
        "batch": BATCH,
        "pairs": PAIRS,
        "threads": torch.get_num_threads(),
        "max_score_difference": differences,
        "seconds_median": {name: statistics.median(t) for name, t in times.items()},
        "seconds": times,
        "bare_over_sandbox_median": statistics.median(ratios),
        "bare_over_sandbox": ratios,
        "bare_merged_over_sandbox_median": statistics.median(merged_ratios),
        # Less sensitive to a shared machine's bursts: each side's fastest run.
        "bare_over_sandbox_fastest": min(times["bare"]) / min(times["sandbox"]),
        "one_ticket": {
            "requests": LATENCY_REQUESTS,
            "p50_ms": _percentile(single, 50) * 1e3,
            "p90_ms": _percentile(single, 90) * 1e3,
        },
    }


def inference_bench() -> dict[str, Any]:
    """Every inference figure of the module docstring, from one provisioned node."""
    threads = torch.get_num_threads()
    load = os.getloadavg()[0]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="ark-bench-inference-") as tmp:
        root = Path(tmp)
        data = write_demo_data(root / "data", 1)
        name, path = next(iter(data.items()))
        deployment = provision_loopback(
            root / "deployment",
            model_dir=default_model_dir(),
            node_data=data,
            key_broker_port=free_port(),
            model_id=MODEL_ID,
            threads=threads,
        )
        spec = RunSpec(
            job_id="bench-inference",
            task=TASK_CLASSIFICATION,
            model_path=default_model_dir(),
            model_id=deployment.model_id,
            labels=DEMO_LABELS,
            num_rounds=1,
            local_steps=1,
        )
        texts = [e.text for e in load_examples(path, spec.task, labels=spec.labels)]
        config = deployment.node_configs[name]
        node = NodeConfig.load(config)
        with key_broker(deployment):
            sandbox = NodeSandbox(node)
            sandbox.start()
            adapter = drive_sealed_run(sandbox, deployment, spec, RUN_ID)
            setup = time.perf_counter() - started
            http = http_figures(node, config, root / "federation", texts)
            in_process = overhead(sandbox, spec, adapter, texts)
    return {
        "model": MODEL_ID,
        "threads": threads,
        "setup_seconds": setup,
        "http": http,
        "overhead": in_process,
        "wall_seconds": time.perf_counter() - started,
        # This machine is shared: the 1-minute load average before and after.
        "load_average": [load, os.getloadavg()[0]],
    }


if __name__ == "__main__":
    print(json.dumps(inference_bench(), indent=2))
