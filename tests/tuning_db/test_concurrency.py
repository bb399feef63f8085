"""Several processes writing to one store at once lose no row and raise no lock error."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from kernmux.tuning_db.storage.store import TuningStore

ROOT = pathlib.Path(__file__).resolve().parents[2]
WORKERS, ROWS = 4, 50


def test_four_processes_writing_lose_no_row(store_url, tmp_path):
    # The database is fresh: the workers also race to create its schema.
    go = tmp_path / "go"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.tuning_db.write_rows_worker", store_url, str(w), str(ROWS), str(go)],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for w in range(WORKERS)
    ]
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err[-3000:]
        results.append(json.loads(out))
    ids = [i for worker_ids in results for i in worker_ids]
    assert len(ids) == len(set(ids)) == WORKERS * ROWS
    with TuningStore(store_url, create=False) as store:
        assert store.count() == WORKERS * ROWS
        for w in range(WORKERS):
            rows = store.rows(study=f"w{w}")
            assert [r.trial_number for r in rows] == list(range(ROWS))
        assert len(store.rows(status="crashed")) == WORKERS * ROWS // 5
