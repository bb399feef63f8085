"""SQLAlchemy engine set-up for the tuning database.

SQLite (the default): a busy timeout so writers wait for each other, WAL so readers
never block the writer, ``BEGIN IMMEDIATE`` for write sessions (the write lock is
taken up front instead of failing on a lock upgrade after a read). PostgreSQL:
``pool_pre_ping`` so a connection dropped by the server is replaced, not reported.

Read-only engines (reading commands, the runtime, a database on a read-only mount):
SQLite opens the file with ``mode=ro`` and never switches its journal mode; where even
that needs a write (a WAL database in a directory that cannot hold its ``-shm`` file)
:func:`kernmux.tuning_db.storage.access.sqlite_read_mode` picks ``immutable=1``. PostgreSQL sessions are read-only
transactions (``postgresql_readonly``), so a stray write fails instead of landing.
"""

from __future__ import annotations

import sqlite3
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event, exc

from kernmux.tuning_db.storage.access import sqlite_uri
from kernmux.tuning_db.storage.paths import sqlite_path
from kernmux.tuning_db.storage.retry import retry

# How long SQLite waits for another writer's lock (read at engine creation and by the
# store's retry, so a test can shorten it).
BUSY_TIMEOUT_S = 30.0


def is_lock_error(error: BaseException | None) -> bool:
    """True for SQLAlchemy's wrapping of SQLite's "database is locked/busy"."""
    if not isinstance(error, exc.OperationalError):
        return False
    text = str(error.orig if error.orig is not None else error).lower()
    return "database is locked" in text or "database is busy" in text or "database table is locked" in text


def _sqlite_locked(error: BaseException) -> bool:
    return isinstance(error, sqlite3.OperationalError) and "locked" in str(error)


def make_engine(url: str, *, read_only: bool = False, immutable: bool = False) -> sa.Engine:
    """An engine for ``url`` configured for several concurrent writers (see above), or
    for reading only (``read_only``; SQLite files: ``immutable`` adds ``immutable=1``)."""
    backend = sa.engine.make_url(url).get_backend_name()
    if backend != "sqlite":
        if read_only:
            return sa.create_engine(url, pool_pre_ping=True, execution_options={"postgresql_readonly": True})
        return sa.create_engine(url, pool_pre_ping=True)
    path = sqlite_path(url)
    on_disk = path is not None
    busy_timeout_s = BUSY_TIMEOUT_S
    if read_only and path is not None:
        options = {"mode": "ro", **({"immutable": "1"} if immutable else {})}
        uri = sqlite_uri(path, **options)
        engine = sa.create_engine(
            f"sqlite:///{path}",
            creator=lambda: sqlite3.connect(uri, uri=True, timeout=busy_timeout_s, check_same_thread=False),
        )
    else:
        engine = sa.create_engine(url, connect_args={"timeout": busy_timeout_s})

    @event.listens_for(engine, "connect")
    def _sqlite_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy's "begin" event emit BEGIN itself (pysqlite's implicit
        # transactions do not cover DDL and cannot say IMMEDIATE).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        try:
            cur.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
            if on_disk and not read_only:
                retry(lambda: cur.execute("PRAGMA journal_mode = WAL"), transient=_sqlite_locked,
                      what="switching SQLite to WAL")
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


def hide_password(url: str) -> str:
    """``url`` with its password masked (for messages and explain)."""
    try:
        return sa.engine.make_url(url).render_as_string(hide_password=True)
    except (exc.ArgumentError, ValueError):
        return url
