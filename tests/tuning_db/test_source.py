"""The resolver hook: open_source, lookups with notes, reload when the database changes."""

from __future__ import annotations

from kernmux.dispatch.platform import Platform
from kernmux.dispatch.tuning import TuningPick
from kernmux.tuning_db.storage.source import TuningSource, open_source, open_tuning_source
from kernmux.tuning_db.storage.store import TuningStore


def test_missing_sqlite_file_gives_no_source_and_is_not_created(tmp_path):
    path = tmp_path / "absent.sqlite"
    assert open_source(f"sqlite:///{path}") is None
    assert not path.exists()


def test_empty_database_gives_no_source(pg_url):
    assert open_source(pg_url) is None


def test_default_url_comes_from_environment(tmp_path, monkeypatch, make_trial):
    path = tmp_path / "env.sqlite"
    monkeypatch.setenv("KERNMUX_DB", str(path))
    assert open_source(None) is None
    with TuningStore() as store:
        assert store.url == f"sqlite:///{path}"
        store.record(make_trial())
    source = open_source(None)
    assert source is not None and source.store.url == f"sqlite:///{path}"
    source.close()


class TestTuningSourceContract:
    def test_lookup_names_the_row(self, store, make_trial, platform):
        store.record(make_trial(kernel="torch", config={}, p50_us=20.0))
        fast = store.record(make_trial(config={"BLOCK": 128}, p50_us=8.25, study="s", trial_number=4))
        source = open_source(store.url)
        try:
            pick, notes = source.lookup("moe_topk_softmax", make_trial().bucket, platform, ["torch", "triton"])
        finally:
            source.close()
        assert isinstance(pick, TuningPick)
        assert (pick.kernel, dict(pick.config), pick.row_id, pick.p50_us) == ("triton", {"BLOCK": 128}, fast, 8.25)
        assert f"tuning row {fast}:" in pick.detail and "p50 8.25 us" in pick.detail
        assert "measured 20" in pick.detail and "study 's' trial 4" in pick.detail
        assert notes == []

    def test_lookup_explains_ignored_rows(self, store, make_trial, platform):
        other_gpu = platform.with_overrides({"device": "NVIDIA H200", "units": 132})
        old_triton = platform.with_overrides(libs={"triton": "3.4.0"})
        store.record_many([
            make_trial(on=other_gpu, p50_us=1.0),
            make_trial(on=other_gpu, p50_us=1.5),
            make_trial(on=old_triton, p50_us=2.0),
            make_trial(kernel="aiter", config={}, p50_us=3.0),
            make_trial(kernel="torch", config={}, p50_us=9.0),
        ])
        source = open_source(store.url)
        try:
            pick, notes = source.lookup("moe_topk_softmax", make_trial().bucket, platform, ["torch", "triton"])
            assert pick.kernel == "torch"
            assert notes == [
                f"2 rows from another platform fingerprint (not {platform.fingerprint()})",
                "1 row measured with triton 3.4.0, now 3.5.0",
                "1 row for kernels not allowed here: aiter (1)",
            ]
            pick, notes = source.lookup("moe_topk_softmax", {"tokens": 999}, platform, ["torch"])
            assert pick is None and notes == ['no rows for moe_topk_softmax bucket {"tokens":999}']
        finally:
            source.close()

    def test_reloads_when_the_database_changes(self, store, make_trial, platform):
        store.record(make_trial(p50_us=10.0))
        source = open_source(store.url)
        try:
            bucket = make_trial().bucket
            first, _ = source.lookup("moe_topk_softmax", bucket, platform, ["triton"])
            generation = source.generation
            # Another process (here: another store) adds a faster row.
            with TuningStore(store.url) as writer:
                faster = writer.record(make_trial(config={"BLOCK": 256}, p50_us=4.0))
            source.check_interval_s = 3600.0  # within the interval nothing is re-read
            pick, _ = source.lookup("moe_topk_softmax", bucket, platform, ["triton"])
            assert pick.row_id == first.row_id and source.generation == generation
            source.check_interval_s = 0.0
            pick, _ = source.lookup("moe_topk_softmax", bucket, platform, ["triton"])
            assert pick.row_id == faster and pick.p50_us == 4.0
            assert source.generation == generation + 1
            # No change: the cheap check does not reload.
            source.lookup("moe_topk_softmax", bucket, platform, ["triton"])
            assert source.generation == generation + 1
        finally:
            source.close()

    def test_keeps_answering_when_the_database_goes_away(self, store, make_trial, platform):
        store.record(make_trial(p50_us=10.0))
        source = open_source(store.url)
        try:
            source.check_interval_s = 0.0
            source.store.change_stamp = _raise_db_error  # the server went away
            pick, notes = source.lookup("moe_topk_softmax", make_trial().bucket, platform, ["triton"])
            assert pick is not None and pick.p50_us == 10.0
            assert any("unreachable" in n for n in notes)
        finally:
            source.close()


def _raise_db_error():
    from kernmux.tuning_db.storage.errors import TuningDBError

    raise TuningDBError("connection refused")


def test_core_hook_opens_this_source(sqlite_url, make_trial):
    with TuningStore(sqlite_url) as store:
        store.record(make_trial())
    source, note = open_tuning_source(sqlite_url)
    assert isinstance(source, TuningSource) and note == ""
    source.close()


def test_core_hook_reports_an_older_schema(sqlite_url):
    import sqlalchemy as sa

    from kernmux.tuning_db.storage import migrations

    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        migrations.upgrade(conn, "0001_initial")
        conn.commit()
    engine.dispose()
    source, note = open_tuning_source(sqlite_url)
    assert source is None
    assert "SchemaMismatchError" in note and "kernmux db upgrade" in note


def test_resolver_uses_the_fastest_row_and_explains_it(sqlite_url):
    """End to end with the core resolver and the test op ``toy_attention``."""
    from kernmux.dispatch.registry import REGISTRY
    from kernmux.dispatch.resolver import resolve
    from kernmux.dispatch.rule_model import RuleSet
    from kernmux.tuning_db.storage.records import TrialRecord

    op = REGISTRY.op("toy_attention")
    platform = Platform(vendor="cpu", arch="cpu", device="cpu", units=2, libs={"torch": "2.13.0"})
    features = op.default_features()
    common = dict(features=features, bucket=op.bucket(features), metrics={}, error=None, p20_us=None, p80_us=None, reps=10)
    with TuningStore(sqlite_url) as store:
        store.record(TrialRecord.for_platform(platform, op=op.name, kernel="torch", config={}, status="ok", p50_us=50.0, **common))
        row_id = store.record(TrialRecord.for_platform(platform, op=op.name, kernel="chunked", config={"block": 16}, status="ok", p50_us=20.0, **common))
        store.record(TrialRecord.for_platform(platform, op=op.name, kernel="flaky", config={}, status="ok", p50_us=5.0, **common))
        store.record(TrialRecord.for_platform(
            platform.with_overrides(libs={"torch": "2.12.0"}), op=op.name, kernel="torch", config={}, status="ok", p50_us=1.0, **common
        ))
    source = open_source(sqlite_url)
    try:
        decision = resolve(op.name, features, platform, RuleSet(), tuning=source, failed={"flaky": "boom"})
    finally:
        source.close()
    assert decision.source == "tuning_db"
    assert (decision.kernel, dict(decision.config), decision.row_id) == ("chunked", {"block": 16}, row_id)
    assert f"tuning row {row_id}" in decision.detail
    assert "1 row measured with torch 2.12.0, now 2.13.0" in decision.notes
    assert any("flaky (1)" in n for n in decision.notes)
