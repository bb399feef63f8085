"""Trust in the hot path: a cache hit never skips a validation the miss would fail, a bad
call never disables a kernel, scalars do not grow the cache, first use is thread-safe."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import kernmux.dispatch.hotpath as hotpath
from kernmux.dispatch.hotpath import Dispatcher, make_entry_function
from kernmux.dispatch.registry import REGISTRY
from tests.dispatch import toy_ops
from tests.dispatch.test_hotpath import PREFER_FLAKY, inputs
from tests.conftest import subprocess_pythonpath

ROOT = Path(__file__).resolve().parents[2]


def entry(cpu_platform):
    dispatcher = Dispatcher(platform=cpu_platform, rules=PREFER_FLAKY, tuning=None)
    return make_entry_function(REGISTRY.op("toy_attention"), dispatcher), dispatcher


def test_bad_call_is_the_callers_error_and_disables_nothing(cpu_platform):
    fn, dispatcher = entry(cpu_platform)
    q, k, v, sink, scale = inputs(2)
    bad_v = torch.randn(5, k.shape[1], v.shape[2])  # batch 5 != 2: every kernel's einsum raises
    with pytest.raises(RuntimeError) as raised:
        fn(q, k, bad_v, sink, scale)
    assert not isinstance(raised.value, toy_ops.FlakyError)
    assert dispatcher.failed == {}
    # The same feature key with valid inputs still runs the preferred kernel.
    o, lse = fn(q, k, v, sink, scale)
    ro, rlse = toy_ops.toy_attention(q, k, v, sink, scale)
    assert torch.allclose(o, ro, atol=1e-5) and torch.allclose(lse, rlse, atol=1e-5)
    feats = REGISTRY.op("toy_attention").features(q, k, v, sink, scale)
    assert dispatcher.explain("toy_attention", feats).kernel == "flaky"


def test_a_kernel_is_marked_failed_only_when_another_succeeds(cpu_platform):
    fn, dispatcher = entry(cpu_platform)
    args = inputs(3)  # flaky raises for batch 3, chunked then succeeds
    o, _ = fn(*args)
    assert torch.allclose(o, toy_ops.toy_attention(*args)[0], atol=1e-5)
    (failed,) = dispatcher.failed.values()
    assert list(failed) == ["flaky"] and "FlakyError" in failed["flaky"]


def test_strides_are_part_of_the_key(cpu_platform):
    fn, _ = entry(cpu_platform)
    q, k, v, sink, scale = inputs(2)
    fn(q, k, v, sink, scale)
    strided_q = torch.randn(q.shape[0], q.shape[1], 2 * q.shape[2])[..., ::2]
    assert strided_q.shape == q.shape and strided_q.stride() != q.stride()
    fn(strided_q, k, v, sink, scale)
    assert len(fn.kernmux_entry.cache) == 2  # validated and decided anew, not a hit


def test_strided_cache_after_contiguous_call_is_rejected():
    """sparse_mla_decode needs a unit last stride of kv_cache: a strided cache of the same
    shape after a contiguous call is refused, not read as contiguous."""
    import kernmux.ops
    from kernmux.kernels.sparse_mla_decode.inputs import make_inputs

    op = REGISTRY.op("sparse_mla_decode")
    feats = {**op.default_features("cpu"), "batch": 1, "heads": 16, "topk": 64, "num_blocks": 2, "block_size": 64}
    feats = {k: v for k, v in feats.items() if k in op.default_features("cpu")}
    args, kwargs = make_inputs(feats, "cpu", 0)
    positional = list(op.positional(args, kwargs))
    kernmux.ops.reset()
    kernmux.ops.sparse_mla_decode(*positional)
    kv = positional[1]
    strided = torch.empty(*kv.shape[:-1], 2 * kv.shape[-1], dtype=kv.dtype)[..., ::2]
    strided.copy_(kv)
    positional[1] = strided
    with pytest.raises(ValueError, match="kv_cache"):
        kernmux.ops.sparse_mla_decode(*positional)
    kernmux.ops.reset()


def test_float_scalars_do_not_grow_the_cache(cpu_platform):
    fn, _ = entry(cpu_platform)
    q, k, v, sink, _ = inputs(2)
    for i in range(50):
        fn(q, k, v, sink, 0.1 + i * 0.01)
    fn(q, k, v, sink, float("nan"))
    assert len(fn.kernmux_entry.cache) == 1


def test_cache_is_bounded(cpu_platform, monkeypatch):
    monkeypatch.setattr(hotpath, "MAX_CACHED_KEYS", 3)
    fn, _ = entry(cpu_platform)
    for batch in (1, 2, 4, 5, 6, 7):
        fn(*inputs(batch))
        assert len(fn.kernmux_entry.cache) <= 3


_THREADS = textwrap.dedent(
    """
    import sys, threading, torch
    import kernmux
    errors, barrier = [], threading.Barrier(8)
    def work(seed):
        g = torch.Generator().manual_seed(seed)
        barrier.wait()
        for i in range(20):
            logits = torch.randn(3 + i % 4, 40, generator=g)
            try:
                w, ids = kernmux.ops.moe_topk_softmax(logits, 4, True, 0)
                ref = torch.topk(torch.softmax(logits.float(), -1), 4, dim=-1).indices
                assert torch.equal(ids.long(), ref), "wrong ids"
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")
    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    print(len(errors), errors[:3])
    """
)


@pytest.mark.slow
def test_concurrent_first_calls_all_succeed(tmp_path):
    """8 threads x 20 first calls at once, in 10 fresh processes: 0 failures."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERNMUX_")}
    env.update(PYTHONPATH=subprocess_pythonpath(), TRITON_INTERPRET="0", KERNMUX_DB=f"sqlite:///{tmp_path}/absent.sqlite")
    for run in range(10):
        proc = subprocess.run([sys.executable, "-c", _THREADS], env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.strip().startswith("0 "), f"run {run}: {proc.stdout}"
