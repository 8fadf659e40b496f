"""``make bench``: quality of federated vs centralized vs local-only LoRA, and aggregation scale.

Quality runs in one process with the same training, evaluation and aggregation code the
Flower apps use (``clients.training``, ``server.aggregation``), on the synthetic demo
data, so every variant sees the same data, step budget and seed. Aggregation scale is
measured side by side against a collect-then-average baseline. Secure aggregation's stage
times and bytes per node run in one process too (``bench/secagg.py``). Medians are reported.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
import tracemalloc
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from bench.compare import REPEATS as COMPARE_REPEATS
from bench.compare import compare_bench
from bench.demo_federation import demo_federation, fresh_model
from bench.deploy import DEMO_PAIRS, NODE_STARTS, deploy_bench
from bench.inference import inference_bench
from bench.node_sandbox import sandbox_bench
from bench.privacy import REPEATS as PRIVACY_REPEATS
from bench.privacy import privacy_bench
from bench.scale import NODES as SCALE_NODES
from bench.scale import RAY_MISSING, format_value, ray_available, scale_bench
from bench.scale import ROUNDS as SCALE_ROUNDS
from bench.sealing import key_release, unseal_throughput
from bench.secagg import REPEATS as SECAGG_REPEATS
from bench.secagg import secagg_bench
from bench.security import secagg_overhead, security_overhead
from bench.translog import translog_bench
from clients.data import Example, Split
from clients.training import evaluate, train_local
from sandbox.config import MODE_FEDAVG, MODE_FFA, RunSpec
from sandbox.lora import adapter_state, is_trained
from sandbox.models import default_model_dir
from server.aggregation import StreamingAggregator, spec_of

RESULTS_DIR = Path(__file__).resolve().parent / "results"
console = Console(width=120)
# The parts ``--only`` runs alone, each updating only its own figures in latest.json.
KEPT_PARTS = (
    "secagg",
    "secagg-rounds",
    "sandbox",
    "inference",
    "deploy",
    "compare",
    "privacy",
    "scale",
)


def _federated(
    spec: RunSpec,
    splits: dict[str, Split],
    union: Sequence[Example],
    initial: dict[str, np.ndarray],
) -> dict[str, float]:
    adapter = dict(initial)
    trained = {k: v for k, v in adapter.items() if is_trained(k, spec.lora_mode)}
    for rnd in range(1, spec.num_rounds + 1):
        aggregator = StreamingAggregator(spec_of(trained))
        for split in splits.values():
            node = fresh_model(spec, adapter)
            train_local(node.model, node.tokenizer, split.train, spec, seed=spec.seed * 1000 + rnd)
            update = {
                k: v for k, v in adapter_state(node.model).items() if is_trained(k, spec.lora_mode)
            }
            aggregator.add(update, float(len(split.train)))
        adapter = {**adapter, **aggregator.result()}
    final = fresh_model(spec, adapter)
    return evaluate(final.model, final.tokenizer, union, spec)


def _single(
    spec: RunSpec,
    train: Sequence[Example],
    union: Sequence[Example],
    initial: dict[str, np.ndarray],
) -> dict[str, float]:
    node = fresh_model(spec, initial)
    train_local(
        node.model,
        node.tokenizer,
        train,
        spec,
        seed=spec.seed,
        steps=spec.local_steps * spec.num_rounds,
    )
    return evaluate(node.model, node.tokenizer, union, spec)


def quality(rounds: int, local_steps: int) -> dict[str, Any]:
    """Held-out accuracy on the union of node held-out sets for each training regime."""
    base, splits = demo_federation(RESULTS_DIR / ".data", 3, rounds=rounds, local_steps=local_steps)
    union = [e for s in splits.values() for e in s.heldout]
    pooled = [e for s in splits.values() for e in s.train]
    rows: dict[str, dict[str, float]] = {}
    for mode in (MODE_FEDAVG, MODE_FFA):
        spec = RunSpec(**{**base.__dict__, "mode": mode})
        initial = adapter_state(fresh_model(spec, None).model)
        started = time.perf_counter()
        rows[f"federated {mode}"] = _federated(spec, splits, union, initial)
        console.log(
            f"federated {mode}: {rows[f'federated {mode}']} ({time.perf_counter() - started:.0f}s)"
        )
    initial = adapter_state(fresh_model(base, None).model)
    rows["centralized (pooled)"] = _single(base, pooled, union, initial)
    console.log(f"centralized: {rows['centralized (pooled)']}")
    for name, split in splits.items():
        rows[f"local-only {name}"] = _single(base, split.train, union, initial)
        console.log(f"local-only {name}: {rows[f'local-only {name}']}")
    central = rows["centralized (pooled)"]["accuracy"]
    best_local = max(v["accuracy"] for k, v in rows.items() if k.startswith("local-only"))
    return {
        "setup": {
            "rounds": rounds,
            "local_steps": local_steps,
            "batch_size": base.batch_size,
            "learning_rate": base.learning_rate,
            "nodes": list(splits),
            "heldout_union": len(union),
            "pooled_train": len(pooled),
            "step_budget": "federated: rounds x local_steps per node; centralized and "
            "local-only: rounds x local_steps in one sequence",
        },
        "rows": rows,
        "federated_vs_centralized": {
            mode: rows[f"federated {mode}"]["accuracy"] / central
            for mode in (MODE_FEDAVG, MODE_FFA)
        },
        "federated_beats_every_local": {
            mode: rows[f"federated {mode}"]["accuracy"] > best_local
            for mode in (MODE_FEDAVG, MODE_FFA)
        },
    }


def _updates(shapes: dict[str, tuple[int, ...]], count: int, seed: int) -> Any:
    rng = np.random.default_rng(seed)
    for _ in range(count):
        yield {k: rng.standard_normal(s, dtype=np.float32) for k, s in shapes.items()}


def _streaming(shapes: dict[str, tuple[int, ...]], count: int) -> None:
    template = {k: np.zeros(s, dtype=np.float32) for k, s in shapes.items()}
    aggregator = StreamingAggregator(spec_of(template))
    for update in _updates(shapes, count, seed=count):
        aggregator.add(update, 100.0)
        del update
    aggregator.result()


def _collect_then_average(shapes: dict[str, tuple[int, ...]], count: int) -> None:
    received = list(_updates(shapes, count, seed=count))
    {k: np.mean([u[k] for u in received], axis=0) for k in shapes}


def _measure(fn: Callable[[], None]) -> tuple[float, int]:
    tracemalloc.start()
    started = time.perf_counter()
    fn()
    elapsed = time.perf_counter() - started
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return elapsed, peak


def aggregation_scale(counts: Sequence[int], repeats: int) -> dict[str, Any]:
    """Time and peak traced memory of aggregating N updates of the default adapter size."""
    spec = RunSpec(
        job_id="bench",
        task="sequence-classification",
        model_path=default_model_dir(),
        labels=("a", "b", "c", "d", "e"),
    )
    shapes = {k: tuple(v.shape) for k, v in adapter_state(fresh_model(spec, None).model).items()}
    params = sum(int(np.prod(s)) for s in shapes.values())
    rows = []
    for count in counts:
        stream = [_measure(partial(_streaming, shapes, count)) for _ in range(repeats)]
        naive = [_measure(partial(_collect_then_average, shapes, count)) for _ in range(repeats)]
        row = {
            "updates": count,
            "streaming_seconds": statistics.median(t for t, _ in stream),
            "streaming_peak_mib": statistics.median(m for _, m in stream) / 2**20,
            "collect_seconds": statistics.median(t for t, _ in naive),
            "collect_peak_mib": statistics.median(m for _, m in naive) / 2**20,
        }
        row["peak_ratio_collect_over_streaming"] = (
            row["collect_peak_mib"] / row["streaming_peak_mib"]
        )
        rows.append(row)
        console.log(row)
    return {
        "adapter_parameters": params,
        "adapter_tensors": len(shapes),
        "repeats": repeats,
        "rows": rows,
    }


def _machine() -> dict[str, Any]:
    import os

    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip()
            for line in cpuinfo.read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "torch": torch.__version__,
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=RunSpec.num_rounds)
    parser.add_argument("--local-steps", type=int, default=RunSpec.local_steps)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--release-samples", type=int, default=200)
    parser.add_argument("--skip-security", action="store_true")
    parser.add_argument("--security-pairs", type=int, default=1)
    parser.add_argument("--security-rounds", type=int, default=3)
    parser.add_argument("--skip-translog", action="store_true")
    parser.add_argument("--only-translog", action="store_true", help="same as --only translog")
    parser.add_argument("--skip-secagg", action="store_true")
    parser.add_argument("--skip-secagg-rounds", action="store_true")
    parser.add_argument("--secagg-pairs", type=int, default=1)
    parser.add_argument(
        "--secagg-repeats",
        type=int,
        default=SECAGG_REPEATS,
        help="secure aggregation: masks per sampled node and aggregator runs per case",
    )
    parser.add_argument("--skip-sandbox", action="store_true")
    parser.add_argument("--sandbox-rounds", type=int, default=2)
    parser.add_argument("--skip-inference", action="store_true")
    parser.add_argument("--skip-deploy", action="store_true")
    parser.add_argument("--skip-compare", action="store_true")
    parser.add_argument(
        "--compare-repeats",
        type=int,
        default=COMPARE_REPEATS,
        help="comparisons of the default catalog and sets of 3 single runs, interleaved",
    )
    parser.add_argument("--skip-privacy", action="store_true")
    parser.add_argument(
        "--privacy-repeats",
        type=int,
        default=PRIVACY_REPEATS,
        help="differential privacy: trainings of every setting (epsilons, client-level)",
    )
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument(
        "--scale-nodes",
        type=_node_counts,
        default=SCALE_NODES,
        help="scale: virtual node counts on Flower's simulation engine, comma-separated",
    )
    parser.add_argument("--scale-rounds", type=int, default=SCALE_ROUNDS)
    parser.add_argument(
        "--deploy-pairs",
        type=int,
        default=DEMO_PAIRS,
        help="ark demo runs on each kind of host (netns, loopback), interleaved",
    )
    parser.add_argument(
        "--deploy-starts", type=int, default=NODE_STARTS, help="ark node start runs per host kind"
    )
    parser.add_argument(
        "--only",
        choices=("translog", *KEPT_PARTS),
        help="run one part; all but translog update only their own figures in latest.json",
    )
    args = parser.parse_args(argv)
    scale = args.only == "scale" or not (args.only or args.only_translog or args.skip_scale)
    if scale and not ray_available():
        parser.error(f"{RAY_MISSING}; or leave the part out with --skip-scale")
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"machine": _machine(), "time": time.strftime("%Y-%m-%dT%H:%M:%SZ")}
    if args.only in KEPT_PARTS:
        latest = RESULTS_DIR / "latest.json"
        kept = json.loads(latest.read_text(encoding="utf-8")) if latest.exists() else report
        stamp = {"machine": report["machine"], "time": report["time"]}
        if args.only == "secagg":
            kept["secagg"] = {**stamp, **secagg_bench(args.secagg_repeats, log=console.log)}
            _print_secagg(kept["secagg"])
        elif args.only == "secagg-rounds":
            figures = secagg_overhead(args.security_rounds, args.secagg_pairs)
            kept["secagg_rounds"] = {**stamp, **figures}
            _print_secagg_rounds(kept["secagg_rounds"])
        elif args.only == "sandbox":
            kept["sandbox"] = {**stamp, **sandbox_bench(args.sandbox_rounds)}
            _print_sandbox(kept["sandbox"])
        elif args.only == "deploy":
            kept["deploy"] = {**stamp, **deploy_bench(args.deploy_pairs, args.deploy_starts)}
            _print_deploy(kept["deploy"])
        elif args.only == "compare":
            kept["compare"] = {**stamp, **compare_bench(args.compare_repeats)}
            _print_compare(kept["compare"])
        elif args.only == "scale":
            figures = scale_bench(args.scale_nodes, args.scale_rounds, RESULTS_DIR, console.log)
            kept["scale"] = {**stamp, **figures}
            _print_scale(kept["scale"])
        elif args.only == "privacy":
            figures = privacy_bench(
                RESULTS_DIR, args.rounds, args.local_steps, args.privacy_repeats, log=console.log
            )
            kept["privacy"] = {**stamp, **figures}
            _print_privacy(kept["privacy"])
        else:
            kept["inference"] = {**stamp, **inference_bench()}
            _print_inference(kept["inference"])
        latest.write_text(json.dumps(kept, indent=2), encoding="utf-8")
        return
    if args.only_translog or args.only == "translog":
        report["translog"] = translog_bench()
        (RESULTS_DIR / "translog.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
        _print_translog(report["translog"])
        return
    report["aggregation"] = aggregation_scale((10, 50, 100), args.repeats)
    report["unseal"] = unseal_throughput(default_model_dir() / "model.safetensors", args.repeats)
    console.log(report["unseal"])
    report["key_release"] = key_release(args.release_samples)
    console.log(report["key_release"])
    if not args.skip_translog:
        report["translog"] = translog_bench()
        console.log(report["translog"])
    if not args.skip_secagg:
        report["secagg"] = secagg_bench(args.secagg_repeats, log=console.log)
    if not args.skip_secagg_rounds:
        report["secagg_rounds"] = secagg_overhead(args.security_rounds, args.secagg_pairs)
    if not args.skip_security:
        report["security"] = security_overhead(args.security_rounds, args.security_pairs)
        console.log({k: v for k, v in report["security"].items() if k != "runs"})
    if not args.skip_sandbox:
        report["sandbox"] = sandbox_bench(args.sandbox_rounds)
    if not args.skip_inference:
        report["inference"] = inference_bench()
    if not args.skip_deploy:
        report["deploy"] = deploy_bench(args.deploy_pairs, args.deploy_starts)
    if not args.skip_compare:
        report["compare"] = compare_bench(args.compare_repeats)
    if not args.skip_privacy:
        report["privacy"] = privacy_bench(
            RESULTS_DIR, args.rounds, args.local_steps, args.privacy_repeats, log=console.log
        )
    if not args.skip_scale:
        report["scale"] = scale_bench(args.scale_nodes, args.scale_rounds, RESULTS_DIR, console.log)
    if not args.skip_quality:
        report["quality"] = quality(args.rounds, args.local_steps)
    (RESULTS_DIR / "latest.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
    _print(report)


def _node_counts(text: str) -> tuple[int, ...]:
    """``10,100,1000`` as node counts (argparse reports a ValueError as a usage error)."""
    counts = tuple(int(part) for part in text.split(","))
    if not counts or min(counts) < 2:
        raise ValueError(f"node counts must be at least 2: {text!r}")
    return counts


def _figures(title: str) -> Table:
    """A report table of figures: measure, value and goal columns."""
    table = Table(title=title)
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("goal", justify="right")
    return table


def _print(report: dict[str, Any]) -> None:
    agg = Table(
        title=f"Aggregation of N updates ({report['aggregation']['adapter_parameters']:,} "
        "parameters each), medians"
    )
    for col in (
        "updates",
        "streaming s",
        "streaming peak MiB",
        "collect s",
        "collect peak MiB",
        "peak ratio",
    ):
        agg.add_column(col, justify="right")
    for r in report["aggregation"]["rows"]:
        agg.add_row(
            str(r["updates"]),
            f"{r['streaming_seconds']:.3f}",
            f"{r['streaming_peak_mib']:.2f}",
            f"{r['collect_seconds']:.3f}",
            f"{r['collect_peak_mib']:.2f}",
            f"{r['peak_ratio_collect_over_streaming']:.1f}x",
        )
    console.print(agg)
    unseal, release = report["unseal"], report["key_release"]
    sealing = _figures(title="Sealed model: unseal, attest + key release, time to model (medians)")
    sealing.add_row(
        f"unseal (STREAM AES-256-GCM, {unseal['bytes'] / 1e6:.0f} MB)",
        f"{unseal['unseal_gb_per_s']:.2f} GB/s",
        "",
    )
    sealing.add_row("raw AES-256-GCM, same 1 MiB chunks", f"{unseal['raw_gb_per_s']:.2f} GB/s", "")
    sealing.add_row("unseal / raw", f"{unseal['unseal_over_raw']:.0%}", ">= 80%")
    sealing.add_row(
        f"attest + key release over loopback TLS, p50 ({release['samples']} samples)",
        f"{release['p50_ms']:.1f} ms",
        "< 50 ms",
    )
    sealing.add_row("attest + key release, p90", f"{release['p90_ms']:.1f} ms", "")
    sealing.add_row(
        "time to model: attest, release, unseal, load MiniLM (warm process)",
        f"{release['time_to_model_s']:.2f} s",
        "",
    )
    sealing.add_row(
        "fresh node process: import the model loader (clients.model; no torch yet)",
        f"{release['cold_process_import_s']:.2f} s",
        "",
    )
    sealing.add_row(
        "fresh node process: attest, release, unseal, load MiniLM (torch imported here)",
        f"{release['cold_process_model_s']:.2f} s",
        "",
    )
    console.print(sealing)
    if "translog" in report:
        _print_translog(report["translog"])
    if "secagg" in report:
        _print_secagg(report["secagg"])
    if "secagg_rounds" in report:
        _print_secagg_rounds(report["secagg_rounds"])
    if "security" in report:
        _print_security(report["security"])
    if "sandbox" in report:
        _print_sandbox(report["sandbox"])
    if "inference" in report:
        _print_inference(report["inference"])
    if "deploy" in report:
        _print_deploy(report["deploy"])
    if "compare" in report:
        _print_compare(report["compare"])
    if "privacy" in report:
        _print_privacy(report["privacy"])
    if "scale" in report:
        _print_scale(report["scale"])
    if "quality" in report:
        q = Table(title="Held-out quality on the union of node held-out sets")
        q.add_column("regime")
        q.add_column("accuracy", justify="right")
        q.add_column("macro-F1", justify="right")
        for name, m in report["quality"]["rows"].items():
            q.add_row(name, f"{m['accuracy']:.3f}", f"{m['macro_f1']:.3f}")
        console.print(q)
        console.print(
            f"federated / centralized accuracy: {report['quality']['federated_vs_centralized']}"
        )
        console.print(
            f"federated beats every local-only: {report['quality']['federated_beats_every_local']}"
        )


def _print_translog(log: dict[str, Any]) -> None:
    append, audit = log["append"], log["audit"]
    table = _figures(
        title=f"Transparency log: append, proofs, full audit (medians; entries are events of "
        f"~{append['entry_bytes_mean']:.0f} B)"
    )
    table.add_row(
        "append from one thread, fsync before returning (as the services do)",
        f"{append['durable_per_s']:,.0f} /s",
        "",
    )
    table.add_row(
        "append from 8 threads at once, fsync before each returns (group commit)",
        f"{append['durable_8_threads_per_s']:,.0f} /s",
        ">= 5,000 /s",
    )
    table.add_row(
        "append, one transaction per entry, WAL without fsync",
        f"{append['no_fsync_per_s']:,.0f} /s",
        "",
    )
    table.add_row(
        "append, batches of 10,000 (one fsync per batch)",
        f"{append['batched_per_s']:,.0f} /s",
        "",
    )
    for row in log["proofs"]["rows"]:
        table.add_row(
            f"inclusion proof at {row['size']:,} entries ({row['proof_hashes']} hashes); "
            f"consistency {row['consistency_ms_p50']:.2f} ms",
            f"{row['inclusion_ms_p50']:.3f} ms",
            "< 5 ms at 1M" if row["size"] == 1_000_000 else "",
        )
    table.add_row(
        f"full audit of {audit['entries']:,} entries, from the SQLite file",
        f"{audit['local_s']:.1f} s",
        "< 30 s",
    )
    table.add_row(
        f"full audit of {audit['entries']:,} entries, over gRPC + TLS on loopback",
        f"{audit['grpc_tls_s']:.1f} s",
        "< 30 s",
    )
    if "scorecards" in log:
        cards = log["scorecards"]
        table.add_row(
            f"scorecard verification, {cards['scorecards']:,} scorecards ({cards['nodes']} "
            f"nodes, 1 comparison of {cards['models']} models): policy check",
            f"{cards['policy_s']:.2f} s",
            f"< {cards['goal_s']:.0f} s",
        )
        table.add_row(
            f"the same log of {cards['entries']:,} entries, whole audit from the SQLite file",
            f"{cards['verify_log_s']:.2f} s",
            "",
        )
    console.print(table)


def _print_secagg(figures: dict[str, Any]) -> None:
    setup = (
        f"threshold {figures['threshold_fraction']:.0%}, clip {figures['clip']:g}; "
        f"median of {figures['repeats']} repeat(s); load average "
        f"{figures['load_average'][0]:.1f}-{figures['load_average'][1]:.1f}"
    )
    nodes = Table(
        title=f"Secure aggregation, one node's stages (real NodeRound, EAR-certified "
        f"adverts; mask: {figures['sampled_nodes']} sampled nodes; {setup})"
    )
    for col in ("nodes", "adapter values", "share", "mask", "check (sign)", "unmask (reveal)"):
        nodes.add_column(col, justify="right")
    for row in figures["timings"]:
        nodes.add_row(
            str(row["nodes"]),
            f"{row['values']:,}",
            f"{row['share_seconds']:.3f} s",
            f"{row['mask_seconds']:.3f} s",
            f"{row['no_dropout']['node_check_seconds'] * 1e3:.2f} ms",
            f"{row['no_dropout']['node_unmask_seconds'] * 1e3:.2f} ms",
        )
    console.print(nodes)
    server = Table(
        title=f"Secure aggregation, the aggregator (real ServerRound): every masked input "
        f"signature and reveal, then the unmasked sum (stages 3-5: add_masked, "
        f"add_consistency, add_reveal and result); "
        f"none dropped, or {figures['dropped_fraction']:.0%} of the nodes (at least 1) after "
        f"sharing ({setup})"
    )
    for col in (
        "nodes",
        "adapter values",
        "stages 1-2: adverts, shares",
        "add_masked all",
        "result, none dropped",
        "stages 3-5, none dropped",
        "dropped",
        "result, with dropped",
        "stages 3-5, with dropped",
    ):
        server.add_column(col, justify="right")
    for row in figures["timings"]:
        whole, lost = row["no_dropout"], row["dropout"]
        server.add_row(
            str(row["nodes"]),
            f"{row['values']:,}",
            f"{row['route_seconds']:.2f} s",
            f"{whole['add_masked_seconds']:.3f} s",
            f"{whole['result_seconds']:.2f} s",
            f"{whole['aggregator_seconds']:.2f} s",
            str(lost["dropped"]),
            f"{lost['result_seconds']:.2f} s",
            f"{lost['aggregator_seconds']:.2f} s",
        )
    console.print(server)
    rows = figures["bytes"]
    sizes = Table(
        title=f"Secure aggregation, bytes per node per round, default adapter "
        f"({figures['default_values']:,} values, {4 * figures['default_values']:,} B fp32)"
    )
    sizes.add_column("measure")
    for row in rows:
        sizes.add_column(f"{row['nodes']} nodes", justify="right")
    sizes.add_column("goal", justify="right")
    names = {
        "advertisement": "sends: key advertisement (with its EAR)",
        "share_bundle": "sends: share bundle",
        "masked_envelope": "sends: masked input, sealed (HPKE envelope)",
        "consistency": "sends: its signature of the round's split",
        "reveal": "sends: reveal",
        "share_request": "receives: share request (every advertisement)",
        "mask_request": "receives: mask request (its shares)",
        "check_request": "receives: check request (the split)",
        "unmask_request": "receives: unmask request (with the signatures)",
    }
    for key, name in names.items():
        part = "sent" if name.startswith("sends") else "received"
        sizes.add_row(name, *(f"{r[part][key]:,} B" for r in rows), "")
    sizes.add_row(
        "  envelope overhead over the raw uint32 vector",
        *(f"{r['envelope_overhead_bytes']:,} B" for r in rows),
        "",
    )
    sizes.add_row(
        "sent / fp32 adapter",
        *(f"{r['sent_over_fp32']:.4f}x" for r in rows),
        f"<= {figures['sent_goal']}x (Flower SecAgg+ int64: "
        f"{figures['flower_int64_over_fp32']:.1f}x)",
    )
    sizes.add_row(
        "received beyond the global adapter / fp32 adapter",
        *(f"{r['received_over_fp32']:.4f}x" for r in rows),
        "",
    )
    console.print(sizes)


def _print_secagg_rounds(figures: dict[str, Any]) -> None:
    """Secure aggregation against fedavg on real processes, side by side."""
    table = Table(
        title=f"Secure aggregation vs fedavg, {figures['nodes']} nodes on real processes, "
        f"every protection on, {figures['rounds']} rounds, {figures['pairs']} pair(s), medians"
    )
    for col in ("measure", "fedavg", "secagg", "secagg / fedavg", "goal"):
        table.add_column(col, justify="right")
    rows = (
        ("round_seconds", "round wall time (s)", "{:.1f}", "<= 1.15"),
        ("later_round_seconds", "rounds after the first (s)", "{:.1f}", ""),
        ("run_seconds", "whole run (s)", "{:.1f}", ""),
        ("node_link_bytes_per_node_round", "node link bytes per node per round", "{:,.0f}", ""),
        ("node_uplink_bytes_per_node_round", "of which uplink (node to provider)", "{:,.0f}", ""),
    )
    for key, name, fmt, goal in rows:
        value = figures[key]
        table.add_row(
            name,
            fmt.format(value["fedavg"]),
            fmt.format(value["secagg"]),
            f"{value['ratio']:.3f}",
            goal,
        )
    fp32 = figures["fp32_adapter_bytes"]
    uplink = figures["uplink_over_fp32"]
    table.add_row(
        f"uplink / fp32 adapter ({fp32:,} B)",
        f"{uplink['fedavg']:.3f}",
        f"{uplink['secagg']:.3f}",
        f"{uplink['secagg'] / uplink['fedavg']:.3f}",
        "secagg <= 1.1 per message; see the in-process bytes table",
    )
    accuracy = figures["accuracy"]
    table.add_row(
        "held-out accuracy after the last round",
        f"{accuracy['fedavg']:.3f}",
        f"{accuracy['secagg']:.3f}",
        "",
        "",
    )
    console.print(table)


def _print_security(sec: dict[str, Any]) -> None:
    table = Table(
        title=f"Security overhead: {sec['nodes']} nodes, {sec['rounds']} rounds, MiniLM, "
        f"everything on vs off ({sec['pairs']} pair(s), medians)"
    )
    table.add_column("measure")
    table.add_column("on", justify="right")
    table.add_column("off", justify="right")
    table.add_column("on / off", justify="right")
    table.add_column("goal", justify="right")
    table.add_row(
        "wall time per round (ServerApp round timer)",
        f"{sec['round_seconds_on']:.1f} s",
        f"{sec['round_seconds_off']:.1f} s",
        f"{sec['round_ratio']:.3f}",
        "<= 1.05",
    )
    table.add_row(
        "  rounds after the first (the handshake is once per run)",
        f"{sec['later_round_seconds_on']:.1f} s",
        f"{sec['later_round_seconds_off']:.1f} s",
        f"{sec['later_round_ratio']:.3f}",
        "",
    )
    table.add_row(
        "whole run: start processes, rounds, final evaluation",
        f"{sec['run_seconds_on']:.1f} s",
        f"{sec['run_seconds_off']:.1f} s",
        f"{sec['run_ratio']:.3f}",
        "",
    )
    table.add_row(
        f"update per node per round vs fp32 adapter ({sec['fp32_adapter_bytes']:,} B)",
        f"{sec['envelope_over_fp32']:.4f}x",
        f"{sec['raw_update_over_fp32']:.4f}x",
        "",
        "<= 1.05x",
    )
    table.add_row(
        "all TCP bytes on the SuperLink port, per node per round",
        f"{sec['wire_bytes_on'] / 1e6:.2f} MB",
        f"{sec['wire_bytes_off'] / 1e6:.2f} MB",
        f"{sec['wire_on_over_off']:.3f}",
        "",
    )
    console.print(table)


def _print_sandbox(sec: dict[str, Any]) -> None:
    after, before = sec["after"], sec["before"] or {}
    old, cost, rnd = before.get("per_message", {}), after["per_message"], after["round"]
    table = Table(
        title=f"Node sandbox: sealed ark demo, {sec['nodes']} nodes x {sec['rounds']} rounds, "
        f"MiniLM (medians); before: {before.get('commit', 'not recorded')} "
        f"{before.get('date', '')}"
    )
    for col in ("measure", "before", "after", "after / before", "goal"):
        table.add_column(col, justify="left" if col == "measure" else "right")

    def row(name: str, b: float | None, a: float, goal: str = "", unit: str = " s") -> None:
        ratio = f"{a / b:.2f}" if b else ""
        shown = "" if b is None else f"{b:.2f}{unit}"
        table.add_row(name, shown, f"{a:.2f}{unit}", ratio, goal)

    row(
        f"per-message fixed cost: ClientApp start to reply, less train+evaluate "
        f"({cost['messages']} messages)",
        old.get("fixed_seconds"),
        cost["fixed_seconds"],
        "<= 0.5 s",
    )
    for name, part in cost.get("by_order", {}).items():
        row(
            f"  {name.replace('_', ' ')} messages ({part['messages']})"
            + ("; each builds the run's model" if name == "first_per_node" else ""),
            old.get("by_order", {}).get(name, {}).get("fixed_seconds"),
            part["fixed_seconds"],
        )
    row(
        "  ClientApp start to handler (after: to the sandbox)",
        old.get("start_to_handler_seconds"),
        cost["start_to_handler_seconds"],
    )
    row(
        "  handler besides train+evaluate (before: attest, release, unseal, build)",
        old.get("handler_overhead_seconds"),
        cost["handler_overhead_seconds"],
    )
    row(
        "  train+evaluate (before: not timed apart, taken as after's)",
        old.get("work_seconds"),
        cost["work_seconds"],
    )
    walls = list(before.get("round_wall_seconds", {}).values())
    row(
        "training round wall time (instructions out to aggregate committed)",
        statistics.median(walls) if walls else None,
        rnd["wall_seconds_median"],
    )
    row("round wall time / slowest node's train+evaluate", None, rnd["ratio_median"], "<= 1.3", "")

    def per_node(counts: dict[str, int] | None) -> str:
        return "" if counts is None else ", ".join(f"{n} {c}" for n, c in counts.items())

    releases, old_releases = after["key_releases"], before.get("key_releases", {})
    table.add_row(
        "model key releases per node per run (key_released)",
        per_node(old_releases.get("key_released")),
        per_node(releases["key_released"]),
        "",
        "1 per node",
    )
    table.add_row(
        "  channel keys certified per node (channel_certified: no key leaves)",
        per_node(old_releases.get("channel_certified")),
        per_node(releases["channel_certified"]),
        "",
        "",
    )
    row(
        f"demo wall time ({after['demo']['command']}), as the caller waits",
        before.get("demo", {}).get("wall_seconds"),
        after["demo"]["wall_seconds"],
        "< 75 s",
    )
    console.print(table)
    parts = Table(title="Where each training round went: the node that answered last (s)")
    columns = {
        "instruction_out_to_clientapp_start": "out to ClientApp start",
        "clientapp_start_to_sandbox": "ClientApp to sandbox",
        "sandbox_overhead": "sandbox overhead",
        "sandbox_work": "train+evaluate",
        "sandbox_done_to_committed": "done to committed",
    }
    for col in ("round", "wall", "slowest train+evaluate", "ratio", *columns.values()):
        parts.add_column(col, justify="right")
    for r in rnd["rounds"]:
        parts.add_row(
            str(r["round"]),
            f"{r['wall_seconds']:.2f}",
            f"{r['slowest_work_seconds']:.2f}",
            f"{r['ratio']:.2f}",
            *(f"{r['last_node'][key]:.2f}" for key in columns),
        )
    console.print(parts)
    sleeps = rnd["fixed_sleeps"]
    console.print(
        "fixed sleeps on a round's path: "
        + "; ".join(f"{name.replace('_', ' ')} {v['seconds']:g} s" for name, v in sleeps.items())
    )


def _print_inference(figures: dict[str, Any]) -> None:
    http, lat, put = figures["http"], figures["http"]["latency"], figures["http"]["throughput"]
    over = figures["overhead"]
    table = _figures(
        title=f"On-prem inference: {figures['model']} + a stored final adapter, "
        f"{over['threads']} torch threads (load average {figures['load_average'][0]:.1f}"
        f"-{figures['load_average'][1]:.1f})"
    )
    table.add_row(
        f"one ticket through the local HTTP API (ark node sandbox), p50 of {lat['requests']}",
        f"{lat['p50_ms']:.1f} ms",
        "",
    )
    table.add_row("same, p90", f"{lat['p90_ms']:.1f} ms", "")
    one = over["one_ticket"]
    table.add_row(
        "one ticket through NodeSandbox.infer in-process (no HTTP), p50 / p90",
        f"{one['p50_ms']:.1f} / {one['p90_ms']:.1f} ms",
        "",
    )
    table.add_row(
        f"batches of {put['batch']} through the API, median of {put['batches']}",
        f"{put['texts_per_second_median']:.0f} texts/s",
        "",
    )
    seconds = over["seconds_median"]
    table.add_row(
        f"batch of {over['batch']}: NodeSandbox.infer in-process / bare transformers+peft "
        "/ bare merged (medians)",
        f"{seconds['sandbox']:.3f} / {seconds['bare']:.3f} / {seconds['bare_merged']:.3f} s",
        "",
    )
    table.add_row(
        f"bare ÷ sandbox forward, median of {over['pairs']} interleaved pairs",
        f"{over['bare_over_sandbox_median']:.3f}",
        ">= 0.9",
    )
    table.add_row("fastest bare ÷ fastest sandbox", f"{over['bare_over_sandbox_fastest']:.3f}", "")
    table.add_row(
        "bare merged ÷ sandbox forward", f"{over['bare_merged_over_sandbox_median']:.3f}", ""
    )
    table.add_row(
        "sandbox process ready (attest, unseal)", f"{http['sandbox_ready_seconds']:.1f} s", ""
    )
    table.add_row(
        "its first request (builds the run's model)", f"{http['first_request_seconds']:.2f} s", ""
    )
    console.print(table)


def _print_compare(figures: dict[str, Any]) -> None:
    table = _figures(
        f"Model catalog: a comparison of {len(figures['models'])} models x {figures['nodes']} "
        f"nodes ({figures['rounds']} rounds of {figures['local_steps']} local steps, on "
        f"{figures['hosts']}) against {len(figures['models'])} single runs, median of "
        f"{figures['repeats']}; {figures['measure']}"
    )
    for model, seconds in figures["median_single_seconds"].items():
        table.add_row(f"single run of {model}", f"{seconds:.1f} s", "")
    table.add_row("sum of the single runs", f"{figures['median_single_sum_seconds']:.1f} s", "")
    table.add_row("the comparison", f"{figures['median_comparison_seconds']:.1f} s", "")
    table.add_row(
        "comparison / sum of single runs", f"{figures['comparison_over_singles']:.3f}", "<= 1.0"
    )
    console.print(table)


def _print_privacy(figures: dict[str, Any]) -> None:
    setup = figures["setup"]
    table = Table(
        title=f"Differential privacy: {len(setup['nodes'])} nodes, {setup['mode']}, "
        f"{setup['rounds']} rounds x {setup['local_steps']} local steps, batch "
        f"{setup['batch_size']}, delta {setup['delta']:g}, median of {figures['repeats']} "
        f"repeat(s); MIA: loss threshold, balanced advantage, mean over nodes (chance "
        f"{figures['mia_chance']:.3f}, 95th percentile {figures['mia_chance_p95']:.3f})"
    )
    for col in ("setting", "epsilon", "sigma", "accuracy", "macro-F1", "MIA advantage"):
        table.add_column(col, justify="left" if col == "setting" else "right")
    for row in figures["rows"]:
        epsilon = "inf" if row["epsilon"] is None else f"{row['epsilon']:.3g}"
        sigma = "" if row["noise_multiplier"] is None else f"{row['noise_multiplier']:.3f}"
        if row["level"] == "client":
            epsilon += " (client)"
            sigma += f" (C {row['clip']:g})"
        table.add_row(
            row["setting"],
            epsilon,
            sigma,
            f"{row['accuracy']:.3f}",
            f"{row['macro_f1']:.3f}",
            f"{row['mia_advantage']:.3f}",
        )
    step = figures["step"]
    table.add_row(
        f"time per training step (median of {step['steps_timed']['dp']})",
        "",
        "",
        f"plain {step['plain_seconds']:.3f} s",
        f"DP {step['dp_seconds']:.3f} s",
        f"DP / plain {step['dp_over_plain']:.2f}",
    )
    console.print(table)
    console.print(f"figure: {RESULTS_DIR / figures['figure']}")


def _print_scale(figures: dict[str, Any]) -> None:
    nodes = [str(n) for n in figures["nodes"]]
    table = Table(
        title=f"Scale on Flower's simulation engine: the ServerApp and ClientApp at "
        f"{', '.join(f'{int(n):,}' for n in nodes)} virtual nodes, {figures['rounds']} rounds; "
        "growth is the fitted log-log slope (0 flat, 1 linear)"
    )
    for col in ("quantity", *(f"n={int(n):,}" for n in nodes), "expected", "slope"):
        table.add_column(col, justify="left" if col == "quantity" else "right")
    for row in figures["rows"]:
        name = f"{row['quantity']} ({row['unit']})" if row["unit"] else row["quantity"]
        slope = "-" if row["slope"] is None else f"{row['slope']:.2f}"
        cells = [format_value(row["values"].get(n)) for n in nodes]
        table.add_row(name, *cells, row["expected"], slope)
    console.print(table)
    for n, point in figures["points"].items():
        if not point["ok"]:
            console.print(f"n={int(n):,}: the run failed: {point['error']}")
    if figures.get("secagg_note"):
        console.print(f"secure aggregation: {figures['secagg_note']}")
    console.print(f"table: {RESULTS_DIR / figures['table']}; figures: scale-*.png")


def _print_deploy(figures: dict[str, Any]) -> None:
    _print_demo_hosts(figures["demo"])
    _print_node_starts(figures["node_start"])


def _print_demo_hosts(demo: dict[str, Any]) -> None:
    if "skipped" in demo:
        console.print(
            f"Deployment across hosts: the netns / loopback demo skipped: {demo['skipped']}"
        )
        return
    medians, ratio = demo["medians"], demo["netns_over_loopback"]
    table = Table(
        title=f"Deployment across hosts: ark demo --rounds {demo['rounds']} --nodes "
        f"{demo['nodes']} on network namespaces vs loopback, {demo['pairs']} interleaved "
        "pair(s), medians"
    )
    for col in ("measure", "netns", "loopback", "netns / loopback", "goal"):
        table.add_column(col, justify="left" if col == "measure" else "right")
    rows = (
        ("job_seconds", "job: provider's 'run submitted' to 'run finished'", "<= 1.1"),
        ("wall_seconds", "whole ark demo, as the caller waits", ""),
        ("printed_wall_seconds", "whole ark demo, as it prints it", ""),
    )
    for key, name, goal in rows:
        netns, loopback = medians["netns"][key], medians["loopback"][key]
        table.add_row(
            f"{name} (min-max {netns['min']:.0f}-{netns['max']:.0f} / "
            f"{loopback['min']:.0f}-{loopback['max']:.0f} s)",
            f"{netns['median']:.1f} s",
            f"{loopback['median']:.1f} s",
            f"{ratio[key]:.3f}",
            goal,
        )
    console.print(table)


def _print_node_starts(starts: dict[str, Any]) -> None:
    table = Table(
        title="ark node start until attested and connected, median (min-max) of "
        + ", ".join(f"{s['starts']} on {kind}" for kind, s in starts.items())
    )
    table.add_column("measure")
    for kind in starts:
        table.add_column(kind, justify="right")
    table.add_column("goal", justify="right")
    rows = (
        ("seconds", "ark node start, as the caller waits", "report the median"),
        ("command_to_sandbox_starting", "  command start to 'sandbox starting' (the CLI)", ""),
        ("to_attested", "  command start to 'sandbox attested' (key released, unsealed)", ""),
        ("attested_to_connected", "  'sandbox attested' to 'SuperNode connected'", ""),
        ("connected_to_exit", "  'SuperNode connected' to the command's exit", ""),
        ("stop_seconds", "ark node stop, as the caller waits", ""),
    )

    def cell(spread: dict[str, Any]) -> str:
        if spread["median"] is None:
            return "not printed"
        return f"{spread['median']:.2f} s ({spread['min']:.2f}-{spread['max']:.2f})"

    for key, name, goal in rows:
        table.add_row(name, *(cell(s[key]) for s in starts.values()), goal)
    table.add_row(
        "SuperNode refused and retried (code 2004)",
        *(str(s["refused_retries"]) for s in starts.values()),
        "",
    )
    console.print(table)


if __name__ == "__main__":
    main()
