"""Transparency-log figures: append throughput, proof generation time as the log grows to
1M entries, the time of a full audit of a 100k-entry log (locally and over TLS), and the
time of the comparison rules over a log of 1,000 signed scorecards.

Entries are realistic events (``tests.loghistory``: whole honest runs), about 500 bytes
of canonical JSON each. Every log lives in a temp dir that is removed afterwards.
"""

from __future__ import annotations

import random
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from sandbox.canonical import canonical_entry
from sandbox.events import ScorecardLogged
from sandbox.ops.tls import issue_loopback_tls
from sandbox.ops.translog.audit import Audit, check_policy, decode, verify_log
from sandbox.ops.translog.client import LogClient
from sandbox.ops.translog.service import serve_log
from sandbox.translog import merkle
from sandbox.translog.store import LogStore
from tests.loghistory import comparison_history, history_of_size, new_signer

PROOF_SIZES = (1_000, 10_000, 100_000, 1_000_000)
BATCH = 10_000
# 333 catalog models scored by each of 3 nodes, and one node's local model: 1,000 scorecards.
SCORECARD_NODES, SCORECARD_MODELS = 3, 333
SCORECARD_GOAL_S = 2.0


def _events(count: int) -> list[bytes]:
    return [canonical_entry(event) for event in history_of_size(count)]


def append_throughput(count: int, repeats: int) -> dict[str, Any]:
    """Entries per second: ``append`` from one thread (durable: fsync before returning, as
    the services append; and WAL without the fsync), from 8 threads at once (group
    commit: each waits for its fsync, concurrent ones share it), and in batches of 10,000."""
    entries = _events(count)
    rates: dict[str, list[float]] = {
        "durable": [],
        "durable_8_threads": [],
        "no_fsync": [],
        "batched": [],
    }
    with tempfile.TemporaryDirectory(prefix="ark-bench-log-") as tmp:
        for repeat in range(repeats):
            for mode in rates:
                path = Path(tmp) / f"{mode}-{repeat}.db"
                store = LogStore(path, durable=mode != "no_fsync")
                started = time.perf_counter()
                if mode == "batched":
                    for lo in range(0, count, BATCH):
                        store.append_many(entries[lo : lo + BATCH])
                elif mode == "durable_8_threads":
                    _append_from_threads(store, entries, 8)
                else:
                    for entry in entries:
                        store.append(entry)
                rates[mode].append(count / (time.perf_counter() - started))
                store.close()
    return {
        "entries": count,
        "entry_bytes_mean": statistics.mean(len(e) for e in entries),
        "repeats": repeats,
        **{f"{mode}_per_s": statistics.median(values) for mode, values in rates.items()},
    }


def _append_from_threads(store: LogStore, entries: list[bytes], threads: int) -> None:
    """``threads`` writers at once, each appending its share one entry at a time."""
    workers = [
        threading.Thread(target=lambda part=entries[n::threads]: [store.append(e) for e in part])
        for n in range(threads)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()


def proof_times(samples: int) -> dict[str, Any]:
    """Median time to generate an inclusion proof (and a consistency proof) for random
    leaves, as one log grows through each size; every proof is also verified."""
    rng = random.Random(7)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ark-bench-log-") as tmp:
        store = LogStore(Path(tmp) / "log.db", durable=False)
        events = iter(history_of_size(PROOF_SIZES[-1]))
        built = 0
        for size in PROOF_SIZES:
            started = time.perf_counter()
            while built < size:
                chunk = [canonical_entry(next(events)) for _ in range(min(BATCH, size - built))]
                store.append_many(chunk)
                built += len(chunk)
            build_s = time.perf_counter() - started
            root = store.root(size)
            inclusion, consistency = [], []
            for _ in range(samples):
                index = rng.randrange(size)
                t0 = time.perf_counter()
                proof = store.inclusion_proof(index, size)
                inclusion.append(time.perf_counter() - t0)
                leaf = merkle.leaf_hash(store.entries(index, index + 1)[0])
                merkle.verify_inclusion(leaf, index, size, proof, root)
                first = rng.randrange(1, size)
                t0 = time.perf_counter()
                proof = store.consistency_proof(first, size)
                consistency.append(time.perf_counter() - t0)
                merkle.verify_consistency(first, size, proof, store.root(first), root)
            rows.append(
                {
                    "size": size,
                    "inclusion_ms_p50": statistics.median(inclusion) * 1e3,
                    "inclusion_ms_max": max(inclusion) * 1e3,
                    "consistency_ms_p50": statistics.median(consistency) * 1e3,
                    "proof_hashes": len(store.inclusion_proof(size // 2, size)),
                    "build_s": build_s,
                    "db_mb": (Path(tmp) / "log.db").stat().st_size / 1e6,
                }
            )
        store.close()
    return {"samples": samples, "rows": rows}


def full_audit(size: int, repeats: int) -> dict[str, Any]:
    """Seconds for `verify_log` over a ``size``-entry log: checkpoint, every entry's
    inclusion (all fetched and hashed to the signed root) and policy; from the SQLite
    file, and from the gRPC service over loopback TLS."""
    signer = new_signer()
    local, remote = [], []
    with tempfile.TemporaryDirectory(prefix="ark-bench-log-") as tmp:
        store = LogStore(Path(tmp) / "log.db", durable=False)
        events = _events(size)
        for lo in range(0, size, BATCH):
            store.append_many(events[lo : lo + BATCH])
        store.sign_checkpoint(signer)
        tls = issue_loopback_tls(Path(tmp) / "tls", common_name="bench-log", valid_days=1)
        server, port = serve_log(
            store, signer, address="127.0.0.1:0", cert=tls.server_cert, key=tls.server_key
        )
        try:
            for _ in range(repeats):
                reader = LogStore(Path(tmp) / "log.db", readonly=True)
                started = time.perf_counter()
                audit = verify_log(reader, signer.verifier)
                local.append(time.perf_counter() - started)
                reader.close()
                _check(audit, size)
                with LogClient(f"127.0.0.1:{port}", ca_cert=tls.ca_cert) as client:
                    started = time.perf_counter()
                    audit = verify_log(client, signer.verifier)
                    remote.append(time.perf_counter() - started)
                _check(audit, size)
        finally:
            server.stop(0).wait()
            store.close()
    return {
        "entries": size,
        "repeats": repeats,
        "local_s": statistics.median(local),
        "grpc_tls_s": statistics.median(remote),
    }


def _check(audit: Audit, size: int) -> None:
    if audit.checkpoint.size != size or audit.violations:
        raise RuntimeError(f"the bench log did not audit clean: {audit.violations[:3]}")


def scorecard_audit(repeats: int) -> dict[str, Any]:
    """Seconds for the policy check (``check_policy``, every rule, the comparison rules
    verifying each signature) over the decoded events of one comparison: 3 nodes certified
    for signing, each committing its held-out set once and scoring 333 catalog models,
    plus one local model: 1,000 signed scorecards. Also the whole ``verify_log`` of the
    same log from its SQLite file. Medians of ``repeats``."""
    log = comparison_history(SCORECARD_MODELS, SCORECARD_NODES, local_model=True)
    entries = [canonical_entry(event) for event in log.events]
    records = decode(entries)  # as the auditor holds them
    signer = new_signer()
    policy, whole = [], []
    with tempfile.TemporaryDirectory(prefix="ark-bench-log-") as tmp:
        store = LogStore(Path(tmp) / "log.db", durable=False)
        store.append_many(entries)
        store.sign_checkpoint(signer)
        for _ in range(repeats):
            started = time.perf_counter()
            violations = check_policy(records)
            policy.append(time.perf_counter() - started)
            if violations:
                raise RuntimeError(f"the bench comparison did not audit clean: {violations[:3]}")
            started = time.perf_counter()
            audit = verify_log(store, signer.verifier)
            whole.append(time.perf_counter() - started)
            _check(audit, len(entries))
        store.close()
    return {
        "scorecards": sum(r.get("kind") == ScorecardLogged.kind for r in records),
        "entries": len(entries),
        "nodes": SCORECARD_NODES,
        "models": SCORECARD_MODELS + 1,
        "repeats": repeats,
        "policy_s": statistics.median(policy),
        "verify_log_s": statistics.median(whole),
        "goal_s": SCORECARD_GOAL_S,
    }


def translog_bench(*, append_entries: int = 5_000, repeats: int = 3) -> dict[str, Any]:
    return {
        "append": append_throughput(append_entries, repeats),
        "proofs": proof_times(samples=200),
        "audit": full_audit(100_000, repeats),
        "scorecards": scorecard_audit(repeats=5),
    }
