"""Tuning scaling over GPUs of one host: the same sweep with 1, 2, 4, ... pinned tuning
processes (``kernmux tune --gpus``) on one shared study.

For each GPU count (up to the GPUs visible, or ``--gpu-counts``) a fresh database gets
the same grid search (every point of the op's Triton config space for one problem) and
reports: wall time, trials per minute, wall time until the best point was stored, rows
vs measured optuna trials (lost = measured trials without a row), points measured twice
(duplicates), and which GPU measured each row. SQLite always; PostgreSQL too when server
binaries (initdb, pg_ctl) are on this machine (a throwaway server on 127.0.0.1).

Usage: python benchmarks/multi_gpu_tune.py --out DIR [--op indexer_logits] [--gpu-counts 1,2,4]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernmux.tuning_db.measurement.timing import environment_row  # noqa: E402
from kernmux.tuning_db.storage.store import TuningStore  # noqa: E402
from kernmux.tuning_db.tuning.gpus import visible_gpus  # noqa: E402
from kernmux.tuning_db.tuning.tuner import TuneSettings, open_study_storage, tune  # noqa: E402

PROBLEMS = {
    "indexer_logits": {"batch": 64, "next_n": 1, "heads": 64, "head_dim": 128, "context": 4096, "block_size": 64,
                       "device": "cuda"},
    "moe_topk_softmax": {"tokens": 4096, "experts": 160, "topk": 6, "shared": 0, "dtype": "bf16",
                         "renormalize": False, "padding": False, "device": "cuda"},
}


def _postgres(tmp: Path):
    """(url_of(n), stop) of a throwaway PostgreSQL server, or (None, reason)."""
    bins = sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True)
    initdb = next((b / "initdb" for b in bins if (b / "initdb").exists()), None) or shutil.which("initdb")
    if initdb is None:
        return None, "no PostgreSQL server binaries (initdb) on this machine"
    bindir = Path(initdb).parent
    data, port = tmp / "pg", 55432 + os.getpid() % 1000
    user = [] if os.getuid() else ["runuser", "-u", "postgres", "--"]
    if user:
        shutil.chown(tmp, "postgres")
    subprocess.run([*user, str(bindir / "initdb"), "-D", str(data), "-U", "kmx", "--auth=trust"], check=True,
                   capture_output=True)
    subprocess.run([*user, str(bindir / "pg_ctl"), "-D", str(data), "-o", f"-p {port} -k {tmp}", "-w", "start",
                    "-l", str(tmp / "pg.log")], check=True, capture_output=True)

    def url_of(n: int) -> str:  # a fresh database per GPU count
        subprocess.run([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "kmx", f"tune{n}"], check=True)
        return f"postgresql+psycopg://kmx@127.0.0.1:{port}/tune{n}"

    def stop() -> None:
        subprocess.run([*user, str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"], capture_output=True)

    return url_of, stop


def run_once(op: str, gpus: tuple[str, ...], url: str, kernels: tuple[str, ...]) -> dict:
    settings = TuneSettings(op=op, kernels=kernels, sampler="grid", trials=10_000, url=url, gpus=gpus,
                            baseline=None, timeout_s=300)
    started = time.perf_counter()
    start_wall = dt.datetime.now(dt.timezone.utc)
    (result,) = tune(settings, [PROBLEMS[op]])
    wall = time.perf_counter() - started
    with TuningStore(url) as store:
        rows = store.rows(op=op, study=result.study)
    import optuna

    study = optuna.load_study(study_name=result.study, storage=open_study_storage(url))
    measured = [t for t in study.get_trials(deepcopy=False) if "point" in t.user_attrs and "duplicate_of" not in t.user_attrs]
    numbers = {r.trial_number for r in rows}
    points = Counter((r.kernel, json.dumps(r.config, sort_keys=True)) for r in rows)
    ok = [r for r in rows if r.status == "ok"]
    best = min(ok, key=lambda r: r.p50_us) if ok else None
    to_best = (best.created_at - start_wall).total_seconds() if best else None
    return {
        "gpus": list(gpus), "points": result.points, "rows": len(rows), "measured_trials": len(measured),
        "lost": sum(1 for t in measured if t.number not in numbers), "duplicates": sum(n - 1 for n in points.values()),
        "wall_s": wall, "trials_per_min": 60 * len(rows) / wall, "seconds_to_best": to_best,
        "best": {"kernel": best.kernel, "config": best.config, "p50_us": best.p50_us} if best else None,
        "rows_per_gpu": dict(Counter(str(r.platform.get("gpu_index")) for r in rows)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True)
    parser.add_argument("--op", default="indexer_logits", choices=sorted(PROBLEMS))
    parser.add_argument("--kernels", default="triton")
    parser.add_argument("--gpu-counts", default=None, help="e.g. 1,2,4 (default: 1, 2, 4, ... up to the GPUs here)")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()
    visible = visible_gpus()
    if not visible:
        print("no CUDA GPU visible: nothing to measure", file=sys.stderr)
        return 1
    counts = [int(c) for c in args.gpu_counts.split(",")] if args.gpu_counts else \
        [c for c in (1, 2, 4, 8) if c <= len(visible)]
    runs, notes = [], []
    with tempfile.TemporaryDirectory() as tmp:
        backends = [("sqlite", lambda n: f"sqlite:///{tmp}/tune_{n}.sqlite", None)]
        if not args.no_postgres:
            pg, stop = _postgres(Path(tmp))
            if pg is None:
                notes.append(f"PostgreSQL not measured: {stop}")
            else:
                backends.append(("postgresql", pg, stop))
        try:
            for backend, url_of, _ in backends:
                for n in counts:
                    if n > len(visible):
                        notes.append(f"{n} GPUs asked, {len(visible)} visible: not run")
                        continue
                    study_url = url_of(n)
                    row = run_once(args.op, tuple(visible[:n]), study_url, tuple(args.kernels.split(",")))
                    row["backend"] = backend
                    runs.append(row)
                    print(f"{backend:<10} {n} GPU(s): {row['rows']} rows / {row['points']} points, "
                          f"{row['trials_per_min']:.1f} trials/min, wall {row['wall_s']:.1f} s, lost {row['lost']}, "
                          f"duplicates {row['duplicates']}, per GPU {row['rows_per_gpu']}", flush=True)
        finally:
            for _, _, stop in backends:
                if stop:
                    stop()
    base = {r["backend"]: r["trials_per_min"] for r in runs if len(r["gpus"]) == 1}
    for r in runs:
        r["speedup_vs_1"] = r["trials_per_min"] / base[r["backend"]] if r["backend"] in base else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "multi_gpu_tune.json").write_text(json.dumps({"environment": environment_row(), "op": args.op,
                                                         "problem": PROBLEMS[args.op], "runs": runs, "notes": notes},
                                                        indent=2, default=str))
    for note in notes:
        print("note:", note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
