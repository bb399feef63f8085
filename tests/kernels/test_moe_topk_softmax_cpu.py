"""moe_topk_softmax ``torch_topk`` (the CPU kernel): bitwise the reference's answer,
ties included, and the CPU default.

The kernel runs on CPU tensors only, whatever device the suite runs on. Its correctness
rests on one claim (packed int64 keys order exactly as the reference's stable sort), so
beside the parity grid these tests aim at what breaks such a claim: ties everywhere
(small-integer logits, bf16 rounding, underflow to 0), NaN of either sign, the tie at
the k-th place, k = E.
"""

from __future__ import annotations

import zlib

import pytest
import torch

from kernmux.dispatch.platform import current_platform
from kernmux.dispatch.registry import REGISTRY
from kernmux.dispatch.verify import verify_kernel
from kernmux.kernels.moe_topk_softmax import spec
from kernmux.kernels.moe_topk_softmax.reference import moe_topk_softmax as reference
from tests.kernels.test_moe_topk_softmax import _tie_cases, _verify_on

OP = "moe_topk_softmax"
KERNEL = "torch_topk"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def _features(tokens, experts, topk, shared, dtype, renormalize, padding=False):
    return {"tokens": tokens, "experts": experts, "topk": topk, "shared": shared, "dtype": dtype,
            "renormalize": renormalize, "padding": padding, "device": "cpu"}


def _kernel():
    return REGISTRY.kernels_of(OP)[KERNEL].bind()


def _assert_same_as_reference(logits, topk, renormalize=False, num_shared=0, is_padding=None):
    got_w, got_ids = _kernel()(logits, topk, renormalize, num_shared, is_padding)
    want_w, want_ids = reference(logits, topk, renormalize, num_shared, is_padding)
    assert torch.equal(got_ids, want_ids), (got_ids, want_ids)
    # Bitwise, NaN where the reference has NaN: the same fp32 expressions in the same order.
    assert torch.equal(torch.isnan(got_w), torch.isnan(want_w))
    assert torch.equal(got_w.nan_to_num(nan=-7.0), want_w.nan_to_num(nan=-7.0))
    assert got_w.dtype == torch.float32 and got_ids.dtype == torch.int32


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shared", [0, 2])
@pytest.mark.parametrize("experts,topk", [(160, 6), (288, 8), (8, 8), (1, 1)])
def test_parity_grid(experts, topk, shared, dtype, renormalize):
    feats = _features(7, experts, topk, shared, dtype, renormalize)
    result = verify_kernel(OP, KERNEL, feats, seed=_seed(feats))
    assert result.passed, f"{result.status}: {result.detail} {dict(result.metrics)}"


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
def test_ties_go_to_the_lower_index(dtype):
    for row, topk, expected in _tie_cases():
        logits = row.to(DTYPES[dtype]).unsqueeze(0).repeat(3, 1)
        _, ids = _kernel()(logits, topk, False, 0, None)
        assert ids.tolist() == [expected] * 3, (row.tolist(), ids.tolist())
        _assert_same_as_reference(logits, topk)


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("low,high", [(-3, 4), (0, 2)])
def test_many_ties_match_reference(dtype, low, high):
    """Small-integer logits: most probabilities tie, at the k-th place too."""
    gen = torch.Generator().manual_seed(_seed("ties", dtype, low))
    logits = torch.randint(low, high, (64, 160 + 2), generator=gen).to(DTYPES[dtype])
    for renormalize in (False, True):
        _assert_same_as_reference(logits, 8, renormalize, 2)


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_router_like_logits_with_rounding_ties(dtype):
    """Normal logits rounded to 16 bits: many rows hold exactly equal values."""
    gen = torch.Generator().manual_seed(_seed("router", dtype))
    logits = (torch.randn(512, 160, generator=gen) * 2).to(DTYPES[dtype])
    _assert_same_as_reference(logits, 6, True)


def test_k_equals_experts_and_one_expert():
    gen = torch.Generator().manual_seed(_seed("k=E"))
    logits = torch.randint(-2, 2, (5, 16), generator=gen).float()
    _assert_same_as_reference(logits, 16)
    _assert_same_as_reference(torch.randn(4, 1, generator=gen), 1)


def test_nan_rows_of_either_sign_and_payload():
    """NaN rows get ids 0..k-1 whatever NaNs the softmax produces (a NaN logit, +inf,
    all -inf, a negative NaN, a NaN with a payload)."""
    logits = torch.randn(6, 40)
    logits[0, 3] = float("nan")
    logits[1, 7] = float("inf")
    logits[2] = float("-inf")
    logits[3, 5] = -float("nan")
    logits[4, 9] = torch.tensor(0x7FC00123, dtype=torch.int32).view(torch.float32)
    logits[4, 11] = torch.tensor(-0x00400001, dtype=torch.int32).view(torch.float32)  # 0xFFBFFFFF: a negative NaN
    logits[5, :20] = float("-inf")
    assert torch.isnan(logits[4, 11])
    for topk in (1, 6, 40):
        _assert_same_as_reference(logits, topk, True)
        _, ids = _kernel()(logits, topk, False, 0, None)
        for row in range(5):
            assert ids[row].tolist() == list(range(topk))


def test_top_ids_order_nan_rows_by_index_whatever_their_bits():
    """The softmax of this torch gives one NaN bit pattern per row; another build may
    not. Rows of mixed NaNs (both signs, payloads) still give ids 0..k-1."""
    from kernmux.kernels.moe_topk_softmax.cpu import top_ids

    patterns = torch.tensor([0x7FC00000, -0x00400000, 0x7FC00123, -0x00000001, 0x7F800001], dtype=torch.int32)
    rows = patterns[torch.randint(0, 5, (4, 24), generator=torch.Generator().manual_seed(3))]
    probs = rows.view(torch.float32)
    assert torch.isnan(probs).all() and len(set(rows.flatten().tolist())) > 1
    assert top_ids(probs, 5).tolist() == [list(range(5))] * 4


def test_nonfinite_inputs_pass_verify():
    feats = _features(8, 160, 6, 2, "bf16", True, padding=True)
    result, _, _ = _verify_on(spec.make_nonfinite_inputs, KERNEL, feats, _seed("nonfinite"))
    assert result.passed, result.detail


def test_padding_zero_tokens_and_non_contiguous():
    gen = torch.Generator().manual_seed(_seed("layout"))
    base = torch.randn(9, 170, generator=gen)
    view = base[:, 3:165]  # 160 routed + 2 shared, row stride 170
    mask = torch.rand(9, generator=gen) < 0.4
    mask[-1] = True
    _assert_same_as_reference(view, 6, True, 2, mask)
    _assert_same_as_reference(torch.randn(30, 9, generator=gen).t(), 3)
    weights, ids = _kernel()(torch.empty(0, 66), 4, False, 2, torch.zeros(0, dtype=torch.bool))
    assert weights.shape == (0, 6) and ids.shape == (0, 6)


def test_chosen_by_default_on_cpu_and_not_offered_for_gpu_tensors(monkeypatch):
    from kernmux.runtime import make_dispatcher

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # as outside the test suite: no Triton on CPU

    dispatcher = make_dispatcher(use_tuning_db=False, run_self_checks=False)
    decision = dispatcher.decide(OP, {**REGISTRY.op(OP).default_features("cpu")})
    assert decision.kernel == KERNEL and decision.source == "priority", decision
    kernel = REGISTRY.kernels_of(OP)[KERNEL]
    support = kernel.check({**REGISTRY.op(OP).default_features("cuda")}, current_platform())
    assert not support.ok and "CPU tensors only" in support.reason
