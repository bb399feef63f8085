"""The one retry-with-backoff helper of the tuning database.

SQLite answers "database is locked" at once in a few situations the busy timeout does
not cover (a stale read snapshot, WAL recovery, switching the journal mode), and a
shared PostgreSQL may drop a connection or abort a transaction in a deadlock. Those
calls are worth repeating after a short, jittered, growing pause; anything else is
raised at once. Each caller states what counts as transient for it.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("kernmux")

T = TypeVar("T")

ATTEMPTS = 8
FIRST_DELAY_S = 0.05
MAX_DELAY_S = 2.0

# Words in driver errors that a repeat may cure (SQLite locks, PostgreSQL conflicts,
# connections dropped by a server or a pool).
_TRANSIENT_WORDS = ("locked", "busy", "deadlock", "could not serialize", "connection")


def retry(
    fn: Callable[[], T],
    *,
    transient: Callable[[BaseException], bool],
    attempts: int = ATTEMPTS,
    give_up_after_s: float | None = None,
    what: str = "tuning database",
) -> T:
    """``fn()``, called again while it raises an exception that ``transient`` accepts.

    Waits 50 ms x (1 + jitter) before the second attempt, doubling up to 2 s; the last
    attempt's exception propagates. give_up_after_s: an attempt that itself lasted this
    long is not repeated (it already waited out a lock that is not being let go)."""
    delay = FIRST_DELAY_S
    for attempt in range(attempts):
        start = time.monotonic()
        try:
            return fn()
        except Exception as e:
            waited_out = give_up_after_s is not None and time.monotonic() - start >= give_up_after_s
            if attempt == attempts - 1 or waited_out or not transient(e):
                raise
            log.debug("kernmux: %s: %s, retry %d", what, type(e).__name__, attempt + 1)
            time.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, MAX_DELAY_S)
    raise AssertionError("unreachable")


def is_transient_error(error: BaseException) -> bool:
    """A driver error that a repeat may cure, judged by its text (any backend, any layer:
    optuna's storage wraps driver errors in its own types)."""
    text = f"{type(error).__name__}: {error}".lower()
    return any(word in text for word in _TRANSIENT_WORDS)
