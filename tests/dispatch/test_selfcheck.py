"""Self-check before first use: a wrong kernel is never used to answer a call."""

from __future__ import annotations

import torch

import kernmux.dispatch.selfcheck as selfcheck_mod
from kernmux.dispatch.hotpath import Dispatcher, make_entry_function
from kernmux.dispatch.registry import Kernel, Registry
from kernmux.dispatch.selfcheck import SelfCheck, Verdict
from tests.dispatch import toy_ops

CALLS = {"wrong": 0}


def wrong_attention(q, k, v, sink, scale):
    """Fast and wrong: the output is off by 1 (lse right)."""
    CALLS["wrong"] += 1
    o, lse = toy_ops.toy_attention(q, k, v, sink, scale)
    return o + 1, lse


class MemoryStore:
    def __init__(self):
        self.rows = {}

    def verdict(self, op, bucket, platform, kernel, config):
        return self.rows.get((op, repr(sorted(bucket.items())), kernel))

    def record_verdict(self, op, features, bucket, platform, kernel, config, verdict):
        self.rows[(op, repr(sorted(bucket.items())), kernel)] = Verdict(verdict.passed, verdict.detail, verdict.metrics, "row 1")
        return "row 1"


def registry():
    reg = Registry()
    reg._loaded = True  # only what this test registers
    reg.add_op(toy_ops.TOY_ATTENTION)
    reg.add_kernel(Kernel(op="toy_attention", name="torch", impl=toy_ops.toy_attention, priority=0))
    reg.add_kernel(Kernel(op="toy_attention", name="wrong", impl=wrong_attention, priority=100))
    return reg


def call(dispatcher, reg, seed=0):
    op = reg.op("toy_attention")
    args, _ = op.make_inputs({**op.default_features(), "sink": True}, "cpu", seed)
    fn = make_entry_function(op, dispatcher)
    return fn(*args), toy_ops.toy_attention(*args), op.features(*args)


def test_wrong_kernel_is_dropped_and_explained(cpu_platform):
    reg, store = registry(), MemoryStore()
    dispatcher = Dispatcher(registry=reg, platform=cpu_platform, selfcheck=SelfCheck("auto", store))
    CALLS["wrong"] = 0
    (o, lse), (ro, rlse), feats = call(dispatcher, reg)
    assert torch.equal(o, ro) and torch.equal(lse, rlse)
    assert CALLS["wrong"] == 1  # once, inside the check; never for the caller
    decision = dispatcher.explain("toy_attention", feats)
    assert decision.kernel == "torch"
    wrong = next(c for c in decision.candidates if c.kernel == "wrong")
    assert wrong.status == "failed" and wrong.reason.startswith("self-check failed") and "max_abs_err_o" in wrong.reason
    (verdict,) = store.rows.values()
    assert not verdict.passed


def test_recorded_verdict_is_not_checked_again(cpu_platform):
    reg, store = registry(), MemoryStore()
    call(Dispatcher(registry=reg, platform=cpu_platform, selfcheck=SelfCheck("auto", store)), reg)
    CALLS["wrong"] = 0
    second = Dispatcher(registry=reg, platform=cpu_platform, selfcheck=SelfCheck("auto", store))  # "another process"
    (o, _), (ro, _), _ = call(second, reg, seed=1)
    assert torch.equal(o, ro) and CALLS["wrong"] == 0
    # "always" checks again whatever is recorded.
    third = Dispatcher(registry=reg, platform=cpu_platform, selfcheck=SelfCheck("always", store))
    call(third, reg, seed=2)
    assert CALLS["wrong"] == 1


def test_off_uses_the_kernel_unchecked(cpu_platform):
    reg = registry()
    (o, _), (ro, _), _ = call(Dispatcher(registry=reg, platform=cpu_platform, selfcheck=SelfCheck("off")), reg)
    assert torch.allclose(o, ro + 1)


def test_never_checks_while_capturing_or_compiling(cpu_platform, monkeypatch):
    reg = registry()
    monkeypatch.setattr(selfcheck_mod, "check_blocked", lambda: "a CUDA graph is being captured")
    dispatcher = Dispatcher(registry=reg, platform=cpu_platform, selfcheck=SelfCheck("auto", MemoryStore()))
    _, _, feats = call(dispatcher, reg)
    decision = dispatcher.explain("toy_attention", feats)
    assert decision.kernel == "wrong"
    assert any("self-check skipped: a CUDA graph is being captured" in n for n in decision.notes)


def test_explain_reads_recorded_failures_without_running(cpu_platform):
    reg, store = registry(), MemoryStore()
    call(Dispatcher(registry=reg, platform=cpu_platform, selfcheck=SelfCheck("auto", store)), reg)
    CALLS["wrong"] = 0
    what_if = Dispatcher(registry=reg, platform=cpu_platform, selfcheck=SelfCheck("auto", store, run=False))
    op = reg.op("toy_attention")
    feats = {**op.default_features(), "sink": True}
    decision = what_if.explain("toy_attention", feats)
    assert decision.kernel == "torch" and CALLS["wrong"] == 0
