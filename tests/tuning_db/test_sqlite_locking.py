"""SQLite specifics: default location, waiting on a held write lock, retrying "locked"."""

from __future__ import annotations

import pathlib
import sqlite3
import threading
import time

import pytest
import sqlalchemy as sa

from kernmux.tuning_db.storage.errors import TuningDBError
from kernmux.tuning_db.storage.paths import default_db_path, default_url, normalize_url, sqlite_path
from kernmux.tuning_db.storage.store import TuningStore


def test_default_location_is_the_user_cache(monkeypatch):
    monkeypatch.delenv("KERNMUX_DB", raising=False)
    path = default_db_path()
    assert path.parts[-2:] == ("kernmux", "tuning.sqlite")
    assert default_url() == f"sqlite:///{path}"
    assert sqlite_path(default_url()) == path


@pytest.mark.parametrize(
    "value, expected",
    [
        ("postgresql+psycopg://u@h:5432/db", "postgresql+psycopg://u@h:5432/db"),
        ("sqlite:////abs/x.sqlite", "sqlite:////abs/x.sqlite"),
        ("/abs/y.sqlite", "sqlite:////abs/y.sqlite"),
    ],
)
def test_kernmux_db_accepts_urls_and_paths(monkeypatch, value, expected):
    monkeypatch.setenv("KERNMUX_DB", value)
    assert default_url() == expected == normalize_url(value)


def test_relative_path_becomes_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert normalize_url("rel.sqlite") == f"sqlite:///{pathlib.Path(tmp_path).resolve() / 'rel.sqlite'}"
    assert sqlite_path("sqlite://") is None and sqlite_path("sqlite:///:memory:") is None


def test_record_waits_for_a_held_write_lock(sqlite_url, make_trial):
    with TuningStore(sqlite_url) as store:
        holder = sqlite3.connect(sqlite_path(sqlite_url), isolation_level=None, check_same_thread=False)
        holder.execute("BEGIN IMMEDIATE")  # another writer holds the lock...
        release = threading.Timer(0.5, holder.execute, args=("COMMIT",))
        release.start()
        start = time.monotonic()
        store.record(make_trial())  # ...and this insert waits for it instead of failing
        waited = time.monotonic() - start
        release.join()
        holder.close()
        assert store.count() == 1
        assert waited >= 0.3


def test_lock_errors_are_retried_and_others_are_not(sqlite_url):
    with TuningStore(sqlite_url) as store:
        calls = []

        def locked_twice():
            calls.append(1)
            if len(calls) <= 2:
                cause = sa.exc.OperationalError("INSERT", {}, sqlite3.OperationalError("database is locked"))
                raise TuningDBError("locked") from cause
            return "done"

        assert store._retry(locked_twice) == "done" and len(calls) == 3

        def broken():
            calls.append(1)
            cause = sa.exc.OperationalError("INSERT", {}, sqlite3.OperationalError("disk I/O error"))
            raise TuningDBError("io") from cause

        calls.clear()
        with pytest.raises(TuningDBError, match="io"):
            store._retry(broken)
        assert len(calls) == 1


def test_a_lock_held_past_the_busy_timeout_is_a_typed_error(sqlite_url, make_trial, monkeypatch):
    from kernmux.tuning_db.storage import engine as engine_module

    TuningStore(sqlite_url).close()
    monkeypatch.setattr(engine_module, "BUSY_TIMEOUT_S", 0.3)
    with TuningStore(sqlite_url) as store:
        holder = sqlite3.connect(sqlite_path(sqlite_url), isolation_level=None)
        holder.execute("BEGIN IMMEDIATE")
        try:
            start = time.monotonic()
            with pytest.raises(TuningDBError, match="database is locked") as info:
                store.record(make_trial())
            assert isinstance(info.value.__cause__, sa.exc.OperationalError)
            assert time.monotonic() - start < 5  # waited out once, not retried
        finally:
            holder.execute("ROLLBACK")
            holder.close()
        assert store.count() == 0
