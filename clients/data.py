"""Load, validate and split an enterprise's private training data.

This runs on the enterprise side, next to the data. Every error is a :class:`DataError`
that names the file and the row, and the column or label at fault. Messages never echo a
row's text: it is private, and error messages end up in logs.
"""

from __future__ import annotations

import csv
import io
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from sandbox import strictjson
from sandbox.config import TASK_CAUSAL_LM, TASK_CLASSIFICATION, TASKS
from sandbox.errors import ConfigError, DataError
from sandbox.strictjson import StrictJSONError, json_type

DEFAULT_MAX_ROW_BYTES = 16 * 1024

# (text column, target column) for each task; a row must have exactly these two.
_COLUMNS: dict[str, tuple[str, str]] = {
    TASK_CLASSIFICATION: ("text", "label"),
    TASK_CAUSAL_LM: ("prompt", "completion"),
}
# Spreadsheet exports often start with a byte order mark; it is not part of the first column.
_BOM = "\ufeff"

_Record = tuple[int, dict[str, object]]


@dataclass(frozen=True)
class Example:
    """One validated row.

    For classification ``text`` is the text and ``target`` the label; for causal-lm
    ``text`` is the prompt and ``target`` the completion. Both are stripped and non-empty.
    """

    text: str
    target: str


@dataclass(frozen=True)
class Split:
    """Disjoint train and held-out examples, each in the order they had in the file."""

    train: tuple[Example, ...]
    heldout: tuple[Example, ...]


def load_examples(
    path: Path,
    task: str,
    *,
    labels: Sequence[str] | None = None,
    max_row_bytes: int = DEFAULT_MAX_ROW_BYTES,
) -> list[Example]:
    """Read and validate a ``.jsonl`` or ``.csv`` data file for ``task``.

    Classification rows need exactly the columns ``text`` and ``label``; causal-lm rows
    need ``prompt`` and ``completion``. When ``labels`` is given, a row whose label is not
    in it is rejected here rather than failing later inside training. ``row`` in errors
    is the 1-based data row: the line number for JSONL (blank lines are skipped but
    counted), the record after the header for CSV.
    """
    columns = _task_columns(task)
    allowed = _allowed_labels(task, labels)
    if max_row_bytes < 1:
        raise ConfigError(
            f"must be a positive number of bytes, got {max_row_bytes!r}", key="max-row-bytes"
        )
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv"):
        raise DataError(path, f"unsupported file type {path.suffix!r}; expected .jsonl or .csv")
    data = _read_bytes(path)
    if suffix == ".jsonl":
        records = _jsonl_records(path, data, columns, max_row_bytes)
    else:
        records = _csv_records(path, data, columns, max_row_bytes)
    examples = [_to_example(path, row, record, columns, allowed) for row, record in records]
    if not examples:
        raise DataError(path, "no data rows" if data.strip() else "empty file, no data rows")
    return examples


def split_examples(
    examples: Sequence[Example],
    *,
    heldout_fraction: float = 0.2,
    seed: int = 0,
    stratify: bool = True,
    source: Path | None = None,
) -> Split:
    """Split examples into train and held-out sets, the same way every time for a seed.

    The held-out set has ``max(1, round(n * heldout_fraction))`` examples, and the train
    set at least one. With ``stratify`` (the default) examples that share a target are
    spread over both sides in proportion, so every label with two or more rows appears in
    both; a target seen only once stays in train, where it can at least be learned.
    Causal-lm completions are almost always unique, which makes this a plain random split.
    ``source`` names the data file in the error raised for fewer than two examples.
    """
    if not 0.0 < heldout_fraction < 1.0:
        raise ConfigError(
            f"must be between 0 and 1 (exclusive), got {heldout_fraction!r}", key="heldout-fraction"
        )
    n = len(examples)
    if n < 2:
        where = source if source is not None else Path("<examples>")
        raise DataError(where, f"need at least 2 rows to split into train and held-out, found {n}")
    n_heldout = min(n - 1, max(1, round(n * heldout_fraction)))
    order = list(range(n))
    # Not a secret: the split must be reproducible from the seed in the node config.
    random.Random(seed).shuffle(order)  # noqa: S311
    if stratify:
        order = _stratified(examples, order)
    heldout = sorted(order[:n_heldout])
    train = sorted(order[n_heldout:])
    return Split(
        train=tuple(examples[i] for i in train),
        heldout=tuple(examples[i] for i in heldout),
    )


def derive_labels(
    paths: Sequence[Path], *, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES
) -> list[str]:
    """Return the sorted union of the labels in classification data files.

    Each file is fully validated on the way, so a broken file fails here, before a run
    is configured with its labels.
    """
    if not paths:
        raise ConfigError("no data files given to derive labels from", key="labels")
    found: set[str] = set()
    for path in paths:
        examples = load_examples(path, TASK_CLASSIFICATION, max_row_bytes=max_row_bytes)
        found.update(example.target for example in examples)
    return sorted(found)


def _task_columns(task: str) -> tuple[str, str]:
    if task not in _COLUMNS:
        raise ConfigError(f"unknown task {task!r}; expected one of {_names(TASKS)}", key="task")
    return _COLUMNS[task]


def _allowed_labels(task: str, labels: Sequence[str] | None) -> tuple[str, ...] | None:
    if labels is None:
        return None
    if task != TASK_CLASSIFICATION:
        raise ConfigError(
            f"labels apply only to {TASK_CLASSIFICATION!r}, not to {task!r}", key="labels"
        )
    if not labels:
        raise ConfigError("must list at least one label", key="labels")
    return tuple(labels)


def _read_bytes(path: Path) -> bytes:
    if path.is_dir():
        raise DataError(path, "is a directory, expected a .jsonl or .csv file")
    try:
        return path.read_bytes()
    except FileNotFoundError as err:
        raise DataError(path, "file not found") from err
    except OSError as err:
        raise DataError(path, f"cannot read the file: {err.strerror or err}") from err


def _jsonl_records(
    path: Path, data: bytes, columns: tuple[str, str], max_row_bytes: int
) -> Iterator[_Record]:
    # bytes.splitlines breaks only at ASCII line ends, which JSON strings cannot contain raw.
    for row, raw in enumerate(data.splitlines(), start=1):
        _check_size(path, row, len(raw), max_row_bytes)
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(
                path, f"not valid UTF-8 (byte {err.start + 1} of the line)", row=row
            ) from err
        if row == 1:
            line = line.removeprefix(_BOM)
        if not line.strip():
            continue
        try:
            value = strictjson.loads(line)
        except StrictJSONError as err:
            raise DataError(path, str(err), row=row) from err
        if not isinstance(value, dict):
            raise DataError(path, f"expected a JSON object, found {json_type(value)}", row=row)
        _check_columns(path, row, list(value), columns)
        yield row, value


def _csv_records(
    path: Path, data: bytes, columns: tuple[str, str], max_row_bytes: int
) -> Iterator[_Record]:
    # Undecodable bytes are kept as lone surrogates so that the record holding them, not
    # just a physical line, can be named; quoted fields may span lines.
    text = data.decode("utf-8", errors="surrogateescape").removeprefix(_BOM)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    header = _next_csv_row(path, reader, row=None)
    if header is None:
        return
    if not _is_utf8(header):
        raise DataError(path, "header: not valid UTF-8")
    names = [name.strip() for name in header]
    _check_text(path, None, header)
    repeated = [name for name, count in Counter(names).items() if count > 1]
    if repeated:
        raise DataError(path, f"header: column {repeated[0][:64]!r} appears more than once")
    _check_columns(path, None, names, columns)
    row = 0
    while True:
        row += 1
        fields = _next_csv_row(path, reader, row=row)
        if fields is None:
            return
        if not fields:
            continue
        if not _is_utf8(fields):
            raise DataError(path, "not valid UTF-8", row=row)
        _check_text(path, row, fields)
        if len(fields) != len(names):
            raise DataError(
                path, f"expected {len(names)} fields as in the header, found {len(fields)}", row=row
            )
        # Quotes are not counted: the limit is on the row's content, not its escaping.
        size = sum(len(field.encode("utf-8")) for field in fields) + len(fields) - 1
        _check_size(path, row, size, max_row_bytes)
        yield row, dict(zip(names, fields, strict=True))


def _next_csv_row(path: Path, reader: Iterator[list[str]], *, row: int | None) -> list[str] | None:
    try:
        return next(reader, None)
    except csv.Error as err:
        where = "header: " if row is None else ""
        raise DataError(path, f"{where}malformed CSV: {err}", row=row) from err


def _is_utf8(fields: list[str]) -> bool:
    # A strictly valid UTF-8 file never decodes to a lone surrogate.
    try:
        for field in fields:
            field.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_text(path: Path, row: int | None, fields: list[str]) -> None:
    """Refuse NUL in a CSV field, as the JSONL reader does (lone surrogates are caught
    earlier, as bytes that are not UTF-8)."""
    for number, field in enumerate(fields, 1):
        try:
            strictjson.check_text(field, f"field {number}")
        except StrictJSONError as err:
            where = "header: " if row is None else ""
            raise DataError(path, f"{where}{err}", row=row) from err


def _check_size(path: Path, row: int, size: int, max_row_bytes: int) -> None:
    if size > max_row_bytes:
        raise DataError(
            path, f"row is {size} bytes, over the limit of {max_row_bytes} bytes", row=row
        )


def _check_columns(
    path: Path, row: int | None, found: list[str], expected: tuple[str, str]
) -> None:
    if set(found) == set(expected):
        return
    missing = [name for name in expected if name not in found]
    unknown = [name for name in found if name not in expected]
    problems = []
    if missing:
        problems.append(f"missing column(s) {_names(missing)}")
    if unknown:
        problems.append(f"unknown column(s) {_names(unknown)}")
    where = "header: " if row is None else ""
    raise DataError(
        path,
        f"{where}{'; '.join(problems)}; expected columns {_names(expected)}, "
        f"found {_names(found) or 'none'}",
        row=row,
    )


def _to_example(
    path: Path,
    row: int,
    record: dict[str, object],
    columns: tuple[str, str],
    allowed: tuple[str, ...] | None,
) -> Example:
    text_column, target_column = columns
    text = _required_string(path, row, record, text_column)
    target = _required_string(path, row, record, target_column)
    if allowed is not None and target not in allowed:
        raise DataError(
            path, f"unknown label {target!r}; allowed labels: {_names(allowed)}", row=row
        )
    return Example(text=text, target=target)


def _required_string(path: Path, row: int, record: dict[str, object], column: str) -> str:
    value = record[column]
    if not isinstance(value, str):
        raise DataError(
            path, f"column {column!r} must be a string, found {json_type(value)}", row=row
        )
    stripped = value.strip()
    if not stripped:
        raise DataError(path, f"column {column!r} is empty", row=row)
    return stripped


def _stratified(examples: Sequence[Example], order: list[int]) -> list[int]:
    """Reorder shuffled indices so that any prefix holds each target in proportion."""
    groups: dict[str, list[int]] = {}
    for index in order:
        groups.setdefault(examples[index].target, []).append(index)
    rank: dict[int, float] = {}
    for members in groups.values():
        for position, index in enumerate(members):
            # Rank 1.0 sorts a target seen once behind every other, into train.
            rank[index] = position / len(members) if len(members) > 1 else 1.0
    # sorted() is stable, so ties keep the seeded shuffle order.
    return sorted(order, key=rank.__getitem__)


def _names(names: Sequence[str]) -> str:
    return ", ".join(repr(name) for name in names)
