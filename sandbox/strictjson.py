"""Strict JSON for bytes another party wrote: one parser for every reader of such files.

Python's :mod:`json` accepts input that crashes its caller or that two readers of the same
bytes would read differently: nesting deep enough to raise ``RecursionError``, integers
of any length (a 5,000-digit one raises ``ValueError`` from the int-string limit), ``NaN``
and ``Infinity``, duplicate keys (the last silently wins), and ``\\ud800`` escapes that
decode to lone surrogates, which no UTF-8 writer can encode again. :func:`loads` refuses
all of these, and NUL in any string, with one error, :class:`StrictJSONError`; each
reader (sealed-package manifests, private data, node journals, log entries) turns it into
its own domain's error naming the file and the row.

:class:`StrictJSONError` is deliberately not an ``ArkError``: a reader that forgets to
translate it fails the fuzz suites instead of leaking an error without a file name.
Messages never quote the input (private data goes through here); a key is named, cut short.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

# Deeper than any file Ark writes (a manifest's model config is the deepest, at about 4).
MAX_DEPTH = 64
# Integers must lie strictly between -INT_LIMIT and INT_LIMIT: Flower's run and node ids
# are unsigned 64-bit, and nothing Ark writes is larger.
INT_LIMIT = 2**64
_INT_DIGITS = len(str(INT_LIMIT))
_KEY_SHOWN = 64

# A JSON string (an unterminated one runs to the end) or a bracket. The alternation takes
# one character at a time, so a failed match cannot backtrack exponentially.
_STRING_OR_BRACKET = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]', re.DOTALL)
_NOT_TEXT = re.compile("[\x00\ud800-\udfff]")


class StrictJSONError(ValueError):
    """Input :func:`loads` refuses, or text :func:`check_text` refuses; says why, quoting
    no input beyond the start of a key."""


def check_text(value: str, what: str = "a string") -> None:
    """Raise :class:`StrictJSONError` if ``value`` holds NUL or a lone surrogate.

    Neither belongs in text: NUL ends strings in C libraries a value may reach, and a lone
    surrogate cannot be written as UTF-8 (encoding it raises ``UnicodeEncodeError``).
    """
    found = _NOT_TEXT.search(value)
    if found is None:
        return
    char = found.group()
    kind = "NUL" if char == "\x00" else f"a lone surrogate (U+{ord(char):04X})"
    raise StrictJSONError(f"{what} holds {kind} at character {found.start() + 1}")


def json_type(value: object) -> str:
    """What kind of JSON value ``value`` is, as an error message names it ("a string")."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def loads(data: bytes | str, *, max_depth: int = MAX_DEPTH) -> Any:
    """Parse one JSON document strictly; raise :class:`StrictJSONError` on anything else.

    ``bytes`` must be UTF-8 (never guessed as UTF-16 or UTF-32, as :func:`json.loads`
    would). Refused: invalid JSON, nesting deeper than ``max_depth``, an integer outside
    ``(-INT_LIMIT, INT_LIMIT)``, ``NaN``, ``Infinity`` or a number that overflows to it,
    a duplicate key, and NUL or a lone surrogate in any string or key.
    """
    if isinstance(data, bytes):
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise StrictJSONError(f"not UTF-8 (byte {exc.start + 1})") from exc
    else:
        text = data
    _check_depth(text, max_depth)
    try:
        value = json.loads(
            text,
            object_pairs_hook=_object,
            parse_int=_integer,
            parse_float=_float,
            parse_constant=_constant,
        )
    except json.JSONDecodeError as exc:
        raise StrictJSONError(
            f"invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from exc
    _check_strings(value)
    return value


def _check_depth(text: str, max_depth: int) -> None:
    """Refuse nesting deeper than ``max_depth`` before the recursive parser sees it."""
    if text.count("[") + text.count("{") <= max_depth:
        return  # cannot nest deeper than it has brackets; skips the scan for most input
    depth = 0
    for match in _STRING_OR_BRACKET.finditer(text):
        first = match.group()[0]
        if first in "[{":
            depth += 1
            if depth > max_depth:
                raise StrictJSONError(f"nested more than {max_depth} deep")
        elif first in "]}":
            depth -= 1


def _object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise StrictJSONError(f"duplicate key {key[:_KEY_SHOWN]!r}")
        result[key] = value
    return result


def _integer(digits: str) -> int:
    out_of_range = StrictJSONError(f"an integer of {len(digits)} characters is out of range")
    # The length is checked before int(), which raises ValueError past Python's
    # int-string limit and takes quadratic time below it.
    if len(digits.lstrip("-")) > _INT_DIGITS:
        raise out_of_range
    value = int(digits)
    if not -INT_LIMIT < value < INT_LIMIT:
        raise out_of_range
    return value


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StrictJSONError("a number overflows to infinity")
    return value


def _constant(name: str) -> Any:
    raise StrictJSONError(f"{name} is not JSON")


def _check_strings(value: Any) -> None:
    """Every key and string in ``value`` is text (:func:`check_text`); an error names the
    key the string sits under. Iterative: no stack is needed to walk it."""
    pending: list[tuple[Any, str]] = [(value, "a string")]
    while pending:
        item, what = pending.pop()
        if isinstance(item, str):
            check_text(item, what)
        elif isinstance(item, dict):
            for key, member in item.items():
                shown = repr(key[:_KEY_SHOWN])
                check_text(key, f"key {shown}")
                pending.append((member, f"the value of key {shown}"))
        elif isinstance(item, list):
            pending.extend((member, what) for member in item)
