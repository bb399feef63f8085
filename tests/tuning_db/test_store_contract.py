"""The tuning-store contract, run against SQLite and a real PostgreSQL (``store_url``).

Written after optuna's ``testing/pytest_storages.py``: one class, every backend.
"""

from __future__ import annotations

import datetime as dt
import math

import pytest
import sqlalchemy as sa

from kernmux.tuning_db.storage.errors import InvalidTrialError, SchemaMismatchError, TuningDBError
from kernmux.tuning_db.storage.models import Trial
from kernmux.tuning_db.storage.records import TrialRecord, bucket_key, content_hash, relevant_libs
from kernmux.tuning_db.storage.selection import choose_best
from kernmux.tuning_db.storage.store import TuningStore


class TestTuningStoreContract:
    # -- schema and sessions ------------------------------------------------------------

    def test_new_database_is_created_at_head(self, store):
        assert store.schema_status() == "current"
        assert store.revision() == TuningStore.head_revision()
        assert store.count() == 0

    def test_reopening_keeps_rows(self, store, make_trial):
        store.record(make_trial())
        with TuningStore(store.url, create=False) as again:
            assert again.count() == 1
            assert again.schema_status() == "current"

    def test_session_rollback_raises_typed_error_and_keeps_nothing(self, store, make_trial):
        store.record(make_trial())
        ok_values = dict(
            content_hash="a" * 64, fingerprint="fp", platform={}, op="o", bucket={}, bucket_key="{}",
            features={}, kernel="k", config={}, status="ok", p50_us=1.0, metrics={}, libs={},
            created_at=dt.datetime.now(dt.timezone.utc),
        )
        with pytest.raises(TuningDBError) as info:
            with store.session_scope(write=True) as session:
                session.add(Trial(**ok_values))
                # Violates the status check constraint: the whole transaction must go.
                session.add(Trial(**{**ok_values, "content_hash": "b" * 64, "status": "bogus"}))
        assert isinstance(info.value.__cause__, sa.exc.IntegrityError)
        assert store.count() == 1

    def test_session_scope_rolls_back_on_non_db_error(self, store):
        values = dict(
            content_hash="c" * 64, fingerprint="fp", platform={}, op="o", bucket={}, bucket_key="{}",
            features={}, kernel="k", config={}, status="crashed", metrics={}, libs={},
            created_at=dt.datetime.now(dt.timezone.utc),
        )
        with pytest.raises(KeyError):
            with store.session_scope(write=True) as session:
                session.add(Trial(**values))
                session.flush()
                raise KeyError("caller bug")
        assert store.count() == 0

    # -- recording --------------------------------------------------------------------

    def test_record_round_trip(self, store, make_trial, platform):
        trial = make_trial(
            status="numerics_failed", p50_us=None, p20_us=None, p80_us=None, reps=None,
            metrics={"max_abs_err": float("nan"), "cos_min": -math.inf, "count": 3},
            error="max_abs_err=nan above tolerance", study="s1", trial_number=7,
        )
        row_id = store.record(trial)
        [row] = store.rows()
        assert row.id == row_id
        assert (row.op, row.kernel, row.status) == ("moe_topk_softmax", "triton", "numerics_failed")
        assert row.config == {"BLOCK": 64, "num_warps": 4}
        assert row.features == trial.features and row.bucket == trial.bucket
        assert row.metrics == {"max_abs_err": "nan", "cos_min": "-inf", "count": 3}
        assert row.fingerprint == platform.fingerprint()
        assert row.platform == {"vendor": "cuda", "arch": "sm_90", "device": "NVIDIA H100 80GB HBM3", "units": 132}
        assert row.libs == {"torch": "2.9.0", "triton": "3.5.0"}
        assert (row.study, row.trial_number) == ("s1", 7)
        assert row.created_at.tzinfo is not None
        assert abs((dt.datetime.now(dt.timezone.utc) - row.created_at).total_seconds()) < 60
        assert row.host
        assert row.content_hash == content_hash(row)

    def test_record_many_returns_ids_in_order(self, store, make_trial):
        ids = store.record_many([make_trial(p50_us=float(i + 1)) for i in range(5)])
        assert ids == sorted(ids) and len(set(ids)) == 5
        assert [r.p50_us for r in store.rows()] == [1.0, 2.0, 3.0, 4.0, 5.0]

    def test_nothing_is_overwritten(self, store, make_trial):
        first = store.record(make_trial(p50_us=10.0))
        second = store.record(make_trial(p50_us=10.0))
        third = store.record(make_trial(p50_us=7.0))
        assert len({first, second, third}) == 3
        assert [r.p50_us for r in store.rows()] == [10.0, 10.0, 7.0]

    def test_identical_trial_twice_is_refused_not_merged(self, store, make_trial):
        when = dt.datetime(2026, 5, 1, 12, 0, 0, 123456, tzinfo=dt.timezone.utc)
        store.record(make_trial(created_at=when))
        with pytest.raises(TuningDBError):
            store.record(make_trial(created_at=when))
        assert store.count() == 1

    @pytest.mark.parametrize(
        "overrides, field",
        [
            ({"status": "bogus"}, "status"),
            ({"p50_us": None}, "p50_us"),
            ({"p50_us": float("nan")}, "p50_us"),
            ({"p20_us": -1.0}, "p20_us"),
            ({"reps": 2.5}, "reps"),
            ({"config": {1: 2}}, "config"),
            ({"features": [1, 2]}, "features"),
            ({"bucket": {"tokens": float("inf")}}, "bucket"),
            ({"kernel": ""}, "kernel"),
            ({"libs": {"torch": 2}}, "libs.torch"),
        ],
    )
    def test_invalid_records_are_rejected_before_writing(self, store, make_trial, overrides, field):
        with pytest.raises(InvalidTrialError, match=field.replace(".", r"\.")):
            store.record(make_trial(**overrides))
        assert store.count() == 0

    def test_rows_filters(self, store, make_trial, platform):
        other = platform.with_overrides({"arch": "sm_100", "device": "B200"})
        store.record_many([
            make_trial(kernel="triton", study="a"),
            make_trial(kernel="torch", config={}, status="crashed", p50_us=None, error="SIGABRT"),
            make_trial(kernel="triton", bucket={"tokens": 32, "experts": 64, "topk": 2, "dtype": "bf16"}),
            make_trial(op="other_op", kernel="triton"),
            make_trial(kernel="triton", on=other),
        ])
        assert len(store.rows(op="moe_topk_softmax")) == 4
        assert [r.kernel for r in store.rows(status="crashed")] == ["torch"]
        assert len(store.rows(status=["ok", "crashed"])) == 5
        assert len(store.rows(kernel="triton", op="moe_topk_softmax")) == 3
        assert len(store.rows(fingerprint=other.fingerprint())) == 1
        assert len(store.rows(study="a")) == 1
        assert len(store.rows(bucket={"dtype": "bf16", "topk": 2, "experts": 64, "tokens": 32})) == 1
        newest = store.rows(limit=2)
        assert [r.id for r in newest] == [r.id for r in store.rows()][-2:]

    # -- best -------------------------------------------------------------------------

    def test_best_picks_fastest_ok_row(self, store, make_trial, platform):
        bucket = make_trial().bucket
        store.record_many([
            make_trial(kernel="torch", config={}, p50_us=30.0),
            make_trial(kernel="triton", config={"BLOCK": 64}, p50_us=12.0),
            make_trial(kernel="triton", config={"BLOCK": 128}, p50_us=9.0),
            make_trial(kernel="vllm", config={}, status="numerics_failed", p50_us=1.0, metrics={"err": 9.0}),
            make_trial(kernel="aiter", config={}, status="timeout", p50_us=None),
        ])
        row, notes = store.best("moe_topk_softmax", bucket, platform)
        assert (row.kernel, row.config, row.p50_us) == ("triton", {"BLOCK": 128}, 9.0)
        assert notes == []
        row, notes = store.best("moe_topk_softmax", bucket, platform, kernels=["torch"])
        assert row.kernel == "torch"
        assert any("not allowed here: triton (2)" in n for n in notes)
        assert store.best("moe_topk_softmax", {"tokens": 1}, platform) == (None, [])

    def test_best_never_picks_a_config_that_failed_in_the_bucket(self, store, make_trial, platform):
        bucket = make_trial().bucket
        store.record_many([
            make_trial(kernel="triton", config={"BLOCK": 128}, p50_us=5.0),
            make_trial(kernel="triton", config={"BLOCK": 128}, status="numerics_failed", p50_us=None,
                       features={**make_trial().features, "tokens": 9}),
            make_trial(kernel="triton", config={"BLOCK": 64}, p50_us=8.0),
        ])
        row, notes = store.best("moe_topk_softmax", bucket, platform)
        assert row.config == {"BLOCK": 64}
        assert notes == ["1 row of triton ignored: the same config failed in this bucket (numerics_failed x1)"]

    def test_best_ignores_other_fingerprints_and_says_so(self, store, make_trial, platform):
        other = platform.with_overrides({"device": "NVIDIA H100 PCIe", "units": 114})
        store.record_many([make_trial(on=other, p50_us=1.0), make_trial(on=other, p50_us=2.0)])
        row, notes = store.best("moe_topk_softmax", make_trial().bucket, platform)
        assert row is None
        assert notes == [f"2 rows from another platform fingerprint (not {platform.fingerprint()})"]
        row, _ = store.best("moe_topk_softmax", make_trial().bucket, other)
        assert row.p50_us == 1.0

    def test_best_ignores_other_library_versions_and_says_so(self, store, make_trial, platform):
        old = platform.with_overrides(libs={"triton": "3.4.0"})
        store.record_many([
            make_trial(on=old, p50_us=1.0),
            make_trial(p50_us=5.0),
            make_trial(kernel="vllm", config={}, on=platform.with_overrides(libs={"vllm": "0.10.0"}), p50_us=2.0),
        ])
        row, notes = store.best("moe_topk_softmax", make_trial().bucket, platform)
        assert row.p50_us == 5.0
        assert notes == [
            "1 row measured with triton 3.4.0, now 3.5.0",
            "1 row measured with vllm 0.10.0, now 0.11.0",
        ]
        gone = platform.with_overrides(libs={"vllm": None})
        row, notes = store.best("moe_topk_softmax", make_trial().bucket, gone)
        assert "1 row measured with vllm 0.11.0, now not installed" not in notes  # recorded 0.10.0
        assert "1 row measured with vllm 0.10.0, now not installed" in notes

    def test_libraries_a_row_did_not_record_are_not_compared(self, store, make_trial, platform):
        # A triton-kernel row records torch+triton only: a vllm upgrade does not void it,
        # and kernmux's own version is never compared.
        store.record(make_trial(libs={"torch": "2.9.0", "triton": "3.5.0", "kernmux": "0.0.1"}, p50_us=4.0))
        upgraded = platform.with_overrides(libs={"vllm": "0.12.0", "kernmux": "0.2.0"})
        row, notes = store.best("moe_topk_softmax", make_trial().bucket, upgraded)
        assert row is not None and row.p50_us == 4.0 and notes == []

    def test_summary_counts(self, store, make_trial):
        store.record_many([
            make_trial(study="s"), make_trial(study="s"),
            make_trial(kernel="torch", config={}, status="error", p50_us=None, error="RuntimeError: x"),
        ])
        summary = store.summary()
        assert summary["rows"] == 3
        assert {"op": "moe_topk_softmax", "kernel": "triton", "status": "ok", "rows": 2} in summary["by_kernel"]
        assert summary["studies"] == [{"study": "s", "rows": 2}]
        assert summary["by_fingerprint"][0]["rows"] == 3

    def test_change_stamp_moves_on_insert(self, store, make_trial):
        before = store.change_stamp()
        store.record(make_trial())
        after = store.change_stamp()
        assert before == (0, 0) and after[0] == 1 and after[1] >= 1


# --------------------------------------------------------------------------- pure helpers


def test_bucket_key_is_canonical():
    assert bucket_key({"b": 2, "a": "x"}) == bucket_key({"a": "x", "b": 2}) == '{"a":"x","b":2}'


def test_relevant_libs_keeps_torch_triton_and_providers(platform):
    assert relevant_libs(platform) == {"torch": "2.9.0", "triton": "3.5.0"}
    assert relevant_libs(platform, ["vllm", "amd-aiter"]) == {"torch": "2.9.0", "triton": "3.5.0", "vllm": "0.11.0"}


def test_choose_best_breaks_ties_by_row_id(make_trial, platform):
    class Row:
        def __init__(self, id, p50):
            t = make_trial(p50_us=p50)
            self.__dict__.update(t.__dict__, id=id)

    row, _ = choose_best([Row(3, 5.0), Row(2, 5.0), Row(9, 6.0)], platform)
    assert row.id == 2


def test_missing_sqlite_file_is_not_created_when_create_false(tmp_path):
    path = tmp_path / "nope.sqlite"
    with pytest.raises(TuningDBError, match="no tuning database"):
        TuningStore(f"sqlite:///{path}", create=False)
    assert not path.exists()


def test_plain_path_means_sqlite(tmp_path, make_trial):
    with TuningStore(str(tmp_path / "sub" / "t.sqlite")) as store:
        assert store.backend == "sqlite"
        store.record(make_trial())
    assert (tmp_path / "sub" / "t.sqlite").exists()


def test_sqlite_uses_wal(sqlite_url):
    with TuningStore(sqlite_url) as store, store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 1000


def test_unreachable_postgres_raises_typed_error():
    pytest.importorskip("psycopg")
    with pytest.raises(TuningDBError, match="OperationalError"):
        TuningStore("postgresql+psycopg://nobody@127.0.0.1:1/none?connect_timeout=2")


def test_schema_mismatch_is_a_tuning_db_error():
    err = SchemaMismatchError("sqlite:///x", "0001_initial", "0002_x", "older")
    assert isinstance(err, TuningDBError)
    assert "0001_initial" in str(err) and "0002_x" in str(err) and "kernmux db upgrade --db sqlite:///x" in str(err)


def test_record_for_platform_fills_identity(platform):
    record = TrialRecord.for_platform(
        platform, requires=["vllm"], op="o", kernel="vllm", config={}, features={}, bucket={},
        status="unsupported", p50_us=None, p20_us=None, p80_us=None, reps=None, metrics={}, error="no",
    )
    assert record.fingerprint == platform.fingerprint()
    assert "libs" not in record.platform
    assert record.libs == {"torch": "2.9.0", "triton": "3.5.0", "vllm": "0.11.0"}


@pytest.mark.parametrize("url", ["foo://bar:baz", "nodriver+x://host/db"])
def test_bad_urls_raise_typed_errors(url):
    with pytest.raises(TuningDBError, match="not a database URL|cannot open"):
        TuningStore(url)
