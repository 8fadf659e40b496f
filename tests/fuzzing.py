"""Shared settings for the property-based fuzz suites (hypothesis).

Every parser of another party's bytes is fuzzed with a bounded number of examples so
that ``make test`` stays fast; ``ARK_FUZZ_EXAMPLES`` raises the count for a longer run.
The property is always the same: the parser returns, or raises the project's typed error
(an ``ArkError`` subclass), and nothing else.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from hypothesis import HealthCheck, settings

from sandbox.errors import ArkError

FUZZ_EXAMPLES = int(os.environ.get("ARK_FUZZ_EXAMPLES", "200"))

# No deadline: a shared 2-core machine makes per-example timing meaningless; the example
# count bounds the time instead. The database is off so a run never depends on the last.
fuzz_settings = settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def typed_errors_only(parse: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call ``parse``; let only the project's typed errors (``ArkError``) through.

    Anything else (``ValueError``, ``KeyError``, ``RecursionError``, …) fails the test
    with the input that caused it.
    """
    try:
        return parse(*args, **kwargs)
    except ArkError:
        return None
