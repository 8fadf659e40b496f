"""The comparison report: N catalog models (and an enterprise's own) side by side.

A comparison job fine-tunes several models, one after another, on the same federation
with the same budget; each node scores each model on its committed held-out set and
signs the scorecard. The orchestration gathers what it ran into ``comparison.json`` in
the comparison's output folder. This module reads that file, strictly (its model ids,
node names and figures were written by other parties: every value is type-checked and
every refusal is a :class:`~sandbox.errors.ComparisonInvalid` naming the file and the
key), and turns it into tables (terminal and HTML), a plot and a recommendation made
under a rule that is written out in words wherever the recommendation is shown.

Format ``ark-comparison/1`` (every key listed is required unless marked optional)::

    {"format": "ark-comparison/1", "comparison": str, "task": str, "metric": str,
     "rule": {"max_price_per_1k_training_examples": number | null},
     "budget": {"rounds": int, "local_steps": int, "batch_size": int},      (optional)
     "models": [{"model_id", "manifest_sha256", "architecture", "layers", "hidden_size",
                 "parameters", "licence", "price": {"currency", "per_1k_training_examples",
                 "per_1k_inferences"} | null, "job", "run", "local": bool}],
     "nodes": [{"name", "ueid", "examples"}],
     "scorecards": [{"model_id", "node", "before": {metric: number},
                     "after": {metric: number}, "cost": {"train_seconds_per_step",
                     "inference_ms_per_example", "update_bytes_per_round",
                     "adapter_bytes"}}]}

``budget`` is what every model was trained with; a node trains on ``rounds × local_steps
× batch_size`` examples (counted with repetition), which with a model's price per 1k
training examples gives the estimated training cost of this comparison. Without it the
cost column is left empty. A local model (``"local": true``, the enterprise's own) has no
price and a scorecard from one node only, its own; every catalog model has one scorecard
from every node, so no model's mean leaves out a node where it did badly.
"""

from __future__ import annotations

import base64
import dataclasses
import html
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.table import Table
from rich.text import Text

from sandbox import strictjson
from sandbox.catalog import Price
from sandbox.errors import CatalogInvalid, ComparisonInvalid
from sandbox.files import read_regular, write_atomic
from sandbox.scorecard import Cost
from sandbox.strictjson import StrictJSONError, json_type

__all__ = [
    "COMPARISON_FILE",
    "COMPARISON_FORMAT",
    "HTML_FILE",
    "PNG_FILE",
    "Budget",
    "CandidateModel",
    "Comparison",
    "Cost",
    "NodeInfo",
    "NodeSummary",
    "Price",
    "Recommendation",
    "Row",
    "Rule",
    "ScoreEntry",
    "Summary",
    "comparison_from_json",
    "load_comparison",
    "notes",
    "recommend",
    "render_html",
    "render_png",
    "render_tables",
    "summarize",
    "write_report",
]

COMPARISON_FORMAT = "ark-comparison/1"
COMPARISON_FILE = "comparison.json"
HTML_FILE = "comparison.html"
PNG_FILE = "comparison.png"

# Bounds on what one file may hold: far above a real comparison, low enough that a hostile
# file cannot make the report unreadable (a plot panel per node) or the sums overflow.
MAX_FILE_BYTES = 8 * 1024 * 1024
MAX_MODELS = 32
MAX_NODES = 64
MAX_TEXT_CHARS = 256
MAX_NUMBER = 1e15
# Means that differ by less than this are a tie (sums of the same figures in another order
# differ in their last bits).
TIE_TOLERANCE = 1e-9

# Metrics where smaller is better (server/results.py reports these for causal LMs); every
# other metric (accuracy, macro_f1, ...) is better when larger.
LOWER_IS_BETTER = frozenset({"perplexity", "loss"})


# --- The file's contents, typed -----------------------------------------------------------


@dataclass(frozen=True)
class CandidateModel:
    """One model compared: a catalog entry, or (``local``) the enterprise's own model."""

    model_id: str
    manifest_sha256: str
    # What the catalog says of the model; null for a local model (the node's own, which
    # the provider's comparison does not describe).
    architecture: str | None
    layers: int | None
    hidden_size: int | None
    parameters: int | None
    licence: str | None
    price: Price | None
    job: str
    run: int
    local: bool


@dataclass(frozen=True)
class NodeInfo:
    """A node that scored models: its name, its TEE's ueid, its number of examples."""

    name: str
    ueid: str
    examples: int


@dataclass(frozen=True)
class ScoreEntry:
    """One node's scorecard of one model: held-out metrics before and after, and cost."""

    model_id: str
    node: str
    before: Mapping[str, float]
    after: Mapping[str, float]
    cost: Cost


@dataclass(frozen=True)
class Budget:
    """The training budget every model of the comparison got (the same for each)."""

    rounds: int
    local_steps: int
    batch_size: int

    @property
    def examples_per_node(self) -> int:
        """Examples one node trains on, counted with repetition."""
        return self.rounds * self.local_steps * self.batch_size


@dataclass(frozen=True)
class Rule:
    """How the recommendation is chosen: the best mean metric within a price limit."""

    max_price_per_1k_training_examples: float | None

    def __post_init__(self) -> None:
        limit = self.max_price_per_1k_training_examples
        if limit is not None and not (math.isfinite(limit) and limit >= 0):
            raise ValueError(f"a price limit must be a finite number >= 0, not {limit!r}")

    def admits(self, model: CandidateModel) -> bool:
        """Whether ``model`` is within the price limit (a local model has no price)."""
        limit = self.max_price_per_1k_training_examples
        return model.price is None or limit is None or model.price.per_1k_training_examples <= limit

    def describe(self, metric: str, currency: str | None) -> str:
        """The rule in words, as every output states it."""
        limit = self.max_price_per_1k_training_examples
        better = "lowest" if metric in LOWER_IS_BETTER else "highest"
        if limit is None:
            within = "with no price limit"
        else:
            within = (
                f"among models priced at most {_money(limit, currency)} per 1k training examples"
            )
        return (
            f"Rule: recommend the model with the {better} held-out {metric} after fine-tuning, "
            f"averaged over the nodes that scored it, {within} (a local model has no price "
            "and always qualifies); a tie goes to the lower price per 1k training examples "
            "(a local model's counts as 0), then to fewer training seconds per step, then to "
            "the model listed first."
        )


@dataclass(frozen=True)
class Comparison:
    """The whole of one ``comparison.json``, checked: see the module docstring."""

    comparison: str
    task: str
    metric: str
    rule: Rule
    budget: Budget | None
    models: tuple[CandidateModel, ...]
    nodes: tuple[NodeInfo, ...]
    scorecards: tuple[ScoreEntry, ...]
    # (model id, node name) pairs with no valid scorecard: the node declined or failed,
    # or its scorecard did not verify. Such a model is not recommended.
    missing: tuple[tuple[str, str], ...] = ()

    @property
    def incomplete(self) -> tuple[str, ...]:
        """The models some node has no scorecard of (in the file's order)."""
        lacking = {model_id for model_id, _ in self.missing}
        return tuple(m.model_id for m in self.models if m.model_id in lacking)

    @property
    def higher_is_better(self) -> bool:
        """Whether a larger value of :attr:`metric` is the better one."""
        return self.metric not in LOWER_IS_BETTER

    @property
    def currency(self) -> str | None:
        """The one currency every priced model is priced in (None: no model has a price)."""
        return next((m.price.currency for m in self.models if m.price is not None), None)

    def scorecard(self, model_id: str, node: str) -> ScoreEntry | None:
        """The scorecard of ``model_id`` from ``node``, or None if that node did not score it."""
        for entry in self.scorecards:
            if entry.model_id == model_id and entry.node == node:
                return entry
        return None

    def with_rule(self, rule: Rule) -> Comparison:
        """The same comparison judged under another rule (``ark compare --max-price``)."""
        return dataclasses.replace(self, rule=rule)


# --- Reading the file ---------------------------------------------------------------------


def load_comparison(path: Path) -> Comparison:
    """Read and check ``path`` (a ``comparison.json``, or the folder holding one).

    Raises :class:`ComparisonInvalid` naming the file (and the key, where one is at
    fault) for an unreadable file, input :mod:`sandbox.strictjson` refuses (NaN, duplicate
    keys, ...), and anything :func:`comparison_from_json` refuses.
    """
    path = Path(path)
    if path.is_dir():
        path = path / COMPARISON_FILE

    def refused(reason: str) -> ComparisonInvalid:
        return ComparisonInvalid(reason, path=path)

    data = read_regular(path, MAX_FILE_BYTES, refused)
    if len(data) > MAX_FILE_BYTES:
        raise refused(f"more than {MAX_FILE_BYTES} bytes")
    try:
        document = strictjson.loads(data)
    except StrictJSONError as exc:
        raise refused(f"not strict JSON: {exc}") from exc
    return comparison_from_json(document, source=path)


def comparison_from_json(document: Any, *, source: Path | str | None = None) -> Comparison:
    """A :class:`Comparison` from parsed JSON; raise :class:`ComparisonInvalid` naming
    ``source`` and the key (``scorecards[2].after.accuracy``) of the first fault."""
    return _Reader(source).comparison(document)


def _at(key: str, name: str | int) -> str:
    if isinstance(name, int):
        return f"{key}[{name}]"
    return f"{key}.{name}" if key else name


class _Reader:
    """Typed values out of parsed JSON; every refusal names the source and the key."""

    def __init__(self, source: Path | str | None):
        self.source = source

    def invalid(self, key: str, message: str) -> ComparisonInvalid:
        return ComparisonInvalid(message, path=self.source, key=key or None)

    def fields(
        self, value: Any, key: str, required: Sequence[str], optional: Sequence[str] = ()
    ) -> Mapping[str, Any]:
        if not isinstance(value, dict):
            raise self.invalid(key, f"expected a JSON object, not {json_type(value)}")
        for name in required:
            if name not in value:
                raise self.invalid(_at(key, name), "missing")
        for name in value:
            if name not in required and name not in optional:
                raise self.invalid(_at(key, name), "unknown key")
        return value

    def items(self, value: Any, key: str, limit: int) -> list[Any]:
        if not isinstance(value, list):
            raise self.invalid(key, f"expected a JSON array, not {json_type(value)}")
        if not 1 <= len(value) <= limit:
            raise self.invalid(key, f"expected 1 to {limit} entries, found {len(value)}")
        return value

    def text(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            raise self.invalid(key, f"expected a string, not {json_type(value)}")
        if not value.strip():
            raise self.invalid(key, "empty")
        if len(value) > MAX_TEXT_CHARS:
            raise self.invalid(key, f"longer than {MAX_TEXT_CHARS} characters")
        try:
            strictjson.check_text(value)
        except StrictJSONError as exc:
            raise self.invalid(key, str(exc)) from exc
        return value

    def integer(
        self, value: Any, key: str, minimum: int = 0, maximum: int | float = MAX_NUMBER
    ) -> int:
        # bool is an int subclass, but ``true`` is no count.
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.invalid(key, f"expected an integer, not {json_type(value)}")
        if not minimum <= value <= maximum:
            raise self.invalid(key, f"{value} is outside [{minimum}, {maximum:.0e}]")
        return value

    def number(self, value: Any, key: str, *, signed: bool = False) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.invalid(key, f"expected a number, not {json_type(value)}")
        number = float(value)
        if not math.isfinite(number):
            raise self.invalid(key, f"{number} is not a finite number")
        low = -MAX_NUMBER if signed else 0.0
        if not low <= number <= MAX_NUMBER:
            raise self.invalid(key, f"{number} is outside [{low:g}, {MAX_NUMBER:g}]")
        return number

    def flag(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.invalid(key, f"expected true or false, not {json_type(value)}")
        return value

    def metrics(self, value: Any, key: str, metric: str) -> dict[str, float]:
        if not isinstance(value, dict):
            raise self.invalid(key, f"expected a JSON object, not {json_type(value)}")
        if metric not in value:
            raise self.invalid(_at(key, metric), "missing: the comparison's metric")
        out = {}
        for name, number in value.items():
            self.text(name, key)
            out[name] = self.number(number, _at(key, name), signed=True)
        return out

    # -- the parts of the file --

    def comparison(self, document: Any) -> Comparison:
        top = self.fields(
            document,
            "",
            ("format", "comparison", "task", "metric", "rule", "models", "nodes", "scorecards"),
            ("budget", "missing"),
        )
        if top["format"] != COMPARISON_FORMAT:
            raise self.invalid("format", f"expected {COMPARISON_FORMAT!r}")
        metric = self.text(top["metric"], "metric")
        models = tuple(
            self.model(item, _at("models", i))
            for i, item in enumerate(self.items(top["models"], "models", MAX_MODELS))
        )
        nodes = tuple(
            self.node(item, _at("nodes", i))
            for i, item in enumerate(self.items(top["nodes"], "nodes", MAX_NODES))
        )
        scorecards = tuple(
            self.scorecard(item, _at("scorecards", i), metric)
            for i, item in enumerate(
                self.items(top["scorecards"], "scorecards", MAX_MODELS * MAX_NODES)
            )
        )
        comparison = Comparison(
            comparison=self.text(top["comparison"], "comparison"),
            task=self.text(top["task"], "task"),
            metric=metric,
            rule=self.rule(top["rule"]),
            budget=None if top.get("budget") is None else self.budget(top["budget"]),
            models=models,
            nodes=nodes,
            scorecards=scorecards,
            missing=tuple(
                self.missing_pair(item, _at("missing", i))
                for i, item in enumerate(
                    self.items(top["missing"], "missing", MAX_MODELS * MAX_NODES)
                    if top.get("missing")
                    else []
                )
            ),
        )
        self.check_together(comparison)
        return comparison

    def rule(self, value: Any) -> Rule:
        key = "rule"
        rule = self.fields(value, key, ("max_price_per_1k_training_examples",))
        limit = rule["max_price_per_1k_training_examples"]
        if limit is None:
            return Rule(None)
        return Rule(self.number(limit, _at(key, "max_price_per_1k_training_examples")))

    def budget(self, value: Any) -> Budget:
        budget = self.fields(value, "budget", ("rounds", "local_steps", "batch_size"))
        return Budget(
            **{name: self.integer(budget[name], _at("budget", name), 1) for name in budget}
        )

    def price(self, value: Any, key: str) -> Price:
        price = self.fields(
            value, key, ("currency", "per_1k_training_examples", "per_1k_inferences")
        )
        currency = self.text(price["currency"], _at(key, "currency"))
        per_train = self.number(
            price["per_1k_training_examples"], _at(key, "per_1k_training_examples")
        )
        per_inference = self.number(price["per_1k_inferences"], _at(key, "per_1k_inferences"))
        try:
            return Price(currency, per_train, per_inference)
        except CatalogInvalid as exc:  # the catalog's own rule (an ISO 4217 code)
            raise self.invalid(_at(key, "currency"), str(exc)) from None

    def model(self, value: Any, key: str) -> CandidateModel:
        names = (
            "model_id",
            "manifest_sha256",
            "architecture",
            "layers",
            "hidden_size",
            "parameters",
            "licence",
            "price",
            "job",
            "run",
            "local",
        )
        model = self.fields(value, key, names)
        local = self.flag(model["local"], _at(key, "local"))
        price_key = _at(key, "price")
        if local and model["price"] is not None:
            raise self.invalid(price_key, "a local model has no price: expected null")
        if not local and model["price"] is None:
            raise self.invalid(price_key, "a catalog model needs a price")
        digest = self.text(model["manifest_sha256"], _at(key, "manifest_sha256"))
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise self.invalid(_at(key, "manifest_sha256"), "expected 64 lowercase hex digits")

        def described(name: str, read: Any) -> Any:
            if local and model[name] is None:
                return None
            return read(model[name], _at(key, name))

        return CandidateModel(
            model_id=self.text(model["model_id"], _at(key, "model_id")),
            manifest_sha256=digest,
            architecture=described("architecture", self.text),
            layers=described("layers", lambda v, k: self.integer(v, k, 1)),
            hidden_size=described("hidden_size", lambda v, k: self.integer(v, k, 1)),
            parameters=described("parameters", lambda v, k: self.integer(v, k, 1)),
            licence=described("licence", self.text),
            price=None if local else self.price(model["price"], price_key),
            job=self.text(model["job"], _at(key, "job")),
            # A Flower run id: an unsigned 64-bit integer.
            run=self.integer(model["run"], _at(key, "run"), maximum=2**64 - 1),
            local=local,
        )

    def node(self, value: Any, key: str) -> NodeInfo:
        node = self.fields(value, key, ("name", "ueid", "examples"))
        return NodeInfo(
            name=self.text(node["name"], _at(key, "name")),
            ueid=self.text(node["ueid"], _at(key, "ueid")),
            examples=self.integer(node["examples"], _at(key, "examples")),
        )

    def scorecard(self, value: Any, key: str, metric: str) -> ScoreEntry:
        card = self.fields(value, key, ("model_id", "node", "before", "after", "cost"))
        cost_key = _at(key, "cost")
        cost = self.fields(
            card["cost"],
            cost_key,
            (
                "train_seconds_per_step",
                "inference_ms_per_example",
                "update_bytes_per_round",
                "adapter_bytes",
            ),
        )
        return ScoreEntry(
            model_id=self.text(card["model_id"], _at(key, "model_id")),
            node=self.text(card["node"], _at(key, "node")),
            before=self.metrics(card["before"], _at(key, "before"), metric),
            after=self.metrics(card["after"], _at(key, "after"), metric),
            cost=Cost(
                train_seconds_per_step=self.number(
                    cost["train_seconds_per_step"], _at(cost_key, "train_seconds_per_step")
                ),
                inference_ms_per_example=self.number(
                    cost["inference_ms_per_example"], _at(cost_key, "inference_ms_per_example")
                ),
                update_bytes_per_round=self.number(
                    cost["update_bytes_per_round"], _at(cost_key, "update_bytes_per_round")
                ),
                adapter_bytes=self.integer(cost["adapter_bytes"], _at(cost_key, "adapter_bytes")),
            ),
        )

    def missing_pair(self, value: Any, key: str) -> tuple[str, str]:
        pair = self.fields(value, key, ("model_id", "node"))
        return (
            self.text(pair["model_id"], _at(key, "model_id")),
            self.text(pair["node"], _at(key, "node")),
        )

    def check_together(self, c: Comparison) -> None:
        """What no single value shows: unique ids, one currency, and complete scorecards."""
        seen: set[str] = set()
        for i, model in enumerate(c.models):
            if model.model_id in seen:
                raise self.invalid(f"models[{i}].model_id", f"duplicate model {model.model_id!r}")
            seen.add(model.model_id)
        currency = c.currency
        for i, model in enumerate(c.models):
            # The rule's limit and the cost plot need one unit: prices in several currencies
            # would be compared as if they were one.
            if model.price is not None and model.price.currency != currency:
                raise self.invalid(
                    f"models[{i}].price.currency",
                    f"{model.price.currency!r}, but another model is priced in {currency!r}",
                )
        for field in ("name", "ueid"):
            values: set[str] = set()
            for i, node in enumerate(c.nodes):
                value = getattr(node, field)
                if value in values:
                    raise self.invalid(f"nodes[{i}].{field}", f"duplicate node {field} {value!r}")
                values.add(value)
        node_names = {node.name for node in c.nodes}
        scored: dict[str, list[str]] = {model.model_id: [] for model in c.models}
        for i, card in enumerate(c.scorecards):
            key = f"scorecards[{i}]"
            if card.model_id not in scored:
                raise self.invalid(f"{key}.model_id", f"unknown model {card.model_id!r}")
            if card.node not in node_names:
                raise self.invalid(f"{key}.node", f"unknown node {card.node!r}")
            if card.node in scored[card.model_id]:
                raise self.invalid(
                    key, f"a second scorecard of model {card.model_id!r} from node {card.node!r}"
                )
            scored[card.model_id].append(card.node)
        missing = set(c.missing)
        for i, (model_id, name) in enumerate(c.missing):
            key = f"missing[{i}]"
            if model_id not in scored or name not in node_names:
                raise self.invalid(key, f"names an unknown model or node: {model_id!r}, {name!r}")
            if name in scored[model_id]:
                raise self.invalid(key, f"model {model_id!r} from node {name!r} has a scorecard")
        for model in c.models:
            nodes = scored[model.model_id]
            if model.local and len(nodes) != 1:
                raise self.invalid(
                    "scorecards",
                    f"local model {model.model_id!r} is scored by {len(nodes)} nodes: "
                    "expected exactly one, its own",
                )
            if not model.local:
                for node in c.nodes:
                    if node.name not in nodes and (model.model_id, node.name) not in missing:
                        raise self.invalid(
                            "scorecards",
                            f"no scorecard of model {model.model_id!r} from node {node.name!r}",
                        )


# --- Summary and recommendation -----------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One model's figures on one node, or (overall) averaged over the nodes that scored it.

    ``training_cost`` is the estimated price of training on this comparison's budget: on a
    node, price per 1k training examples × the budget's examples per node / 1000; overall,
    the sum over the nodes that trained it. None for a model with no price (local) or a
    comparison without a budget.
    """

    model_id: str
    local: bool
    nodes: int
    before: float
    after: float
    gain: float
    train_seconds_per_step: float
    inference_ms_per_example: float
    update_bytes_per_round: float
    adapter_bytes: float
    price: Price | None
    training_cost: float | None


@dataclass(frozen=True)
class NodeSummary:
    """The rows of one node's table, in the file's model order."""

    node: NodeInfo
    rows: tuple[Row, ...]


@dataclass(frozen=True)
class Summary:
    """Per-node tables and the overall one (means over nodes), in the file's model order."""

    metric: str
    per_node: tuple[NodeSummary, ...]
    overall: tuple[Row, ...]
    examples_per_node: int | None

    def row(self, model_id: str) -> Row:
        """The overall row of ``model_id``."""
        for row in self.overall:
            if row.model_id == model_id:
                return row
        raise KeyError(model_id)


def _row(c: Comparison, model: CandidateModel, cards: Sequence[ScoreEntry]) -> Row:
    count = len(cards)

    def mean(values: Sequence[float]) -> float:
        return math.fsum(values) / count

    before = mean([card.before[c.metric] for card in cards])
    after = mean([card.after[c.metric] for card in cards])
    examples = None if c.budget is None else c.budget.examples_per_node
    cost = None
    if model.price is not None and examples is not None:
        cost = model.price.per_1k_training_examples * examples * count / 1000
    return Row(
        model_id=model.model_id,
        local=model.local,
        nodes=count,
        before=before,
        after=after,
        gain=after - before if c.higher_is_better else before - after,
        train_seconds_per_step=mean([card.cost.train_seconds_per_step for card in cards]),
        inference_ms_per_example=mean([card.cost.inference_ms_per_example for card in cards]),
        update_bytes_per_round=mean([card.cost.update_bytes_per_round for card in cards]),
        adapter_bytes=mean([card.cost.adapter_bytes for card in cards]),
        price=model.price,
        training_cost=cost,
    )


def summarize(c: Comparison) -> Summary:
    """Each node's table (the models it scored) and the overall one.

    ``gain`` is the improvement in the metric's better direction (after − before, or
    before − after for a metric where lower is better), so a positive gain is always good.
    """
    per_node = []
    for node in c.nodes:
        rows = []
        for model in c.models:
            card = c.scorecard(model.model_id, node.name)
            if card is not None:
                rows.append(_row(c, model, [card]))
        per_node.append(NodeSummary(node=node, rows=tuple(rows)))
    overall = tuple(
        _row(c, model, [card for card in c.scorecards if card.model_id == model.model_id])
        for model in c.models
    )
    return Summary(
        metric=c.metric,
        per_node=tuple(per_node),
        overall=overall,
        examples_per_node=None if c.budget is None else c.budget.examples_per_node,
    )


@dataclass(frozen=True)
class Recommendation:
    """The model the rule picks (None when no model is within the price limit), the rule
    in words, why this model, and the models the price limit left out."""

    model_id: str | None
    rule: str
    reason: str
    excluded: tuple[str, ...]
    # Models left out because some node has no scorecard of them.
    incomplete: tuple[str, ...] = ()


def recommend(c: Comparison) -> Recommendation:
    """The model :attr:`Comparison.rule` picks; see :meth:`Rule.describe` for the rule."""
    summary = summarize(c)
    rule = c.rule.describe(c.metric, c.currency)
    incomplete = c.incomplete
    qualifying = [m for m in c.models if c.rule.admits(m) and m.model_id not in incomplete]
    excluded = tuple(m.model_id for m in c.models if not c.rule.admits(m))
    if not qualifying:
        why = "no model is within the price limit"
        if incomplete:
            why += " among those every node scored"
        return Recommendation(None, rule, why, excluded, incomplete)
    sign = 1.0 if c.higher_is_better else -1.0
    best = max(sign * summary.row(m.model_id).after for m in qualifying)
    tied = [m for m in qualifying if sign * summary.row(m.model_id).after >= best - TIE_TOLERANCE]

    def tie_break(model: CandidateModel) -> tuple[float, float]:
        price = 0.0 if model.price is None else model.price.per_1k_training_examples
        return (price, summary.row(model.model_id).train_seconds_per_step)

    # min() keeps the first of equal keys: the model listed first wins a full tie.
    chosen = min(tied, key=tie_break)
    row = summary.row(chosen.model_id)
    price = (
        "no price (local)"
        if chosen.price is None
        else f"{_money(chosen.price.per_1k_training_examples, c.currency)} per 1k training examples"
    )
    reason = f"mean {c.metric} after {row.after:.3f} over {_plural(row.nodes, 'node')}, {price}"
    if len(tied) > 1:
        others = ", ".join(repr(m.model_id) for m in tied if m is not chosen)
        reason += f"; tied on {c.metric} with {others}"
    return Recommendation(chosen.model_id, rule, reason, excluded, incomplete)


# --- Formatting ---------------------------------------------------------------------------


def _plural(count: int, word: str) -> str:
    return f"{count} {word if count == 1 else word + 's'}"


def _money(value: float | None, currency: str | None) -> str:
    if value is None:
        return "—"
    return f"{value:,.2f} {currency}" if currency else f"{value:,.2f}"


def _bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{value:,.0f} {unit}" if unit == "B" else f"{value:,.1f} {unit}"
        value /= 1024
    return f"{value:,.1f} GiB"


HEADERS = (
    "model",
    "before",
    "after",
    "gain",
    "train s/step",
    "infer ms/example",
    "update/round",
    "adapter",
    "price /1k train",
    "price /1k infer",
    "training cost",
)


def _cells(row: Row, currency: str | None) -> list[str]:
    """A row's figures as text (not escaped: each output escapes for its own medium)."""
    price = row.price
    return [
        row.model_id + (" (local)" if row.local else ""),
        f"{row.before:.3f}",
        f"{row.after:.3f}",
        f"{row.gain:+.3f}",
        f"{row.train_seconds_per_step:.3f}",
        f"{row.inference_ms_per_example:.2f}",
        _bytes(row.update_bytes_per_round),
        _bytes(row.adapter_bytes),
        "—" if price is None else _money(price.per_1k_training_examples, currency),
        "—" if price is None else _money(price.per_1k_inferences, currency),
        _money(row.training_cost, currency),
    ]


def notes(c: Comparison) -> list[str]:
    """How to read the tables: where the training cost comes from, what a local model's
    overall row means, which way gain points. Shown under the tables in every output."""
    examples = None if c.budget is None else c.budget.examples_per_node
    if examples is None:
        cost = (
            "Training cost: not estimated (this comparison.json states no budget: rounds, "
            "local steps and batch size)."
        )
    else:
        cost = (
            f"Training cost: price per 1k training examples × {examples:,} examples per node "
            "(rounds × local steps × batch size of this comparison's budget, counted with "
            "repetition) / 1000; overall, summed over the nodes that trained the model."
        )
    lacking = [
        f"No scorecard of {model_id} from node {node}: it is not recommended (scored on "
        "fewer nodes than the others), and `ark audit verify` fails the comparison "
        "(exit 38) if the log shows the node committed to its held-out set."
        for model_id, node in c.missing
    ]
    return [
        cost,
        "A local model has no price and is scored on its own node only, so its overall "
        "figures are that node's.",
        "Gain is the change in the metric in its better direction: positive is better.",
        *lacking,
    ]


def _overall_title(c: Comparison) -> str:
    return f"overall: mean over nodes of {c.metric} ({_plural(len(c.nodes), 'node')})"


def _node_title(node: NodeInfo) -> str:
    return f"node {node.name} ({node.examples:,} examples)"


def render_tables(c: Comparison) -> list[Table]:
    """One table per node and the overall one, the recommended model's row marked ★."""
    summary = summarize(c)
    chosen = recommend(c).model_id
    currency = c.currency
    groups = [(_node_title(s.node), s.rows) for s in summary.per_node]
    groups.append((_overall_title(c), summary.overall))
    tables = []
    for title, rows in groups:
        # Text, never markup: model ids and node names are other parties' strings.
        table = Table(title=Text(f"{c.comparison}: {title}"))
        for header in HEADERS:
            table.add_column(header, justify="left" if header == "model" else "right")
        for row in rows:
            cells = _cells(row, currency)
            recommended = row.model_id == chosen
            if recommended:
                cells[0] = "★ " + cells[0]
            table.add_row(*(Text(cell) for cell in cells), style="bold" if recommended else None)
        tables.append(table)
    return tables


# --- The plot -----------------------------------------------------------------------------


def _label(text: str, width: int = 24) -> str:
    """A party's string as a plot label: cut short, and ``$`` escaped so matplotlib never
    parses it as mathtext (a bad expression would fail the whole plot)."""
    flat = " ".join(text.split())
    flat = flat if len(flat) <= width else flat[: width - 1] + "…"
    return flat.replace("$", r"\$")


def render_png(c: Comparison) -> bytes:
    """The plot as PNG bytes: before/after bars per model for each node and overall, and
    the overall metric against the price per 1k training examples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    summary = summarize(c)
    chosen = recommend(c).model_id
    panels = [(_node_title(s.node), s.rows) for s in summary.per_node]
    panels.append((_overall_title(c), summary.overall))
    columns = min(3, len(panels) + 1)
    lines = -(-(len(panels) + 1) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(5.2 * columns, 4.2 * lines), squeeze=False)
    flat = list(axes.flat)
    for ax, (title, rows) in zip(flat, panels, strict=False):
        xs = np.arange(len(rows))
        ax.bar(xs - 0.2, [r.before for r in rows], 0.4, label="before", color="#9aa5b1")
        ax.bar(xs + 0.2, [r.after for r in rows], 0.4, label="after", color="#2f6fb0")
        ax.set_xticks(xs)
        ax.set_xticklabels(
            [("★ " if r.model_id == chosen else "") + _label(r.model_id) for r in rows],
            rotation=20,
            ha="right",
            fontsize="small",
        )
        ax.set_ylabel(c.metric)
        ax.set_title(_label(title, 60), fontsize="medium")
        ax.grid(axis="y", alpha=0.3)
        # Head room above the tallest bar for the legend, so it never covers a bar.
        top = max(max(r.before, r.after) for r in rows)
        ax.set_ylim(top=top * 1.25 if top > 0 else 1.0)
        ax.legend(fontsize="small", ncols=2, loc="upper left")
    scatter = flat[len(panels)]
    for row in summary.overall:
        price = 0.0 if row.price is None else row.price.per_1k_training_examples
        marker = "*" if row.model_id == chosen else ("s" if row.local else "o")
        scatter.scatter([price], [row.after], s=160 if marker == "*" else 60, marker=marker)
        name = _label(row.model_id) + (" (local, no price)" if row.local else "")
        scatter.annotate(name, (price, row.after), textcoords="offset points", xytext=(6, 4))
    limit = c.rule.max_price_per_1k_training_examples
    if limit is not None:
        scatter.axvline(limit, linestyle="--", color="#b03a2e", label="price limit")
        scatter.legend(fontsize="small")
    currency = c.currency
    unit = f" ({_label(currency, 12)})" if currency else ""
    scatter.set_xlabel(f"price per 1k training examples{unit}")
    scatter.set_ylabel(f"mean {c.metric} after")
    scatter.set_title("overall: metric against price", fontsize="medium")
    scatter.grid(alpha=0.3)
    scatter.margins(x=0.25, y=0.2)  # room for the names beside the points
    for ax in flat[len(panels) + 1 :]:
        ax.set_visible(False)
    fig.suptitle(_label(f"{c.comparison} ({c.task})", 80))
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out.getvalue()


# --- The HTML page ------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #1f2933; }
main { max-width: 1200px; margin: auto; }
table { border-collapse: collapse; margin: 8px 0 24px; font-size: 14px; }
th, td { border-bottom: 1px solid #d9e2ec; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.recommended td { background: #e3f9e5; font-weight: 600; }
.rule { background: #f0f4f8; border-left: 4px solid #2f6fb0; padding: 10px 14px; }
.note { color: #52606d; font-size: 13px; }
img { max-width: 100%; height: auto; border: 1px solid #d9e2ec; }
"""


def _esc(value: object) -> str:
    return html.escape(str(value), quote=True)


def _html_table(rows: Sequence[Row], chosen: str | None, currency: str | None) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in HEADERS)
    body = []
    for row in rows:
        cells = _cells(row, currency)
        mark = ""
        css = ""
        if row.model_id == chosen:
            css = ' class="recommended"'
            mark = "★ "  # the highlight is not colour alone
        tds = "".join(f"<td>{_esc(cell)}</td>" for cell in cells[1:])
        body.append(f"<tr{css}><td>{mark}{_esc(cells[0])}</td>{tds}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def render_html(c: Comparison, png: bytes) -> str:
    """The whole report page; ``png`` (from :func:`render_png`) is embedded as a data: URI.

    Embedded rather than linked so the page is one self-contained file that can be
    archived, mailed or screenshotted on its own; its Content-Security-Policy still
    forbids scripts and every fetch (``img-src data:`` only).
    """
    summary = summarize(c)
    advice = recommend(c)
    currency = c.currency
    if advice.model_id is None:
        verdict = f"No model recommended: {_esc(advice.reason)}."
    else:
        verdict = f"Recommended: <strong>{_esc(advice.model_id)}</strong> ({_esc(advice.reason)})."
    excluded = ""
    if advice.excluded:
        names = ", ".join(_esc(name) for name in advice.excluded)
        excluded = f"<p>Over the price limit, not considered: {names}.</p>"
    sections = [
        f"<h1>Model comparison {_esc(c.comparison)}</h1>",
        f"<p>Task {_esc(c.task)}; metric {_esc(c.metric)} on each node's committed held-out "
        f"set; {_plural(len(c.models), 'model')}, {_plural(len(c.nodes), 'node')}.</p>",
        f'<div class="rule"><p>{verdict}</p><p>{_esc(advice.rule)}</p>{excluded}</div>',
        f'<img alt="before/after {_esc(c.metric)} per node and overall, and metric against '
        f'price" src="data:image/png;base64,{base64.b64encode(png).decode("ascii")}">',
        f"<h2>{_esc(_overall_title(c))}</h2>",
        _html_table(summary.overall, advice.model_id, currency),
    ]
    for node in summary.per_node:
        sections.append(f"<h2>{_esc(_node_title(node.node))}</h2>")
        sections.append(_html_table(node.rows, advice.model_id, currency))
    sections.append(f'<p class="note">{_esc(" ".join(notes(c)))}</p>')
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta http-equiv="Content-Security-Policy" content="default-src \'none\'; '
        "style-src 'unsafe-inline'; img-src data:\">"
        f"<title>Model comparison {_esc(c.comparison)}</title><style>{STYLE}</style></head>"
        f"<body><main>{''.join(sections)}</main></body></html>\n"
    )


def write_report(c: Comparison, out_dir: Path) -> tuple[Path, Path]:
    """Write ``comparison.html`` and ``comparison.png`` into ``out_dir``; return both paths.

    The PNG is also embedded in the page (see :func:`render_html`); the file beside it is
    for slides and documents. Each file is replaced atomically.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    png = render_png(c)
    png_path = out_dir / PNG_FILE
    html_path = out_dir / HTML_FILE
    write_atomic(png_path, png)
    write_atomic(html_path, render_html(c, png).encode("utf-8"))
    return html_path, png_path
