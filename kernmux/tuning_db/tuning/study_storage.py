"""optuna's RDB storage for the tuner: created once under a lock, resilient to a restart.

* :func:`open_study_storage` -- the studies live in the tuning database itself (optuna's
  own tables beside the ``kernmux_`` ones), with optuna's trial heartbeat switched on so
  a tuning process that died is noticed (:mod:`~kernmux.tuning_db.tuning.recovery`).
* :class:`ResilientRDBStorage` -- every storage call is retried while the database
  cannot be reached (a PostgreSQL restart) for up to the reconnect window; after it,
  the call raises :class:`TuningDBError` naming the driver's cause (``Connection
  refused``), not optuna's ``StorageInternalError`` whose text guesses "exceeding max
  length".
* :func:`schema_lock` -- one process at a time creates the schema: four tunes started
  together on a fresh PostgreSQL would otherwise race in optuna's ``CREATE TYPE``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import threading
import warnings
from collections.abc import Iterator
from typing import Any

from kernmux.tuning_db.storage.engine import hide_password
from kernmux.tuning_db.storage.errors import TuningDBError
from kernmux.tuning_db.storage.paths import sqlite_path
from kernmux.tuning_db.storage.retry import is_connection_error, is_transient_error, reconnect_window_s, retry, root_cause

# optuna's heartbeat: each tuning process records one for its running trial this often;
# a trial whose last heartbeat is older than the grace period belongs to a dead process
# (on another host: processes on this host are judged by their pid at once).
HEARTBEAT_INTERVAL_S = 5
GRACE_PERIOD_S = 60
# SQLite: how long optuna's connections wait for the write lock.
_SQLITE_LOCK_WAIT_S = 120

_local = threading.local()


def _is_function(value: Any) -> bool:
    return callable(value) and not isinstance(value, (staticmethod, classmethod, type))


# RDBStorage members not wrapped: construction, pickling, heartbeat plumbing (a beat that
# fails is skipped, never retried for minutes), and pure helpers.
_NOT_RETRIED = {
    "__init__", "__getstate__", "__setstate__", "record_heartbeat", "get_heartbeat_interval",
    "get_heartbeat_stale_trial_callback", "get_failed_trial_callback", "remove_session", "upgrade",
    "_build_frozen_trial_from_trial_model", "_set_default_engine_kwargs_for_mysql",
}


def _storage_class() -> type:
    """:class:`ResilientRDBStorage`, built on first use (optuna is imported lazily)."""
    global _RESILIENT
    if _RESILIENT is not None:
        return _RESILIENT
    import optuna

    class ResilientRDBStorage(optuna.storages.RDBStorage):
        """optuna's RDBStorage whose calls survive a database restart (see the module doc).

        The retry wraps the outermost storage call only (a call made inside another is
        part of its attempt). A call that may have been committed before its connection
        broke is harmless to repeat, except two: ``set_trial_state_values`` (a repeat
        finding the trial already in the requested state counts as done) and
        ``create_new_trial`` (a repeat may leave one extra RUNNING trial without a
        point, which the recovery reclaims and the search never counts)."""

        reconnect_window_s: float = 120.0

    for name, member in vars(optuna.storages.RDBStorage).items():
        if name in _NOT_RETRIED or not _is_function(member) or (name.startswith("__") and name.endswith("__")):
            continue
        setattr(ResilientRDBStorage, name, _resilient(name, member))
    _RESILIENT = ResilientRDBStorage
    return ResilientRDBStorage


_RESILIENT: type | None = None


def _resilient(name: str, method: Any) -> Any:
    @functools.wraps(method)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        if getattr(_local, "depth", 0):
            return method(self, *args, **kwargs)
        _local.depth = 1
        failures = 0

        def attempt() -> Any:
            nonlocal failures
            try:
                return method(self, *args, **kwargs)
            except Exception as e:
                if is_connection_error(e):
                    failures += 1
                elif failures and name == "set_trial_state_values" and _already_set(self, args, kwargs):
                    return True  # the attempt that lost its connection had committed it
                raise

        try:
            return retry(attempt, transient=is_connection_error, window_s=self.reconnect_window_s,
                         what=f"optuna storage ({name})")
        except Exception as e:
            if is_connection_error(e):
                url = hide_password(str(getattr(self, "url", "")))
                raise TuningDBError(
                    f"tuning database {url} unreachable for {self.reconnect_window_s:g} s: {root_cause(e)}"
                ) from e
            raise
        finally:
            _local.depth = 0

    return call


def _already_set(storage: Any, args: tuple, kwargs: dict) -> bool:
    """True when the trial of a repeated ``set_trial_state_values`` already holds the state."""
    trial_id = args[0] if args else kwargs.get("trial_id")
    state = args[1] if len(args) > 1 else kwargs.get("state")
    try:
        return storage.get_trial(trial_id).state == state
    except Exception:
        return False


def open_study_storage(url: str, *, reconnect_s: float | None = None) -> Any:
    """optuna's RDB storage on ``url``, configured for several writers and restarts.

    SQLite: a long busy timeout so concurrent processes wait for the write lock instead
    of failing (the tuning store has already switched the file to WAL). PostgreSQL:
    ``pool_pre_ping`` so connections broken by a restart are replaced. reconnect_s: how
    long a lost connection is retried (default :func:`reconnect_window_s`)."""
    import optuna
    import sqlalchemy as sa

    backend = sa.engine.make_url(url).get_backend_name()
    if backend == "sqlite":
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": _SQLITE_LOCK_WAIT_S}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # The heartbeat is recorded by kernmux's own thread around ask/tell (recovery.py),
    # which optuna's warning for heartbeats outside Study.optimize does not know.
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used", category=UserWarning)
    cls = _storage_class()
    window = reconnect_window_s() if reconnect_s is None else reconnect_s

    def make() -> Any:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # heartbeat_interval is "experimental" in optuna
            storage = cls(url, engine_kwargs=engine_kwargs, heartbeat_interval=HEARTBEAT_INTERVAL_S,
                          grace_period=GRACE_PERIOD_S)
        storage.reconnect_window_s = window
        return storage

    try:
        return retry(make, transient=is_transient_error, window_s=window or None, what="optuna storage")
    except Exception as e:
        if is_connection_error(e):
            raise TuningDBError(f"tuning database {hide_password(url)} unreachable: {root_cause(e)}") from e
        raise


def load_study(name: str, storage: Any, sampler: Any) -> Any:
    """Create or load the study ``name`` (minimizing p50) on ``storage``."""
    import optuna

    return retry(
        lambda: optuna.create_study(
            study_name=name, storage=storage, sampler=sampler, direction="minimize", load_if_exists=True
        ),
        transient=is_transient_error,
        what="optuna study",
    )


@contextlib.contextmanager
def schema_lock(url: str) -> Iterator[None]:
    """Hold a lock that serializes schema creation among processes sharing ``url``.

    PostgreSQL: a session-level advisory lock (``pg_advisory_lock``) on a dedicated
    connection; SQLite: ``flock`` on the database file (independent of SQLite's own
    locks); other backends: no lock (creation there relies on retries)."""
    import sqlalchemy as sa

    backend = sa.engine.make_url(url).get_backend_name()
    if backend == "postgresql":
        key = int.from_bytes(hashlib.sha256(b"kernmux schema").digest()[:8], "big", signed=True)
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)

        def lock() -> Any:
            conn = engine.connect()
            try:
                conn.execute(sa.text("SELECT pg_advisory_lock(:k)"), {"k": key})
                conn.commit()
            except BaseException:
                conn.close()
                raise
            return conn

        try:
            conn = retry(lock, transient=is_connection_error, window_s=reconnect_window_s() or None,
                         what="schema lock")
        except sa.exc.SQLAlchemyError as e:
            engine.dispose()
            raise TuningDBError(f"tuning database {hide_password(url)}: cannot take the schema lock: "
                                f"{root_cause(e)}") from e
        try:
            yield
        finally:
            with contextlib.suppress(Exception):
                conn.execute(sa.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                conn.commit()
            with contextlib.suppress(Exception):
                conn.close()
            engine.dispose()
        return
    path = sqlite_path(url)
    if backend == "sqlite" and path is not None:
        import fcntl

        try:  # an empty file is an empty SQLite database; it gives the lock a home
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch(exist_ok=True)
        except OSError as e:
            raise TuningDBError(f"cannot create tuning database {path}: {e.strerror or e}") from e

        with open(path, "rb") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
        return
    yield
