"""Shared fixtures: tiny, randomly initialised models built from configs, never downloaded.

Both models reuse the WordPiece tokenizer of the embedded default model, so tokenizing
needs no network either. Models are written once per session under pytest's temp dir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import shutil
import signal
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

# sandbox.models sets the offline switches, which huggingface_hub reads at import time,
# so it comes before transformers.
from sandbox.models import default_model_dir  # isort: skip

import torch
import transformers

from sandbox.config import TASK_CLASSIFICATION, LoraSpec, RunSpec
from sandbox.events import JsonlEventSink
from sandbox.launcher import fab_digest
from sandbox.ops.apps import build_fab
from sandbox.ops.federation import Federation, free_port
from sandbox.ops.processes import still_running
from sandbox.ops.provision import (
    LoopbackDeployment,
    ProviderWorkspace,
    build_broker,
    provision_loopback,
)

if TYPE_CHECKING:
    import grpc

    from tests.scenarios import ProtectedRun

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)
VOCAB_SIZE = 30522  # the embedded model's BERT WordPiece vocabulary
TINY_LABELS = ("a", "b", "c")


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """A SIGTERM (a CI timeout, `timeout`, a stopped job) ends the session as Ctrl-C
    does, so every fixture's teardown still stops the processes and removes the
    workspaces the tests started, instead of leaving them behind."""
    signal.signal(signal.SIGTERM, _interrupt)


def _copy_tokenizer(dst: Path, **config_overrides: Any) -> None:
    src = default_model_dir()
    for name in TOKENIZER_FILES:
        if (src / name).exists():
            shutil.copyfile(src / name, dst / name)
    if config_overrides:
        config_file = dst / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8"))
        config.update(config_overrides)
        config_file.write_text(json.dumps(config), encoding="utf-8")


def _save_model(model: Any, dst: Path) -> None:
    transformers.utils.logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    model.save_pretrained(str(dst), safe_serialization=True)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide BERT encoder (no head), usable for sequence classification.

    Saved as a plain ``BertModel`` so any label count loads; the classifier head is
    freshly initialised on every load, as with a real pretrained encoder.
    """
    return save_tiny_bert(tmp_path_factory.mktemp("tiny-bert"), layers=2)


def save_tiny_bert(path: Path, *, layers: int) -> Path:
    """A 32-wide BERT encoder of ``layers`` layers (seeded, so the same each time) with the
    embedded model's tokenizer, saved at ``path``."""
    config = transformers.BertConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        _save_model(transformers.BertModel(config), path)
    _copy_tokenizer(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer, 32-wide Llama causal LM sharing the BERT vocabulary.

    The BERT tokenizer has no end-of-sequence token; ``[SEP]`` (id 102, the model's
    ``eos_token_id``) is declared as one so causal-lm examples end like real ones.
    """
    path = tmp_path_factory.mktemp("tiny-llama")
    config = transformers.LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=101,
        eos_token_id=102,
    )
    with torch.random.fork_rng():
        torch.manual_seed(0)
        _save_model(transformers.LlamaForCausalLM(config), path)
    _copy_tokenizer(path, eos_token="[SEP]")
    return path


def make_spec(model_dir: Path, task: str = TASK_CLASSIFICATION, **overrides: Any) -> RunSpec:
    """A small RunSpec for ``model_dir``; keyword arguments override any field.

    Classification gets labels ``("a", "b", "c")``; causal-lm gets none.
    """
    values: dict[str, Any] = {
        "job_id": "tiny-job",
        "task": task,
        "model_path": model_dir,
        "labels": TINY_LABELS if task == TASK_CLASSIFICATION else (),
        "local_steps": 3,
        "batch_size": 4,
        "max_length": 32,
        "lora": LoraSpec(r=4, alpha=8),
        "seed": 0,
    }
    values.update(overrides)
    return RunSpec(**values)


@pytest.fixture(name="make_spec")
def make_spec_fixture() -> Callable[..., RunSpec]:
    """The :func:`make_spec` factory, for tests that prefer fixtures to imports."""
    return make_spec


@pytest.fixture
def scratch_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The ServerApp's scratch stores (``server/scratch.py``) made under ``tmp_path`` for
    this test, whatever folder an earlier job in this process named; restored after."""
    from server import scratch

    monkeypatch.setattr(scratch, "_root", tmp_path)
    monkeypatch.setattr(scratch, "_shared", None)
    return tmp_path


@pytest.fixture
def tiny_spec(tiny_bert_dir: Path) -> RunSpec:
    """A classification RunSpec on the tiny BERT with labels a, b, c."""
    return make_spec(tiny_bert_dir, TASK_CLASSIFICATION)


@contextlib.contextmanager
def checked_federation(workdir: Path) -> Iterator[Federation]:
    """A federation under ``workdir`` running this project's app, whose every process,
    children included, must be gone once the block ends."""
    fed = Federation(workdir)
    try:
        yield fed
    finally:
        procs = fed.all_processes()
        for proc in procs:
            proc.remember_descendants()
        seen = [p for proc in procs for p in proc.seen.values()]
        leftovers = fed.stop()
        alive = [p.pid for p in seen if still_running(p)]
        alive += [proc.pid for proc in procs if proc.alive()]
        assert leftovers == [], f"processes that would not stop: {leftovers}"
        assert alive == [], f"processes left behind: {alive}"


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    """A federation whose every process, children included, must be gone afterwards."""
    with checked_federation(tmp_path) as fed:
        yield fed


@pytest.fixture(scope="session")
def protected_run(tmp_path_factory: pytest.TempPathFactory, tiny_bert_dir: Path) -> ProtectedRun:
    """The protected canary run (tests/scenarios.py), run once for every test that reads it."""
    from tests.scenarios import run_protected  # it builds on this module's helpers

    return run_protected(tmp_path_factory.mktemp("protected-run"), tiny_bert_dir)


APP_DIR = Path(__file__).resolve().parent.parent


@functools.cache
def app_digest() -> str:
    """This checkout's FAB digest, built once per test session."""
    with tempfile.TemporaryDirectory() as out:
        return fab_digest(build_fab(APP_DIR, Path(out)).read_bytes())


def serve_key_broker(ws: ProviderWorkspace, port: int) -> grpc.Server:
    """The workspace's key broker (its policy as the file says now) over gRPC with TLS on
    loopback ``port``, its events in the workspace's events file."""
    from sandbox.ops.keybroker.service import serve

    server, _ = serve(
        build_broker(ws, JsonlEventSink(ws.events)),
        address=f"127.0.0.1:{port}",
        cert=ws.tls / "server.crt",
        key=ws.tls / "server.key",
    )
    return server


@dataclasses.dataclass
class ServedBroker:
    """A workspace's key broker serving on a fixed loopback port (see serve_key_broker)."""

    ws: ProviderWorkspace
    port: int
    server: grpc.Server | None = None

    def start(self) -> None:
        self.server = serve_key_broker(self.ws, self.port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop(grace=None).wait()
            self.server = None

    def restart(self) -> None:
        """Serve again on the same port, with the policy as its file says now."""
        self.stop()
        self.start()


@contextlib.contextmanager
def served_deployment(
    root: Path, model_dir: Path, node_data: dict[str, Path], **options: Any
) -> Iterator[tuple[LoopbackDeployment, ServedBroker]]:
    """A provisioned provider and nodes (``provision_loopback``), with the key broker
    serving on a free loopback port until the block ends."""
    port = free_port()
    deployed = provision_loopback(
        root, model_dir=model_dir, node_data=node_data, key_broker_port=port, **options
    )
    broker = ServedBroker(deployed.provider, port)
    broker.start()
    try:
        yield deployed, broker
    finally:
        broker.stop()
