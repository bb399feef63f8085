"""``bench`` (side-by-side timings, roofline fraction) and sub-space restriction.

The measured ceilings behind the fraction are tested in ``test_ceilings.py``."""

from __future__ import annotations

import json

import pytest

from kernmux.tuning_db.measurement.bench import bench
from kernmux.tuning_db.tuning.search import Point, SearchSpace, restrict
from tests.tuning_db import fault_kernels

OP = fault_kernels.OP
FAST = {"warmup_ms": 0.5, "rep_ms": 1.0}


def test_bench_gates_numerics_and_reports_achieved_bandwidth():
    fault_kernels.register()
    feats = [{"n": 33, "device": "cpu"}, {"n": 4096, "device": "cpu"}]
    rows, ceilings = bench(OP, feats, ["torch", "good", "wrong"], **FAST)
    assert ceilings is None, "CPU: no measured ceilings, no fraction"
    assert [(r.features["n"], r.kernel, r.status) for r in rows] == [
        (33, "torch", "ok"), (33, "good", "ok"), (33, "wrong", "numerics_failed"),
        (4096, "torch", "ok"), (4096, "good", "ok"), (4096, "wrong", "numerics_failed")]
    for r in rows:
        if r.status == "ok":
            assert r.achieved_tbs == pytest.approx(8.0 * r.features["n"] / (r.p50_us * 1e6))
            assert r.fraction is None and r.floor_us is None
        else:
            assert r.p50_us is None and r.achieved_tbs is None and "numerics" in r.error
    assert rows[1].config == {"chunk": 1, "order": "fwd"}, "kernels are benched at their default config"


def test_cli_bench_json_and_exit_codes(capsys):
    from kernmux.cli.main import main

    fault_kernels.register()
    # CPU inputs on any machine: the "no ceilings" answers below are what CPU inputs get
    # (a GPU's measured ceilings are tested in test_timing_gpu.py).
    base = ["bench", OP, "n=64", "--device", "cpu", "--warmup-ms", "0.5", "--rep-ms", "1"]
    assert main([*base, "--kernels", "torch,good", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [r["kernel"] for r in data["rows"]] == ["torch", "good"] and data["ceilings"] is None
    assert data["environment"]["torch"]
    assert main([*base, "--kernels", "good,nan"]) == 1, "a kernel failing the gate fails the check"
    out = capsys.readouterr().out
    assert "numerics_failed" in out and "no measured ceilings" in out
    assert main([*base, "--kernels", "nope"]) == 2


def test_restrict_keeps_only_the_fixed_sub_space():
    points = [Point.of("a", {"x": x, "y": y}) for x in (1, 2) for y in ("p", "q")] + [Point.of("b")]
    space = restrict(SearchSpace.from_points(points), {"a": {"y": "q"}})
    assert [p.config_dict for p in space.points] == [{"x": 1, "y": "q"}, {"x": 2, "y": "q"}, {}]
    assert dict(space.choices["a"]) == {"x": (1, 2), "y": ("q",)}
