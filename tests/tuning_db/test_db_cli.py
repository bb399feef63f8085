"""``kernmux db ...`` and ``kernmux rules derive`` through the real argument parser."""

from __future__ import annotations

import json
import subprocess
import sys

import sqlalchemy as sa

from kernmux.cli.main import main
from kernmux.tuning_db.storage import migrations
from kernmux.tuning_db.storage.store import TuningStore


def _run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _json(capsys, *argv):
    code, out, _ = _run(capsys, *argv, "--json")
    return code, json.loads(out)


def test_upgrade_creates_then_reports_current(capsys, sqlite_url):
    code, out, _ = _run(capsys, "db", "upgrade", "--db", sqlite_url)
    assert code == 0 and f"upgraded schema (new database) -> {TuningStore.head_revision()}" in out
    code, data = _json(capsys, "db", "upgrade", "--db", sqlite_url)
    assert code == 0 and data["changed"] is False and data["to"] == TuningStore.head_revision()


def test_upgrade_and_show_an_older_database(capsys, sqlite_url):
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:
        migrations.upgrade(conn, "0001_initial")
        conn.commit()
    engine.dispose()
    code, out, _ = _run(capsys, "db", "show", "--db", sqlite_url)
    assert code == 1 and "older" in out and f"kernmux db upgrade --db {sqlite_url}" in out
    code, _, err = _run(capsys, "db", "export", "--db", sqlite_url)
    assert code == 1 and "0001_initial" in err and "kernmux db upgrade" in err
    code, data = _json(capsys, "db", "upgrade", "--db", sqlite_url)
    assert code == 0 and (data["from"], data["to"]) == ("0001_initial", TuningStore.head_revision())
    code, data = _json(capsys, "db", "show", "--db", sqlite_url)
    assert code == 0 and data["schema"]["status"] == "current" and data["rows"] == 0


def test_show_lists_counts_and_latest_rows(capsys, sqlite_url, make_trial):
    with TuningStore(sqlite_url) as store:
        store.record_many([make_trial(study="s"), make_trial(kernel="torch", config={}, status="crashed", p50_us=None, error="SIGABRT")])
    code, out, _ = _run(capsys, "db", "show", "--db", sqlite_url, "--rows", "5")
    assert code == 0
    assert "rows:     2" in out and "moe_topk_softmax/torch" in out and "crashed" in out and "SIGABRT" in out
    code, data = _json(capsys, "db", "show", "--db", sqlite_url, "--rows", "1")
    assert data["rows"] == 2 and [r["kernel"] for r in data["latest"]] == ["torch"]


def test_show_missing_database_fails_cleanly(capsys, tmp_path):
    code, _, err = _run(capsys, "db", "show", "--db", str(tmp_path / "none.sqlite"))
    assert code == 1 and "no tuning database" in err
    assert not (tmp_path / "none.sqlite").exists()


def test_export_import_merge_report(capsys, tmp_path, make_trial):
    src = f"sqlite:///{tmp_path / 'src.sqlite'}"
    dst = f"sqlite:///{tmp_path / 'dst.sqlite'}"
    with TuningStore(src) as store:
        store.record_many([make_trial(kernel="torch", config={}, p50_us=30.0), make_trial(p50_us=10.0)])
    export = tmp_path / "rows.json"
    code, out, _ = _run(capsys, "db", "export", "--db", src, "-o", str(export))
    assert code == 0 and "wrote 2 rows" in out
    code, out, _ = _run(capsys, "db", "export", "--db", src)
    assert json.loads(out)["format"] == "kernmux-tuning"

    code, data = _json(capsys, "db", "import", str(export), "--db", dst)
    assert code == 0 and (data["added"], data["duplicates"], data["bad"]) == (2, 0, [])

    doc = json.loads(export.read_text())
    doc["rows"].append({**doc["rows"][0], "status": "melted"})
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    code, out, _ = _run(capsys, "db", "import", str(bad), "--db", dst)
    assert code == 1 and "0 added, 2 already present, 1 bad" in out and "row 2: status" in out

    code, data = _json(capsys, "db", "merge", src, "--db", dst)
    assert code == 0 and data["added"] == 0 and data["duplicates"] == 2

    html = tmp_path / "r.html"
    code, out, _ = _run(capsys, "db", "report", "--db", dst, "-o", str(html))
    assert code == 0 and html.read_text().startswith("<!DOCTYPE html>") and "&times;3.00" in html.read_text()


def test_rules_derive_uses_the_store(capsys, sqlite_url, tmp_path):
    from kernmux.dispatch.platform import Platform
    from kernmux.dispatch.registry import REGISTRY
    from kernmux.tuning_db.storage.records import TrialRecord

    features = REGISTRY.op("toy_attention").default_features()
    cpu = Platform(libs={"torch": "2.13.0"})
    with TuningStore(sqlite_url) as store:
        store.record(TrialRecord.for_platform(
            cpu, op="toy_attention", kernel="flaky", config={}, features=features, bucket=features,
            status="crashed", p50_us=None, p20_us=None, p80_us=None, reps=None, metrics={}, error="SIGSEGV",
        ))
    out_file = tmp_path / "derived.yaml"
    code, _, _ = _run(capsys, "rules", "derive", "--db", sqlite_url, "-o", str(out_file))
    assert code == 0 and "deny: [flaky]" in out_file.read_text()
    code, out, _ = _run(capsys, "rules", "lint", str(out_file))
    assert code == 0, out


def test_db_cli_module_import_is_light():
    code = "import sys, kernmux.cli.db; assert 'sqlalchemy' not in sys.modules and 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
