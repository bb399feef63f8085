"""``kernmux tune --remeasure`` (new rows, nothing overwritten) and ``kernmux db prune``
(the one deletion: dry run, --yes, filters, studies left empty) through the CLI."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from kernmux.cli.main import main
from kernmux.tuning_db.storage.prune import PruneFilter, parse_age, prune
from kernmux.tuning_db.storage.store import TuningStore

OP = "moe_topk_softmax"
TUNE = ["tune", OP, "tokens=2,4", "experts=8", "topk=2", "dtype=fp32", "--kernels", "torch,torch_topk",
        "--trials", "2", "--warmup-ms", "1", "--rep-ms", "5", "--in-process", "--device", "cpu"]


def _run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture
def tuned(capsys, tmp_path):
    db = str(tmp_path / "t.sqlite")
    code, out, err = _run(capsys, *TUNE, "--db", db)
    assert code == 0, out + err
    return db


def _rows(db):
    with TuningStore(db) as store:
        return store.rows()


def test_remeasure_adds_rows_and_overwrites_nothing(capsys, tuned):
    before = {r.id: (r.p50_us, r.created_at) for r in _rows(tuned)}
    assert len(before) == 4 and all(r.status == "ok" for r in _rows(tuned))
    code, out, err = _run(capsys, *TUNE, "--db", tuned, "--remeasure", "--json")
    assert code == 0, err
    data = json.loads(out)["remeasured"]
    assert len(data) == 4 and {d["previous_row"] for d in data} == set(before)
    after = _rows(tuned)
    assert {r.id: (r.p50_us, r.created_at) for r in after if r.id in before} == before  # untouched
    new = [r for r in after if r.id not in before]
    assert len(new) == 4 and all(r.metrics["remeasure_of"] in before and r.metrics["threads"] == 1 for r in new)
    assert all(r.study is not None and r.trial_number is None for r in new)
    assert "remeasuring 4 stored ok point(s)" in err


def test_remeasure_only_the_given_features_and_kernels(capsys, tuned):
    code, out, _ = _run(capsys, "tune", OP, "tokens=4", "experts=8", "topk=2", "dtype=fp32", "--kernels", "torch",
                        "--warmup-ms", "1", "--rep-ms", "5", "--in-process", "--device", "cpu", "--db", tuned,
                        "--remeasure", "--json")
    data = json.loads(out)["remeasured"]
    assert code == 0 and [(d["features"]["tokens"], d["kernel"]) for d in data] == [(4, "torch")]


def test_remeasure_with_nothing_stored_says_so(capsys, tmp_path):
    db = str(tmp_path / "empty.sqlite")
    code, out, _ = _run(capsys, "tune", OP, "--remeasure", "--in-process", "--device", "cpu", "--db", db)
    assert code == 1 and "no stored ok point of moe_topk_softmax" in out


def test_prune_needs_yes_or_dry_run_and_a_filter(capsys, tuned):
    n = len(_rows(tuned))
    code, _, err = _run(capsys, "db", "prune", "--kernel", "torch", "--db", tuned)
    assert code == 2 and "would delete 2 row(s)" in err and "--yes" in err
    code, out, _ = _run(capsys, "db", "prune", "--kernel", "torch", "--db", tuned, "--dry-run")
    assert code == 0 and "would delete 2 row(s) matching kernel torch" in out and "moe_topk_softmax/torch ok: 2" in out
    assert len(_rows(tuned)) == n
    code, _, err = _run(capsys, "db", "prune", "--db", tuned, "--yes")
    assert code == 2 and "name the rows to delete" in err
    code, _, err = _run(capsys, "db", "prune", "--status", "fine", "--db", tuned, "--dry-run")
    assert code == 2 and "unknown status" in err
    assert len(_rows(tuned)) == n


def test_prune_deletes_what_the_filter_names_and_studies_left_empty(capsys, tuned):
    import optuna

    studies = {r.study for r in _rows(tuned)}
    code, out, _ = _run(capsys, "db", "prune", "--kernel", "torch", "--db", tuned, "--yes", "--json")
    data = json.loads(out)
    assert code == 0 and data["deleted"] == 2 and data["studies_deleted"] == []
    assert {r.kernel for r in _rows(tuned)} == {"torch_topk"}
    code, out, _ = _run(capsys, "db", "prune", "--op", OP, "--db", tuned, "--yes", "--json")
    data = json.loads(out)
    assert data["deleted"] == 2 and sorted(data["studies_deleted"]) == sorted(studies)
    assert _rows(tuned) == []
    with TuningStore(tuned) as store:
        names = {s.study_name for s in optuna.study.get_all_study_summaries(store.url)}
    assert not names & studies
    code, out, err = _run(capsys, *TUNE, "--db", tuned)  # searched again from scratch
    assert code == 0 and len(_rows(tuned)) == 4, err


@pytest.mark.dispersion_gate  # synthetic rows judged by the shipped bound
def test_prune_by_age_and_noisy(make_trial, sqlite_url):
    now = dt.datetime(2030, 1, 10, tzinfo=dt.timezone.utc)
    with TuningStore(sqlite_url) as store:
        old = store.record(make_trial(created_at=now - dt.timedelta(days=9)))
        noisy = store.record(make_trial(created_at=now, p20_us=64.0, p50_us=100.0, p80_us=16052.0))
        flagged = store.record(make_trial(created_at=now, metrics={"noisy": True}))
        fine = store.record(make_trial(created_at=now))
        failed = store.record(make_trial(created_at=now, status="crashed", p50_us=None, p20_us=None, p80_us=None, error="x"))
        report = prune(store, PruneFilter(older_than=parse_age("7d")), dry_run=True, now=now)
        assert report.ids == [old] and report.deleted == 0
        report = prune(store, PruneFilter(noisy=True), dry_run=False, now=now)
        assert report.ids == [noisy, flagged] and report.deleted == 2
        report = prune(store, PruneFilter(statuses=("crashed",), older_than=parse_age("1h")), dry_run=False, now=now)
        assert report.ids == []
        assert [r.id for r in store.rows()] == [old, fine, failed]
    with pytest.raises(ValueError, match="unit"):
        parse_age("7 days")
