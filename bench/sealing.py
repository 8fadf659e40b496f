"""Sealed-model benchmarks: unseal vs raw AES-256-GCM, attest + key release, time to model.

Everything is measured side by side in one process on the real components: the STREAM
decryptor against raw ``AESGCM.decrypt`` over the same 1 MiB chunks, and the real key
broker served over gRPC with TLS on loopback. Medians (and p90 for latency) are reported.
"""

from __future__ import annotations

import io
import json
import mmap
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from sandbox.config import TASK_CLASSIFICATION, NodeConfig, RunSpec
from sandbox.models import default_model_dir
from sandbox.ops.federation import free_port
from sandbox.ops.keybroker.service import serve
from sandbox.ops.provision import build_broker, provision_loopback
from sandbox.seal.stream import CHUNK_SIZE, decrypt_stream, encrypt_stream


def _seconds(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def unseal_throughput(weights: Path, repeats: int) -> dict[str, Any]:
    """STREAM decryption of a model's weights vs raw AES-256-GCM over the same chunks.

    Unseal reads the sealed file the way nodes do (a read-only memory map of the file);
    raw decrypts the same 1 MiB chunks, already in memory, with one AES-256-GCM call each.
    """
    plain = weights.read_bytes()
    key = AESGCM.generate_key(bit_length=256)
    aead = AESGCM(key)
    nonce = os.urandom(12)
    chunks = [
        aead.encrypt(nonce, plain[i : i + CHUNK_SIZE], None)
        for i in range(0, len(plain), CHUNK_SIZE)
    ]
    with tempfile.TemporaryDirectory(prefix="ark-bench-") as tmp:
        sealed_path = Path(tmp) / "weights.sealed"
        with sealed_path.open("wb") as sealed:
            encrypt_stream(key, io.BytesIO(plain), sealed, context=b"bench")
        handle = sealed_path.open("rb")
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)

        def raw() -> None:
            for chunk in chunks:
                aead.decrypt(nonce, chunk, None)

        def unseal() -> None:
            for _ in decrypt_stream(key, memoryview(mapped), context=b"bench"):
                pass

        raw_s, unseal_s = [], []
        for _ in range(repeats):  # interleaved, so drift in machine load hits both alike
            raw_s.append(_seconds(raw))
            unseal_s.append(_seconds(unseal))
        mapped.close()
        handle.close()
    size = len(plain)
    raw_median, unseal_median = statistics.median(raw_s), statistics.median(unseal_s)
    return {
        "bytes": size,
        "chunks": len(chunks),
        "raw_gb_per_s": size / raw_median / 1e9,
        "unseal_gb_per_s": size / unseal_median / 1e9,
        "unseal_over_raw": raw_median / unseal_median,
        "repeats": repeats,
    }


def key_release(samples: int) -> dict[str, Any]:
    """Attest + key release round trips, and time to a loaded default model, over TLS."""
    from clients.model import load_base_model, node_measurements
    from sandbox.attestation.backends import load_attester
    from sandbox.keybroker.client import KeyBrokerClient, obtain_content_key
    from sandbox.keyfiles import load_ec_public, load_ed25519_public
    from sandbox.seal.package import read_manifest

    with tempfile.TemporaryDirectory(prefix="ark-bench-") as tmp:
        root = Path(tmp)
        data = root / "node.jsonl"
        data.write_text('{"text": "t", "label": "a"}\n', encoding="utf-8")
        port = free_port()
        deployment = provision_loopback(
            root,
            model_dir=default_model_dir(),
            node_data={"bench": data},
            key_broker_port=port,
            model_id="minilm",
        )
        ws = deployment.provider
        server, _ = serve(
            # As `ark provider serve` does: events.jsonl and the transparency log, durably.
            build_broker(ws, ws.event_sink()),
            address=f"127.0.0.1:{port}",
            cert=ws.tls / "server.crt",
            key=ws.tls / "server.key",
        )
        try:
            node = NodeConfig.load(deployment.node_configs["bench"])
            sandbox = node.sandbox
            assert sandbox is not None
            attester = load_attester(
                sandbox.tee, sandbox.attestation_key, sandbox.attestation_chain, sandbox.ueid
            )
            measurements = node_measurements(node)
            result_key = load_ec_public(sandbox.result_key)
            manifest_key = load_ed25519_public(sandbox.manifest_key)
            key_id = read_manifest(sandbox.package, manifest_key)["key_id"]
            latencies = []
            with KeyBrokerClient(sandbox.key_broker, ca_cert=sandbox.provider_ca) as client:
                for _ in range(samples + 5):
                    started = time.perf_counter()
                    obtain_content_key(
                        client,
                        attester,
                        key_id=key_id,
                        measurements=measurements,
                        result_key=result_key,
                    )
                    latencies.append(time.perf_counter() - started)
            latencies = sorted(latencies[5:])  # the first calls warm up the channel
            spec = RunSpec(
                job_id="bench",
                task=TASK_CLASSIFICATION,
                model_path=default_model_dir(),
                labels=("a", "b", "c", "d", "e"),
            )
            first_model = []
            for _ in range(3):
                started = time.perf_counter()
                load_base_model(spec, node)
                first_model.append(time.perf_counter() - started)
            cold = [_cold_process(deployment.node_configs["bench"]) for _ in range(3)]
        finally:
            server.stop(grace=None)
    return {
        "samples": samples,
        "p50_ms": 1000 * statistics.median(latencies),
        "p90_ms": 1000 * latencies[int(0.9 * (len(latencies) - 1))],
        "time_to_model_s": statistics.median(first_model),
        "time_to_model_includes": "fresh ephemeral key, attest + release over TLS, "
        "unseal and verify the 90 MB package in memory, build the model from bytes",
        "cold_process_import_s": statistics.median(c["import_s"] for c in cold),
        "cold_process_model_s": statistics.median(c["model_s"] for c in cold),
    }


def _cold_process(config: Path) -> dict[str, float]:
    """Timings from a fresh interpreter, as a ClientApp process would start."""
    output = subprocess.run(
        [sys.executable, "-m", "bench.cold_model", str(config)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    ).stdout
    timings: dict[str, float] = json.loads(output.strip().splitlines()[-1])
    return timings
