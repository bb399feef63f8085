"""Versioned JSON export, validated import (bad rows reported, good rows kept), idempotent merge."""

from __future__ import annotations

import copy
import json

import pytest

from kernmux.tuning_db.storage.errors import TuningDBError
from kernmux.tuning_db.storage.store import TuningStore
from kernmux.tuning_db.tuning.export import (
    FORMAT,
    VERSION,
    ExportFormatError,
    export_doc,
    import_file,
    import_rows,
    load_export,
    merge,
    write_export,
)


def _fill(store, make_trial, platform):
    store.record_many([
        make_trial(kernel="torch", config={}, p50_us=20.0),
        make_trial(config={"BLOCK": 128}, p50_us=8.0, study="s", trial_number=1),
        make_trial(status="numerics_failed", p50_us=None, metrics={"max_abs_err": float("nan")}, error="NaN in output"),
        make_trial(kernel="aiter", config={}, status="crashed", p50_us=None, error="SIGSEGV",
                   on=platform.with_overrides({"vendor": "rocm", "arch": "gfx942", "device": "MI300X"})),
    ])


def _identity(rows):
    return sorted((r.content_hash, r.op, r.kernel, r.status, r.p50_us, r.created_at) for r in rows)


class TestExportImportContract:
    def test_round_trip_to_a_fresh_database(self, store, make_trial, platform, tmp_path):
        _fill(store, make_trial, platform)
        path = tmp_path / "export.json"
        assert write_export(store, path) == 4
        doc = json.loads(path.read_text())
        assert (doc["format"], doc["version"]) == (FORMAT, VERSION)
        assert doc["schema_revision"] == TuningStore.head_revision()
        assert "id" not in doc["rows"][0] and len(doc["rows"][0]["content_hash"]) == 64
        assert doc["rows"][2]["metrics"] == {"max_abs_err": "nan"}

        with TuningStore(f"sqlite:///{tmp_path / 'fresh.sqlite'}") as fresh:
            report = import_file(fresh, path)
            assert (report.total, report.added, report.duplicates, report.bad) == (4, 4, 0, [])
            assert _identity(fresh.rows()) == _identity(store.rows())
            again = import_file(fresh, path)
            assert (again.added, again.duplicates) == (0, 4)
            assert fresh.count() == 4

    def test_import_reports_bad_rows_and_keeps_good_ones(self, store, make_trial, platform, tmp_path):
        with TuningStore(f"sqlite:///{tmp_path / 'src.sqlite'}") as src:
            _fill(src, make_trial, platform)
            rows = export_doc(src)["rows"]
        bad = [copy.deepcopy(rows[0]) for _ in range(6)]
        bad[0]["status"] = "melted"
        bad[1]["p50_us"] = "fast"
        del bad[2]["kernel"]
        bad[3]["p50_us"] = 1.0  # edited after export: the hash no longer matches
        bad[4]["surprise"] = 1
        bad[5] = "not an object"
        report = import_rows(store, [rows[0], *bad, rows[1], rows[2], rows[3], rows[1]])
        assert report.added == 4 and report.duplicates == 1
        reasons = dict(report.bad)
        assert sorted(reasons) == [1, 2, 3, 4, 5, 6]
        assert "status" in reasons[1] and "melted" in reasons[1]
        assert "p50_us" in reasons[2]
        assert "missing field(s) kernel" in reasons[3]
        assert "content_hash does not match" in reasons[4]
        assert "unknown field(s) surprise" in reasons[5]
        assert "expected a JSON object" in reasons[6]
        assert store.count() == 4
        assert "row 1: status" in report.summary()

    def test_rows_without_hash_are_accepted_and_hashed(self, store, make_trial, platform, tmp_path):
        with TuningStore(f"sqlite:///{tmp_path / 'src.sqlite'}") as src:
            _fill(src, make_trial, platform)
            rows = export_doc(src)["rows"]
        for row in rows:
            del row["content_hash"]
            row.pop("host")
        assert import_rows(store, rows).added == 4
        assert import_rows(store, rows).duplicates == 4

    def test_merge_from_another_database_is_idempotent(self, store, make_trial, platform, tmp_path):
        _fill(store, make_trial, platform)
        other_url = f"sqlite:///{tmp_path / 'other.sqlite'}"
        with TuningStore(other_url) as other:
            other.record(make_trial(kernel="vllm", config={}, p50_us=6.0))
            other.record(make_trial(config={"BLOCK": 32}, p50_us=7.0))
            # Both directions: the other database into ``store`` and back.
            first = merge(store, other_url)
            assert (first.added, first.duplicates, first.bad) == (2, 0, [])
            assert merge(store, other_url).added == 0
            assert store.count() == 6
            back = merge(other, store.url)
            assert (back.added, back.duplicates) == (4, 2)
            assert _identity(other.rows()) == _identity(store.rows())
        # A SQLite file given as a path, and an export file, work too.
        assert merge(store, str(tmp_path / "other.sqlite")).added == 0
        path = tmp_path / "e.json"
        with TuningStore(other_url) as other:
            write_export(other, path)
        assert merge(store, path).added == 0

    def test_merge_into_itself_is_refused(self, store):
        with pytest.raises(TuningDBError, match="into itself"):
            merge(store, store.url)


@pytest.mark.parametrize(
    "doc, message",
    [
        ([], "expected a JSON object"),
        ({"format": "other", "version": 1, "rows": []}, "expected format"),
        ({"format": FORMAT, "version": 2, "rows": []}, "newer than this kernmux reads"),
        ({"format": FORMAT, "version": "1", "rows": []}, "integer version"),
        ({"format": FORMAT, "version": 1, "rows": {}}, "list under 'rows'"),
    ],
)
def test_bad_envelopes_are_refused(tmp_path, doc, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ExportFormatError, match=message):
        load_export(path)


def test_not_json_is_refused(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text("{nope")
    with pytest.raises(ExportFormatError, match="not JSON"):
        load_export(path)


def test_export_filters_by_op(sqlite_url, make_trial):
    with TuningStore(sqlite_url) as store:
        store.record_many([make_trial(), make_trial(op="other")])
        assert [r["op"] for r in export_doc(store, op="other")["rows"]] == ["other"]
