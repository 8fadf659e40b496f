"""Tests for private data loading (clients.data) and the synthetic demo data."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from pathlib import Path

import pytest

from clients.data import (
    Example,
    derive_labels,
    load_examples,
    split_examples,
)
from sandbox.config import TASK_CAUSAL_LM, TASK_CLASSIFICATION
from sandbox.errors import ConfigError, DataError
from sandbox.ops.demo_data import (
    DEMO_LABELS,
    DEMO_NODES,
    generate_node_rows,
    node_names,
    write_demo_data,
)

CLS, LM = TASK_CLASSIFICATION, TASK_CAUSAL_LM


def _jsonl(*rows: object) -> bytes:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode()


def _write(tmp_path: Path, name: str, content: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(content)
    return path


def test_jsonl_classification_strips_and_skips_blank_lines(tmp_path: Path) -> None:
    content = _jsonl({"text": "  Zähler defekt ", "label": " metering"}) + b"\n  \n"
    content += _jsonl({"label": "vegetation", "text": "tree on line"})
    path = _write(tmp_path, "a.jsonl", content)
    assert load_examples(path, CLS, labels=["metering", "vegetation"]) == [
        Example("Zähler defekt", "metering"),
        Example("tree on line", "vegetation"),
    ]


def test_jsonl_causal_lm(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.jsonl", _jsonl({"prompt": "Q: 2+2?", "completion": " 4 "}))
    assert load_examples(path, LM) == [Example("Q: 2+2?", "4")]


def test_csv_classification_any_column_order_quotes_and_bom(tmp_path: Path) -> None:
    content = '\ufefflabel, text\r\nspam,"buy, now\nplease"\r\n\r\nham,hello\r\n'.encode()
    path = _write(tmp_path, "a.csv", content)
    assert load_examples(path, CLS) == [
        Example("buy, now\nplease", "spam"),
        Example("hello", "ham"),
    ]


def test_csv_causal_lm(tmp_path: Path) -> None:
    path = _write(tmp_path, "a.CSV", b"prompt,completion\nHi,Hello there\n")
    assert load_examples(path, LM) == [Example("Hi", "Hello there")]


ROW = {"text": "t", "label": "a"}


def _case(
    case_id: str, name: str, content: bytes, pattern: str, row: int | None, **kw: object
) -> pytest.ParameterSet:
    """One load error: file name and bytes, the message pattern, and the row it must name."""
    task = kw.pop("task", CLS)
    return pytest.param(name, content, task, kw, pattern, row, id=case_id)


# A table reads best with one case per entry, which the formatter would spread out.
# fmt: off
ERROR_CASES = [
    _case("suffix", "a.txt", b"x\n", r"unsupported file type '\.txt'", None),
    _case("empty-jsonl", "a.jsonl", b"", "no data rows", None),
    _case("blank-jsonl", "a.jsonl", b"\n \n", "no data rows", None),
    _case("empty-csv", "a.csv", b"", "no data rows", None),
    _case("header-only-csv", "a.csv", b"text,label\n", "no data rows", None),
    _case("bad-json", "a.jsonl", _jsonl(ROW) + b'{"text": "t",\n', "invalid JSON", 2),
    _case("json-array", "a.jsonl", b'["t", "a"]\n', "expected a JSON object", 1),
    _case("missing-col", "a.jsonl", _jsonl(ROW, {"text": "t"}),
          r"missing column\(s\) 'label'; expected columns 'text', 'label', found 'text'", 2),
    _case("extra-col", "a.jsonl", _jsonl({**ROW, "id": 1}), r"unknown column\(s\) 'id'", 1),
    _case("wrong-task", "a.jsonl", _jsonl(ROW),
          "expected columns 'prompt', 'completion', found 'text', 'label'", 1, task=LM),
    _case("int-label", "a.jsonl", _jsonl({**ROW, "label": 3}),
          "'label' must be a string, found a number", 1),
    _case("null-text", "a.jsonl", _jsonl({**ROW, "text": None}),
          "'text' must be a string, found null", 1),
    _case("blank-text", "a.jsonl", _jsonl(ROW, {**ROW, "text": " \t"}), "'text' is empty", 2),
    _case("blank-completion", "a.csv", b"prompt,completion\nq, \n", "'completion' is empty", 1,
          task=LM),
    _case("utf8-jsonl", "a.jsonl", _jsonl(ROW, ROW) + b'{"text": "\xff"}\n', "not valid UTF", 3),
    # The bad bytes sit on line 5 but in data row 3: row 2 spans two lines.
    _case("utf8-csv", "a.csv", b'text,label\nok,a\n"2\nlines",a\nbad \xc3,a\n', "not valid UTF", 3),
    _case("utf8-csv-header", "a.csv", b"te\xffxt,label\nt,a\n", "header: not valid", None),
    _case("big-jsonl", "a.jsonl", _jsonl(ROW, {**ROW, "text": "x" * 100}),
          "row is 1.. bytes, over the limit of 64 bytes", 2, max_row_bytes=64),
    _case("big-csv", "a.csv", b"text,label\n" + b"x" * 70 + b",a\n",
          "row is 72 bytes, over the limit of 64 bytes", 1, max_row_bytes=64),
    _case("unknown-label", "a.jsonl", _jsonl(ROW, {**ROW, "label": "spam"}),
          "unknown label 'spam'; allowed labels: 'a', 'b'", 2, labels=["a", "b"]),
    _case("csv-header-cols", "a.csv", b"text,lable\nt,a\n",
          r"header: missing column\(s\) 'label'; unknown column\(s\) 'lable'", None),
    _case("csv-dup-header", "a.csv", b"text,label,text\nt,a,t\n", "more than once", None),
    _case("csv-fields", "a.csv", b"text,label\nt,a\nt,a,extra\n", "expected 2 fields", 2),
    _case("csv-quoting", "a.csv", b'text,label\n"t"x,a\n', "malformed CSV", 1),
    # Hostile input that raised untyped errors or was accepted before strict parsing.
    _case("jsonl-2000-deep", "a.jsonl", _jsonl(ROW) + b'{"text": ' + b"[" * 2000 + b"]" * 2000
          + b', "label": "a"}\n', "nested more than 64 deep", 2, max_row_bytes=8192),
    _case("jsonl-5000-digits", "a.jsonl", b'{"text": "t", "label": ' + b"9" * 5000 + b"}\n",
          "integer of 5000 characters is out of range", 1),
    _case("jsonl-nan", "a.jsonl", b'{"text": NaN, "label": "a"}\n', "NaN is not JSON", 1),
    _case("jsonl-nul", "a.jsonl", b'{"text": "t\\u0000", "label": "a"}\n',
          "the value of key 'text' holds NUL at character 2", 1),
    _case("jsonl-lone-surrogate", "a.jsonl", b'{"text": "\\udc80t", "label": "a"}\n',
          r"the value of key 'text' holds a lone surrogate \(U\+DC80\)", 1),
    _case("jsonl-surrogate-key", "a.jsonl", b'{"text": "t", "label": "a", "\\ud800": 1}\n',
          "key '\\\\ud800' holds a lone surrogate", 1),
    _case("jsonl-duplicate-key", "a.jsonl", _jsonl(ROW) + b'{"text": "t", "label": "a", '
          b'"label": "b"}\n', "duplicate key 'label'", 2),
    _case("csv-nul", "a.csv", b"text,label\nt,a\nt\x00,a\n", "field 1 holds NUL", 2),
    _case("csv-nul-header", "a.csv", b"text,label\x00\nt,a\n", "header: field 2 holds NUL",
          None),
    _case("csv-dup-stripped", "a.csv", b"text,label, text\nt,a,t\n",
          "header: column 'text' appears more than once", None),
]
# fmt: on


@pytest.mark.parametrize(("name", "content", "task", "kwargs", "pattern", "row"), ERROR_CASES)
def test_load_errors_name_file_and_row(
    tmp_path: Path,
    name: str,
    content: bytes,
    task: str,
    kwargs: dict[str, object],
    pattern: str,
    row: int | None,
) -> None:
    path = _write(tmp_path, name, content)
    with pytest.raises(DataError, match=pattern) as info:
        load_examples(path, task, **kwargs)  # type: ignore[arg-type]
    assert info.value.path == path
    assert info.value.row == row
    prefix = str(path) if row is None else f"{path}, row {row}:"
    assert str(info.value).startswith(prefix)


def test_missing_file_and_directory(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found") as info:
        load_examples(tmp_path / "nope.jsonl", CLS)
    assert "nope.jsonl" in str(info.value)
    folder = tmp_path / "dir.jsonl"
    folder.mkdir()
    with pytest.raises(DataError, match="is a directory") as info:
        load_examples(folder, CLS)
    assert "dir.jsonl" in str(info.value)


@pytest.mark.parametrize(
    ("task", "kwargs", "key"),
    [
        ("regression", {}, "task"),
        (LM, {"labels": ["a"]}, "labels"),
        (CLS, {"labels": []}, "labels"),
        (CLS, {"max_row_bytes": 0}, "max-row-bytes"),
    ],
)
def test_bad_settings_raise_config_error(
    tmp_path: Path, task: str, kwargs: dict[str, object], key: str
) -> None:
    path = _write(tmp_path, "a.jsonl", _jsonl(ROW))
    with pytest.raises(ConfigError) as info:
        load_examples(path, task, **kwargs)  # type: ignore[arg-type]
    assert info.value.key == key


def _examples(counts: dict[str, int]) -> list[Example]:
    return [Example(f"{label} {i}", label) for label, n in counts.items() for i in range(n)]


def test_split_is_deterministic_disjoint_and_complete() -> None:
    examples = _examples({"a": 30, "b": 20})
    first = split_examples(examples, seed=3)
    assert first == split_examples(examples, seed=3)
    assert first.heldout != split_examples(examples, seed=4).heldout
    assert set(first.train).isdisjoint(first.heldout)
    assert sorted(first.train + first.heldout, key=examples.index) == examples
    # Both sides keep the file order.
    assert list(first.train) == sorted(first.train, key=examples.index)


@pytest.mark.parametrize(
    ("n", "fraction", "heldout"),
    [(10, 0.2, 2), (2, 0.2, 1), (2, 0.9, 1), (5, 0.9, 4), (100, 0.25, 25)],
)
def test_split_sizes(n: int, fraction: float, heldout: int) -> None:
    split = split_examples(_examples({"a": n}), heldout_fraction=fraction)
    assert (len(split.train), len(split.heldout)) == (n - heldout, heldout)


def test_split_is_stratified_per_label() -> None:
    examples = _examples({"big": 60, "mid": 15, "two": 2, "once": 1})
    for seed in range(10):
        split = split_examples(examples, heldout_fraction=0.2, seed=seed)
        held = Counter(e.target for e in split.heldout)
        train = Counter(e.target for e in split.train)
        assert held == {"big": 12, "mid": 3, "two": 1}
        assert train == {"big": 48, "mid": 12, "two": 1, "once": 1}


def test_split_of_unique_targets_is_random() -> None:
    examples = [Example(f"p{i}", f"c{i}") for i in range(20)]
    heldout = split_examples(examples, seed=1).heldout
    assert len(heldout) == 4
    assert heldout != tuple(examples[:4])


def test_split_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="need at least 2 rows") as info:
        split_examples(_examples({"a": 1}), source=tmp_path / "one.jsonl")
    assert "one.jsonl" in str(info.value)
    for fraction in (0.0, 1.0, -0.5, 1.5, float("nan")):
        with pytest.raises(ConfigError) as config_info:
            split_examples(_examples({"a": 5}), heldout_fraction=fraction)
        assert config_info.value.key == "heldout-fraction"


def test_derive_labels_is_sorted_union_and_validates(tmp_path: Path) -> None:
    one = _write(tmp_path, "one.jsonl", _jsonl({"text": "t", "label": "b"}, ROW))
    two = _write(tmp_path, "two.csv", b"text,label\nt,c\nt,b\n")
    assert derive_labels([one, two]) == ["a", "b", "c"]
    bad = _write(tmp_path, "bad.jsonl", _jsonl(ROW, {"text": "", "label": "z"}))
    with pytest.raises(DataError, match="row 2"):
        derive_labels([one, bad])


def test_node_names() -> None:
    assert node_names(1) == ["alpine"]
    assert node_names(3) == list(DEMO_NODES) == ["alpine", "coastal", "desert"]
    eight = node_names(8)
    assert len(set(eight)) == 8
    assert eight[6:] == ["alpine-2", "coastal-2"]
    with pytest.raises(ConfigError):
        node_names(0)


def test_generator_is_deterministic() -> None:
    rows = generate_node_rows("coastal", 50, seed=1)
    assert rows == generate_node_rows("coastal", 50, seed=1)
    assert rows != generate_node_rows("coastal", 50, seed=2)
    assert rows != generate_node_rows("coastal-2", 50, seed=1)


def _shares(rows: list[dict[str, str]]) -> dict[str, float]:
    counts = Counter(row["label"] for row in rows)
    return {label: counts[label] / len(rows) for label in DEMO_LABELS}


def test_generator_is_non_iid_with_every_label_everywhere() -> None:
    by_node = {node: generate_node_rows(node, 240, seed=7) for node in node_names(6)}
    for rows in by_node.values():
        shares = _shares(rows)
        assert min(shares.values()) > 0
        assert max(shares.values()) >= 0.35
    alpine, desert = _shares(by_node["alpine"]), _shares(by_node["desert"])
    distance = sum(abs(alpine[label] - desert[label]) for label in DEMO_LABELS) / 2
    assert distance > 0.3


def test_generator_text_shape_and_regional_vocabulary() -> None:
    alpine = generate_node_rows("alpine", 240, seed=7)
    desert = generate_node_rows("desert", 240, seed=7)
    for row in alpine + desert:
        assert 12 <= len(row["text"].split()) <= 40, row["text"]
        assert re.search(r"feeder F-\d+", row["text"])
    assert any("snow" in row["text"] for row in alpine)
    assert not any(re.search("snow|avalanche", row["text"]) for row in desert)
    assert any("dust storm" in row["text"].lower() for row in desert)
    assert len({row["text"] for row in alpine}) > 230


def test_generator_rejects_unknown_node_and_too_few_rows() -> None:
    with pytest.raises(ConfigError):
        generate_node_rows("mars", 10, seed=0)
    with pytest.raises(ConfigError):
        generate_node_rows("alpine", len(DEMO_LABELS) - 1, seed=0)


def test_written_demo_data_loads_back(tmp_path: Path) -> None:
    paths = write_demo_data(tmp_path / "demo", 3, rows_per_node=40, seed=7)
    assert list(paths) == list(DEMO_NODES)
    for node, path in paths.items():
        assert path == tmp_path / "demo" / f"{node}.jsonl"
        examples = load_examples(path, CLS, labels=DEMO_LABELS)
        assert [e.target for e in examples] == [
            row["label"] for row in generate_node_rows(node, 40, seed=7)
        ]
    # ensure_ascii=False keeps the degree sign as UTF-8 rather than an escape.
    assert "°C" in paths["desert"].read_text(encoding="utf-8")
    assert derive_labels(list(paths.values())) == sorted(DEMO_LABELS)


def test_duplicate_csv_columns_are_found_in_linear_time(tmp_path: Path) -> None:
    """40,000 columns took 15 s with a quadratic check; the repeat is the very last one."""
    header = ",".join([*(f"c{i}" for i in range(40_000)), "c39999"])
    path = _write(tmp_path, "wide.csv", f"{header}\n".encode())
    started = time.perf_counter()
    with pytest.raises(DataError, match="header: column 'c39999' appears more than once"):
        load_examples(path, CLS)
    assert time.perf_counter() - started < 2.0
