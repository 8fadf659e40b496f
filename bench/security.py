"""Security overhead and bytes on the wire, measured side by side in one bench run.

Two demo-sized federations on real processes: the pretrained MiniLM, three nodes, the
demo data, the same seed and rounds. "on" is the product: TLS, SuperNode
authentication, a sealed base model released on attestation, aggregator attestation,
HPKE envelopes both ways and the egress guard. "off" has all of that switched off:
plaintext HTTP, a plaintext model, raw arrays, no guard. Runs alternate (off, on, ...)
so drift on a shared machine hits both. Reported: median wall time per round (the
ServerApp's own round timer), the whole-run wall time, the uplink envelope size against
the fp32 adapter, and (with tcpdump) all TCP bytes on the SuperLink port per node per
round.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file

from sandbox.config import MODE_FEDAVG, MODE_SECAGG, PROTECTION_OFF, RunSpec
from sandbox.events import JsonlEventSink, Key, UpdateAccepted
from sandbox.lora import is_trained
from sandbox.models import default_model_dir
from sandbox.ops.apps import approve_app_dir
from sandbox.ops.demo_data import write_demo_data
from sandbox.ops.federation import Federation, free_port, write_run_config
from sandbox.ops.gateway import split_address
from sandbox.ops.provision import init_unprotected_nodes, provision_loopback
from tests.canary import LoopbackCapture, read_pcap

APP_DIR = Path(__file__).resolve().parent.parent
NODES = 3


def _spec(root: Path, rounds: int, labels: tuple[str, ...], **changes: Any) -> RunSpec:
    return RunSpec(
        job_id="bench-security",
        task="sequence-classification",
        model_path=default_model_dir(),
        labels=labels,
        num_rounds=rounds,
        expected_nodes=NODES,
        round_timeout=300.0,
        output_dir=root / "provider" / "job",
        **changes,
    )


def _one_run(
    root: Path, protected: bool, rounds: int, data: dict[str, Path], mode: str = MODE_FEDAVG
) -> dict[str, Any]:
    """One federation from a clean workdir (``mode``: fedavg, or secagg for secure
    aggregation); timings and sizes from its own records."""
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    labels = tuple(sorted({json.loads(line)["label"] for p in data.values() for line in p.open()}))
    federation = Federation(
        root,
        node_auth=protected,
        tls_on=protected,
    )
    if protected:
        deployment = provision_loopback(
            root,
            model_dir=default_model_dir(),
            node_data=data,
            key_broker_port=free_port(),
            model_id="all-MiniLM-L6-v2",
            threads=1,
        )
        configs = deployment.node_configs
        spec = _spec(
            root,
            rounds,
            labels,
            model_id=deployment.model_id,
            aggregator_dir=deployment.provider.aggregator,
            log_db=deployment.provider.log_db,
            mode=mode,
        )
    else:
        configs = init_unprotected_nodes(root, data)
        spec = _spec(root, rounds, labels, protection=PROTECTION_OFF)
    approve_app_dir(APP_DIR, list(configs.values()), root / "fab")
    run_config = write_run_config(root / "run.toml", spec.to_run_config())
    capture = LoopbackCapture(root / "capture.pcap")
    started = time.perf_counter()
    with _capturing(capture), federation:
        if protected:
            federation.start_key_broker(int(deployment.key_broker.rsplit(":", 1)[1]))
        federation.start_superlink()
        federation.start_nodes(configs)
        outcome = federation.wait(federation.submit(APP_DIR, run_config), timeout=1800)
        if not outcome.ok:
            raise RuntimeError(f"bench run failed: {outcome.details}")
    wall = time.perf_counter() - started
    out = root / "provider" / "job"
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    per_round = [r["seconds"] for r in results["rounds"][1:]]
    initial = load_file(str(out / "checkpoints" / "round-0000.safetensors"))
    fp32 = sum(4 * v.size for k, v in initial.items() if is_trained(k, spec.lora_mode))
    events = JsonlEventSink(out / "events.jsonl").read()
    accepted = [e for e in events if e[Key.KIND] == UpdateAccepted.kind]
    link_bytes: float | None = None
    uplink_bytes: float | None = None
    if capture.process is not None:
        streams = read_pcap(capture.path)
        # What crosses the node-facing link: nodes talk only to the gateway's port.
        node_port = split_address(federation.node_address)[1]
        link_bytes = sum(
            len(payload)
            for (_, _, sport, dport), payload in streams.flows.items()
            if node_port in (sport, dport)
        ) / (NODES * rounds)
        uplink_bytes = sum(
            len(payload)
            for (_, _, _, dport), payload in streams.flows.items()
            if dport == node_port
        ) / (NODES * rounds)
    return {
        "round_seconds": per_round,
        "later_round_seconds": per_round[1:],
        "run_seconds": wall,
        "fp32_adapter_bytes": fp32,
        "update_bytes": [e["envelope_bytes"] for e in accepted],
        "node_link_bytes_per_node_round": link_bytes,
        "node_uplink_bytes_per_node_round": uplink_bytes,
        "dropped_packets": capture.dropped if capture.process is not None else None,
        "accuracy": results["rounds"][-1]["mean"].get("accuracy"),
    }


@contextlib.contextmanager
def _capturing(capture: LoopbackCapture) -> Iterator[None]:
    """Capture loopback traffic if this user may (root or passwordless sudo); else skip."""
    try:
        capture.__enter__()
    except (OSError, RuntimeError) as exc:
        capture.process = None
        print(f"no loopback capture ({exc}); wire bytes are not measured")
        yield
        return
    try:
        yield
    finally:
        capture.__exit__(None, None, None)


def security_overhead(rounds: int = 3, pairs: int = 1) -> dict[str, Any]:
    """Alternate off/on runs ``pairs`` times; report medians and their ratios."""
    runs: dict[str, list[dict[str, Any]]] = {"off": [], "on": []}
    # Outside the checkout: `flwr build` of the app must not see the runs' files.
    with tempfile.TemporaryDirectory(prefix="ark-bench-security-") as tmp:
        data = write_demo_data(Path(tmp) / "data", NODES)
        for _ in range(pairs):
            for name, protected in (("off", False), ("on", True)):
                runs[name].append(_one_run(Path(tmp) / name, protected, rounds, data))

    def median(name: str, key: str) -> float:
        values = [v for run in runs[name] for v in np.atleast_1d(run[key]) if v is not None]
        return float(statistics.median(values)) if values else float("nan")

    fp32 = runs["on"][0]["fp32_adapter_bytes"]
    return {
        "rounds": rounds,
        "pairs": pairs,
        "nodes": NODES,
        "runs": runs,
        "round_seconds_on": median("on", "round_seconds"),
        "round_seconds_off": median("off", "round_seconds"),
        "round_ratio": median("on", "round_seconds") / median("off", "round_seconds"),
        # Rounds after the first: the handshake happens once per ServerApp process.
        "later_round_seconds_on": median("on", "later_round_seconds"),
        "later_round_seconds_off": median("off", "later_round_seconds"),
        "later_round_ratio": median("on", "later_round_seconds")
        / median("off", "later_round_seconds"),
        "run_seconds_on": median("on", "run_seconds"),
        "run_seconds_off": median("off", "run_seconds"),
        "run_ratio": median("on", "run_seconds") / median("off", "run_seconds"),
        "fp32_adapter_bytes": fp32,
        "envelope_bytes": median("on", "update_bytes"),
        "envelope_over_fp32": median("on", "update_bytes") / fp32,
        "raw_update_over_fp32": median("off", "update_bytes") / fp32,
        "wire_bytes_on": median("on", "node_link_bytes_per_node_round"),
        "wire_bytes_off": median("off", "node_link_bytes_per_node_round"),
        "wire_on_over_off": median("on", "node_link_bytes_per_node_round")
        / median("off", "node_link_bytes_per_node_round"),
    }


def secagg_overhead(rounds: int = 3, pairs: int = 1) -> dict[str, Any]:
    """Secure aggregation against plain fedavg, both with every protection on: alternate
    fedavg/secagg runs ``pairs`` times on the same data; medians and their ratios (round
    time; bytes per node per round on the node-facing link, both ways and uplink only)."""
    runs: dict[str, list[dict[str, Any]]] = {MODE_FEDAVG: [], MODE_SECAGG: []}
    with tempfile.TemporaryDirectory(prefix="ark-bench-secagg-") as tmp:
        data = write_demo_data(Path(tmp) / "data", NODES)
        for _ in range(pairs):
            for mode in (MODE_FEDAVG, MODE_SECAGG):
                runs[mode].append(_one_run(Path(tmp) / mode, True, rounds, data, mode))

    def median(name: str, key: str) -> float:
        values = [v for run in runs[name] for v in np.atleast_1d(run[key]) if v is not None]
        return float(statistics.median(values)) if values else float("nan")

    fp32 = runs[MODE_FEDAVG][0]["fp32_adapter_bytes"]
    out: dict[str, Any] = {"rounds": rounds, "pairs": pairs, "nodes": NODES, "runs": runs}
    for key in (
        "round_seconds",
        "later_round_seconds",
        "run_seconds",
        "node_link_bytes_per_node_round",
        "node_uplink_bytes_per_node_round",
    ):
        plain, secure = median(MODE_FEDAVG, key), median(MODE_SECAGG, key)
        out[key] = {MODE_FEDAVG: plain, MODE_SECAGG: secure, "ratio": secure / plain}
    out["fp32_adapter_bytes"] = fp32
    out["uplink_over_fp32"] = {
        mode: median(mode, "node_uplink_bytes_per_node_round") / fp32 for mode in runs
    }
    out["accuracy"] = {mode: median(mode, "accuracy") for mode in runs}
    return out
