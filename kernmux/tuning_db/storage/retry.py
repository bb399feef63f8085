"""The one retry-with-backoff helper of the tuning database.

SQLite answers "database is locked" at once in a few situations the busy timeout does
not cover (a stale read snapshot, WAL recovery, switching the journal mode), and a
shared PostgreSQL may drop a connection or abort a transaction in a deadlock. Those
calls are worth repeating after a short, jittered, growing pause; anything else is
raised at once. Each caller states what counts as transient for it.

A PostgreSQL server that restarts (an upgrade, a failover) refuses connections for
seconds. Writers that must not lose a measurement (the tuner) retry a lost connection
for up to :func:`reconnect_window_s` (``KERNMUX_DB_RECONNECT_S``, default 120 s), then
report the driver's own words (``Connection refused``) from :func:`root_cause`.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from typing import TypeVar

log = logging.getLogger("kernmux")

T = TypeVar("T")

ATTEMPTS = 8
FIRST_DELAY_S = 0.05
MAX_DELAY_S = 2.0
RECONNECT_ENV = "KERNMUX_DB_RECONNECT_S"
DEFAULT_RECONNECT_WINDOW_S = 120.0

# Words in driver errors that a repeat may cure (SQLite locks, PostgreSQL conflicts,
# connections dropped by a server or a pool).
_TRANSIENT_WORDS = ("locked", "busy", "deadlock", "could not serialize", "connection")


def retry(
    fn: Callable[[], T],
    *,
    transient: Callable[[BaseException], bool],
    attempts: int = ATTEMPTS,
    give_up_after_s: float | None = None,
    window_s: float | None = None,
    what: str = "tuning database",
) -> T:
    """``fn()``, called again while it raises an exception that ``transient`` accepts.

    Waits 50 ms x (1 + jitter) before the second attempt, doubling up to 2 s; the last
    attempt's exception propagates. give_up_after_s: an attempt that itself lasted this
    long is not repeated (it already waited out a lock that is not being let go).
    window_s: keep retrying (beyond ``attempts``) until this many seconds have passed
    since the first attempt (a server restarting)."""
    delay = FIRST_DELAY_S
    first = time.monotonic()
    attempt = 0
    while True:
        start = time.monotonic()
        try:
            return fn()
        except Exception as e:
            now = time.monotonic()
            waited_out = give_up_after_s is not None and now - start >= give_up_after_s
            out_of_attempts = attempt >= attempts - 1 and (window_s is None or now - first >= window_s)
            if out_of_attempts or waited_out or not transient(e):
                raise
            attempt += 1
            if window_s is not None and (attempt == 1 or attempt % 10 == 0):
                log.warning("kernmux: %s: %s; retrying for up to %.0f s", what, root_cause(e), window_s)
            else:
                log.debug("kernmux: %s: %s, retry %d", what, type(e).__name__, attempt)
            pause = delay * (1 + random.random())
            if window_s is not None:
                pause = max(0.0, min(pause, first + window_s - now))
            time.sleep(pause)
            delay = min(delay * 2, MAX_DELAY_S)


def is_transient_error(error: BaseException) -> bool:
    """A driver error that a repeat may cure, judged by its text and the text of every
    error it was raised from (any backend, any layer: optuna's storage wraps driver
    errors in a ``StorageInternalError`` whose own text says nothing of the cause)."""
    return any(
        any(word in f"{type(e).__name__}: {e}".lower() for word in _TRANSIENT_WORDS) for e in cause_chain(error)
    )


# Words of a lost or refused connection (psycopg, libpq and SQLAlchemy wording).
_CONNECTION_WORDS = (
    "connection refused", "could not connect", "connection failed", "server closed the connection",
    "terminating connection", "connection is closed", "connection already closed", "connection reset",
    "connection timed out", "the database system is starting up", "the database system is shutting down",
    "the database system is in recovery mode", "no connection to the server", "broken pipe",
    "ssl connection has been closed", "consuming input failed", "server conn crashed",
)


def cause_chain(error: BaseException) -> list[BaseException]:
    """``error`` and the errors it was raised from (``__cause__``/``__context__``, and a
    SQLAlchemy error's ``orig``), outermost first, each once."""
    chain: list[BaseException] = []
    todo: list[BaseException | None] = [error]
    while todo and len(chain) < 20:
        e = todo.pop(0)
        if e is None or any(e is seen for seen in chain):
            continue
        chain.append(e)
        todo += [getattr(e, "orig", None), e.__cause__, e.__context__]
    return chain


def is_connection_error(error: BaseException) -> bool:
    """True when ``error`` (or what it was raised from) is a lost or refused connection."""
    for e in cause_chain(error):
        if getattr(e, "connection_invalidated", False):
            return True
        text = str(e).lower()
        if any(word in text for word in _CONNECTION_WORDS):
            return True
    return False


def root_cause(error: BaseException) -> str:
    """The innermost driver error of ``error`` as one line (``OperationalError: connection
    failed: ... Connection refused``): the words that say what really happened."""
    chain = cause_chain(error)
    innermost = chain[-1]
    for e in reversed(chain):  # prefer a driver error over a wrapper without text
        if str(e).strip():
            innermost = e
            break
    text = " ".join(str(innermost).split())
    return f"{type(innermost).__name__}: {text[:500]}"


def reconnect_window_s() -> float:
    """How long writers retry a lost connection (``KERNMUX_DB_RECONNECT_S``, default 120)."""
    text = os.environ.get(RECONNECT_ENV, "").strip()
    if not text:
        return DEFAULT_RECONNECT_WINDOW_S
    try:
        value = float(text)
    except ValueError:
        log.warning("kernmux: %s=%r is not a number of seconds; using %g", RECONNECT_ENV, text,
                    DEFAULT_RECONNECT_WINDOW_S)
        return DEFAULT_RECONNECT_WINDOW_S
    return max(0.0, value)
