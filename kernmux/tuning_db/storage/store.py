"""The tuning store: every trial is an inserted row; "best" is a query.

Contract (shared by the tuner, the resolver hook, export/import and the CLI):

* :class:`~kernmux.tuning_db.storage.records.TrialRecord` is one measured or failed
  trial. :meth:`TuningStore.record` validates it, stamps ``created_at`` (UTC) and
  ``host`` when missing, and inserts it. Nothing is ever updated; rows are deleted in
  one place only, :meth:`TuningStore.delete_rows`, on a user's explicit request
  (``kernmux db prune``, :mod:`kernmux.tuning_db.storage.prune`).
* Every storage failure raises :class:`TuningDBError` ``from`` the driver error;
  a database whose schema is older or newer than this code raises
  :class:`SchemaMismatchError` naming both revisions and the command to run.
  An invalid record raises :class:`InvalidTrialError` (a ``ValueError``).
* :meth:`TuningStore.best` returns the fastest ``ok`` row for (platform fingerprint,
  op, bucket) whose recorded library versions equal the platform's, excluding any
  (kernel, config) that failed in another trial of the same bucket, plus notes on what
  was ignored (:func:`~kernmux.tuning_db.storage.selection.choose_best`, the same rule
  the resolver applies to rows in memory).

* Read-only: ``TuningStore(url, read_only=True)`` never writes (no schema creation, no
  journal-mode switch; a write raises :class:`TuningDBError` saying so). Reading
  commands and the runtime open stores this way, so a database shipped on a read-only
  mount works. :attr:`TuningStore.read_only_reason` says why a database cannot be
  written ("" when it can, as far as the file system tells).
* Writers that must not lose a row (the tuner) pass ``reconnect_window_s``: a lost
  PostgreSQL connection is retried that long, then reported with the driver's words.

Backends: SQLite (default; WAL, busy timeout, ``BEGIN IMMEDIATE`` for writes and
retries on "database is locked", :mod:`.engine`) and PostgreSQL (``postgresql+psycopg://``).

Length (~450 lines): one class, the store; record validation, selection and engine set-up
live in their own modules (records, selection, engine), what remains is its query methods.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.orm import Session, sessionmaker

from kernmux.dispatch.platform import Platform
from kernmux.tuning_db.storage import access
from kernmux.tuning_db.storage import engine as engine_setup
from kernmux.tuning_db.storage import migrations
from kernmux.tuning_db.storage.errors import SchemaMismatchError, TuningDBError
from kernmux.tuning_db.storage.models import Trial
from kernmux.tuning_db.storage.paths import default_url, normalize_url, sqlite_path
from kernmux.tuning_db.storage.records import (
    RECORD_FIELDS,
    TrialRecord,
    TrialRow,
    bucket_key,
    normalize_record,
    stored_values,
)
from kernmux.tuning_db.storage.retry import is_connection_error, retry, root_cause
from kernmux.tuning_db.storage.selection import choose_best

T = TypeVar("T")


def _row_from_orm(t: Trial) -> TrialRow:
    return TrialRow(id=t.id, content_hash=t.content_hash, **{f: getattr(t, f) for f in RECORD_FIELDS})


def _locked(error: BaseException) -> bool:
    return isinstance(error, TuningDBError) and engine_setup.is_lock_error(error.__cause__)


def _error_text(error: BaseException) -> str:
    """A SQLAlchemy error as one line: its class and the driver's message (without the
    statement and SQLAlchemy's "background" link)."""
    orig = getattr(error, "orig", None)
    text = str(orig if orig is not None else error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


@functools.lru_cache(maxsize=1)
def _known_revisions() -> tuple[str, ...]:
    return tuple(migrations.known_revisions())


class TuningStore:
    """The tuning database at ``url`` (None: ``KERNMUX_DB`` or the default SQLite file).

    create: create the schema when the database is new (and the SQLite file's
        directory); with False a missing SQLite file raises TuningDBError.
    check: raise SchemaMismatchError when the schema is older/newer than the code
        (``False`` only for ``kernmux db upgrade``/``show``, which report it).
    Close with :meth:`close` (or use as a context manager). Not shareable across
    ``fork``: open one store per process.
    """

    def __init__(
        self,
        url: str | None = None,
        *,
        create: bool = True,
        check: bool = True,
        read_only: bool = False,
        reconnect_window_s: float = 0.0,
    ):
        self.url = normalize_url(url) if url else default_url()
        self.display_url = engine_setup.hide_password(self.url)
        try:
            self.backend = sa.engine.make_url(self.url).get_backend_name()
        except (exc.ArgumentError, ValueError) as e:
            raise TuningDBError(f"not a database URL or path: {self.display_url!r}: {e}") from e
        self._access = access.decide(self.url, create=create, read_only=read_only)
        self.reconnect_window_s = reconnect_window_s
        try:
            self.engine = engine_setup.make_engine(self.url, read_only=self.read_only,
                                                   immutable=self._access.immutable)
        except (exc.ArgumentError, ValueError, ImportError) as e:
            raise TuningDBError(f"cannot open tuning database {self.display_url}: {e}") from e
        # Same pool; SQLite transactions from this one begin IMMEDIATE (writers).
        self._write_engine = self.engine.execution_options(kernmux_sqlite_begin="IMMEDIATE")
        self._reader = sessionmaker(self.engine, expire_on_commit=False)
        self._writer = sessionmaker(self._write_engine, expire_on_commit=False)
        # True when this call created the schema (``kernmux db upgrade`` reports it).
        self.created = False
        try:
            status = self.opened_status = self._retry(self.schema_status)
            if status == "empty" and create and not self.read_only:
                self._create_schema()
                self.created = True
                self.opened_status = "current"
            elif check and status in ("older", "newer"):
                raise self._mismatch(status)
        except BaseException:
            self.engine.dispose()
            raise

    @property
    def read_only(self) -> bool:
        """True when this store never writes (asked for, or the URL says so)."""
        return self._access.read_only

    @property
    def read_only_reason(self) -> str:
        """Why the database cannot be written ("" when it can, as far as we can tell)."""
        return self._access.reason

    @property
    def access(self) -> str:
        """"read-write", "read-only" or "immutable" (SQLite ``immutable=1``)."""
        return self._access.mode

    def access_note(self) -> str:
        """One line for ``db show`` and explain: can the database be written, and how it
        was opened."""
        return self._access.note()

    def check_writable(self) -> None:
        """Raise :class:`TuningDBError` now if this store cannot be written (before a
        command does any work that would be lost)."""
        self._refuse_write()

    def _refuse_write(self) -> None:
        if self.read_only:
            why = f" ({self.read_only_reason})" if self.read_only_reason else ""
            raise TuningDBError(
                f"tuning database {self.display_url} is opened read-only{why}; it cannot be written"
            )

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
        SQLite's write lock at BEGIN (use it for sessions that insert); on a read-only
        store it raises :class:`TuningDBError` at once."""
        if write:
            self._refuse_write()
        session = (self._writer if write else self._reader)()
        try:
            yield session
            session.commit()
        except exc.SQLAlchemyError as e:
            with contextlib.suppress(exc.SQLAlchemyError):  # a dead connection cannot roll back
                session.rollback()
            if is_connection_error(e):
                raise TuningDBError(f"tuning database {self.display_url} unreachable: {root_cause(e)}") from e
            raise TuningDBError(f"tuning database {self.display_url}: {_error_text(e)}") from e
        except BaseException:
            with contextlib.suppress(exc.SQLAlchemyError):
                session.rollback()
            raise
        finally:
            with contextlib.suppress(exc.SQLAlchemyError):
                session.close()

    def _retry(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` again (with backoff) while SQLite answers "database is locked" at once,
        and, with ``reconnect_window_s``, while the database server cannot be reached.

        The busy timeout already waits for a lock that is held; what reaches here fast
        is SQLite's immediate SQLITE_BUSY (a stale read snapshot, WAL recovery). An
        attempt that waited out the whole busy timeout is not retried: that lock is
        held by something that is not letting go."""
        window = self.reconnect_window_s

        def transient(error: BaseException) -> bool:
            return _locked(error) or (window > 0 and isinstance(error, TuningDBError) and is_connection_error(error))

        try:
            return retry(fn, transient=transient, give_up_after_s=0.9 * engine_setup.BUSY_TIMEOUT_S,
                         window_s=window or None, what=f"tuning database {self.display_url}")
        except TuningDBError as e:
            if window > 0 and is_connection_error(e):
                raise TuningDBError(
                    f"tuning database {self.display_url} unreachable for {window:g} s: {root_cause(e)}"
                ) from e
            raise

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
        self._refuse_write()

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

    def damage(self) -> str:
        """"" when SQLite's ``PRAGMA quick_check`` finds the file sound (and for other
        backends), else its first findings: a file with corrupted pages must not be
        written into (a tune would add rows to a database that is already lost)."""
        if self.backend != "sqlite" or sqlite_path(self.url) is None:
            return ""
        try:
            with self.engine.connect() as conn:
                found = [str(r[0]) for r in conn.exec_driver_sql("PRAGMA quick_check(5)")]
        except exc.SQLAlchemyError as e:
            return f"{type(e).__name__}: {e}"
        return "" if found == ["ok"] else "; ".join(found)

    # -- writing ---------------------------------------------------------------------

    def record(self, trial: TrialRecord) -> int:
        """Validate and insert one trial; returns its row id."""
        return self.record_many([trial])[0]

    def record_many(self, trials: Sequence[TrialRecord]) -> list[int]:
        """Validate every trial first, then insert them in one transaction; row ids.

        Storing a row whose content is already stored raises :class:`TuningDBError`,
        except on a retry: after a connection lost during the commit, the row that
        commit stored is found by its content hash instead of being added twice."""
        self._refuse_write()
        values = [stored_values(normalize_record(t)) for t in trials]
        hashes = [v["content_hash"] for v in values]
        attempts = 0

        def write() -> list[int]:
            nonlocal attempts
            attempts += 1
            with self.session_scope(write=True) as session:
                present: dict[str, int] = {}
                if attempts > 1:
                    present = dict(session.execute(
                        sa.select(Trial.content_hash, Trial.id).where(Trial.content_hash.in_(hashes))
                    ).all())
                rows = [Trial(**v) for v in values if v["content_hash"] not in present]
                session.add_all(rows)
                session.flush()
                present.update((r.content_hash, r.id) for r in rows)
                return [present[h] for h in hashes]

        return self._retry(write)

    def delete_rows(self, ids: Sequence[int]) -> int:
        """Delete the rows with these ids in one transaction; how many were deleted.

        The only deletion in kernmux: called by ``kernmux db prune`` (see
        :mod:`kernmux.tuning_db.storage.prune`), never by tuning or dispatch."""
        wanted = sorted(set(int(i) for i in ids))

        def delete() -> int:
            deleted = 0
            with self.session_scope(write=True) as session:
                for start in range(0, len(wanted), 500):  # bounded IN lists
                    chunk = wanted[start:start + 500]
                    result = session.execute(sa.delete(Trial).where(Trial.id.in_(chunk)))
                    deleted += int(result.rowcount or 0)
            return deleted

        return self._retry(delete) if wanted else 0

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
        trial_number: int | None = None,
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
        if trial_number is not None:
            query = query.where(Trial.trial_number == trial_number)
        if limit is not None:
            query = query.order_by(Trial.id.desc()).limit(limit)
        else:
            query = query.order_by(Trial.id)
        def read() -> list[TrialRow]:
            with self.session_scope() as session:
                return [_row_from_orm(t) for t in session.scalars(query)]

        return sorted(self._retry(read), key=lambda r: r.id)

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
