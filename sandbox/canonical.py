"""RFC 8785 (JCS) canonical JSON: the one encoder for every byte string Ark signs or hashes.

JCS numbers are IEEE doubles, so :func:`dumps` refuses an integer beyond ``±(2**53 - 1)``
and a non-finite float with :class:`~sandbox.errors.CanonicalJSONError` naming where the
value sits, rather than letting a caller hash bytes it cannot reproduce. Whoever holds
such values decides how to spell them first: the transparency log and the node journal
spell them as text (:func:`as_text_beyond_jcs`, then :func:`canonical_entry`), so a
Flower run id (unsigned 64-bit) is logged as ``"16401725734191279427"``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import rfc8785

from sandbox.errors import CanonicalJSONError

# The largest integer an IEEE double holds exactly, and so the largest JCS allows.
MAX_SAFE_INTEGER = 2**53 - 1


def dumps(value: Any) -> bytes:
    """``value`` as RFC 8785 canonical JSON; :class:`CanonicalJSONError` (naming the path
    to the first value JCS cannot hold) for an integer beyond ``MAX_SAFE_INTEGER``, a
    non-finite float, a non-string key or a type JSON does not have."""
    try:
        return rfc8785.dumps(value)
    except rfc8785.CanonicalizationError as exc:
        raise CanonicalJSONError(f"{_first_unencodable(value)}: {exc}") from exc


def as_text_beyond_jcs(value: Any) -> Any:
    """``value`` with every integer beyond ``MAX_SAFE_INTEGER`` and every non-finite float
    spelled as its decimal text (``str``), the form the log and the journal keep; readers
    compare ids as text, and :mod:`sandbox.events` parses the text back."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_SAFE_INTEGER:
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): as_text_beyond_jcs(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [as_text_beyond_jcs(v) for v in value]
    return value


def canonical_entry(record: Mapping[str, Any]) -> bytes:
    """A log entry or journal line: ``record`` as JCS, with the values JCS cannot hold
    spelled as text (:func:`as_text_beyond_jcs`). The bytes the log and journal hash."""
    return dumps(as_text_beyond_jcs(record))


def _first_unencodable(value: Any, path: str = "$") -> str:
    """The JSONPath-like location of the first value JCS refuses inside ``value``."""
    pending: list[tuple[Any, str]] = [(value, path)]
    while pending:
        item, where = pending.pop(0)
        if isinstance(item, bool) or item is None or isinstance(item, str):
            continue
        if isinstance(item, int):
            if abs(item) > MAX_SAFE_INTEGER:
                return f"{where} (an integer beyond 2**53 - 1)"
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"{where} (a non-finite number)"
        elif isinstance(item, Mapping):
            for key, member in item.items():
                if not isinstance(key, str):
                    return f"{where} (a key that is not a string)"
                pending.append((member, f"{where}.{key}"))
        elif isinstance(item, (list, tuple)):
            pending.extend((member, f"{where}[{n}]") for n, member in enumerate(item))
        else:
            return f"{where} (a {type(item).__name__}, not JSON)"
    return where
