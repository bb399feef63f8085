"""GPU-only behaviour of the kernels (skipped without CUDA; the GPU suite runs it).

The MoE top-k direct launcher (kernmux/kernels/moe_topk_softmax/direct_launch.py): the
first call of a specialisation goes through Triton's launcher and is remembered; later
calls of the same key launch the compiled kernel directly and must give identical
results; a call that differs in anything Triton specialises on (a stride class, the
padding mask) compiles and caches an entry of its own instead of reusing one.
"""

from __future__ import annotations

import pytest
import torch

from kernmux.kernels.moe_topk_softmax import spec
from kernmux.kernels.moe_topk_softmax import triton as topk_triton
from kernmux.kernels.moe_topk_softmax.reference import moe_topk_softmax as reference

pytestmark = pytest.mark.gpu


def _feats(tokens, experts, topk, shared, padding=False):
    return {"tokens": tokens, "experts": experts, "topk": topk, "shared": shared, "dtype": "bf16",
            "renormalize": True, "padding": padding, "device": "cuda"}


@pytest.fixture
def launcher():
    topk_triton.LAUNCHER.entries.clear()
    if topk_triton.LAUNCHER.driver() is None:
        pytest.skip(f"direct launch disabled on this Triton: {topk_triton.LAUNCHER.disabled_reason}")
    yield topk_triton.LAUNCHER
    topk_triton.LAUNCHER.entries.clear()


def test_second_call_takes_the_direct_path_with_identical_results(launcher):
    gen = torch.Generator(device="cuda").manual_seed(11)
    logits = torch.randn(7, 162, generator=gen, device="cuda").to(torch.bfloat16)
    first = topk_triton.moe_topk_softmax(logits, 8, True, 2)
    assert len(launcher.entries) == 1
    (key,) = launcher.entries
    calls = []
    original = launcher.launch

    def counting(*args, **kwargs):
        calls.append(args[0])
        return original(*args, **kwargs)

    launcher.launch = counting
    try:
        second = topk_triton.moe_topk_softmax(logits, 8, True, 2)
    finally:
        del launcher.launch
    assert calls == [key]
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])
    result = spec.compare(second, reference(logits, 8, True, 2), _feats(7, 160, 8, 2))
    assert result.passed, result.detail


def test_a_new_stride_class_compiles_its_own_entry(launcher):
    gen = torch.Generator(device="cuda").manual_seed(12)
    wide = torch.randn(7, 176, generator=gen, device="cuda").to(torch.bfloat16)
    dense = wide[:, :162].contiguous()  # row stride 162
    view = wide[:, :162]  # row stride 176, divisible by 16: Triton specialises on that
    for logits in (dense, view):
        got = topk_triton.moe_topk_softmax(logits, 8, True, 2)
        result = spec.compare(got, reference(logits, 8, True, 2), _feats(7, 160, 8, 2))
        assert result.passed, result.detail
    assert len(launcher.entries) == 2
    for logits in (dense, view):  # both replayed from their own entries
        got = topk_triton.moe_topk_softmax(logits, 8, True, 2)
        assert spec.compare(got, reference(logits, 8, True, 2), _feats(7, 160, 8, 2)).passed
    assert len(launcher.entries) == 2


def test_padding_mask_has_its_own_entry_and_survives_replay(launcher):
    gen = torch.Generator(device="cuda").manual_seed(13)
    logits = torch.randn(9, 161, generator=gen, device="cuda").to(torch.bfloat16)
    mask = torch.zeros(9, dtype=torch.bool, device="cuda")
    mask[5:] = True
    plain = topk_triton.moe_topk_softmax(logits, 6, True, 1)
    padded = topk_triton.moe_topk_softmax(logits, 6, True, 1, mask)
    assert len(launcher.entries) == 2
    again = topk_triton.moe_topk_softmax(logits, 6, True, 1, mask)
    assert torch.equal(padded[1], again[1])
    assert (padded[1][5:] == -1).all() and torch.equal(padded[1][:5], plain[1][:5])
    feats = _feats(9, 160, 6, 1, padding=True)
    assert spec.compare(again, reference(logits, 6, True, 1, mask), feats).passed


# ----------------------------------------------------------- sparse MLA: NaN fp8 bytes


@pytest.mark.parametrize("fp8_mode", [0, 1, 2])
def test_sparse_mla_nan_fp8_latent_byte_gives_nan_rows(fp8_mode):
    """A NaN e4m3fn byte (0x7F) in a selected fp8 row: NaN in every head of that query,
    as in the reference. (Triton's CPU interpreter decodes 0x7F as 480, so this case
    is checked on the GPU only; make_nonfinite_inputs poisons the fp32 scale instead.)"""
    from kernmux.dispatch.outputs import poisoned_outputs
    from kernmux.dispatch.registry import REGISTRY

    op = REGISTRY.op("sparse_mla_decode")
    feats = {**op.default_features("cuda"), "batch": 4, "heads": 16, "topk": 64, "kv_dtype": "fp8", "extra_topk": 0}
    args, kwargs = op.make_inputs(feats, "cuda", 5)
    q, cache, indices = args[0], args[1].clone(), args[2]
    flat = indices.reshape(-1, indices.shape[-1]).cpu()
    query = next(i for i in range(flat.shape[0]) if (flat[i] >= 0).any())
    slot = int(flat[query][flat[query] >= 0][0])
    cache[slot // cache.shape[1], slot % cache.shape[1], 7] = 0x7F
    args = (q, cache, *args[2:])
    expected = op.reference(*args, **kwargs)
    with poisoned_outputs():
        got = REGISTRY.kernels_of("sparse_mla_decode")["triton"].bind({"FP8_MODE": fp8_mode})(*op.positional(args, kwargs))
    result = op.compare(got, expected, feats)
    assert result.passed, (result.detail, result.metrics)
    assert result.metrics["nan_rows_expected"] >= 16


# ------------------------------------------------------------- indexer: NaN fp8 bytes


@pytest.mark.parametrize("config", [{}, {"mma": "hk"}, {"mma": "kh", "joint": 1}])
def test_indexer_nan_fp8_query_and_key_bytes_give_nan(config):
    """NaN e4m3fn bytes in q and in a key: NaN logits where the reference has them
    (relu keeps NaN). GPU-only: the interpreter decodes 0x7F as 480."""
    from kernmux.dispatch.outputs import poisoned_outputs
    from kernmux.dispatch.registry import REGISTRY

    op = REGISTRY.op("indexer_logits")
    feats = {"batch": 3, "next_n": 2, "heads": 32, "head_dim": 128, "context": 300, "block_size": 64, "device": "cuda"}
    args, _ = op.make_inputs(feats, "cuda", 17)
    q, k_cache, k_scale, weights, context_lens, block_table, max_context = args
    q = q.clone()
    q.view(torch.uint8)[0, 1, 3, 9] = 0x7F
    position = int(context_lens[2]) // 2
    page = int(block_table[2, position // 64])
    k_cache.view(torch.uint8)[page, position % 64, 5] = 0x7F  # a view of the fused buffer
    args = (q, k_cache, k_scale, weights, context_lens, block_table, max_context)
    expected = op.reference(*args)
    kernel = REGISTRY.kernels_of("indexer_logits")["triton"]
    with poisoned_outputs():
        got = kernel.bind(config or None)(*args)
    result = op.compare(got, expected, feats)
    assert result.passed, result.detail
    assert torch.isnan(got[1]).any() and torch.isnan(got[4:6, position]).any()
