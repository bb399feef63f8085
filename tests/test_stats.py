"""Dispatch statistics: hot-path counters, decision log lines, per-process JSON dumps."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kernmux import stats
from tests.conftest import subprocess_pythonpath

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _fresh():
    stats.reset()
    yield
    stats.reset()


def test_counters_and_decisions(caplog):
    for _ in range(3):
        stats.record_call("moe_topk_softmax")
    stats.record_hook("vllm.moe", "kernmux")
    stats.record_hook("vllm.moe", "fallback")
    with caplog.at_level(logging.INFO, logger="kernmux"):
        stats.record_dispatch("moe_topk_softmax", (("experts", 8), ("tokens", 4)), "triton", "use:my-rule")
    snap = stats.snapshot()
    assert snap["calls"] == {"moe_topk_softmax": 3}
    assert snap["hooks"] == {"vllm.moe": {"kernmux": 1, "fallback": 1}}
    assert [(d["op"], d["kernel"], d["source"]) for d in snap["decisions"]] == [("moe_topk_softmax", "triton", "use:my-rule")]
    assert snap["decisions"][0]["key"] == [["experts", 8], ["tokens", 4]]
    assert "kernmux: moe_topk_softmax experts=8 tokens=4 -> triton (use:my-rule)" in caplog.text
    json.dumps(snap)


@pytest.mark.parametrize("form", ["dir", "pid", "file"])
def test_stats_path_forms(tmp_path, monkeypatch, form):
    value = {"dir": f"{tmp_path}/", "pid": f"{tmp_path}/s-{{pid}}.json", "file": f"{tmp_path}/s.json"}[form]
    monkeypatch.setenv(stats.STATS_ENV, value)
    expected = {"dir": tmp_path / "kernmux-stats-42.json", "pid": tmp_path / "s-42.json", "file": tmp_path / "s.json"}[form]
    assert stats.stats_path(42) == str(expected)


def test_no_path_no_dump(monkeypatch):
    monkeypatch.delenv(stats.STATS_ENV, raising=False)
    assert stats.stats_path() is None and stats.dump() is None


def test_each_process_dumps_at_exit(tmp_path):
    code = (
        "from kernmux import stats\n"
        "stats.set_info('who', 'child')\n"
        "stats.record_call('moe_topk_softmax')\n"
        "stats.record_call('moe_topk_softmax')\n"
    )
    env = {**os.environ, stats.STATS_ENV: f"{tmp_path}/", "PYTHONPATH": subprocess_pythonpath()}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    (path,) = tmp_path.glob("kernmux-stats-*.json")
    dump = json.loads(path.read_text())
    assert path.name == f"kernmux-stats-{dump['pid']}.json"
    assert dump["calls"] == {"moe_topk_softmax": 2} and dump["info"] == {"who": "child"}
