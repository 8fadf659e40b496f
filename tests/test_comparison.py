"""The comparison report: reading comparison.json strictly, the summary figures, the
recommendation under its rule, the HTML page and PNG plot, and ``ark compare results``."""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from sandbox.errors import ComparisonInvalid, ConfigError
from sandbox.ops.cli import app
from sandbox.ops.comparison import (
    COMPARISON_FILE,
    Rule,
    comparison_from_json,
    load_comparison,
    recommend,
    render_tables,
    summarize,
    write_report,
)

NODES = ("acme", "globex", "initech")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _model(model_id: str, train: float | None, infer: float, run: int, **shape: Any) -> Any:
    local = train is None
    return {
        "model_id": model_id,
        "manifest_sha256": f"{run:02d}" * 32,
        "architecture": shape.get("architecture", "bert"),
        "layers": shape.get("layers", 6),
        "hidden_size": shape.get("hidden_size", 384),
        "parameters": shape.get("parameters", 22_700_000),
        "licence": "apache-2.0",
        "price": None
        if local
        else {"currency": "EUR", "per_1k_training_examples": train, "per_1k_inferences": infer},
        "job": f"cmp-1-{model_id}",
        "run": run,
        "local": local,
    }


def _card(model_id: str, node: str, before: float, after: float, step: float) -> Any:
    return {
        "model_id": model_id,
        "node": node,
        "before": {"accuracy": before, "macro_f1": before - 0.05},
        "after": {"accuracy": after, "macro_f1": after - 0.05},
        "cost": {
            "train_seconds_per_step": step,
            "inference_ms_per_example": step * 10,
            "update_bytes_per_round": 300_000.0,
            "adapter_bytes": 295_000,
        },
    }


# (before, after, train seconds per step) per node, in NODES order.
SCORES = {
    "minilm-l6": [(0.50, 0.90, 0.40), (0.52, 0.84, 0.44), (0.48, 0.87, 0.42)],
    "minilm-l3": [(0.49, 0.80, 0.20), (0.51, 0.76, 0.22), (0.50, 0.78, 0.21)],
    "bert-mini": [(0.45, 0.83, 0.30), (0.47, 0.81, 0.32), (0.46, 0.82, 0.31)],
}


def fixture_document() -> dict[str, Any]:
    """3 catalog models and acme's own local model, scored on 3 nodes."""
    cards = [
        _card(model_id, node, *figures)
        for model_id, per_node in SCORES.items()
        for node, figures in zip(NODES, per_node, strict=True)
    ]
    cards.append(_card("acme-own", "acme", 0.60, 0.80, 0.50))
    return {
        "format": "ark-comparison/1",
        "comparison": "cmp-1",
        "task": "sequence-classification",
        "metric": "accuracy",
        "rule": {"max_price_per_1k_training_examples": None},
        "budget": {"rounds": 3, "local_steps": 10, "batch_size": 8},
        "models": [
            _model("minilm-l6", 2.00, 0.50, 1),
            _model("minilm-l3", 0.80, 0.20, 2, layers=3),
            _model("bert-mini", 1.20, 0.30, 3, layers=4, hidden_size=256),
            _model("acme-own", None, 0.0, 4),
        ],
        "nodes": [
            {"name": name, "ueid": f"ueid-{name}", "examples": 400 + 100 * i}
            for i, name in enumerate(NODES)
        ],
        "scorecards": cards,
    }


def _write(folder: Path, document: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / COMPARISON_FILE
    path.write_text(json.dumps(document), encoding="utf-8")
    return path


# --- Summary ------------------------------------------------------------------------------


def test_summary_means_over_nodes_and_costs_from_the_budget(tmp_path: Path) -> None:
    c = load_comparison(_write(tmp_path, fixture_document()))
    summary = summarize(c)
    assert summary.examples_per_node == 3 * 10 * 8

    l6 = summary.row("minilm-l6")
    assert l6.nodes == 3
    assert l6.before == pytest.approx(0.50)
    assert l6.after == pytest.approx(0.87)
    assert l6.gain == pytest.approx(0.37)
    assert l6.train_seconds_per_step == pytest.approx(0.42)
    assert l6.inference_ms_per_example == pytest.approx(4.2)
    assert l6.update_bytes_per_round == 300_000
    assert l6.adapter_bytes == 295_000
    assert l6.price is not None
    assert l6.price.per_1k_training_examples == 2.00
    assert l6.price.per_1k_inferences == 0.50
    # 2.00 EUR per 1k × 240 examples per node × 3 nodes.
    assert l6.training_cost == pytest.approx(2.00 * 240 / 1000 * 3)

    own = summary.row("acme-own")
    assert (own.nodes, own.local, own.price, own.training_cost) == (1, True, None, None)
    assert own.after == pytest.approx(0.80)

    by_node = {s.node.name: s for s in summary.per_node}
    assert [r.model_id for r in by_node["acme"].rows] == [
        "minilm-l6",
        "minilm-l3",
        "bert-mini",
        "acme-own",
    ]
    assert [r.model_id for r in by_node["globex"].rows] == ["minilm-l6", "minilm-l3", "bert-mini"]
    globex_l3 = by_node["globex"].rows[1]
    assert (globex_l3.before, globex_l3.after) == (0.51, 0.76)
    assert globex_l3.training_cost == pytest.approx(0.80 * 240 / 1000)


def test_without_a_budget_no_cost_is_estimated() -> None:
    document = fixture_document()
    del document["budget"]
    summary = summarize(comparison_from_json(document))
    assert summary.examples_per_node is None
    assert all(row.training_cost is None for row in summary.overall)


def test_gain_is_positive_when_a_lower_is_better_metric_falls() -> None:
    document = fixture_document()
    document["metric"] = "perplexity"
    for card in document["scorecards"]:
        card["before"] = {"perplexity": 40.0}
        card["after"] = {"perplexity": 25.0 if card["model_id"] == "minilm-l3" else 30.0}
    c = comparison_from_json(document)
    assert summarize(c).row("minilm-l3").gain == pytest.approx(15.0)
    advice = recommend(c)
    assert advice.model_id == "minilm-l3"
    assert "lowest held-out perplexity" in advice.rule


# --- Recommendation -----------------------------------------------------------------------


def test_no_price_limit_recommends_the_best_mean() -> None:
    advice = recommend(comparison_from_json(fixture_document()))
    assert advice.model_id == "minilm-l6"
    assert advice.excluded == ()
    assert "with no price limit" in advice.rule
    assert "highest held-out accuracy" in advice.rule
    assert "0.870" in advice.reason


def test_a_price_limit_that_excludes_the_best() -> None:
    c = comparison_from_json(fixture_document()).with_rule(Rule(1.50))
    advice = recommend(c)
    # minilm-l6 (0.87) costs 2.00; of the rest bert-mini (0.82) beats acme-own (0.80).
    assert advice.model_id == "bert-mini"
    assert advice.excluded == ("minilm-l6",)
    assert "at most 1.50 EUR per 1k training examples" in advice.rule


def test_the_local_model_always_qualifies() -> None:
    document = fixture_document()
    document["rule"]["max_price_per_1k_training_examples"] = 0.5
    advice = recommend(comparison_from_json(document))
    assert advice.model_id == "acme-own"
    assert advice.excluded == ("minilm-l6", "minilm-l3", "bert-mini")
    assert "no price (local)" in advice.reason


def test_no_model_within_the_limit() -> None:
    document = fixture_document()
    document["models"].pop()
    document["scorecards"].pop()
    document["rule"]["max_price_per_1k_training_examples"] = 0.1
    advice = recommend(comparison_from_json(document))
    assert advice.model_id is None
    assert "no model is within the price limit" in advice.reason
    assert "at most 0.10 EUR" in advice.rule


def _set_scores(document: dict[str, Any], model_id: str, after: list[float], step: float) -> None:
    cards = [c for c in document["scorecards"] if c["model_id"] == model_id]
    for card, value in zip(cards, after, strict=True):
        card["after"]["accuracy"] = value
        card["cost"]["train_seconds_per_step"] = step


def test_a_tie_goes_to_the_lower_price() -> None:
    document = fixture_document()
    # bert-mini's figures are minilm-l6's in another order: equal means (exact, via fsum).
    _set_scores(document, "bert-mini", [0.87, 0.90, 0.84], 0.9)
    advice = recommend(comparison_from_json(document))
    assert advice.model_id == "bert-mini"  # 1.20 EUR against 2.00 EUR
    assert "tied on accuracy with 'minilm-l6'" in advice.reason


def test_a_tie_on_price_goes_to_fewer_seconds_per_step() -> None:
    document = fixture_document()
    _set_scores(document, "bert-mini", [0.87, 0.90, 0.84], 0.9)
    document["models"][2]["price"]["per_1k_training_examples"] = 2.00
    assert recommend(comparison_from_json(document)).model_id == "minilm-l6"  # 0.42 s < 0.9 s
    _set_scores(document, "bert-mini", [0.87, 0.90, 0.84], 0.1)
    assert recommend(comparison_from_json(document)).model_id == "bert-mini"


def test_a_full_tie_goes_to_the_model_listed_first() -> None:
    document = fixture_document()
    _set_scores(document, "bert-mini", [0.90, 0.84, 0.87], 0.42)
    for node, card in enumerate(c for c in document["scorecards"] if c["model_id"] == "bert-mini"):
        card["cost"]["train_seconds_per_step"] = SCORES["minilm-l6"][node][2]
    document["models"][2]["price"]["per_1k_training_examples"] = 2.00
    assert recommend(comparison_from_json(document)).model_id == "minilm-l6"
    document["models"][0], document["models"][2] = document["models"][2], document["models"][0]
    assert recommend(comparison_from_json(document)).model_id == "bert-mini"


# --- Malformed files ----------------------------------------------------------------------


def _edit(change: Callable[[dict[str, Any]], object]) -> dict[str, Any]:
    document = copy.deepcopy(fixture_document())
    change(document)
    return document


MALFORMED = {
    "missing key": (lambda d: d["models"][0].pop("licence"), "models[0].licence"),
    "missing top-level key": (lambda d: d.pop("scorecards"), "scorecards"),
    "unknown key": (lambda d: d.update(extra=1), "extra"),
    "wrong type": (lambda d: d["nodes"][1].update(examples="many"), "nodes[1].examples"),
    "bool for an integer": (lambda d: d["models"][1].update(run=True), "models[1].run"),
    "string for a number": (
        lambda d: d["scorecards"][4]["cost"].update(train_seconds_per_step="0.3"),
        "scorecards[4].cost.train_seconds_per_step",
    ),
    "negative price": (
        lambda d: d["models"][2]["price"].update(per_1k_inferences=-1),
        "models[2].price.per_1k_inferences",
    ),
    "wrong format": (lambda d: d.update(format="ark-comparison/2"), "format"),
    "metric missing from a scorecard": (
        lambda d: d["scorecards"][0]["after"].pop("accuracy"),
        "scorecards[0].after.accuracy",
    ),
    "unknown model in a scorecard": (
        lambda d: d["scorecards"][5].update(model_id="ghost"),
        "scorecards[5].model_id",
    ),
    "unknown node in a scorecard": (
        lambda d: d["scorecards"][5].update(node="nowhere"),
        "scorecards[5].node",
    ),
    "duplicate scorecard": (
        lambda d: d["scorecards"].append(copy.deepcopy(d["scorecards"][3])),
        "scorecards[10]",
    ),
    "missing scorecard": (lambda d: d["scorecards"].pop(4), "scorecards"),
    "local model scored twice": (
        lambda d: d["scorecards"].append({**copy.deepcopy(d["scorecards"][9]), "node": "globex"}),
        "scorecards",
    ),
    "duplicate model": (
        lambda d: d["models"][1].update(model_id="minilm-l6"),
        "models[1].model_id",
    ),
    "duplicate ueid": (lambda d: d["nodes"][2].update(ueid="ueid-acme"), "nodes[2].ueid"),
    "local model with a price": (
        lambda d: d["models"][3].update(price=d["models"][0]["price"]),
        "models[3].price",
    ),
    "catalog model without a price": (
        lambda d: d["models"][0].update(price=None),
        "models[0].price",
    ),
    "two currencies": (
        lambda d: d["models"][1]["price"].update(currency="USD"),
        "models[1].price.currency",
    ),
    "bad digest": (
        lambda d: d["models"][0].update(manifest_sha256="ab" * 31 + "zz"),
        "models[0].manifest_sha256",
    ),
    "no models": (lambda d: d.update(models=[]), "models"),
    "zero rounds": (lambda d: d["budget"].update(rounds=0), "budget.rounds"),
    "NaN in memory": (
        lambda d: d["scorecards"][0]["after"].update(accuracy=math.nan),
        "scorecards[0].after.accuracy",
    ),
    "infinite price limit": (
        lambda d: d["rule"].update(max_price_per_1k_training_examples=math.inf),
        "rule.max_price_per_1k_training_examples",
    ),
}


@pytest.mark.parametrize(("change", "key"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_comparison_names_the_file_and_key(
    tmp_path: Path, change: Callable[[dict[str, Any]], object], key: str
) -> None:
    document = _edit(change)
    # json.dumps writes NaN and Infinity, which only the strict parser refuses: checked
    # through the parsed document, where the key can be named.
    with pytest.raises(ComparisonInvalid) as raised:
        comparison_from_json(document, source=tmp_path / COMPARISON_FILE)
    assert raised.value.key == key
    assert f"key {key!r}" in str(raised.value)
    assert str(tmp_path / COMPARISON_FILE) in str(raised.value)
    assert isinstance(raised.value, ConfigError)
    if all(math.isfinite(x) for x in _numbers(document)):
        path = _write(tmp_path, document)
        with pytest.raises(ComparisonInvalid) as from_file:
            load_comparison(tmp_path)
        assert from_file.value.key == key
        assert from_file.value.path == path


def _numbers(value: Any) -> list[float]:
    if isinstance(value, float):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, list):
        return [x for item in value for x in _numbers(item)]
    return []


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ('{"format": NaN}', "NaN is not JSON"),
        ('{"format": 1e999}', "overflows to infinity"),
        ('{"format": "a", "format": "b"}', "duplicate key 'format'"),
        ("[1, 2", "invalid JSON"),
    ],
)
def test_file_refused_by_the_strict_parser(tmp_path: Path, text: str, reason: str) -> None:
    path = tmp_path / COMPARISON_FILE
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ComparisonInvalid, match=reason) as raised:
        load_comparison(path)
    assert str(path) in str(raised.value)


def test_a_missing_file_or_a_symlink_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ComparisonInvalid, match="cannot open") as raised:
        load_comparison(tmp_path)
    assert raised.value.path == tmp_path / COMPARISON_FILE
    real = _write(tmp_path / "real", fixture_document())
    (tmp_path / COMPARISON_FILE).symlink_to(real)
    with pytest.raises(ComparisonInvalid, match="cannot open"):
        load_comparison(tmp_path)


def test_top_level_not_an_object(tmp_path: Path) -> None:
    with pytest.raises(ComparisonInvalid, match="expected a JSON object, not an array"):
        load_comparison(_write(tmp_path, [fixture_document()]))


# --- Report files -------------------------------------------------------------------------

HOSTILE_ID = '$\\frac$ <script>alert("x")</script> & co'
HOSTILE_NODE = "<img src=x onerror=alert(1)>"


def _hostile_document() -> dict[str, Any]:
    document = fixture_document()
    document["models"][0]["model_id"] = HOSTILE_ID
    document["nodes"][1]["name"] = HOSTILE_NODE
    for card in document["scorecards"]:
        if card["model_id"] == "minilm-l6":
            card["model_id"] = HOSTILE_ID
        if card["node"] == "globex":
            card["node"] = HOSTILE_NODE
    return document


def test_html_escapes_other_parties_strings_and_marks_the_recommendation(tmp_path: Path) -> None:
    c = comparison_from_json(_hostile_document())
    html_path, png_path = write_report(c, tmp_path / "out")
    page = html_path.read_text(encoding="utf-8")
    assert "<script" not in page
    assert "<img src=x" not in page
    assert "$\\frac$ &lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; co" in page
    assert "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "script-src" not in page
    assert "default-src 'none'" in page
    # One table per node and the overall one; the best model's row marked in each.
    assert page.count("<table>") == 4
    assert page.count('<tr class="recommended"><td>★ $\\frac$ &lt;script&gt;') == 4
    assert "with no price limit" in page
    assert "Training cost: price per 1k training examples × 240 examples per node" in page
    # The plot is embedded, so the page needs no file beside it.
    assert 'src="data:image/png;base64,iVBORw0KGgo' in page
    assert "http" not in page.replace("http-equiv", "")
    assert png_path.read_bytes().startswith(PNG_MAGIC)


def test_png_is_a_real_plot(tmp_path: Path) -> None:
    from PIL import Image

    c = comparison_from_json(fixture_document()).with_rule(Rule(1.5))
    _, png_path = write_report(c, tmp_path)
    data = png_path.read_bytes()
    assert data.startswith(PNG_MAGIC)
    assert len(data) > 20_000
    with Image.open(png_path) as image:
        image.verify()
    with Image.open(png_path) as image:
        width, height = image.size
        assert width > 1000
        assert height > 600
        # Not a blank canvas: many colours are drawn.
        colors = image.convert("RGB").getcolors(maxcolors=1 << 16)
        assert colors is None or len(colors) > 50


def test_rich_tables_one_per_node_and_overall() -> None:
    tables = render_tables(comparison_from_json(fixture_document()))
    assert [str(t.title) for t in tables] == [
        "cmp-1: node acme (400 examples)",
        "cmp-1: node globex (500 examples)",
        "cmp-1: node initech (600 examples)",
        "cmp-1: overall: mean over nodes of accuracy (3 nodes)",
    ]
    assert [t.row_count for t in tables] == [4, 3, 3, 4]


# --- ark compare results ------------------------------------------------------------------

runner = CliRunner()


def test_cli_prints_every_model_and_the_recommendation(tmp_path: Path) -> None:
    document = fixture_document()
    document["models"][2]["model_id"] = "[bold]bert-mini[/bold]"
    for card in document["scorecards"]:
        if card["model_id"] == "bert-mini":
            card["model_id"] = "[bold]bert-mini[/bold]"
    _write(tmp_path, document)
    result = runner.invoke(app, ["compare", "results", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for model_id in ("minilm-l6", "minilm-l3", "[bold]bert-mini[/bold]", "acme-own (local)"):
        assert model_id in result.output
    assert "★ minilm-l6" in result.output
    assert "Recommended: minilm-l6 (mean accuracy after 0.870 over 3 nodes" in result.output
    assert "with no price limit" in result.output
    assert "1.44 EUR" in result.output  # minilm-l6's training cost on the budget
    assert "× 240 examples per node (rounds × local steps × batch size" in result.output

    result = runner.invoke(app, ["compare", "results", str(tmp_path), "--max-price", "1.5"])
    assert result.exit_code == 0, result.output
    assert "Recommended: [bold]bert-mini[/bold]" in result.output
    assert "Over the price limit, not considered: minilm-l6." in result.output
    assert "at most 1.50 EUR per 1k training examples" in result.output


def test_cli_refuses_a_malformed_file_naming_it(tmp_path: Path) -> None:
    path = _write(tmp_path, _edit(lambda d: d["scorecards"][5].update(model_id="ghost")))
    result = runner.invoke(app, ["compare", "results", str(tmp_path)])
    assert result.exit_code == 2
    assert str(path) in result.output
    assert "scorecards[5].model_id" in result.output
    assert "unknown model 'ghost'" in result.output


def test_cli_refuses_a_bad_price_limit(tmp_path: Path) -> None:
    _write(tmp_path, fixture_document())
    result = runner.invoke(app, ["compare", "results", str(tmp_path), "--max-price", "nan"])
    assert result.exit_code == 2
    assert "--max-price" in result.output
