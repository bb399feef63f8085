"""``kernmux tune`` under faults, end to end through the real CLI in subprocesses.

* kill -9 three times, then one resume: every point of the space measured exactly once;
* PostgreSQL stopped for 10 s mid-tune and started again: the tune finishes, every point
  measured once; stopped for good: exit 1 naming ``Connection refused``;
* four tunes started together on a fresh PostgreSQL: four succeed, no point twice;
* refused before anything is written: an in-memory database, a SQLite file with damaged
  pages, ``--device cuda`` without CUDA.

The space: ``torch`` and the test-only ``sleepy`` kernel (8 configs, each trial about
0.6 s), so a tune lasts long enough to be interrupted. Where the database is what is
under test, trials run in the tuning process (``--in-process``: one torch import less
per tune); the kill test keeps the worker subprocess and checks that it dies too.
"""

from __future__ import annotations

import collections
import json
import os
import pathlib
import sqlite3
import subprocess
import sys
import time
import uuid

import pytest

from tests.tuning_db import fault_kernels
from tests.conftest import subprocess_pythonpath

REPO = pathlib.Path(__file__).resolve().parents[2]
OP = fault_kernels.OP
POINTS = 1 + fault_kernels.SLEEPY_STEPS  # torch + sleepy{step=0..7}
MARK = "KERNMUX_TEST_RUN"


def _tune_args(url: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "kernmux", "tune", OP, "n=64", "--kernels", "torch,sleepy", "--sampler", "grid",
        "--trials", "1000", "--db", url, "--import", fault_kernels.__name__, "--warmup-ms", "0.5",
        "--rep-ms", "1", "--timeout", "60", *extra,
    ]


def _env(mark: str = "", **extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": subprocess_pythonpath(), "PYTHONDONTWRITEBYTECODE": "1",
            "KERNMUX_TEST_SLEEPY_S": "0.05", MARK: mark, **extra}


def _start(url: str, mark: str = "", *extra: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen(_tune_args(url, *extra), env=_env(mark, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _sqlite_rows(path: pathlib.Path) -> list[tuple[str, str]]:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            return conn.execute("SELECT kernel, config FROM kernmux_trials").fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return []


def _pg_rows(url: str) -> list[tuple[str, str]]:
    import psycopg

    conninfo = url.replace("postgresql+psycopg://", "postgresql://")
    try:
        with psycopg.connect(conninfo, connect_timeout=2) as conn:
            return [(k, json.dumps(c, sort_keys=True)) for k, c in
                    conn.execute("SELECT kernel, config FROM kernmux_trials").fetchall()]
    except psycopg.Error:
        return []


def _wait_for_rows(count_rows, n: int, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while len(count_rows()) < n:
        assert proc.poll() is None, f"tune exited early: {proc.communicate()}"
        assert time.monotonic() < deadline, f"no {n} rows within {timeout_s} s"
        time.sleep(0.05)


def _processes_marked(mark: str) -> list[int]:
    """Live processes whose environment carries ``mark`` (the tune and its workers)."""
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[-1].split()[0]
        except OSError:
            continue
        if f"{MARK}={mark}".encode() in environ.split(b"\0") and state != "Z":
            found.append(int(entry.name))
    return found


def _assert_each_point_once(rows: list[tuple[str, str]]) -> None:
    per_point = collections.Counter((kernel, json.dumps(json.loads(config), sort_keys=True)) for kernel, config in rows)
    assert len(per_point) == POINTS, f"points measured: {sorted(per_point)}"
    assert set(per_point.values()) == {1}, f"measured more than once: {per_point}"


def _finish(proc: subprocess.Popen, timeout_s: float = 120) -> tuple[str, str]:
    out, err = proc.communicate(timeout=timeout_s)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{err[-3000:]}"
    assert "Traceback" not in err
    return out, err


@pytest.mark.slow
def test_kill_nine_three_times_then_resume_measures_every_point_once(tmp_path):
    db = tmp_path / "tuning.sqlite"
    url = str(db)
    # Kills land in different places: right after a row appears (often between the row
    # and optuna's tell) and a moment later (in the middle of the next trial).
    for rows, delay in ((1, 0.3), (3, 0.0), (5, 0.3)):
        mark = uuid.uuid4().hex
        proc = _start(url, mark)
        _wait_for_rows(lambda: _sqlite_rows(db), rows, proc)
        time.sleep(delay)
        proc.kill()
        proc.communicate()
        deadline = time.monotonic() + 5
        while _processes_marked(mark) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _processes_marked(mark), "a trial worker outlived its killed tune"
    _finish(_start(url))
    _assert_each_point_once(_sqlite_rows(db))
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    running = conn.execute("SELECT count(*) FROM trials t JOIN trial_user_attributes a ON a.trial_id = t.trial_id "
                           "WHERE t.state = 'RUNNING' AND a.key = 'point'").fetchone()[0]
    conn.close()
    assert running == 0, "a killed trial still holds a point"


@pytest.mark.slow
def test_postgresql_stopped_for_ten_seconds_mid_tune(own_pg_server):
    url = own_pg_server.url("kernmux_test")
    proc = _start(url, "", "--in-process")  # the database is under test here, not the worker
    _wait_for_rows(lambda: _pg_rows(url), 2, proc)
    own_pg_server.halt()
    time.sleep(10)
    own_pg_server.resume()
    _, err = _finish(proc)
    assert "retrying for up to" in err, "the tune never saw the server go away"
    _assert_each_point_once(_pg_rows(url))


@pytest.mark.slow
def test_postgresql_gone_for_good_is_reported_with_the_real_cause(own_pg_server):
    url = own_pg_server.url("kernmux_test")
    proc = _start(url, "", "--in-process", KERNMUX_DB_RECONNECT_S="3")
    _wait_for_rows(lambda: _pg_rows(url), 1, proc)
    own_pg_server.halt()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    assert "Connection refused" in err and "unreachable for 3 s" in err
    assert "Traceback" not in err and "max length" not in err


@pytest.mark.slow
def test_four_tunes_started_together_on_a_fresh_postgresql(pg_url):
    procs = [_start(pg_url, "", "--in-process") for _ in range(4)]
    for proc in procs:
        _finish(proc, timeout_s=180)
    _assert_each_point_once(_pg_rows(pg_url))


# --------------------------------------------------------------------------- refusals


def _run(*argv: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kernmux", *argv], env=_env(**env), capture_output=True,
                          text=True, timeout=120)


@pytest.mark.parametrize("url", ["sqlite:///:memory:", "sqlite://"])
def test_an_in_memory_database_is_refused_by_commands_that_keep_data(url, tmp_path):
    export = tmp_path / "e.json"
    export.write_text(json.dumps({"format": "kernmux-tuning", "version": 1, "rows": []}))
    for argv in (["tune", OP, "n=8", "--import", fault_kernels.__name__, "--kernels", "torch"],
                 ["db", "import", str(export)], ["db", "merge", str(export)], ["db", "upgrade"]):
        proc = _run(*argv, "--db", url)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert "in-memory database" in proc.stderr and "Traceback" not in proc.stderr


def test_a_damaged_sqlite_file_is_refused_before_tune_writes(tmp_path, make_trial):
    from kernmux.tuning_db.storage.store import TuningStore

    db = tmp_path / "tuning.sqlite"
    with TuningStore(str(db)) as store:
        store.record_many([make_trial(p50_us=float(i + 1), error="e" * 300) for i in range(200)])
    data = bytearray(db.read_bytes())
    page = 4096
    assert len(data) > 8 * page
    data[4 * page: 6 * page] = os.urandom(2 * page)  # two pages of the trials table
    db.write_bytes(bytes(data))
    before = db.read_bytes()
    proc = _run(*_tune_args(str(db))[3:])
    assert proc.returncode == 1, proc.stderr
    assert "damaged" in proc.stderr and "quick_check" in proc.stderr and "Traceback" not in proc.stderr
    assert db.read_bytes() == before, "tune wrote into a damaged database"


def test_tune_on_a_device_that_is_not_there_is_a_usage_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    db = tmp_path / "tuning.sqlite"
    proc = _run("tune", OP, "n=8", "--device", "cuda", "--import", fault_kernels.__name__, "--db", str(db))
    # The CLI refuses before the tuner does (its own message); the library's check is the
    # same refusal for callers of tune() (test_recovery / test_tuner cover it).
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "no usable CUDA" in proc.stderr or "has no CUDA support" in proc.stderr, proc.stderr
    assert not db.exists(), "nothing is recorded for a device that is not there"
