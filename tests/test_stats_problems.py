"""Per-problem call counts: every problem run through ``kernmux.ops`` is in the dump with its
full features and how often it was called (hits counted by the cached callable)."""

from __future__ import annotations

import json

import pytest
import torch

import kernmux.ops
from kernmux import stats
from kernmux.dispatch.hotpath import make_entry_function
from kernmux.dispatch.registry import REGISTRY

OP = "moe_topk_softmax"


@pytest.fixture
def counting(monkeypatch, tmp_path):
    """kernmux.ops with statistics on (KERNMUX_STATS_PATH set before the entry is built)."""
    monkeypatch.setenv(stats.STATS_ENV, str(tmp_path / "stats.json"))
    monkeypatch.setenv("KERNMUX_FORCE", f"{OP}=torch")  # no compilation, no database
    stats.reset()
    kernmux.ops.reset()
    yield tmp_path / "stats.json"
    kernmux.ops.reset()
    stats.reset()


def test_each_problem_counted_with_its_features(counting):
    small, large = torch.randn(3, 16), torch.randn(40, 16)
    for _ in range(5):
        kernmux.ops.moe_topk_softmax(small, 2)
    for _ in range(2):
        kernmux.ops.moe_topk_softmax(large, 2, True)
    # Another raw key (strides) of the same problem: the same counter.
    kernmux.ops.moe_topk_softmax(torch.randn(16, 3).t(), 2)
    snap = stats.snapshot()
    assert snap["version"] == 2
    problems = [(p["op"], p["features"]["tokens"], p["features"]["renormalize"], p["calls"]) for p in snap["problems"]]
    assert problems == [(OP, 3, False, 6), (OP, 40, True, 2)]
    features = snap["problems"][0]["features"]
    assert set(features) == set(REGISTRY.op(OP).feature_names)
    assert features == REGISTRY.op(OP).features(small, 2)
    assert snap["calls"] == {OP: 8}
    assert stats.dump() == str(counting)
    assert json.loads(counting.read_text())["problems"] == snap["problems"]


def test_a_call_rejected_at_the_boundary_is_not_counted(counting):
    x = torch.randn(4, 16)
    kernmux.ops.moe_topk_softmax(x, 2)
    with pytest.raises(ValueError):
        kernmux.ops.moe_topk_softmax(x, 99)  # topk > experts: rejected at the boundary, never dispatched
    kernmux.ops.moe_topk_softmax(x, 2)
    (problem,) = stats.snapshot()["problems"]
    assert problem["calls"] == 2


def test_without_statistics_nothing_is_wrapped(monkeypatch):
    monkeypatch.delenv(stats.STATS_ENV, raising=False)
    monkeypatch.setenv("KERNMUX_FORCE", f"{OP}=torch")
    stats.reset()
    kernmux.ops.reset()
    try:
        kernmux.ops.moe_topk_softmax(torch.randn(3, 16), 2)
        (cached,) = kernmux.ops.moe_topk_softmax.kernmux_entry.cache.values()
        assert not hasattr(cached, "__wrapped__")
        assert stats.snapshot()["problems"] == []
    finally:
        kernmux.ops.reset()


def test_counting_closure_keeps_the_signature_and_result():
    from kernmux.runtime import default_dispatcher

    op = REGISTRY.op(OP)
    fn = make_entry_function(op, default_dispatcher(), counter=stats.problem_counter)
    stats.reset()
    x = torch.randn(6, 16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KERNMUX_FORCE", f"{OP}=torch")
        out = fn(x, 2)
        again = fn(gating_logits=x, topk=2)
    ref = op.reference(x, 2)
    assert all(torch.equal(a, b) for a, b in zip(out, ref)) and all(torch.equal(a, b) for a, b in zip(again, ref))
    (cached,) = fn.kernmux_entry.cache.values()
    assert cached.__wrapped__ is not None
    assert stats.snapshot()["problems"][0]["calls"] == 2
    stats.reset()
