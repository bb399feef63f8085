"""Worker process for the store concurrency test (not a test module).

``python -m tests.tuning_db.write_rows_worker URL WORKER N GO_FILE``: opens the store
(creating the schema if this worker is first), waits until GO_FILE exists so that every
worker writes at the same time, records N trials one transaction each, and prints the
row ids as JSON. Any exception ends the process with a traceback and a non-zero code.
"""

from __future__ import annotations

import json
import os
import sys
import time

from kernmux.dispatch.platform import Platform
from kernmux.tuning_db.storage.records import TrialRecord
from kernmux.tuning_db.storage.store import TuningStore


def main(url: str, worker: int, n: int, go_file: str) -> None:
    platform = Platform(vendor="cpu", arch="cpu", device="cpu", units=4, libs={"torch": "2.13.0"})
    with TuningStore(url) as store:
        deadline = time.monotonic() + 60
        while not os.path.exists(go_file):
            if time.monotonic() > deadline:
                raise TimeoutError("start signal never came")
            time.sleep(0.01)
        ids = []
        for i in range(n):
            ids.append(store.record(TrialRecord.for_platform(
                platform, op="concurrency_op", kernel=f"k{i % 3}", config={"i": i}, features={"tokens": i},
                bucket={"tokens": 1 << max(i - 1, 0).bit_length()}, status="ok" if i % 5 else "crashed",
                p50_us=float(i + 1) if i % 5 else None, p20_us=None, p80_us=None, reps=None, metrics={},
                error=None if i % 5 else "simulated crash", study=f"w{worker}", trial_number=i,
            )))
    print(json.dumps(ids))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
