"""The tuning store: every trial is an inserted row; "best" is a query.

Contract (shared by the tuner, the resolver hook, export/import and the CLI):

* :class:`TrialRecord` is one measured or failed trial. :meth:`TuningStore.record`
  validates it, stamps ``created_at`` (UTC) and ``host`` when missing, and inserts it.
  Nothing is ever updated or deleted.
* Every storage failure raises :class:`TuningDBError` ``from`` the driver error;
  a database whose schema is older or newer than this code raises
  :class:`SchemaMismatchError` naming both revisions and the command to run.
  An invalid record raises :class:`InvalidTrialError` (a ``ValueError``).
* :meth:`TuningStore.best` returns the fastest ``ok`` row for (platform fingerprint,
  op, bucket) whose recorded library versions equal the platform's, excluding any
  (kernel, config) that failed in another trial of the same bucket, plus notes on what
  was ignored. :func:`choose_best` is the same rule over rows in memory (the resolver).

Backends: SQLite (default; WAL, busy timeout, ``BEGIN IMMEDIATE`` for writes and
retries on "database is locked") and PostgreSQL (``postgresql+psycopg://``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import hashlib
import json
import logging
import math
import random
import socket
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.orm import Session, sessionmaker

from kernmux.dispatch.platform import Platform
from kernmux.tuning_db import migrations
from kernmux.tuning_db.models import FAILURE_STATUSES, STATUSES, Trial
from kernmux.tuning_db.paths import default_url, normalize_url, sqlite_path

__all__ = [
    "STATUSES",
    "FAILURE_STATUSES",
    "TrialRecord",
    "TrialRow",
    "TuningDBError",
    "SchemaMismatchError",
    "InvalidTrialError",
    "TuningStore",
    "default_url",
    "choose_best",
    "relevant_libs",
    "bucket_key",
    "config_key",
    "content_hash",
    "describe_row",
]

log = logging.getLogger("kernmux")

BUSY_TIMEOUT_S = 30.0
LOCK_RETRIES = 8
# Libraries whose version is recorded but never invalidates a row: kernmux's own
# version changes with every release without changing a measured library kernel.
IGNORED_LIBS = frozenset({"kernmux"})
# torch and triton matter for every kernel (torch reference, torch.compile, Triton).
BASE_LIBS = ("torch", "triton")

T = TypeVar("T")


# --------------------------------------------------------------------------- errors


class TuningDBError(RuntimeError):
    """A tuning-database operation failed; ``__cause__`` holds the driver error."""


class SchemaMismatchError(TuningDBError):
    """The database's schema revision is not the one this kernmux was written for."""

    def __init__(self, url: str, found: str | None, expected: str, direction: str):
        self.url, self.found, self.expected, self.direction = url, found, expected, direction
        shown = found or "(no revision stamp)"
        if direction == "newer":
            msg = (
                f"tuning database {url} is at schema revision {shown}, newer than this "
                f"kernmux knows (its newest is {expected}): it was written by a newer "
                f"kernmux; upgrade kernmux (pip install -U kernmux) or use another database"
            )
        else:
            msg = (
                f"tuning database {url} is at schema revision {shown}, older than this "
                f"kernmux ({expected}); run `kernmux db upgrade --db {url}`"
            )
        super().__init__(msg)


class InvalidTrialError(ValueError):
    """A trial record that cannot be stored (names the field and what was wrong)."""


# --------------------------------------------------------------------------- records


@dataclass
class TrialRecord:
    """One measured (or failed) trial; nothing is overwritten.

    config/features/bucket: JSON objects (scalars inside). metrics: error measures
    against the reference (``Comparison.metrics``); non-finite floats are stored as
    the strings "nan", "inf", "-inf". p50/p20/p80 in microseconds (required when
    status is "ok"). fingerprint: ``Platform.fingerprint()``; platform:
    ``Platform.as_dict()`` without libs; libs: versions of the libraries the result
    depends on (see :func:`relevant_libs`). created_at/host: filled by ``record()``.
    """

    op: str
    kernel: str
    config: dict
    features: dict
    bucket: dict
    status: str
    p50_us: float | None
    p20_us: float | None
    p80_us: float | None
    reps: int | None
    metrics: dict
    error: str | None
    fingerprint: str
    platform: dict
    libs: dict
    study: str | None = None
    trial_number: int | None = None
    created_at: dt.datetime | None = None
    host: str | None = None

    @classmethod
    def for_platform(
        cls, platform: Platform, *, requires: Iterable[str] = (), **fields: Any
    ) -> TrialRecord:
        """A record with fingerprint/platform/libs filled from ``platform``.

        ``requires``: the kernel's provider distributions (``Kernel.requires`` keys);
        libs = :func:`relevant_libs` of them. Every other field is a keyword."""
        hw = {k: v for k, v in platform.as_dict().items() if k != "libs"}
        fields.setdefault("libs", relevant_libs(platform, requires))
        return cls(fingerprint=platform.fingerprint(), platform=hw, **fields)

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        if self.created_at is not None:
            out["created_at"] = self.created_at.isoformat()
        return out


@dataclass(kw_only=True)
class TrialRow(TrialRecord):
    """A stored trial: a :class:`TrialRecord` plus its row id and content hash."""

    id: int
    content_hash: str


RECORD_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(TrialRecord))
# What makes two rows the same trial (merge dedupe). ``host`` is informational and was
# added by revision 0002, so hashes of rows written before it stay valid.
IDENTITY_FIELDS: tuple[str, ...] = tuple(f for f in RECORD_FIELDS if f != "host")


def relevant_libs(platform: Platform, requires: Iterable[str] = ()) -> dict[str, str]:
    """Versions a measurement depends on: torch, triton and the kernel's providers."""
    names = [*BASE_LIBS, *requires]
    return {n: platform.libs[n] for n in names if n in platform.libs and n not in IGNORED_LIBS}


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), allow_nan=False)


def bucket_key(bucket: Mapping[str, Any]) -> str:
    """Canonical JSON of a bucket (sorted keys, no spaces): the indexed lookup key."""
    return _canonical(dict(bucket))


def config_key(config: Mapping[str, Any]) -> str:
    return _canonical(dict(config))


def _utc(value: dt.datetime) -> dt.datetime:
    if value.tzinfo is None:
        return value.replace(tzinfo=dt.timezone.utc)
    return value.astimezone(dt.timezone.utc)


def content_hash(record: TrialRecord) -> str:
    """sha256 of the record's identity fields (canonical JSON, created_at in UTC)."""
    if record.created_at is None:
        raise InvalidTrialError("content_hash needs created_at")
    identity = {f: getattr(record, f) for f in IDENTITY_FIELDS}
    identity["created_at"] = _utc(record.created_at).isoformat()
    return hashlib.sha256(_canonical(identity).encode()).hexdigest()


def _json_value(value: Any, where: str, *, nonfinite_ok: bool) -> Any:
    """``value`` as plain JSON (lists for tuples); raises InvalidTrialError naming ``where``."""
    if value is None or isinstance(value, (str, bool)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        if not nonfinite_ok:
            raise InvalidTrialError(f"{where}: non-finite float {value!r}")
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidTrialError(f"{where}: keys must be strings, got {k!r}")
            out[k] = _json_value(v, f"{where}.{k}", nonfinite_ok=nonfinite_ok)
        return out
    if isinstance(value, (list, tuple)):
        return [_json_value(v, f"{where}[{i}]", nonfinite_ok=nonfinite_ok) for i, v in enumerate(value)]
    raise InvalidTrialError(f"{where}: expected a JSON value, got {type(value).__name__} {value!r}")


def _opt_float(record: TrialRecord, name: str) -> float | None:
    value = getattr(record, name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidTrialError(f"{name}: expected a number of microseconds or None, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise InvalidTrialError(f"{name}: expected a finite non-negative number, got {value!r}")
    return value


def _opt_int(record: TrialRecord, name: str) -> int | None:
    value = getattr(record, name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidTrialError(f"{name}: expected a non-negative int or None, got {value!r}")
    return int(value)


def _opt_str(record: TrialRecord, name: str, limit: int | None = None) -> str | None:
    value = getattr(record, name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise InvalidTrialError(f"{name}: expected a string or None, got {value!r}")
    if limit is not None and len(value) > limit:
        raise InvalidTrialError(f"{name}: longer than {limit} characters")
    return value


def _req_str(record: TrialRecord, name: str, limit: int) -> str:
    value = getattr(record, name)
    if not isinstance(value, str) or not value:
        raise InvalidTrialError(f"{name}: expected a non-empty string, got {value!r}")
    if len(value) > limit:
        raise InvalidTrialError(f"{name}: longer than {limit} characters")
    return value


def _req_obj(record: TrialRecord, name: str, *, nonfinite_ok: bool = False) -> dict:
    value = getattr(record, name)
    if not isinstance(value, Mapping):
        raise InvalidTrialError(f"{name}: expected a JSON object (dict), got {type(value).__name__}")
    return _json_value(value, name, nonfinite_ok=nonfinite_ok)


def normalize_record(record: TrialRecord, *, stamp: bool = True) -> TrialRecord:
    """A validated copy of ``record`` in stored form (floats as float, UTC time).

    stamp: fill ``created_at`` (now, UTC) and ``host`` when they are None."""
    if record.status not in STATUSES:
        raise InvalidTrialError(f"status: expected one of {STATUSES}, got {record.status!r}")
    libs = _req_obj(record, "libs")
    for name, version in libs.items():
        if not isinstance(version, str):
            raise InvalidTrialError(f"libs.{name}: expected a version string, got {version!r}")
    created = record.created_at
    if created is None:
        if not stamp:
            raise InvalidTrialError("created_at: missing")
        created = dt.datetime.now(dt.timezone.utc)
    elif not isinstance(created, dt.datetime):
        raise InvalidTrialError(f"created_at: expected a datetime, got {created!r}")
    out = TrialRecord(
        op=_req_str(record, "op", 128),
        kernel=_req_str(record, "kernel", 128),
        config=_req_obj(record, "config"),
        features=_req_obj(record, "features"),
        bucket=_req_obj(record, "bucket"),
        status=record.status,
        p50_us=_opt_float(record, "p50_us"),
        p20_us=_opt_float(record, "p20_us"),
        p80_us=_opt_float(record, "p80_us"),
        reps=_opt_int(record, "reps"),
        metrics=_req_obj(record, "metrics", nonfinite_ok=True),
        error=_opt_str(record, "error"),
        fingerprint=_req_str(record, "fingerprint", 128),
        platform=_req_obj(record, "platform"),
        libs=libs,
        study=_opt_str(record, "study", 256),
        trial_number=_opt_int(record, "trial_number"),
        created_at=_utc(created),  # microseconds: what SQLite and PostgreSQL both keep
        host=_opt_str(record, "host", 255),
    )
    if out.host is None and stamp:
        out.host = socket.gethostname()[:255] or None
    if out.status == "ok" and out.p50_us is None:
        raise InvalidTrialError("p50_us: required when status is 'ok'")
    if len(bucket_key(out.bucket)) > 1024:
        raise InvalidTrialError("bucket: canonical JSON longer than 1024 characters")
    return out


def _values(record: TrialRecord) -> dict[str, Any]:
    values = {f: getattr(record, f) for f in RECORD_FIELDS}
    values["bucket_key"] = bucket_key(record.bucket)
    values["content_hash"] = content_hash(record)
    return values


def _row_from_orm(t: Trial) -> TrialRow:
    return TrialRow(id=t.id, content_hash=t.content_hash, **{f: getattr(t, f) for f in RECORD_FIELDS})


# --------------------------------------------------------------------------- choosing


class RowLike(Protocol):
    id: int
    fingerprint: str
    kernel: str
    config: Mapping[str, Any]
    status: str
    p50_us: float | None
    libs: Mapping[str, str]


def lib_mismatches(row_libs: Mapping[str, str], platform: Platform) -> list[tuple[str, str, str | None]]:
    """(lib, recorded version, current version or None) for each recorded library whose
    version differs on ``platform``. Libraries the row did not record are not compared."""
    out = []
    for name, version in sorted(row_libs.items()):
        if name in IGNORED_LIBS:
            continue
        now = platform.libs.get(name)
        if now != version:
            out.append((name, version, now))
    return out


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def choose_best(
    rows: Iterable[RowLike], platform: Platform, allowed: Sequence[str] | None = None
) -> tuple[RowLike | None, list[str]]:
    """The fastest usable ``ok`` row among ``rows`` (all of one op and bucket), and notes.

    Usable: same fingerprint as ``platform``; every recorded library version equal to
    the platform's; kernel in ``allowed`` (None = any); and its (kernel, config) never
    failed (numerics_failed, crashed, timeout, error) in a usable-platform trial of
    this bucket. Ties go to the lower row id."""
    fingerprint = platform.fingerprint()
    other_fp = 0
    lib_notes: Counter[tuple[str, str, str | None]] = Counter()
    failed: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    not_allowed: Counter[str] = Counter()
    candidates: list[RowLike] = []
    for row in rows:
        if row.fingerprint != fingerprint:
            other_fp += row.status == "ok"
            continue
        mismatches = lib_mismatches(row.libs, platform)
        if mismatches:
            if row.status == "ok":
                lib_notes.update(mismatches)
            continue
        if row.status in FAILURE_STATUSES:
            failed[(row.kernel, config_key(row.config))][row.status] += 1
            continue
        if row.status != "ok":
            continue
        if allowed is not None and row.kernel not in allowed:
            not_allowed[row.kernel] += 1
            continue
        candidates.append(row)
    notes: list[str] = []
    if other_fp:
        notes.append(f"{_rows(other_fp)} from another platform fingerprint (not {fingerprint})")
    for (name, then, now), n in sorted(lib_notes.items()):
        notes.append(f"{_rows(n)} measured with {name} {then}, now {now or 'not installed'}")
    if not_allowed:
        listed = ", ".join(f"{k} ({n})" for k, n in sorted(not_allowed.items()))
        notes.append(f"{_rows(sum(not_allowed.values()))} for kernels not allowed here: {listed}")
    usable = []
    excluded: Counter[str] = Counter()
    excluded_why: dict[str, Counter[str]] = defaultdict(Counter)
    for row in candidates:
        why = failed.get((row.kernel, config_key(row.config)))
        if why:
            excluded[row.kernel] += 1
            excluded_why[row.kernel].update(why)
        else:
            usable.append(row)
    for kernel, n in sorted(excluded.items()):
        statuses = ", ".join(f"{s} x{c}" for s, c in sorted(excluded_why[kernel].items()))
        notes.append(f"{_rows(n)} of {kernel} ignored: the same config failed in this bucket ({statuses})")
    if not usable:
        return None, notes
    return min(usable, key=lambda r: (r.p50_us, r.id)), notes


def describe_row(row: Any) -> str:
    """One line naming a row: id, kernel, config, timing, when (for explain)."""
    created = getattr(row, "created_at", None)
    when = _utc(created).strftime("%Y-%m-%d %H:%M UTC") if created else "unknown time"
    timing = f"p50 {row.p50_us:.2f} us" if row.p50_us is not None else "no timing"
    if getattr(row, "p20_us", None) is not None and getattr(row, "p80_us", None) is not None:
        timing += f" (p20 {row.p20_us:.2f}, p80 {row.p80_us:.2f}"
        timing += f", {row.reps} reps)" if getattr(row, "reps", None) else ")"
    config = f" {config_key(row.config)}" if row.config else ""
    study = getattr(row, "study", None)
    origin = f", study {study!r} trial {row.trial_number}" if study else ""
    return f"tuning row {row.id}: {row.kernel}{config} {timing}, measured {when}{origin}"


# --------------------------------------------------------------------------- engine


def _is_lock_error(error: BaseException | None) -> bool:
    if not isinstance(error, exc.OperationalError):
        return False
    text = str(error.orig if error.orig is not None else error).lower()
    return "database is locked" in text or "database is busy" in text or "database table is locked" in text


def _make_engine(url: str) -> sa.Engine:
    backend = sa.engine.make_url(url).get_backend_name()
    if backend != "sqlite":
        return sa.create_engine(url, pool_pre_ping=True)
    on_disk = sqlite_path(url) is not None
    engine = sa.create_engine(url, connect_args={"timeout": BUSY_TIMEOUT_S})

    @event.listens_for(engine, "connect")
    def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite's implicit
        # transactions do not cover DDL and cannot say IMMEDIATE).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_S * 1000)}")
            if on_disk:
                _retry_sqlite(lambda: cur.execute("PRAGMA journal_mode = WAL"))
                cur.execute("PRAGMA synchronous = NORMAL")  # durable enough with WAL
        finally:
            cur.close()

    @event.listens_for(engine, "begin")
    def _sqlite_begin(conn: sa.Connection) -> None:
        # Writers take the write lock up front (waiting up to busy_timeout) instead of
        # failing on a lock upgrade after a read.
        mode = conn.get_execution_options().get("kernmux_sqlite_begin", "DEFERRED")
        conn.exec_driver_sql(f"BEGIN {mode}")

    return engine


def _retry_sqlite(fn: Callable[[], T]) -> T:
    import sqlite3

    for attempt in range(LOCK_RETRIES):
        try:
            return fn()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or attempt == LOCK_RETRIES - 1:
                raise
            time.sleep(0.05 * (2**attempt) * (1 + random.random()))
    raise AssertionError("unreachable")


@functools.lru_cache(maxsize=1)
def _known_revisions() -> tuple[str, ...]:
    return tuple(migrations.known_revisions())


def _hide_password(url: str) -> str:
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except (exc.ArgumentError, ValueError):
        return url


# --------------------------------------------------------------------------- store


class TuningStore:
    """The tuning database at ``url`` (None: ``KERNMUX_DB`` or the default SQLite file).

    create: create the schema when the database is new (and the SQLite file's
        directory); with False a missing SQLite file raises TuningDBError.
    check: raise SchemaMismatchError when the schema is older/newer than the code
        (``False`` only for ``kernmux db upgrade``/``show``, which report it).
    Close with :meth:`close` (or use as a context manager). Not shareable across
    ``fork``: open one store per process.
    """

    def __init__(self, url: str | None = None, *, create: bool = True, check: bool = True):
        self.url = normalize_url(url) if url else default_url()
        self.display_url = _hide_password(self.url)
        path = sqlite_path(self.url)
        try:
            self.backend = sa.engine.make_url(self.url).get_backend_name()
        except (exc.ArgumentError, ValueError) as e:
            raise TuningDBError(f"not a database URL or path: {self.display_url!r}: {e}") from e
        if path is not None:
            if create:
                path.parent.mkdir(parents=True, exist_ok=True)
            elif not path.exists():
                raise TuningDBError(f"no tuning database at {path} (create one with `kernmux db upgrade --db {self.url}`)")
        try:
            self.engine = _make_engine(self.url)
        except (exc.ArgumentError, ValueError, ImportError) as e:
            raise TuningDBError(f"cannot open tuning database {self.display_url}: {e}") from e
        # Same pool; SQLite transactions from this one begin IMMEDIATE (writers).
        self._write_engine = self.engine.execution_options(kernmux_sqlite_begin="IMMEDIATE")
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        self._writer = sessionmaker(self._write_engine, expire_on_commit=False)
        # True when this call created the schema (``kernmux db upgrade`` reports it).
        self.created = False
        try:
            status = self.opened_status = self.schema_status()
            if status == "empty" and create:
                self._create_schema()
                self.created = True
                self.opened_status = "current"
            elif check and status in ("older", "newer"):
                raise self._mismatch(status)
        except BaseException:
            self.engine.dispose()
            raise

    # -- lifecycle -------------------------------------------------------------------

    def close(self) -> None:
        self.engine.dispose()

    def __enter__(self) -> TuningStore:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"TuningStore({self.display_url!r})"

    # -- sessions --------------------------------------------------------------------

    @contextlib.contextmanager
    def session_scope(self, *, write: bool = False) -> Iterator[Session]:
        """A session that commits on success and rolls back on any exception.

        SQLAlchemy errors are re-raised as :class:`TuningDBError` ``from`` the original;
        other exceptions propagate unchanged after the rollback. ``write=True`` takes
        SQLite's write lock at BEGIN (use it for sessions that insert)."""
        session = (self._writer if write else self._reader)()
        try:
            yield session
            session.commit()
        except exc.SQLAlchemyError as e:
            session.rollback()
            raise TuningDBError(f"tuning database {self.display_url}: {type(e).__name__}: {e}") from e
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def _retry(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` again (with backoff) while SQLite answers "database is locked" at once.

        The busy timeout already waits for a lock that is held; what reaches here fast
        is SQLite's immediate SQLITE_BUSY (a stale read snapshot, WAL recovery). An
        attempt that waited out the whole busy timeout is not retried: that lock is
        held by something that is not letting go."""
        delay = 0.05
        for attempt in range(LOCK_RETRIES):
            start = time.monotonic()
            try:
                return fn()
            except TuningDBError as e:
                waited_out = time.monotonic() - start >= 0.9 * BUSY_TIMEOUT_S
                if attempt == LOCK_RETRIES - 1 or waited_out or not _is_lock_error(e.__cause__):
                    raise
                log.debug("kernmux: tuning database locked, retry %d", attempt + 1)
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 2.0)
        raise AssertionError("unreachable")

    # -- schema ----------------------------------------------------------------------

    def revision(self) -> str | None:
        """The schema revision stamped in the database (None when unversioned/empty)."""
        try:
            with self.engine.connect() as conn:
                return migrations.current_revision(conn)
        except (exc.SQLAlchemyError, RuntimeError) as e:  # RuntimeError: a damaged version table
            raise TuningDBError(f"tuning database {self.display_url}: {type(e).__name__}: {e}") from e

    @staticmethod
    def head_revision() -> str:
        return _known_revisions()[-1]

    def schema_status(self) -> str:
        """"current", "older" (run ``kernmux db upgrade``), "newer" (upgrade kernmux) or
        "empty" (no kernmux tables yet)."""
        try:
            with self.engine.connect() as conn:
                current = migrations.current_revision(conn)
                has_table = current is not None or sa.inspect(conn).has_table(Trial.__tablename__)
        except (exc.SQLAlchemyError, RuntimeError) as e:  # RuntimeError: a damaged version table
            raise TuningDBError(f"tuning database {self.display_url}: {type(e).__name__}: {e}") from e
        known = _known_revisions()
        if current is None:
            return "older" if has_table else "empty"
        if current == known[-1]:
            return "current"
        return "older" if current in known else "newer"

    def _mismatch(self, status: str) -> SchemaMismatchError:
        return SchemaMismatchError(self.display_url, self.revision(), self.head_revision(), status)

    def _migrate(self, revision: str) -> None:
        def run() -> None:
            try:
                with self._write_engine.connect() as conn:
                    migrations.upgrade(conn, revision)
                    conn.commit()
            except exc.SQLAlchemyError as e:
                raise TuningDBError(f"tuning database {self.display_url}: migration failed: {e}") from e

        self._retry(run)

    def _create_schema(self) -> None:
        try:
            self._migrate("head")
        except TuningDBError:
            # Another process may have created it between our check and our DDL.
            if self.schema_status() != "current":
                raise

    def upgrade(self, revision: str = "head") -> None:
        """Migrate the schema to ``revision`` (alembic; kernmux tables only)."""
        if self.schema_status() == "newer":
            raise self._mismatch("newer")
        self._migrate(revision)

    # -- writing ---------------------------------------------------------------------

    def record(self, trial: TrialRecord) -> int:
        """Validate and insert one trial; returns its row id."""
        return self.record_many([trial])[0]

    def record_many(self, trials: Sequence[TrialRecord]) -> list[int]:
        """Validate every trial first, then insert them in one transaction; row ids."""
        values = [_values(normalize_record(t)) for t in trials]

        def write() -> list[int]:
            with self.session_scope(write=True) as session:
                rows = [Trial(**v) for v in values]
                session.add_all(rows)
                session.flush()
                return [r.id for r in rows]

        return self._retry(write)

    # -- reading ---------------------------------------------------------------------

    def rows(
        self,
        *,
        op: str | None = None,
        status: str | Sequence[str] | None = None,
        kernel: str | None = None,
        fingerprint: str | None = None,
        study: str | None = None,
        bucket: Mapping[str, Any] | None = None,
        limit: int | None = None,
    ) -> list[TrialRow]:
        """Stored rows matching every given filter, oldest first (``limit``: newest N)."""
        query = sa.select(Trial)
        if op is not None:
            query = query.where(Trial.op == op)
        if status is not None:
            statuses = [status] if isinstance(status, str) else list(status)
            query = query.where(Trial.status.in_(statuses))
        if kernel is not None:
            query = query.where(Trial.kernel == kernel)
        if fingerprint is not None:
            query = query.where(Trial.fingerprint == fingerprint)
        if study is not None:
            query = query.where(Trial.study == study)
        if bucket is not None:
            query = query.where(Trial.bucket_key == bucket_key(bucket))
        if limit is not None:
            query = query.order_by(Trial.id.desc()).limit(limit)
        else:
            query = query.order_by(Trial.id)
        with self.session_scope() as session:
            found = [_row_from_orm(t) for t in session.scalars(query)]
        return sorted(found, key=lambda r: r.id)

    def count(self) -> int:
        with self.session_scope() as session:
            return int(session.scalar(sa.select(sa.func.count(Trial.id))) or 0)

    def change_stamp(self) -> tuple[int, int]:
        """(row count, max id): changes whenever a row is added (rows are never updated)."""
        with self.session_scope() as session:
            n, top = session.execute(sa.select(sa.func.count(Trial.id), sa.func.max(Trial.id))).one()
        return int(n or 0), int(top or 0)

    def best(
        self,
        op: str,
        bucket: Mapping[str, Any],
        platform: Platform,
        kernels: Sequence[str] | None = None,
    ) -> tuple[TrialRow | None, list[str]]:
        """Fastest usable ok row for (platform fingerprint, op, bucket); see :func:`choose_best`."""
        rows = self.rows(op=op, bucket=bucket)
        row, notes = choose_best(rows, platform, kernels)
        return row, notes  # type: ignore[return-value]

    def summary(self) -> dict[str, Any]:
        """Counts for ``kernmux db show``: per (op, kernel, status) and per fingerprint."""
        with self.session_scope() as session:
            per_kernel = session.execute(
                sa.select(Trial.op, Trial.kernel, Trial.status, sa.func.count(Trial.id))
                .group_by(Trial.op, Trial.kernel, Trial.status)
                .order_by(Trial.op, Trial.kernel, Trial.status)
            ).all()
            per_fp = session.execute(
                sa.select(Trial.fingerprint, sa.func.count(Trial.id), sa.func.max(Trial.created_at))
                .group_by(Trial.fingerprint)
                .order_by(Trial.fingerprint)
            ).all()
            studies = session.execute(
                sa.select(Trial.study, sa.func.count(Trial.id))
                .where(Trial.study.is_not(None))
                .group_by(Trial.study)
                .order_by(Trial.study)
            ).all()
        return {
            "rows": sum(n for *_, n in per_kernel),
            "by_kernel": [
                {"op": op, "kernel": k, "status": s, "rows": n} for op, k, s, n in per_kernel
            ],
            "by_fingerprint": [
                {"fingerprint": fp, "rows": n, "latest": last.isoformat() if last else None}
                for fp, n, last in per_fp
            ],
            "studies": [{"study": s, "rows": n} for s, n in studies],
        }
