"""Typed configuration: the provider's run config and each node operator's node config.

Every key is defined once, on the dataclass field it fills (:func:`_key`): its name, its
rule (type and bounds) and its default. Reading (:func:`_read`), validating on
construction (:func:`_check`) and writing back (:func:`_written`) all walk those
definitions, and a test checks pyproject's ``[tool.flwr.app.config]`` against
:data:`RUN_CONFIG_DEFAULTS`. Every error names the source (when there is one), the key and
the bad value.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tomllib
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import MISSING, Field, InitVar, asdict, dataclass, field, fields
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
# A run's mode: how LoRA trains (fedavg: A and B; ffa: B only, A frozen from the seed), and
# whether the aggregator sees only the sum (secure aggregation, ``sandbox/secagg.py``):
# "secagg" is fedavg with it, "ffa+secagg" ffa with it.
MODE_SECAGG = "secagg"
MODE_FFA_SECAGG = "ffa+secagg"
RUN_MODES = (*MODES, MODE_SECAGG, MODE_FFA_SECAGG)
PROTECTION_SEALED = "sealed"
PROTECTION_OFF = "off"
PROTECTIONS = (PROTECTION_SEALED, PROTECTION_OFF)
# The model id a comparison's local-model run names (``ark compare run --with-local``):
# each node fine-tunes its operator's own model there, and nothing of it leaves.
LOCAL_MODEL = "local"
MIN_FEDERATED_NODES = 2
# The largest ``max-examples-per-update``: every count up to it is exact as a float64,
# and no weighted sum of bounded float32 updates comes near float64's range.
EXAMPLES_LIMIT = 2**53
# The longest path a Unix domain socket may have on Linux (sun_path less its NUL).
MAX_SOCKET_PATH = 107
# The smallest noise multiplier a run may set (0 turns the noise off): below it the noise
# protects nothing and the accountants' arithmetic overflows.
MIN_NOISE_MULTIPLIER = 0.1


# -- rules: how one key's value is read, checked and written --------------------------------


def read_toml(path: Path, what: str, *, missing: str | None = None) -> dict[str, Any]:
    """``path`` (an operator's file) parsed as TOML; ConfigError naming the file: ``cannot
    read WHAT: ...``, or ``missing`` when given and the file does not exist."""
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ConfigError(missing or f"cannot read {what}: {exc}", path=path) from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read {what}: {exc}", path=path) from exc


class _Invalid(Exception):
    """A value breaks its key's rule; :func:`_naming` turns it into a ConfigError that names
    the source and the key."""


@contextmanager
def _naming(path: str | Path | None, key: str) -> Iterator[None]:
    try:
        yield
    except _Invalid as exc:
        raise ConfigError(str(exc), path=path, key=key) from None


class _Rule(ABC):
    """One key's type and bounds: ``parse`` takes the value as TOML (or Flower's run config)
    holds it, ``check`` the typed value a dataclass holds, ``dump`` writes it back."""

    @abstractmethod
    def check(self, value: Any) -> None:
        """Raise _Invalid if ``value`` breaks this rule."""

    def parse(self, raw: Any) -> Any:
        self.check(raw)
        return raw

    def dump(self, value: Any) -> Any:
        return value


@dataclass(frozen=True)
class _Text(_Rule):
    nonempty: bool = False
    # A name that is safe as one path component (a job's output folder).
    plain: bool = False

    def check(self, value: Any) -> None:
        if not isinstance(value, str):
            raise _Invalid(f"expected a string, got {value!r}")
        if self.plain and (not value or "/" in value or value.startswith(".")):
            raise _Invalid(f"must be a plain name, got {value!r}")
        if self.nonempty and not value:
            raise _Invalid("must not be empty")


@dataclass(frozen=True)
class _Choice(_Rule):
    options: tuple[str, ...]

    def check(self, value: Any) -> None:
        _Text().check(value)
        if value not in self.options:
            raise _Invalid(f"must be one of {', '.join(self.options)}; got {value!r}")


@dataclass(frozen=True)
class _Integer(_Rule):
    minimum: int = 0
    maximum: int | None = None
    # How the maximum reads in an error, when its digits alone say little.
    maximum_text: str = ""

    def check(self, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(f"expected an integer, got {value!r}")
        if value < self.minimum:
            raise _Invalid(f"must be at least {self.minimum}, got {value!r}")
        if self.maximum is not None and value > self.maximum:
            limit = self.maximum_text or str(self.maximum)
            raise _Invalid(f"must be at most {limit}, got {value!r}")


@dataclass(frozen=True)
class _Number(_Rule):
    low: float
    high: float | None = None

    def check(self, value: Any) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Invalid(f"expected a number, got {value!r}")
        # Written so that NaN, which compares false with everything, is refused.
        if not (self.low <= value and (self.high is None or value <= self.high)):
            bound = f"[{self.low}, {self.high}]" if self.high is not None else f">= {self.low}"
            raise _Invalid(f"must be in {bound}, got {value!r}")

    def parse(self, raw: Any) -> float:
        self.check(raw)
        return float(raw)


@dataclass(frozen=True)
class _Flag(_Rule):
    def check(self, value: Any) -> None:
        if not isinstance(value, bool):
            raise _Invalid(f"must be true or false, got {value!r}")


@dataclass(frozen=True)
class _Path(_Rule):
    """A path, written as a string. ``""`` reads as None when ``optional``; ``empty``, when
    set, is the error for ``""`` instead."""

    optional: bool = False
    empty: str = ""

    def check(self, value: Any) -> None:
        if value is None and self.optional:
            return
        if not isinstance(value, Path):
            raise _Invalid(f"expected a path, got {value!r}")

    def parse(self, raw: Any) -> Path | None:
        _Text().check(raw)
        if not raw and self.empty:
            raise _Invalid(self.empty)
        if not raw and self.optional:
            return None
        return Path(raw)

    def dump(self, value: Any) -> str:
        return "" if value is None else str(value)


@dataclass(frozen=True)
class _Paths(_Rule):
    """Paths, a TOML list of non-empty strings; held as a tuple without repeats."""

    def check(self, value: Any) -> None:
        if not isinstance(value, tuple) or not all(isinstance(p, Path) for p in value):
            raise _Invalid(f"expected paths, got {value!r}")
        if len(set(value)) != len(value):
            raise _Invalid(f"has duplicates: {value!r}")

    def parse(self, raw: Any) -> tuple[Path, ...]:
        if not isinstance(raw, list) or not all(isinstance(p, str) and p for p in raw):
            raise _Invalid(f"must be a list of non-empty paths, got {raw!r}")
        paths = tuple(Path(p) for p in raw)
        self.check(paths)
        return paths

    def dump(self, value: Any) -> list[str]:
        return [str(p) for p in value]


@dataclass(frozen=True)
class _Labels(_Rule):
    """Class labels, written as a JSON list of strings (Flower's run config holds scalars)."""

    def check(self, value: Any) -> None:
        if (
            not isinstance(value, tuple)
            or not all(isinstance(x, str) and x for x in value)
            or len(set(value)) != len(value)
        ):
            raise _Invalid(f"must be distinct non-empty strings, got {value!r}")

    def parse(self, raw: Any) -> tuple[str, ...]:
        _Text().check(raw)
        try:
            labels = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _Invalid(f"must be a JSON list of strings, got {raw!r}") from exc
        if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
            raise _Invalid(f"must be a JSON list of non-empty strings, got {raw!r}")
        if len(set(labels)) != len(labels):
            raise _Invalid(f"has duplicates: {raw!r}")
        return tuple(labels)

    def dump(self, value: Any) -> str:
        return json.dumps(list(value))


@dataclass(frozen=True)
class _Names(_Rule):
    """Names written comma-separated in one string; blanks around and between are dropped."""

    def check(self, value: Any) -> None:
        if not isinstance(value, tuple) or not all(
            isinstance(x, str) and x and x == x.strip() and "," not in x for x in value
        ):
            raise _Invalid(f"must be names without commas or blanks, got {value!r}")

    def parse(self, raw: Any) -> tuple[str, ...]:
        _Text().check(raw)
        return tuple(name.strip() for name in raw.split(",") if name.strip())

    def dump(self, value: Any) -> str:
        return ",".join(value)


def _is_digest(value: Any) -> bool:
    return (
        isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)
    )


@dataclass(frozen=True)
class _Digests(_Rule):
    """Hex SHA-256 digests, a TOML list; read sorted and without repeats."""

    def check(self, value: Any) -> None:
        self._check(value, tuple)

    def parse(self, raw: Any) -> tuple[str, ...]:
        self._check(raw, list)
        return tuple(sorted(set(raw)))

    @staticmethod
    def _check(value: Any, kind: type[tuple[Any, ...]] | type[list[Any]]) -> None:
        if not isinstance(value, kind) or not all(_is_digest(d) for d in value):
            raise _Invalid(f"must be a list of lowercase hex SHA-256 digests, got {value!r}")

    def dump(self, value: Any) -> list[str]:
        return list(value)


@dataclass(frozen=True)
class _MetricNames(_Rule):
    """Metric names, a TOML list; held as a frozenset, written sorted."""

    def check(self, value: Any) -> None:
        if not isinstance(value, frozenset) or not all(isinstance(m, str) and m for m in value):
            raise _Invalid(f"must be a set of metric names, got {value!r}")

    def parse(self, raw: Any) -> frozenset[str]:
        if not isinstance(raw, list) or not all(isinstance(m, str) and m for m in raw):
            raise _Invalid(f"must be a list of metric names, got {raw!r}")
        return frozenset(raw)

    def dump(self, value: Any) -> list[str]:
        return sorted(value)


# -- keys: one definition per field ---------------------------------------------------------

_KEY = "ark.config.key"


@dataclass(frozen=True)
class _Key:
    """One config key: its name as written and its rule. The default is its field's; for
    a field the constructor requires, ``default`` is what a file without the key means
    (None: the key must be given)."""

    name: str
    rule: _Rule
    default: str | int | float | None = None
    # The key an error names, where that differs from ``prefix + name`` (kept as it was).
    label: str = ""
    # Left out of a written file while it holds its field's default.
    quiet: bool = False


def _key(name: str, rule: _Rule, **options: Any) -> dict[str, _Key]:
    """A field's ``metadata``: the one definition of the key that fills it."""
    return {_KEY: _Key(name, rule, **options)}


def _keyed(cls: Any) -> Iterator[tuple[Field[Any], _Key]]:
    for f in fields(cls):
        if _KEY in f.metadata:
            yield f, f.metadata[_KEY]


def _label(key: _Key, prefix: str) -> str:
    return key.label or prefix + key.name


def _check(obj: Any, path: str | Path | None, prefix: str = "") -> None:
    """Validate every keyed field of ``obj`` (from ``__post_init__``)."""
    for f, key in _keyed(type(obj)):
        with _naming(path, _label(key, prefix)):
            key.rule.check(getattr(obj, f.name))


def _read(
    cls: Any, values: Mapping[str, Any], path: str | Path | None, prefix: str = ""
) -> dict[str, Any]:
    """The keyed fields of ``cls`` from a flat mapping, by field name; a key left out takes
    its default (a required key with none reads as missing, and its rule says so)."""
    read: dict[str, Any] = {}
    for f, key in _keyed(cls):
        if key.name not in values and f.default is not MISSING:
            read[f.name] = f.default
            continue
        raw = values.get(key.name, key.default)
        with _naming(path, _label(key, prefix)):
            read[f.name] = key.rule.parse(raw)
    return read


def _written(obj: Any) -> dict[str, Any]:
    """The keyed fields of ``obj`` as :func:`_read` reads them back."""
    written = {}
    for f, key in _keyed(type(obj)):
        value = getattr(obj, f.name)
        if not (key.quiet and value == f.default):
            written[key.name] = key.rule.dump(value)
    return written


def _defaults(cls: Any) -> dict[str, Any]:
    """Each key of ``cls`` with the default a written file holds."""
    return {
        key.name: key.default if f.default is MISSING else key.rule.dump(f.default)
        for f, key in _keyed(cls)
    }


def _names(cls: Any) -> tuple[str, ...]:
    """The keys of ``cls`` as written, in field order."""
    return tuple(key.name for _, key in _keyed(cls))


# -- the provider's run config --------------------------------------------------------------
# A node sandbox builds and trains whatever a run config asks for, so every size in it
# has a ceiling: a hostile run config cannot make a sandbox allocate or train unboundedly.


@dataclass(frozen=True)
class LoraSpec:
    """LoRA hyper-parameters shared by every node of a run."""

    r: int = field(default=8, metadata=_key("lora-r", _Integer(minimum=1, maximum=1024)))
    alpha: int = field(
        default=16, metadata=_key("lora-alpha", _Integer(minimum=1, maximum=1 << 20))
    )
    dropout: float = field(default=0.0, metadata=_key("lora-dropout", _Number(0.0, 0.99)))
    target_modules: tuple[str, ...] = field(
        default=(), metadata=_key("lora-target-modules", _Names())
    )

    def __post_init__(self) -> None:
        _check(self, None)


@dataclass(frozen=True)
class RunSpec:
    """The provider's run configuration, as the ServerApp and every ClientApp read it.

    Each field names its run-config key; the four without a default here take theirs from
    the run config (``[tool.flwr.app.config]``), where only ``job-id`` and ``task`` have a
    usable one. ``source`` names where the values came from in errors.
    """

    job_id: str = field(metadata=_key("job-id", _Text(plain=True), default="ark-demo"))
    task: str = field(metadata=_key("task", _Choice(TASKS), default=TASK_CLASSIFICATION))
    model_path: Path = field(
        metadata=_key(
            "model-path",
            _Path(empty="is empty; set it to a local model directory"),
            default="",
        )
    )
    labels: tuple[str, ...] = field(metadata=_key("labels", _Labels(), default="[]"))
    num_rounds: int = field(
        default=2, metadata=_key("num-rounds", _Integer(minimum=1, maximum=100_000))
    )
    mode: str = field(default=MODE_FEDAVG, metadata=_key("mode", _Choice(RUN_MODES)))
    min_nodes: int = field(
        default=MIN_FEDERATED_NODES, metadata=_key("min-nodes", _Integer(minimum=1))
    )
    expected_nodes: int = field(default=0, metadata=_key("expected-nodes", _Integer(minimum=0)))
    round_timeout: float = field(default=180.0, metadata=_key("round-timeout", _Number(1.0)))
    update_norm_bound: float = field(
        default=100.0, metadata=_key("update-norm-bound", _Number(1e-6))
    )
    # The most one update may weigh: a node's declared example count is clipped to it
    # (and to the count first accepted from that node in the job), so a node that lies
    # about its count weighs no more than an honest node holding this many examples.
    max_examples_per_update: int = field(
        default=10_000,
        metadata=_key(
            "max-examples-per-update",
            _Integer(minimum=1, maximum=EXAMPLES_LIMIT, maximum_text=f"2**53 ({EXAMPLES_LIMIT})"),
        ),
    )
    # Secure aggregation (``mode`` secagg or ffa+secagg): the share of the advertised nodes
    # needed to unmask (always a strict majority), and the clip range of each weighted
    # update value, which sets the 32-bit fixed-point scale (``sandbox.secagg``).
    secagg_threshold: float = field(
        default=0.6, metadata=_key("secagg-threshold", _Number(0.5, 1.0))
    )
    secagg_clip: float = field(default=4.0, metadata=_key("secagg-clip", _Number(1e-6, 1e6)))
    # Record-level differential privacy (``sandbox/privacy.py``): what the provider asks
    # each node to spend on this run at most. A node whose own budget (``[node.privacy]``)
    # is stricter refuses a looser ask; a node with a budget applies it even when the run
    # asks nothing (``dp-epsilon`` 0). ``dp-noise-multiplier`` 0: each node fits the noise
    # so that the run's planned steps spend the run's epsilon.
    dp_epsilon: float = field(default=0.0, metadata=_key("dp-epsilon", _Number(0.0, 1e4)))
    dp_delta: float = field(default=1e-5, metadata=_key("dp-delta", _Number(1e-12, 0.1)))
    dp_clip: float = field(default=1.0, metadata=_key("dp-clip", _Number(1e-6, 1e6)))
    dp_noise_multiplier: float = field(
        default=0.0, metadata=_key("dp-noise-multiplier", _Number(0.0, 1e4))
    )
    # Client-level differential privacy at the aggregate, the provider's option: each
    # node's update clipped to ``dp-client-clip`` (L2), every node weighing the same, and
    # Gaussian noise of ``dp-client-noise`` x clip added to the sum (with secure
    # aggregation, each node adds its share before masking). 0: off.
    dp_client_noise: float = field(default=0.0, metadata=_key("dp-client-noise", _Number(0.0, 1e4)))
    dp_client_clip: float = field(default=1.0, metadata=_key("dp-client-clip", _Number(1e-6, 1e6)))
    local_steps: int = field(
        default=12, metadata=_key("local-steps", _Integer(minimum=1, maximum=1_000_000))
    )
    batch_size: int = field(
        default=16, metadata=_key("batch-size", _Integer(minimum=1, maximum=4096))
    )
    learning_rate: float = field(default=1e-2, metadata=_key("learning-rate", _Number(1e-8, 1.0)))
    max_length: int = field(
        default=64, metadata=_key("max-length", _Integer(minimum=8, maximum=32_768))
    )
    # Its keys (``lora-*``) are LoraSpec's fields'.
    lora: LoraSpec = field(default_factory=LoraSpec)
    seed: int = field(default=42, metadata=_key("seed", _Integer(minimum=0)))
    output_dir: Path | None = field(default=None, metadata=_key("output-dir", _Path(optional=True)))
    # The sealed model nodes must unseal (its manifest model id); empty: whatever they hold.
    model_id: str = field(default="", metadata=_key("model-id", _Text()))
    # The comparison this run scores a model for (``ark compare run``); empty: none. In a
    # comparison each node commits to its held-out set and signs a scorecard of the run.
    comparison: str = field(default="", metadata=_key("comparison", _Text()))
    # "sealed": attested aggregator, HPKE envelopes both ways, egress guard (the default).
    # "off": plaintext arrays, for the canary test's negative control and the overhead
    # bench only; a node runs it only when its own config says ``unprotected = true``.
    protection: str = field(
        default=PROTECTION_SEALED, metadata=_key("protection", _Choice(PROTECTIONS))
    )
    # The aggregator sandbox's identity (``ark provider init --manufacturer``).
    aggregator_dir: Path | None = field(
        default=None, metadata=_key("aggregator-dir", _Path(optional=True))
    )
    # The provider's transparency log (SQLite); the ServerApp appends its events there.
    log_db: Path | None = field(default=None, metadata=_key("log-db", _Path(optional=True)))
    source: InitVar[str | Path | None] = None

    def __post_init__(self, source: str | Path | None) -> None:
        _check(self, source)
        if not isinstance(self.lora, LoraSpec):
            raise ConfigError(f"expected a LoraSpec, got {self.lora!r}", path=source, key="lora")
        if self.task == TASK_CLASSIFICATION and len(self.labels) < 2:
            raise ConfigError(
                f"classification needs at least 2 labels, got {self.labels!r}",
                path=source,
                key="labels",
            )
        if self.secure_aggregation and self.protection != PROTECTION_SEALED:
            raise ConfigError(
                f"mode {self.mode!r} needs protection {PROTECTION_SEALED!r}: secure "
                "aggregation's keys are signed by attested sandboxes",
                path=source,
                key="mode",
            )
        for key, noise in (
            ("dp-noise-multiplier", self.dp_noise_multiplier),
            ("dp-client-noise", self.dp_client_noise),
        ):
            if 0 < noise < MIN_NOISE_MULTIPLIER:
                raise ConfigError(
                    f"{noise!r} is below {MIN_NOISE_MULTIPLIER}: that little noise protects "
                    "nothing; 0 turns it off",
                    path=source,
                    key=key,
                )
        if self.secure_aggregation and self.client_dp:
            # The largest value a node masks: its clipped change plus 6 standard deviations
            # of its noise share at the smallest threshold (2); beyond secagg-clip it would
            # be cut, and the noise would not be the noise the accountant counts.
            share = self.dp_client_noise * self.dp_client_clip / math.sqrt(2)
            needed = self.dp_client_clip + 6 * share
            if needed > self.secagg_clip:
                raise ConfigError(
                    f"{self.secagg_clip:g} is too small for client-level noise "
                    f"{self.dp_client_noise:g} x clip {self.dp_client_clip:g}: each node's "
                    f"noisy share needs a range of at least {needed:.3g}",
                    path=source,
                    key="secagg-clip",
                )
        if self.secure_aggregation and (self.comparison or self.model_id == LOCAL_MODEL):
            raise ConfigError(
                f"mode {self.mode!r} does not run in a comparison: scorecards name each "
                "node's own adapter, which secure aggregation hides",
                path=source,
                key="mode",
            )

    @property
    def client_dp(self) -> bool:
        """Whether the aggregate gets client-level noise (``dp-client-noise``)."""
        return self.dp_client_noise > 0

    @classmethod
    def from_run_config(
        cls, values: Mapping[str, Any], source: str | Path = "run config"
    ) -> RunSpec:
        """Validate a Flower run config (``[tool.flwr.app.config]`` plus overrides)."""
        lora = LoraSpec(**_read(LoraSpec, values, source))
        return cls(**_read(cls, values, source), lora=lora, source=source)

    @property
    def lora_mode(self) -> str:
        """How LoRA trains in this run: fedavg or ffa (secure aggregation aside)."""
        return MODE_FFA if self.mode in (MODE_FFA, MODE_FFA_SECAGG) else MODE_FEDAVG

    @property
    def secure_aggregation(self) -> bool:
        """Whether the aggregator sees only the sum of the nodes' updates."""
        return self.mode in (MODE_SECAGG, MODE_FFA_SECAGG)

    def to_run_config(self) -> dict[str, str | int | float]:
        """The inverse of :meth:`from_run_config`, for writing a run-config TOML."""
        return {**_written(self), **_written(self.lora)}

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


# Every run-config key with its default: what ``[tool.flwr.app.config]`` ships (a test
# checks the two are equal, key for key and type for type).
RUN_CONFIG_DEFAULTS: dict[str, str | int | float] = {**_defaults(RunSpec), **_defaults(LoraSpec)}


# -- each node operator's node config -------------------------------------------------------


def _beside(config: Path, value: Path | None) -> Path | None:
    """A path from a config file, relative paths taken from the file's folder."""
    if value is None or value.is_absolute():
        return value
    return (config.parent / value).resolve()


_FILE = _Path(empty="must not be empty")
_OPTIONAL_FILE = _Path(optional=True, empty="must not be empty")


@dataclass(frozen=True)
class SandboxConfig:
    """``[node.sandbox]``: how this node's sandbox attests and where the sealed model is.

    Paths are resolved against the node config's folder. Every file here is the
    operator's or was handed over by the provider out of band (its CA, manifest-signing
    key and result-signing key), never fetched from the provider at run time.
    """

    tee: str = field(metadata=_key("tee", _Text(nonempty=True)))
    ueid: str = field(metadata=_key("ueid", _Text(nonempty=True)))
    attestation_key: Path = field(metadata=_key("attestation-key", _FILE))
    attestation_chain: Path = field(metadata=_key("attestation-chain", _FILE))
    key_broker: str = field(metadata=_key("key-broker", _Text(nonempty=True)))
    provider_ca: Path = field(metadata=_key("provider-ca", _FILE))
    manifest_key: Path = field(metadata=_key("manifest-key", _FILE))
    result_key: Path = field(metadata=_key("result-key", _FILE))
    package: Path = field(metadata=_key("package", _FILE))
    hpke_suite: str = field(
        default="x25519-hkdf-sha256-aes256gcm", metadata=_key("hpke-suite", _Text(nonempty=True))
    )
    # The node's passport policy for the aggregator, and the roots it trusts for it.
    aggregator_policy: Path | None = field(
        default=None, metadata=_key("aggregator-policy", _OPTIONAL_FILE, quiet=True)
    )
    trusted_roots: Path | None = field(
        default=None, metadata=_key("trusted-roots", _OPTIONAL_FILE, quiet=True)
    )
    # A provider's signed model catalog (a folder of catalog.json, catalog.sig and its
    # sealed packages), and the Ed25519 keys (PEM) this operator trusts to sign one
    # (`ark node trust-catalog`). A run naming a catalog model unseals that model's
    # package; any other run, this node's own ``package``.
    catalog: Path | None = field(default=None, metadata=_key("catalog", _OPTIONAL_FILE, quiet=True))
    catalog_keys: tuple[Path, ...] = field(
        default=(), metadata=_key("catalog-keys", _Paths(), quiet=True)
    )
    # The operator's own model: a plain Hugging Face folder that never leaves the node,
    # the "1" of a comparison. A local-model run fine-tunes it here with the run's budget
    # and sends only the signed scorecard.
    local_model: Path | None = field(
        default=None, metadata=_key("local-model", _OPTIONAL_FILE, quiet=True)
    )

    def __post_init__(self) -> None:
        _check(self, None, "node.sandbox.")

    @classmethod
    def from_section(cls, section: Any, path: Path) -> SandboxConfig:
        """Read and validate ``[node.sandbox]`` of the node config at ``path``."""
        if not isinstance(section, dict):
            raise ConfigError("must be a table", path=path, key="node.sandbox")
        unknown = sorted(set(section) - set(SANDBOX_KEYS))
        if unknown:
            raise ConfigError(
                f"unknown key; allowed: {SANDBOX_KEYS}", path=path, key=f"node.sandbox.{unknown[0]}"
            )
        read = _read(cls, section, path, "node.sandbox.")
        for name, value in read.items():
            if isinstance(value, Path):
                read[name] = _beside(path, value)
            elif isinstance(value, tuple) and all(isinstance(p, Path) for p in value):
                read[name] = tuple(_beside(path, p) for p in value)
        return cls(**read)

    def as_table(self) -> dict[str, Any]:
        """The ``[node.sandbox]`` table that :meth:`from_section` reads."""
        return _written(self)


SANDBOX_KEYS = _names(SandboxConfig)


@dataclass(frozen=True)
class PrivacyBudget:
    """``[node.privacy]``: the most this node's records may be spent, in total, on
    everything it trains (every run, every provider), as record-level differential
    privacy (epsilon, delta), and the per-example gradient clip it trains with.

    A run may ask for less (a smaller epsilon, delta or clip), never more; its rounds are
    tracked by the sandbox's accountant in the node's journal (the ledger), and a round
    that would pass the budget is declined."""

    epsilon: float = field(metadata=_key("epsilon", _Number(1e-3, 1e4)))
    delta: float = field(default=1e-5, metadata=_key("delta", _Number(1e-12, 0.1)))
    clip: float = field(default=1.0, metadata=_key("clip", _Number(1e-6, 1e6)))

    def __post_init__(self) -> None:
        _check(self, None, "node.privacy.")

    @classmethod
    def from_section(cls, section: Any, path: Path) -> PrivacyBudget:
        """Read and validate ``[node.privacy]`` of the node config at ``path``."""
        if not isinstance(section, dict):
            raise ConfigError("must be a table", path=path, key="node.privacy")
        unknown = sorted(set(section) - set(_names(cls)))
        if unknown:
            raise ConfigError(
                f"unknown key; allowed: {list(_names(cls))}",
                path=path,
                key=f"node.privacy.{unknown[0]}",
            )
        return cls(**_read(cls, section, path, "node.privacy."))

    def as_table(self) -> dict[str, Any]:
        """The ``[node.privacy]`` table that :meth:`from_section` reads."""
        return _written(self)


# What a round trained with differential privacy reports with its update: its mechanism
# and what it cost (``sandbox/privacy.py``); the provider logs them for the auditor.
DP_NOISE_MULTIPLIER = "dp-noise-multiplier"
DP_SAMPLE_RATE = "dp-sample-rate"
DP_STEPS = "dp-steps"
DP_CLIP = "dp-clip"
DP_DELTA = "dp-delta"
DP_EPSILON = "dp-epsilon"
DP_EPSILON_TOTAL = "dp-epsilon-total"
DP_BUDGET = "dp-budget"
DP_METRICS = (
    DP_NOISE_MULTIPLIER,
    DP_SAMPLE_RATE,
    DP_STEPS,
    DP_CLIP,
    DP_DELTA,
    DP_EPSILON,
    DP_EPSILON_TOTAL,
    DP_BUDGET,
)

# Scalar metrics the ClientApp reports; a node operator may narrow (or extend) the list.
DEFAULT_EGRESS_METRICS = tuple(
    [
        *DP_METRICS,
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

    metrics: frozenset[str] = field(
        default=frozenset(DEFAULT_EGRESS_METRICS), metadata=_key("metrics", _MetricNames())
    )
    max_update_bytes: int = field(
        default=64 * 1024 * 1024, metadata=_key("max-update-bytes", _Integer(minimum=1))
    )

    def __post_init__(self) -> None:
        _check(self, None, "node.egress.")

    @classmethod
    def from_section(cls, section: Any, path: Path) -> EgressPolicy:
        """Read and validate ``[node.egress]`` of the node config at ``path``."""
        if not isinstance(section, dict):
            raise ConfigError("must be a table", path=path, key="node.egress")
        unknown = sorted(set(section) - set(_names(cls)))
        if unknown:
            raise ConfigError("unknown key", path=path, key=f"node.egress.{unknown[0]}")
        return cls(**_read(cls, section, path, "node.egress."))

    def as_table(self) -> dict[str, Any]:
        """The ``[node.egress]`` table that :meth:`from_section` reads."""
        return _written(self)


@dataclass(frozen=True)
class NodeConfig:
    """A node operator's own settings; provider-shipped code cannot change them."""

    name: str = field(metadata=_key("name", _Text(nonempty=True), label="node.name"))
    data_path: Path = field(metadata=_key("data-path", _Path()))
    heldout_fraction: float = field(
        default=0.2, metadata=_key("heldout-fraction", _Number(0.01, 0.9))
    )
    split_seed: int = field(default=0, metadata=_key("split-seed", _Integer()))
    max_row_bytes: int = field(
        default=16 * 1024, metadata=_key("max-row-bytes", _Integer(minimum=64))
    )
    threads: int = field(default=0, metadata=_key("threads", _Integer()))
    journal_path: Path | None = field(
        default=None, metadata=_key("journal", _Path(optional=True), quiet=True)
    )
    # The node sandbox's Unix socket (the ClientApp's only way to it); default
    # ``sandbox/api.sock`` beside this file (see :meth:`socket_path`).
    sandbox_socket: Path | None = field(
        default=None, metadata=_key("sandbox-socket", _Path(optional=True), quiet=True)
    )
    # The sandbox's local inference API (HTTP on 127.0.0.1 only); 0: an ephemeral port,
    # which the sandbox publishes in ``sandbox/inference.json`` beside this file.
    inference_port: int = field(
        default=0,
        metadata=_key("inference-port", _Integer(minimum=0, maximum=65535), quiet=True),
    )
    sandbox: SandboxConfig | None = None
    egress: EgressPolicy = field(default_factory=EgressPolicy)
    # The node's differential-privacy budget; None: the node asks none of its own (a run
    # may still ask for record-level DP, which the node then applies and tracks).
    privacy: PrivacyBudget | None = None
    # FAB digests (hex SHA-256) this node's operator approved (``ark node approve``); the
    # node's launcher runs no other app.
    approved_apps: tuple[str, ...] = field(
        default=(),
        metadata=_key("approved-apps", _Digests(), label="node.approved-apps", quiet=True),
    )
    # Run with no protection at all (plaintext model and arrays, no guard). Exists only
    # for the canary test's negative control and the overhead bench; never in a deployment.
    unprotected: bool = field(
        default=False, metadata=_key("unprotected", _Flag(), label="node.unprotected", quiet=True)
    )
    source: Path | None = None

    def __post_init__(self) -> None:
        _check(self, self.source)
        if self.sandbox is not None and not isinstance(self.sandbox, SandboxConfig):
            raise ConfigError("must be a table", path=self.source, key="node.sandbox")
        if not isinstance(self.egress, EgressPolicy):
            raise ConfigError("must be a table", path=self.source, key="node.egress")
        if self.privacy is not None and not isinstance(self.privacy, PrivacyBudget):
            raise ConfigError("must be a table", path=self.source, key="node.privacy")
        if self.privacy is not None and self.journal_path is None:
            raise ConfigError(
                "a privacy budget needs the node's journal: it is the ledger of what was spent",
                path=self.source,
                key="node.journal",
            )

    @classmethod
    def load(cls, path: Path) -> NodeConfig:
        """Read and validate ``[node]`` from a node TOML file."""
        raw = read_toml(path, "node config", missing="node config file does not exist")
        section = raw.get("node")
        if not isinstance(section, dict):
            raise ConfigError("missing [node] table", path=path, key="node")
        known = sorted({*_names(cls), "sandbox", "egress", "privacy"})
        unknown = sorted(set(section) - set(known))
        if unknown:
            raise ConfigError(f"unknown key; allowed: {known}", path=path, key=f"node.{unknown[0]}")
        read = _read(cls, section, path)
        read["data_path"] = _beside(path, read["data_path"])
        read["journal_path"] = _beside(path, read["journal_path"])
        read["sandbox_socket"] = _beside(path, read["sandbox_socket"])
        return cls(
            **read,
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
            privacy=(
                PrivacyBudget.from_section(section["privacy"], path)
                if "privacy" in section
                else None
            ),
            source=path,
        )

    def to_toml(self) -> str:
        """Render as the node TOML format that :meth:`load` reads (written by tomli-w)."""
        node: dict[str, Any] = _written(self)
        if self.sandbox is not None:
            node["sandbox"] = self.sandbox.as_table()
        if self.egress != EgressPolicy():
            node["egress"] = self.egress.as_table()
        if self.privacy is not None:
            node["privacy"] = self.privacy.as_table()
        return tomli_w.dumps({"node": node})

    def socket_path(self) -> Path:
        """Where the node sandbox listens: ``sandbox-socket``, else ``sandbox/api.sock``
        beside this config. A Unix socket path holds at most 107 bytes."""
        path = self.sandbox_socket
        if path is None:
            if self.source is None:
                raise ConfigError("the node config was not loaded from a file; set sandbox-socket")
            path = self.source.parent.absolute() / "sandbox" / "api.sock"
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise ConfigError(
                f"socket path {path} is longer than {MAX_SOCKET_PATH} bytes; set a shorter one",
                path=self.source,
                key="node.sandbox-socket",
            )
        return path

    def workspace(self) -> Path:
        """The node's workspace: the folder of its config file (where the sandbox keeps
        its adapters, its inference token and address)."""
        if self.source is None:
            raise ConfigError("the node config was not loaded from a file: it has no workspace")
        return self.source.parent.absolute()

    def inference_token_path(self) -> Path:
        """Where the sandbox writes its inference API's bearer token (0600, new each start)."""
        return self.workspace() / "sandbox" / "inference.token"

    def inference_address_path(self) -> Path:
        """Where the sandbox publishes its inference API's address (``{"url", "pid"}``)."""
        return self.workspace() / "sandbox" / "inference.json"

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
            if key not in ("source", "sandbox", "egress", "approved_apps", "privacy")
            and value is not None
        }
        effective["approved-apps"] = ",".join(self.approved_apps)
        effective["egress-metrics"] = ",".join(sorted(self.egress.metrics))
        effective["egress-max-update-bytes"] = str(self.egress.max_update_bytes)
        if self.privacy is not None:
            for name, value in self.privacy.as_table().items():
                effective[f"privacy-{name}"] = str(value)
        return effective
