"""The generated entry function: cache, validation, runtime fallback, torch.compile."""

import logging

import pytest
import torch

from kernmux.dispatch.hotpath import Dispatcher, make_entry_function
from kernmux.dispatch.registry import REGISTRY
from kernmux.rules.loader import parse_rules_text
from kernmux.dispatch.rule_model import RuleSet
from tests.dispatch import toy_ops
from tests.dispatch.toy_ops import toy_attention

PREFER_FLAKY = RuleSet(tuple(parse_rules_text(
    """version: 1
rules:
  - id: prefer-flaky
    op: toy_attention
    prefer: [flaky, chunked]
    reason: test
    link: https://example.org/x
""", "t.yaml")))


def entry(cpu_platform, rules=PREFER_FLAKY):
    dispatcher = Dispatcher(platform=cpu_platform, rules=rules, tuning=None)
    return make_entry_function(REGISTRY.op("toy_attention"), dispatcher), dispatcher


def inputs(batch, heads=8, seed=0):
    op = REGISTRY.op("toy_attention")
    args, _ = op.make_inputs({**op.default_features(), "batch": batch, "heads": heads, "sink": True}, "cpu", seed)
    return args


def test_signature_defaults_and_cache(cpu_platform):
    fn, dispatcher = entry(cpu_platform)
    q, k, v, sink, scale = inputs(2)
    o, lse = fn(q, k, v, sink, scale=scale)
    ro, rlse = toy_attention(q, k, v, sink, scale)
    assert torch.allclose(o, ro) and torch.allclose(lse, rlse)
    cache = fn.kernmux_entry.cache
    assert len(cache) == 1
    fn(*inputs(2, seed=1))  # same shapes: hit, no new decision
    assert len(cache) == 1 and len(dispatcher._decisions) == 1


def test_runtime_fallback_is_per_key_and_correct(cpu_platform, caplog):
    fn, dispatcher = entry(cpu_platform)
    toy_ops.CALLS.clear()
    args3 = inputs(3, seed=7)
    with caplog.at_level(logging.WARNING, logger="kernmux"):
        o, lse = fn(*args3)
        fn(*inputs(3, seed=8))
    ro, rlse = toy_attention(*args3)
    assert torch.allclose(o, ro, atol=1e-5) and torch.allclose(lse, rlse, atol=1e-5)
    warnings = [r for r in caplog.records if "flaky" in r.getMessage()]
    assert len(warnings) == 1  # logged once
    feats3 = REGISTRY.op("toy_attention").features(*args3)
    decision = dispatcher.explain("toy_attention", feats3)
    assert decision.kernel == "chunked"
    flaky = next(c for c in decision.candidates if c.kernel == "flaky")
    assert flaky.status == "failed" and "batch=3" in flaky.reason
    # Another key still uses the flaky kernel.
    calls_before = toy_ops.CALLS["flaky"]
    fn(*inputs(2, seed=9))
    assert toy_ops.CALLS["flaky"] == calls_before + 1
    assert dispatcher.explain("toy_attention", REGISTRY.op("toy_attention").features(*inputs(2))).kernel == "flaky"


def test_validation_names_argument(cpu_platform):
    fn, _ = entry(cpu_platform)
    q, k, v, sink, scale = inputs(2)
    with pytest.raises(ValueError, match=r"sink: expected \[H=8\], got \[3\]"):
        fn(q, k, v, torch.randn(3), scale)
    with pytest.raises(TypeError, match="q: expected dtype"):
        fn(q.half(), k, v, sink, scale)


def test_torch_compile_fullgraph_on_cpu(monkeypatch):
    import kernmux.ops

    kernmux.ops.reset()
    toy = kernmux.ops.toy_attention

    def model(q, k, v, sink):
        o, lse = toy(q, k, v, sink, 0.5)
        return o * 2 + lse[..., None]

    q, k, v, sink, _ = inputs(2, seed=3)
    compiled = torch.compile(model, fullgraph=True, backend="inductor")
    got = compiled(q, k, v, sink)
    ro, rlse = toy_attention(q, k, v, sink, 0.5)
    assert torch.allclose(got, ro * 2 + rlse[..., None], atol=1e-5)
    assert hasattr(torch.ops.kernmux, "toy_attention")
    kernmux.ops.reset()


def test_custom_op_fake_shapes():
    import kernmux.ops
    from torch._subclasses.fake_tensor import FakeTensorMode

    kernmux.ops.toy_attention  # registers torch.ops.kernmux.toy_attention
    with FakeTensorMode():
        q, k, v = torch.empty(2, 4, 8), torch.empty(2, 5, 8), torch.empty(2, 5, 6)
        o, lse = torch.ops.kernmux.toy_attention(q, k, v, None, 1.0)
        assert o.shape == (2, 4, 6) and lse.shape == (2, 4)
    kernmux.ops.reset()


def test_unknown_op_attribute():
    import kernmux.ops

    with pytest.raises(AttributeError, match="known ops"):
        kernmux.ops.no_such_op
