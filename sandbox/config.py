"""Typed configuration: the provider's run config and each node operator's node config.

Both are validated on load; every error names the source, the key and the bad value.
"""

from __future__ import annotations

import hashlib
import json
import tomllib
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from sandbox.errors import ConfigError

TASK_CLASSIFICATION = "sequence-classification"
TASK_CAUSAL_LM = "causal-lm"
TASKS = (TASK_CLASSIFICATION, TASK_CAUSAL_LM)
MODE_FEDAVG = "fedavg"
MODE_FFA = "ffa"
MODES = (MODE_FEDAVG, MODE_FFA)
PROTECTION_SEALED = "sealed"
PROTECTION_OFF = "off"
PROTECTIONS = (PROTECTION_SEALED, PROTECTION_OFF)
MIN_FEDERATED_NODES = 2
# The largest ``max-examples-per-update``: every count up to it is exact as a float64,
# and no weighted sum of bounded float32 updates comes near float64's range.
EXAMPLES_LIMIT = 2**53


class _Reader:
    """Typed access to a flat mapping, raising ConfigError that names source and key."""

    def __init__(self, values: Mapping[str, Any], source: str | Path):
        self.values = values
        self.source = source

    def _get(self, key: str, default: Any) -> Any:
        return self.values.get(key, default)

    def fail(self, key: str, message: str) -> ConfigError:
        return ConfigError(message, path=self.source, key=key)

    def string(self, key: str, default: str | None = None) -> str:
        value = self._get(key, default)
        if not isinstance(value, str):
            raise self.fail(key, f"expected a string, got {value!r}")
        return value

    def integer(self, key: str, default: int | None = None, *, minimum: int = 0) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key, f"expected an integer, got {value!r}")
        if value < minimum:
            raise self.fail(key, f"must be at least {minimum}, got {value!r}")
        return value

    def number(
        self, key: str, default: float | None = None, *, low: float, high: float | None = None
    ) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key, f"expected a number, got {value!r}")
        if value < low or (high is not None and value > high):
            bound = f"[{low}, {high}]" if high is not None else f">= {low}"
            raise self.fail(key, f"must be in {bound}, got {value!r}")
        return float(value)

    def choice(self, key: str, options: tuple[str, ...], default: str | None = None) -> str:
        value = self.string(key, default)
        if value not in options:
            raise self.fail(key, f"must be one of {', '.join(options)}; got {value!r}")
        return value


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters shared by every node of a run."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"LoRA rank must be >= 1, got {self.r}", key="lora-r")
        if self.alpha < 1:
            raise ConfigError(f"LoRA alpha must be >= 1, got {self.alpha}", key="lora-alpha")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"must be in [0, 1), got {self.dropout}", key="lora-dropout")


@dataclass(frozen=True)
class RunSpec:
    """The provider's run configuration, as the ServerApp and every ClientApp read it."""

    job_id: str
    task: str
    model_path: Path
    labels: tuple[str, ...]
    num_rounds: int = 2
    mode: str = MODE_FEDAVG
    min_nodes: int = MIN_FEDERATED_NODES
    expected_nodes: int = 0
    round_timeout: float = 180.0
    update_norm_bound: float = 100.0
    # The most one update may weigh: a node's declared example count is clipped to it
    # (and to the count first accepted from that node in the job), so a node that lies
    # about its count weighs no more than an honest node holding this many examples.
    max_examples_per_update: int = 10_000
    local_steps: int = 12
    batch_size: int = 16
    learning_rate: float = 1e-2
    max_length: int = 64
    lora: LoraSpec = field(default_factory=LoraSpec)
    seed: int = 42
    output_dir: Path | None = None
    model_id: str = ""
    # "sealed": attested aggregator, HPKE envelopes both ways, egress guard (the default).
    # "off": plaintext arrays, for the canary test's negative control and the overhead
    # bench only; a node runs it only when its own config says ``unprotected = true``.
    protection: str = PROTECTION_SEALED
    # The aggregator sandbox's identity (``ark provider init --manufacturer``).
    aggregator_dir: Path | None = None
    # The provider's transparency log (SQLite); the ServerApp appends its events there.
    log_db: Path | None = None

    @classmethod
    def from_run_config(
        cls, values: Mapping[str, Any], source: str | Path = "run config"
    ) -> RunSpec:
        """Validate a Flower run config (``[tool.flwr.app.config]`` plus overrides)."""
        read = _Reader(values, source)
        task = read.choice("task", TASKS, TASK_CLASSIFICATION)
        model_path = read.string("model-path", "")
        if not model_path:
            raise read.fail("model-path", "is empty; set it to a local model directory")
        labels = _parse_labels(read.string("labels", "[]"), read)
        if task == TASK_CLASSIFICATION and len(labels) < 2:
            raise read.fail("labels", f"classification needs at least 2 labels, got {labels!r}")
        targets = tuple(
            t.strip() for t in read.string("lora-target-modules", "").split(",") if t.strip()
        )
        output_dir = read.string("output-dir", "")
        aggregator_dir = read.string("aggregator-dir", "")
        log_db = read.string("log-db", "")
        job_id = read.string("job-id", "ark-job")
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise read.fail("job-id", f"must be a plain name, got {job_id!r}")
        lora = LoraSpec(
            r=read.integer("lora-r", 8, minimum=1),
            alpha=read.integer("lora-alpha", 16, minimum=1),
            dropout=read.number("lora-dropout", 0.0, low=0.0, high=0.99),
            target_modules=targets,
        )
        return cls(
            job_id=job_id,
            task=task,
            model_path=Path(model_path),
            labels=labels,
            num_rounds=read.integer("num-rounds", 2, minimum=1),
            mode=read.choice("mode", MODES, MODE_FEDAVG),
            min_nodes=read.integer("min-nodes", MIN_FEDERATED_NODES, minimum=1),
            expected_nodes=read.integer("expected-nodes", 0, minimum=0),
            round_timeout=read.number("round-timeout", 180.0, low=1.0),
            update_norm_bound=read.number("update-norm-bound", 100.0, low=1e-6),
            max_examples_per_update=_examples_cap(read, cls.max_examples_per_update),
            local_steps=read.integer("local-steps", 12, minimum=1),
            batch_size=read.integer("batch-size", 16, minimum=1),
            learning_rate=read.number("learning-rate", 1e-2, low=1e-8, high=1.0),
            max_length=read.integer("max-length", 64, minimum=8),
            lora=lora,
            seed=read.integer("seed", 42, minimum=0),
            output_dir=Path(output_dir) if output_dir else None,
            model_id=read.string("model-id", ""),
            protection=read.choice("protection", PROTECTIONS, PROTECTION_SEALED),
            aggregator_dir=Path(aggregator_dir) if aggregator_dir else None,
            log_db=Path(log_db) if log_db else None,
        )

    def to_run_config(self) -> dict[str, str | int | float]:
        """The inverse of :meth:`from_run_config`, for writing a run-config TOML."""
        return {
            "job-id": self.job_id,
            "task": self.task,
            "model-path": str(self.model_path),
            "labels": json.dumps(list(self.labels)),
            "num-rounds": self.num_rounds,
            "mode": self.mode,
            "min-nodes": self.min_nodes,
            "expected-nodes": self.expected_nodes,
            "round-timeout": self.round_timeout,
            "update-norm-bound": self.update_norm_bound,
            "max-examples-per-update": self.max_examples_per_update,
            "local-steps": self.local_steps,
            "batch-size": self.batch_size,
            "learning-rate": self.learning_rate,
            "max-length": self.max_length,
            "lora-r": self.lora.r,
            "lora-alpha": self.lora.alpha,
            "lora-dropout": self.lora.dropout,
            "lora-target-modules": ",".join(self.lora.target_modules),
            "seed": self.seed,
            "output-dir": "" if self.output_dir is None else str(self.output_dir),
            "model-id": self.model_id,
            "protection": self.protection,
            "aggregator-dir": "" if self.aggregator_dir is None else str(self.aggregator_dir),
            "log-db": "" if self.log_db is None else str(self.log_db),
        }

    def fingerprint(self) -> str:
        """Digest of everything that must match for a checkpoint to be resumed.

        The round count is left out on purpose: a finished job may be extended.
        """
        identity = asdict(self)
        for volatile in (
            "num_rounds",
            "round_timeout",
            "min_nodes",
            "expected_nodes",
            "output_dir",
            "aggregator_dir",
            "log_db",
        ):
            identity.pop(volatile)
        identity["model_path"] = str(self.model_path)
        canonical = json.dumps(identity, sort_keys=True, default=list).encode()
        return hashlib.sha256(canonical).hexdigest()


def _examples_cap(read: _Reader, default: int) -> int:
    key = "max-examples-per-update"
    cap = read.integer(key, default, minimum=1)
    if cap > EXAMPLES_LIMIT:
        raise read.fail(key, f"must be at most 2**53 ({EXAMPLES_LIMIT}), got {cap!r}")
    return cap


def _parse_labels(raw: str, read: _Reader) -> tuple[str, ...]:
    try:
        labels = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise read.fail("labels", f"must be a JSON list of strings, got {raw!r}") from exc
    if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
        raise read.fail("labels", f"must be a JSON list of non-empty strings, got {raw!r}")
    if len(set(labels)) != len(labels):
        raise read.fail("labels", f"has duplicates: {raw!r}")
    return tuple(labels)


SANDBOX_KEYS = (
    "tee",
    "ueid",
    "attestation-key",
    "attestation-chain",
    "key-broker",
    "provider-ca",
    "manifest-key",
    "result-key",
    "package",
    "hpke-suite",
    "aggregator-policy",
    "trusted-roots",
)


@dataclass(frozen=True)
class SandboxConfig:
    """``[node.sandbox]``: how this node's sandbox attests and where the sealed model is.

    Paths are resolved against the node config's folder. Every file here is the
    operator's or was handed over by the provider out of band (its CA, manifest-signing
    key and result-signing key), never fetched from the provider at run time.
    """

    tee: str
    ueid: str
    attestation_key: Path
    attestation_chain: Path
    key_broker: str
    provider_ca: Path
    manifest_key: Path
    result_key: Path
    package: Path
    hpke_suite: str = "x25519-hkdf-sha256-aes256gcm"
    # The node's passport policy for the aggregator, and the roots it trusts for it.
    aggregator_policy: Path | None = None
    trusted_roots: Path | None = None

    @classmethod
    def from_section(cls, section: Any, path: Path) -> SandboxConfig:
        if not isinstance(section, dict):
            raise ConfigError("must be a table", path=path, key="node.sandbox")
        read = _Reader(section, path)
        unknown = sorted(set(section) - set(SANDBOX_KEYS))
        if unknown:
            raise read.fail(f"node.sandbox.{unknown[0]}", f"unknown key; allowed: {SANDBOX_KEYS}")

        def text(key: str, default: str | None = None) -> str:
            value = read.string(key, default)
            if not value:
                raise read.fail(f"node.sandbox.{key}", "must not be empty")
            return value

        def file(key: str) -> Path:
            value = Path(text(key))
            return value if value.is_absolute() else (path.parent / value).resolve()

        return cls(
            tee=text("tee"),
            ueid=text("ueid"),
            attestation_key=file("attestation-key"),
            attestation_chain=file("attestation-chain"),
            key_broker=text("key-broker"),
            provider_ca=file("provider-ca"),
            manifest_key=file("manifest-key"),
            result_key=file("result-key"),
            package=file("package"),
            hpke_suite=text("hpke-suite", "x25519-hkdf-sha256-aes256gcm"),
            aggregator_policy=file("aggregator-policy") if "aggregator-policy" in section else None,
            trusted_roots=file("trusted-roots") if "trusted-roots" in section else None,
        )

    def as_table(self) -> dict[str, str]:
        """The ``[node.sandbox]`` table that :meth:`from_section` reads."""
        values = {
            "tee": self.tee,
            "ueid": self.ueid,
            "attestation-key": str(self.attestation_key),
            "attestation-chain": str(self.attestation_chain),
            "key-broker": self.key_broker,
            "provider-ca": str(self.provider_ca),
            "manifest-key": str(self.manifest_key),
            "result-key": str(self.result_key),
            "package": str(self.package),
            "hpke-suite": self.hpke_suite,
        }
        if self.aggregator_policy is not None:
            values["aggregator-policy"] = str(self.aggregator_policy)
        if self.trusted_roots is not None:
            values["trusted-roots"] = str(self.trusted_roots)
        return values


# Scalar metrics the ClientApp reports; a node operator may narrow (or extend) the list.
DEFAULT_EGRESS_METRICS = tuple(
    [
        "num-examples",
        "heldout-examples",
        "train-loss",
        *(
            f"{when}-{name}"
            for when in ("before", "after")
            for name in ("accuracy", "macro_f1", "loss", "perplexity")
        ),
    ]
)


@dataclass(frozen=True)
class EgressPolicy:
    """``[node.egress]``: exactly what may leave this node in a reply.

    One sealed update envelope of at most ``max_update_bytes`` and the named scalar
    metrics; no strings, no raw arrays, no other keys.
    """

    metrics: frozenset[str] = frozenset(DEFAULT_EGRESS_METRICS)
    max_update_bytes: int = 64 * 1024 * 1024

    @classmethod
    def from_section(cls, section: Any, path: Path) -> EgressPolicy:
        if not isinstance(section, dict):
            raise ConfigError("must be a table", path=path, key="node.egress")
        unknown = sorted(set(section) - {"metrics", "max-update-bytes"})
        if unknown:
            raise ConfigError("unknown key", path=path, key=f"node.egress.{unknown[0]}")
        metrics = section.get("metrics", list(DEFAULT_EGRESS_METRICS))
        if not isinstance(metrics, list) or not all(isinstance(m, str) and m for m in metrics):
            raise ConfigError(
                f"must be a list of metric names, got {metrics!r}",
                path=path,
                key="node.egress.metrics",
            )
        size = _Reader(section, path).integer("max-update-bytes", 64 * 1024 * 1024, minimum=1)
        return cls(frozenset(metrics), size)

    def as_table(self) -> dict[str, Any]:
        """The ``[node.egress]`` table that :meth:`from_section` reads."""
        return {"metrics": sorted(self.metrics), "max-update-bytes": self.max_update_bytes}


@dataclass(frozen=True)
class NodeConfig:
    """A node operator's own settings; provider-shipped code cannot change them."""

    name: str
    data_path: Path
    heldout_fraction: float = 0.2
    split_seed: int = 0
    max_row_bytes: int = 16 * 1024
    threads: int = 0
    journal_path: Path | None = None
    sandbox: SandboxConfig | None = None
    egress: EgressPolicy = field(default_factory=EgressPolicy)
    # FAB digests (hex SHA-256) this node's operator approved (``ark node approve``); the
    # node's launcher runs no other app.
    approved_apps: tuple[str, ...] = ()
    # Run with no protection at all (plaintext model and arrays, no guard). Exists only
    # for the canary test's negative control and the overhead bench; never in a deployment.
    unprotected: bool = False
    source: Path | None = None

    @classmethod
    def load(cls, path: Path) -> NodeConfig:
        """Read and validate ``[node]`` from a node TOML file."""
        try:
            raw = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise ConfigError("node config file does not exist", path=path) from exc
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read node config: {exc}", path=path) from exc
        section = raw.get("node")
        if not isinstance(section, dict):
            raise ConfigError("missing [node] table", path=path, key="node")
        read = _Reader(section, path)
        known = {
            "name",
            "data-path",
            "heldout-fraction",
            "split-seed",
            "max-row-bytes",
            "threads",
            "journal",
            "sandbox",
            "egress",
            "approved-apps",
            "unprotected",
        }
        unknown = sorted(set(section) - known)
        if unknown:
            raise read.fail(f"node.{unknown[0]}", f"unknown key; allowed: {sorted(known)}")
        name = read.string("name")
        if not name:
            raise read.fail("node.name", "must not be empty")
        data_path = Path(read.string("data-path"))
        if not data_path.is_absolute():
            data_path = (path.parent / data_path).resolve()
        journal = read.string("journal", "")
        journal_path = Path(journal) if journal else None
        if journal_path is not None and not journal_path.is_absolute():
            journal_path = (path.parent / journal_path).resolve()
        return cls(
            name=name,
            data_path=data_path,
            heldout_fraction=read.number("heldout-fraction", 0.2, low=0.01, high=0.9),
            split_seed=read.integer("split-seed", 0),
            max_row_bytes=read.integer("max-row-bytes", 16 * 1024, minimum=64),
            threads=read.integer("threads", 0),
            journal_path=journal_path,
            sandbox=(
                SandboxConfig.from_section(section["sandbox"], path)
                if "sandbox" in section
                else None
            ),
            egress=(
                EgressPolicy.from_section(section["egress"], path)
                if "egress" in section
                else EgressPolicy()
            ),
            approved_apps=_app_digests(section.get("approved-apps", []), path),
            unprotected=_flag(section, "unprotected", path),
            source=path,
        )

    def to_toml(self) -> str:
        """Render as the node TOML format that :meth:`load` reads (written by tomli-w)."""
        node: dict[str, Any] = {
            "name": self.name,
            "data-path": str(self.data_path),
            "heldout-fraction": self.heldout_fraction,
            "split-seed": self.split_seed,
            "max-row-bytes": self.max_row_bytes,
            "threads": self.threads,
        }
        if self.journal_path is not None:
            node["journal"] = str(self.journal_path)
        if self.approved_apps:
            node["approved-apps"] = list(self.approved_apps)
        if self.unprotected:
            node["unprotected"] = True
        if self.sandbox is not None:
            node["sandbox"] = self.sandbox.as_table()
        if self.egress != EgressPolicy():
            node["egress"] = self.egress.as_table()
        return tomli_w.dumps({"node": node})

    def require_sandbox(self) -> SandboxConfig:
        """``[node.sandbox]``, which every model load needs; ConfigError naming it if absent."""
        if self.sandbox is None:
            raise ConfigError(
                "no [node.sandbox] table: a node loads the base model only through "
                "attestation (run `ark node init`)",
                path=self.source,
                key="node.sandbox",
            )
        return self.sandbox

    def effective(self) -> dict[str, str]:
        """The settings that shape what this node does, as strings (measured into evidence)."""
        effective = {
            key: str(value)
            for key, value in asdict(self).items()
            if key not in ("source", "sandbox", "egress", "approved_apps") and value is not None
        }
        effective["approved-apps"] = ",".join(self.approved_apps)
        effective["egress-metrics"] = ",".join(sorted(self.egress.metrics))
        effective["egress-max-update-bytes"] = str(self.egress.max_update_bytes)
        return effective


def _app_digests(value: Any, path: Path) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(
        isinstance(d, str) and len(d) == 64 and all(c in "0123456789abcdef" for c in d)
        for d in value
    ):
        raise ConfigError(
            f"must be a list of lowercase hex SHA-256 digests, got {value!r}",
            path=path,
            key="node.approved-apps",
        )
    return tuple(sorted(set(value)))


def _flag(section: Mapping[str, Any], key: str, path: Path) -> bool:
    value = section.get(key, False)
    if not isinstance(value, bool):
        raise ConfigError(f"must be true or false, got {value!r}", path=path, key=f"node.{key}")
    return value
