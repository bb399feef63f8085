"""Import keeps every good row: bad rows are reported by index and reason, on SQLite and
PostgreSQL; a database failure midway (disk full) reports what was stored and exits 1."""

from __future__ import annotations

import copy
import json
import os
import pathlib
import resource
import subprocess
import sys

import pytest
from sqlalchemy import event

from kernmux.cli.main import main
from kernmux.tuning_db.storage.records import stored_values
from kernmux.tuning_db.storage.store import TuningStore
from kernmux.tuning_db.tuning.export import export_doc, import_rows, insert_isolated, record_from_dict
from tests.conftest import subprocess_pythonpath

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# One bad field per case: each passed the old validation and then cost its whole chunk
# (or crashed the import with a traceback).
BAD_ROWS = {
    "integer overflow": ({"trial_number": 2**70}, "trial_number"),
    "over 32 bits": ({"reps": 2**40}, "reps"),
    "float overflow": ({"p50_us": 10**400}, "p50_us"),
    "JSON integer overflow": ({"config": {"BLOCK": 2**80}}, "config.BLOCK"),
    "date before year 1 in UTC": ({"created_at": "0001-01-01T00:00:00+01:00"}, "created_at"),
    "date after 9999 in UTC": ({"created_at": "9999-12-31T23:59:59-05:00"}, "created_at"),
    "lone surrogate": ({"error": "bad \ud800 text"}, "error"),
    "lone surrogate in a JSON key": ({"metrics": {"\udcff": 1.0}}, "metrics"),
    "NUL byte": ({"error": "a\x00b"}, "error"),
    "NUL byte in JSON": ({"features": {"tokens": "1\x002"}}, "features.tokens"),
    "op name with newlines": ({"op": "moe_topk_softmax\n# injected"}, "op"),
    "kernel name with a control character": ({"kernel": "triton\x1b[31m"}, "kernel"),
    "nested too deep": ({"metrics": json.loads('{"a":' * 40 + "1" + "}" * 40)}, "metrics"),
}


def _good_rows(make_trial, tmp_path, n: int = 10) -> list[dict]:
    with TuningStore(f"sqlite:///{tmp_path / 'source.sqlite'}") as src:
        src.record_many([make_trial(p50_us=float(i + 1), trial_number=i) for i in range(n)])
        return export_doc(src)["rows"]


def _bad_row(template: dict, change: dict) -> dict:
    row = copy.deepcopy(template)
    row.pop("content_hash")  # the change is the point, not the hash
    row.update(change)
    return row


@pytest.mark.parametrize("case", sorted(BAD_ROWS))
def test_ten_good_rows_and_one_bad_row_keep_the_ten(store, make_trial, tmp_path, case):
    change, field = BAD_ROWS[case]
    good = _good_rows(make_trial, tmp_path)
    rows = [*good[:4], _bad_row(good[0], change), *good[4:]]
    report = import_rows(store, rows)
    assert (report.total, report.added, report.duplicates, report.error) == (11, 10, 0, None)
    [(index, reason)] = report.bad
    assert index == 4 and reason.startswith(field), reason
    assert len(reason) < 200 and "\n" not in reason
    assert store.count() == 10


def test_the_database_refusing_one_row_keeps_the_others(store, make_trial, tmp_path):
    """The second line of defence: a value the validation let through but the database
    refuses costs that row only (each row retried alone in a savepoint)."""
    good = [stored_values(record_from_dict(r)[0]) for r in _good_rows(make_trial, tmp_path)]
    bad = dict(good[0], content_hash="f" * 64)
    if store.backend == "postgresql":
        bad["error"] = "NUL \x00 byte"  # PostgreSQL text cannot hold it: DataError
    else:
        bad["trial_number"] = 2**70  # past SQLite's 64-bit INTEGER: OverflowError
    chunk = [(i, v) for i, v in enumerate(good[:6])] + [(6, bad)] + [(7 + i, v) for i, v in enumerate(good[6:])]
    outcome = store._retry(lambda: insert_isolated(store, chunk))
    assert outcome.added == 10 and outcome.present == 0
    [(index, reason)] = outcome.rejected
    assert index == 6 and reason.startswith("refused by the database")
    assert store.count() == 10
    # Again: every good row is already there, the bad one is refused again.
    again = store._retry(lambda: insert_isolated(store, chunk))
    assert (again.added, again.present, len(again.rejected)) == (0, 10, 1)


def test_cli_import_reports_the_bad_row_and_keeps_the_good_ones(store_url, make_trial, tmp_path, capsys):
    good = _good_rows(make_trial, tmp_path)
    doc = {"format": "kernmux-tuning", "version": 1, "rows": [*good, _bad_row(good[0], {"error": "x\x00y"})]}
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(doc))
    assert main(["db", "import", str(path), "--db", store_url]) == 1
    out, err = capsys.readouterr()
    assert "11 rows: 10 added, 0 already present, 1 bad" in out
    assert "row 10: error: NUL character" in out and "Traceback" not in out + err
    assert main(["db", "show", "--db", store_url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rows"] == 10


def test_disk_full_midway_reports_what_was_stored(sqlite_url, make_trial, tmp_path):
    """SQLite with a page limit: the first chunks commit, the one that fills the file is
    rolled back, the report says both counts, and importing again adds only the rest."""
    with TuningStore(f"sqlite:///{tmp_path / 'source.sqlite'}") as src:
        src.record_many([make_trial(p50_us=float(i + 1), error="e" * 400) for i in range(2000)])
        rows = export_doc(src)["rows"]
    store = TuningStore(sqlite_url)
    event.listen(store.engine, "connect", lambda conn, _: conn.execute("PRAGMA max_page_count = 300"))
    store.engine.dispose()  # new connections carry the limit
    report = import_rows(store, rows)
    assert report.error is not None and "full" in report.error
    assert report.added > 0 and report.added % 500 == 0, "whole chunks commit, the failing one does not"
    assert report.not_stored == 2000 - report.added and not report.bad
    assert f"{report.added} row(s) were stored" in report.error
    assert store.count() == report.added
    store.close()
    with TuningStore(sqlite_url) as roomy:
        again = import_rows(roomy, rows)
        assert (again.added, again.duplicates, again.error) == (report.not_stored, report.added, None)
        assert roomy.count() == 2000


def _limit_file_size(limit: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_cli_import_on_a_full_disk_exits_1_and_says_what_was_committed(make_trial, tmp_path):
    """A real I/O failure: the CLI runs with a file-size limit (RLIMIT_FSIZE; Python
    ignores SIGXFSZ, so writes past it fail with EFBIG as on a full disk)."""
    with TuningStore(f"sqlite:///{tmp_path / 'source.sqlite'}") as src:
        src.record_many([make_trial(p50_us=float(i + 1), error="e" * 400) for i in range(3000)])
        path = tmp_path / "rows.json"
        path.write_text(json.dumps(export_doc(src)))
    target = tmp_path / "target.sqlite"
    with TuningStore(f"sqlite:///{target}"):
        pass  # the schema exists; the import is what fills the disk
    env = {**os.environ, "PYTHONPATH": subprocess_pythonpath(), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "kernmux", "db", "import", str(path), "--db", str(target), "--json"],
        capture_output=True, text=True, env=env, timeout=120, preexec_fn=_limit_file_size(1_200_000),
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    report = json.loads(proc.stdout)
    assert report["ok"] is False and report["error"] and report["added"] + report["not_stored"] == 3000
    assert "were stored" in proc.stderr and "stopped" in proc.stderr
    with TuningStore(f"sqlite:///{target}", read_only=True) as check:
        assert check.count() == report["added"]


@pytest.mark.parametrize("make, message", [
    (lambda tmp: pathlib.Path("/dev/zero"), "not a regular file"),
    (lambda tmp: _fifo(tmp / "fifo"), "not a regular file"),
    (lambda tmp: _write(tmp / "utf16.json", '{"format": "kernmux-tuning"}'.encode("utf-16")), "not UTF-8"),
    (lambda tmp: _write(tmp / "deep.json", b"[" * 100_000 + b"]" * 100_000), "nested too deeply"),
    (lambda tmp: _write(tmp / "big.json", b'{"version": ' + b"9" * 5000 + b"}"), "unreadable JSON"),
])
def test_hostile_import_files_end_in_a_message(sqlite_url, tmp_path, capsys, make, message):
    path = make(tmp_path)
    assert main(["db", "import", str(path), "--db", sqlite_url]) == 1
    out, err = capsys.readouterr()
    assert message in err and "Traceback" not in out + err


def _fifo(path: pathlib.Path) -> pathlib.Path:
    os.mkfifo(path)
    return path


def _write(path: pathlib.Path, data: bytes) -> pathlib.Path:
    path.write_bytes(data)
    return path
