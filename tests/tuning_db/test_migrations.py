"""Alembic migrations: upgrading a database created by the first schema, mismatch
messages, models == migrations, and coexistence with optuna's tables."""

from __future__ import annotations

import datetime as dt

import pytest
import sqlalchemy as sa

from kernmux.tuning_db.storage import migrations
from kernmux.tuning_db.storage.errors import SchemaMismatchError
from kernmux.tuning_db.storage.models import Base, is_kernmux_table
from kernmux.tuning_db.storage.records import content_hash
from kernmux.tuning_db.storage.source import open_source
from kernmux.tuning_db.storage.store import TuningStore

FIRST = "0001_initial"


def _engine(url: str) -> sa.Engine:
    return sa.create_engine(url)


def _create_at(url: str, revision: str) -> None:
    engine = _engine(url)
    try:
        with engine.connect() as conn:
            migrations.upgrade(conn, revision)
            conn.commit()
    finally:
        engine.dispose()


def _insert_first_schema_row(url: str) -> dict:
    """A row as kernmux at revision 0001 wrote it (no ``host`` column yet)."""
    values = dict(
        fingerprint="cuda:sm_90:abc", platform={"vendor": "cuda", "arch": "sm_90", "device": "H100", "units": 132},
        op="moe_topk_softmax", bucket={"tokens": 16}, bucket_key='{"tokens":16}', features={"tokens": 13},
        kernel="triton", config={"BLOCK": 64}, status="ok", p50_us=12.5, p20_us=12.0, p80_us=13.0, reps=50,
        metrics={"max_abs_err": 0.0}, error=None, libs={"torch": "2.9.0", "triton": "3.5.0"},
        study="old-study", trial_number=3, created_at=dt.datetime(2026, 1, 2, 3, 4, 5, 678901),
    )
    from kernmux.tuning_db.storage.records import TrialRecord

    record = TrialRecord(**{k: v for k, v in values.items() if k != "bucket_key"})
    values["content_hash"] = content_hash(record)
    engine = _engine(url)
    try:
        table = sa.Table("kernmux_trials", sa.MetaData(), autoload_with=engine)
        assert "host" not in table.c  # really the first schema
        with engine.begin() as conn:
            conn.execute(table.insert().values(**values))
    finally:
        engine.dispose()
    return values


def test_upgrade_database_created_by_first_schema(store_url):
    _create_at(store_url, FIRST)
    values = _insert_first_schema_row(store_url)

    with pytest.raises(SchemaMismatchError) as info:
        TuningStore(store_url)
    message = str(info.value)
    assert FIRST in message and TuningStore.head_revision() in message
    assert "kernmux db upgrade --db" in message
    with pytest.raises(SchemaMismatchError):
        open_source(store_url)

    with TuningStore(store_url, check=False) as store:
        assert store.schema_status() == "older"
        assert store.revision() == FIRST
        store.upgrade()
        assert store.schema_status() == "current"
        [row] = store.rows()
        assert row.host is None
        assert (row.kernel, row.config, row.p50_us, row.study, row.trial_number) == ("triton", {"BLOCK": 64}, 12.5, "old-study", 3)
        assert row.created_at == values["created_at"].replace(tzinfo=dt.timezone.utc)
        # The identity hash written by the first schema still describes the row.
        assert row.content_hash == values["content_hash"] == content_hash(row)
        inspector = sa.inspect(store.engine)
        assert "ix_kernmux_trials_study" in {ix["name"] for ix in inspector.get_indexes("kernmux_trials")}


@pytest.mark.parametrize("earlier", migrations.known_revisions()[:-1])
def test_every_earlier_schema_upgrades_to_head(store_url, earlier):
    """A database made by any earlier kernmux, holding a row, upgrades to head: its row is
    kept and every later table exists (0003: the measured ceilings)."""
    _create_at(store_url, earlier)
    values = _insert_row_as_written_at(store_url, earlier)
    with TuningStore(store_url, check=False) as store:
        assert store.revision() == earlier and store.schema_status() == "older"
        store.upgrade()
        assert store.schema_status() == "current" and store.revision() == migrations.head_revision()
        assert {"kernmux_trials", "kernmux_ceilings"} <= set(sa.inspect(store.engine).get_table_names())
        [row] = store.rows()
        assert row.content_hash == values["content_hash"] == content_hash(row)
        assert row.host == values.get("host")
        from kernmux.tuning_db.storage.ceiling_store import CeilingRecord, latest_ceilings, record_ceilings

        record_ceilings(store, CeilingRecord(fingerprint="cuda:sm_90:abc", device="H200", bandwidth_tbs=4.27, tflops=797.0))
        assert latest_ceilings(store, "cuda:sm_90:abc").tflops == 797.0


def _insert_row_as_written_at(url: str, revision: str) -> dict:
    if revision == FIRST:
        return _insert_first_schema_row(url)
    # From 0002 on, rows carry the measuring host (not part of the identity hash).
    values = dict(
        fingerprint="cuda:sm_90:abc", platform={"vendor": "cuda"}, op="moe_topk_softmax", bucket={"tokens": 16},
        bucket_key='{"tokens":16}', features={"tokens": 13}, kernel="torch", config={}, status="ok", p50_us=20.0,
        p20_us=19.0, p80_us=21.0, reps=10, metrics={}, error=None, libs={"torch": "2.9.0"}, study=None,
        trial_number=None, created_at=dt.datetime(2026, 6, 1, 12, 0, 0), host="old-host",
    )
    from kernmux.tuning_db.storage.records import TrialRecord

    values["content_hash"] = content_hash(TrialRecord(**{k: v for k, v in values.items() if k != "bucket_key"}))
    engine = _engine(url)
    try:
        table = sa.Table("kernmux_trials", sa.MetaData(), autoload_with=engine)
        with engine.begin() as conn:
            conn.execute(table.insert().values(**values))
    finally:
        engine.dispose()
    return values


def test_downgrade_then_upgrade_keeps_rows_and_constraints(store_url, make_trial):
    with TuningStore(store_url) as store:
        store.record(make_trial(host="worker-1"))
    engine = _engine(store_url)
    try:
        with engine.connect() as conn:
            from alembic import command

            command.downgrade(migrations.alembic_config(conn), FIRST)
            conn.commit()
    finally:
        engine.dispose()
    with TuningStore(store_url, check=False) as store:
        assert store.revision() == FIRST
        store.upgrade()
        [row] = store.rows()
        assert row.host is None  # the column was dropped and re-added
        with pytest.raises(Exception, match="IntegrityError|CHECK|check"):
            with store.session_scope(write=True) as session:
                session.execute(sa.text("UPDATE kernmux_trials SET status = 'bogus'"))


def test_newer_database_is_refused_with_a_clear_message(store_url):
    TuningStore(store_url).close()
    engine = _engine(store_url)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE kernmux_alembic_version SET version_num = '0099_from_the_future'"))
    engine.dispose()
    with pytest.raises(SchemaMismatchError, match="newer than this kernmux") as info:
        TuningStore(store_url)
    assert "0099_from_the_future" in str(info.value) and TuningStore.head_revision() in str(info.value)
    with TuningStore(store_url, check=False) as store:
        assert store.schema_status() == "newer"
        with pytest.raises(SchemaMismatchError):
            store.upgrade()


def test_models_describe_the_head_revision(store_url):
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext

    TuningStore(store_url).close()
    engine = _engine(store_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(
                conn,
                opts={
                    "compare_type": True,
                    "include_object": lambda obj, name, type_, reflected, compare_to: (
                        is_kernmux_table(name) if type_ == "table" else True
                    ),
                },
            )
            diffs = compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()
    assert diffs == []


def test_optuna_tables_are_left_alone(store_url):
    optuna = pytest.importorskip("optuna")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = optuna.storages.RDBStorage(store_url)
    study = optuna.create_study(study_name="shared", storage=storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)

    with TuningStore(store_url) as store:  # kernmux schema created beside optuna's
        assert store.schema_status() == "current"
        store.upgrade()
    engine = _engine(store_url)
    try:
        tables = set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()
    assert {"kernmux_trials", "kernmux_alembic_version", "studies", "trials", "alembic_version"} <= tables
    again = optuna.load_study(study_name="shared", storage=optuna.storages.RDBStorage(store_url))
    assert len(again.trials) == 2


def test_revision_ids_are_file_names_in_chain_order():
    # The store reads revisions from file names (without importing alembic): hold
    # alembic's own view of the chain to that.
    assert migrations.known_revisions() == migrations.alembic_revisions()
    assert migrations.known_revisions()[0] == FIRST
    assert TuningStore.head_revision() == migrations.known_revisions()[-1]
