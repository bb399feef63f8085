"""benchmarks/decision_quality.py: the held-out draw, the regret arithmetic, and a --smoke run
end to end on CPU (Triton in its interpreter). Timings are never asserted: only that the
report is complete and consistent with the measurements it holds."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from decision_quality_report import geomean_ratio, quantile, summarize  # noqa: E402
from decision_quality_shapes import PLANS, draw_held_out, plan_for  # noqa: E402
from tests.conftest import subprocess_pythonpath


@pytest.mark.parametrize("op", sorted(PLANS))
@pytest.mark.parametrize("mode", ["quick", "full"])
def test_held_out_shapes_are_seeded_distinct_and_never_trained(op, mode):
    plan = plan_for(op, mode)
    first = draw_held_out(plan, 7, plan.held_out)
    assert first == draw_held_out(plan, 7, plan.held_out)  # same seed, same shapes
    assert first != draw_held_out(plan, 8, plan.held_out)
    assert len(first) == plan.held_out
    keys = [json.dumps(f, sort_keys=True) for f in first]
    assert len(set(keys)) == len(keys)
    assert not set(keys) & {json.dumps(dict(f), sort_keys=True) for f in plan.train}
    assert all(set(f) == set(plan.train[0]) for f in first)  # every feature but device


def _shape(tokens, pick, default, times, *, source="tuning_db", borrowed=None, distance=None):
    def key(name):
        return json.dumps([name, {}])

    return {
        "features": {"tokens": tokens, "device": "cuda"},
        "pick": {"kernel": pick, "config": {}, "source": source, "borrowed_from": borrowed, "distance": distance,
                 "key": key(pick)},
        "default": {"kernel": default, "config": {}, "source": "priority", "key": key(default)},
        "timings": [{"key": key(k), "kernel": k, "config": {}, "status": "ok" if t else "error", "p50_us": t}
                    for k, t in times.items()],
    }


def test_regret_gains_and_static_choice():
    shapes = [
        _shape(1, "a", "b", {"a": 10.0, "b": 20.0, "c": 12.0}),                      # pick is the oracle
        _shape(100, "a", "b", {"a": 11.0, "b": 10.0, "c": 30.0}, borrowed={"tokens": 64}, distance=0.64),
        _shape(1000, "b", "b", {"a": 40.0, "b": 20.0, "c": None}, source="priority"),  # c failed here
    ]
    s = summarize({"shapes": shapes, "tune_wall_s": 1.0, "mode": "quick"})
    ratios = [1.0, 1.1, 1.0]
    assert s["regret_geomean"] == pytest.approx(math.prod(ratios) ** (1 / 3) - 1)
    assert s["regret_max"] == pytest.approx(0.1) and s["regret_p90"] == pytest.approx(0.1)
    # Static: c did not run everywhere; a (10, 11, 40) vs b (20, 10, 20): b has the lower geomean.
    assert s["static"] == "b"
    assert s["gain_over_static"] == pytest.approx((20 / 10 * 10 / 11 * 20 / 20) ** (1 / 3) - 1)
    assert s["gain_over_default"] == pytest.approx(s["gain_over_static"])  # default is b as well
    assert s["decisions"] == {"tuned bucket": 1, "borrowed": 1, "priority": 1}
    assert s["oracle_kernels"] == {"a": 1, "b": 2} and s["kernels_cross_over"]
    assert s["goals"]["regret_max_le_15pct"] == "met" and s["goals"]["regret_geomean_le_3pct"] == "not met"
    assert [r["regret"] for r in s["per_shape"]] == pytest.approx([0.0, 0.1, 0.0])


def test_quantile_and_geomean_edges():
    assert geomean_ratio([]) is None and quantile([], 0.9) is None
    assert quantile([0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], 0.9) == 0.8
    assert geomean_ratio([2.0, 0.5]) == pytest.approx(0.0)


def test_smoke_run_reports_every_shape(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERNMUX_")}
    env.update(PYTHONPATH=subprocess_pythonpath(), KERNMUX_DB=f"sqlite:///{tmp_path}/absent.sqlite", TRITON_INTERPRET="1")
    proc = subprocess.run(
        [sys.executable, "benchmarks/decision_quality.py", "--smoke", "--seed", "3", "--confirm", "1",
         "--out", str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "decision_quality.json").read_text())
    assert report["seed"] == 3 and report["mode"] == "smoke" and "gpu" in report["environment"]
    assert report["command"] == "python benchmarks/decision_quality.py --smoke --seed 3 --confirm 1 --out OUT"
    (op,) = report["ops"]
    plan = plan_for("moe_topk_softmax", "smoke")
    assert [{k: v for k, v in f.items() if k != "device"} for f in op["held_out"]] == draw_held_out(plan, 3, 3)
    assert len(op["shapes"]) == 3 and op["tune_wall_s"] > 0
    summary = op["summary"]
    for shape, row in zip(op["shapes"], summary["per_shape"]):
        timings = {t["key"]: t for t in shape["timings"]}
        pick = timings[shape["pick"]["key"]]
        assert pick["status"] == "ok" and row["pick_us"] == pick["p50_us"]
        best = min(t["p50_us"] for t in timings.values() if t["status"] == "ok")
        assert row["oracle_us"] == best and row["regret"] == pytest.approx(pick["p50_us"] / best - 1)
        if shape["pick"]["source"] == "tuning_db":
            # The pick came from the database: a training winner or a borrowed one.
            assert pick["origin"] in ("winner", "default")
    # seed 3 draws tokens 12, 10 (tuned bucket 16) and 7 (bucket 8: borrowed from 16).
    assert summary["decisions"] == {"tuned bucket": 2, "borrowed": 1}
    borrowed = [s["pick"] for s in op["shapes"] if s["pick"]["borrowed_from"]]
    assert borrowed[0]["borrowed_from"]["tokens"] == 16 and borrowed[0]["distance"] == pytest.approx(1.1926, abs=1e-3)
    text = (tmp_path / "out" / "decision_quality.md").read_text()
    assert "| moe_topk_softmax | 3 | borrowed 1, tuned bucket 2 |" in text and "seed 3" in text
