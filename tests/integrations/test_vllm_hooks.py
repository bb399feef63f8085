"""Each hook's replacement against vLLM's calling convention: the arguments vLLM passes
are mapped onto the kernmux op (compared with calling the op directly, and with the
reference semantics), and calls the op cannot express go to vLLM's function unchanged."""

from __future__ import annotations

import pytest
import torch

import kernmux.ops
from kernmux.dispatch.registry import REGISTRY
from kernmux import stats
from kernmux.integrations.vllm_hooks import indexer, moe_topk, sparse_mla
from kernmux.integrations.vllm_hooks.base import HookRuntime
from kernmux.kernels.indexer_logits.layout import page_layout_base
from kernmux.kernels.moe_topk_softmax.reference import moe_topk_softmax as moe_reference


@pytest.fixture(autouse=True)
def _torch_kernels(monkeypatch):
    # The hooks' mapping is under test, not the kernels: keep the Triton interpreter out.
    monkeypatch.setenv("KERNMUX_FORCE", "moe_topk_softmax=torch,indexer_logits=torch,sparse_mla_decode=torch")
    kernmux.ops.reset()
    stats.reset()
    yield
    kernmux.ops.reset()
    stats.reset()


class Recorder:
    """Stands in for vLLM's function: records calls, answers a sentinel. ``like``: a
    function whose signature the recorder reports (hooks read the installed signature)."""

    def __init__(self, like=None):
        self.calls = []
        if like is not None:
            import inspect

            self.__signature__ = inspect.signature(like)

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return "vllm"


# The signatures of the hooked indexer functions as read from the vLLM wheels.
def deep_gemm_032(q, kv_cache, weights, context_lens, block_tables, schedule_metadata, max_model_len, clean_logits, indices=None):
    """vllm 0.32.0 vllm/utils/deep_gemm.py"""


def deep_gemm_033(q, kv_cache, weights, context_lens, block_tables, schedule_metadata, max_model_len, indices=None):
    """vllm 0.33.0: clean_logits removed (notes/vllm.md, Corrections)"""


def rocm_032(q_fp8, kv_cache_fp8, weights, context_lens, block_tables, schedule_metadata, max_model_len, *, compress_ratio=1):
    """vllm 0.32.0 vllm/v1/attention/ops/rocm_aiter_mla_sparse.py"""


# --------------------------------------------------------------------------- MoE top-k


@pytest.mark.parametrize("tokens, experts, k", [(1, 8, 2), (7, 60, 4), (33, 16, 1)])
@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("shared", [0, 1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_softmax_fills_vllm_buffers(tokens, experts, k, renormalize, shared, dtype):
    gen = torch.Generator().manual_seed(tokens * 1000 + experts + k + shared)
    logits = torch.randn(tokens, experts + shared, generator=gen).to(dtype)
    vllm_fn = Recorder()
    fn = moe_topk.make_topk_softmax(HookRuntime("t", "moe_topk_softmax"), vllm_fn)
    weights = torch.full((tokens, k + shared), float("nan"))
    ids = torch.full((tokens, k), -7, dtype=torch.int32)
    tei = torch.full((tokens, k), -7, dtype=torch.int32)
    args = (weights, ids, tei, logits, renormalize) + ((shared, "sigmoid") if shared else ())
    out_w, out_ids = fn(*args)
    assert out_w is weights and out_ids is ids and not vllm_fn.calls
    ref_w, ref_ids = moe_reference(logits, k, renormalize, shared)
    torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-7)
    assert torch.equal(ids, ref_ids[:, :k])
    assert torch.equal(tei, torch.arange(k * tokens, dtype=torch.int32).view(k, tokens).t())


def test_topk_softmax_int64_ids_and_no_token_expert_indices():
    logits = torch.randn(5, 8, generator=torch.Generator().manual_seed(3))
    fn = moe_topk.make_topk_softmax(HookRuntime("t", "moe_topk_softmax"), Recorder())
    weights, ids = torch.empty(5, 2), torch.empty(5, 2, dtype=torch.int64)
    fn(topk_weights=weights, topk_indices=ids, token_expert_indices=None, gating_output=logits)
    ref_w, ref_ids = moe_reference(logits, 2)
    assert torch.equal(ids, ref_ids.long()) and torch.allclose(weights, ref_w)


@pytest.mark.parametrize(
    "extra",
    [
        {"num_shared_experts": 1, "shared_expert_scoring_func": "softmax"},  # not the op's sigmoid slot
        {"num_shared_experts": 1, "shared_expert_scoring_func": ""},
        {"e_score_correction_bias": torch.zeros(9)},  # an argument the op does not have
    ],
)
def test_topk_softmax_passes_through_what_the_op_cannot_express(extra):
    vllm_fn = Recorder()
    fn = moe_topk.make_topk_softmax(HookRuntime("t", "moe_topk_softmax"), vllm_fn)
    weights, ids, tei = torch.empty(3, 3), torch.empty(3, 2, dtype=torch.int32), torch.empty(3, 2, dtype=torch.int32)
    assert fn(weights, ids, tei, torch.randn(3, 9), False, **extra) == "vllm"
    assert len(vllm_fn.calls) == 1
    assert stats.snapshot()["hooks"]["t"] == {"vllm": 1}


def test_dispatch_factory_passes_arguments_and_keeps_vllm_choice():
    seen = []

    def factory(use_rocm_aiter=False, **kwargs):
        seen.append((use_rocm_aiter, kwargs))
        return Recorder()

    runtime = HookRuntime("moe_topk.fused", "moe_topk_softmax")
    dispatch = moe_topk.make_dispatch(runtime, factory)
    fn = dispatch(use_rocm_aiter=True, num_shared_experts=2)  # 0.33 adds keyword arguments
    assert seen == [(True, {"num_shared_experts": 2})]
    assert fn.__wrapped__ is not None and callable(fn)
    runtime.disabled = True
    assert isinstance(dispatch(), Recorder)  # disabled: vLLM's own function


def _fused_router_module(mask):
    """A module shaped like vLLM 0.32/0.33's fused_topk_router: vllm_topk_softmax applies
    the padding mask that _get_padding_mask returns (None unless VLLM_MOE_SKIP_PADDING is
    on and a forward context is set)."""
    import types

    module = types.ModuleType("fused_topk_router_like")
    module.asked = []

    def _get_padding_mask(num_tokens):
        module.asked.append(num_tokens)
        return mask[:num_tokens] if mask is not None else None

    def vllm_topk_softmax(topk_weights, topk_indices, token_expert_indices, gating_output, renormalize=False):
        raise AssertionError("kernmux answers this call")

    def aiter_topk_softmax(*args, **kwargs):
        raise AssertionError("kernmux answers this call")

    def dispatch_topk_softmax_func(use_rocm_aiter=False):
        return aiter_topk_softmax if use_rocm_aiter else vllm_topk_softmax

    module._get_padding_mask = _get_padding_mask
    module.vllm_topk_softmax = vllm_topk_softmax
    module.dispatch_topk_softmax_func = dispatch_topk_softmax_func
    dispatch_topk_softmax_func.__module__ = module.__name__
    return module


@pytest.mark.parametrize("shared", [0, 2])
def test_padding_mask_reaches_the_op_as_vllm_passes_it(monkeypatch, shared):
    """vLLM's CUDA top-k writes id -1 to every routed slot of a padded row (PR #48979);
    the hook reads the mask through vLLM's own _get_padding_mask and kernmux does the same."""
    import sys

    mask = torch.tensor([False, True, False, True, True, False])
    module = _fused_router_module(mask)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    dispatch = moe_topk.make_dispatch(HookRuntime("moe_topk.fused", "moe_topk_softmax"), module.dispatch_topk_softmax_func)
    logits = torch.randn(5, 12 + shared, generator=torch.Generator().manual_seed(4))
    weights, ids, tei = torch.empty(5, 3 + shared), torch.empty(5, 3, dtype=torch.int32), torch.empty(5, 3, dtype=torch.int32)
    args = (weights, ids, tei, logits, True) + ((shared, "sigmoid") if shared else ())
    dispatch(use_rocm_aiter=False)(*args)
    assert module.asked == [5]
    ref_w, ref_ids = moe_reference(logits, 3, True, shared, mask[:5])
    assert torch.equal(ids, ref_ids[:, :3]) and (ids[[1, 3, 4]] == -1).all() and (ids[[0, 2]] >= 0).all()
    torch.testing.assert_close(weights, ref_w, rtol=1e-6, atol=1e-7)
    # vLLM's AITER choice takes no mask: neither does the kernmux call behind it
    module.asked.clear()
    dispatch(use_rocm_aiter=True)(*args)
    assert module.asked == [] and (ids >= 0).all()


def test_no_padding_mask_when_vllm_gives_none(monkeypatch):
    import sys

    module = _fused_router_module(None)  # VLLM_MOE_SKIP_PADDING=0, or no forward context
    monkeypatch.setitem(sys.modules, module.__name__, module)
    dispatch = moe_topk.make_dispatch(HookRuntime("moe_topk.fused", "moe_topk_softmax"), module.dispatch_topk_softmax_func)
    logits = torch.randn(4, 8)
    weights, ids, tei = torch.empty(4, 2), torch.empty(4, 2, dtype=torch.int32), torch.empty(4, 2, dtype=torch.int32)
    dispatch()(weights, ids, tei, logits, False)
    assert module.asked == [4] and torch.equal(ids, moe_reference(logits, 2)[1])


@pytest.mark.parametrize("tokens, experts, k", [(1, 8, 2), (9, 64, 6)])
@pytest.mark.parametrize("renormalize", [False, True])
def test_cpu_softmax_topk(tokens, experts, k, renormalize):
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(experts + k))
    wide = torch.randn(experts, tokens).t()  # non-contiguous logits, as a transposed GEMM gives
    fn = moe_topk.make_cpu_softmax_topk(HookRuntime("c", "moe_topk_softmax"), Recorder())
    for x in (logits, wide):
        w, ids = fn(x, k, renormalize)
        ref_w, ref_ids = moe_reference(x, k, renormalize)
        assert w.is_contiguous() and ids.is_contiguous() and ids.dtype == torch.int32
        assert torch.equal(ids, ref_ids) and torch.allclose(w, ref_w)


# --------------------------------------------------------------------------- sparse MLA


def _mla_inputs(kv_dtype: str, extra_topk: int = 0, sink: bool = False):
    op = REGISTRY.op("sparse_mla_decode")
    feats = op.default_features()
    dims = {"bf16": (64, 32), "fp8": (192, 128)}[kv_dtype]
    feats.update(batch=2, heads=3, topk=16, extra_topk=extra_topk, d_qk=dims[0], d_v=dims[1],
                 kv_dtype=kv_dtype, sink=sink)
    args, kwargs = op.make_inputs(feats, "cpu", 7)
    return op, feats, args, kwargs


@pytest.mark.parametrize("kv_dtype, extra_topk, sink", [("bf16", 0, False), ("fp8", 0, False), ("bf16", 8, True)])
def test_flash_mla_with_kvcache_sparse_calls_go_to_kernmux(kv_dtype, extra_topk, sink):
    op, feats, args, kwargs = _mla_inputs(kv_dtype, extra_topk, sink)
    q, kv, indices, scale, d_v = args
    original = Recorder()
    fn = sparse_mla.make_flash_mla_with_kvcache(HookRuntime("m", "sparse_mla_decode"), _flashmla_signature(original))
    extra_kv = kwargs.get("extra_kv_cache")
    out, lse = fn(
        q=q, k_cache=kv.unsqueeze(-2), block_table=torch.zeros(1, 1, dtype=torch.int32),
        head_dim_v=d_v, cache_seqlens=None, tile_scheduler_metadata=None,
        is_fp8_kvcache=kv_dtype == "fp8", indices=indices, softmax_scale=scale,
        attn_sink=kwargs.get("attn_sink"),
        extra_k_cache=None if extra_kv is None else extra_kv.unsqueeze(-2),
        extra_indices_in_kvcache=kwargs.get("extra_indices"),
    )
    assert not original.calls
    ref_out, ref_lse = op.reference(*args, **kwargs)
    assert lse.shape == (q.shape[0], q.shape[2], q.shape[1])  # FlashMLA's [B, h_q, s_q]
    assert op.compare((out, lse.transpose(1, 2)), (ref_out, ref_lse), feats).passed


def _flashmla_signature(recorder):
    def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                               num_splits=None, softmax_scale=None, causal=False, is_fp8_kvcache=False,
                               indices=None, attn_sink=None, extra_k_cache=None, extra_indices_in_kvcache=None,
                               topk_length=None, extra_topk_length=None):
        return recorder(q, k_cache, indices=indices, topk_length=topk_length)

    return flash_mla_with_kvcache


@pytest.mark.parametrize("case", ["dense", "topk_length", "two_kv_heads"])
def test_flash_mla_with_kvcache_other_calls_go_to_flashmla(case):
    _, _, (q, kv, indices, scale, d_v), _ = _mla_inputs("bf16")
    original = Recorder()
    fn = sparse_mla.make_flash_mla_with_kvcache(HookRuntime("m", "sparse_mla_decode"), _flashmla_signature(original))
    call = dict(q=q, k_cache=kv.unsqueeze(-2), block_table=None, cache_seqlens=None, head_dim_v=d_v,
                tile_scheduler_metadata=None, indices=indices)
    if case == "dense":
        call["indices"] = None
    elif case == "topk_length":
        call["topk_length"] = torch.full((q.shape[0],), 4, dtype=torch.int32)
    else:
        call["k_cache"] = torch.cat([kv.unsqueeze(-2)] * 2, dim=-2)
    assert fn(**call) == "vllm" and len(original.calls) == 1


# --------------------------------------------------------------------------- indexer


def _indexer_inputs(block_size: int, next_n: int = 1):
    op = REGISTRY.op("indexer_logits")
    feats = op.default_features()
    feats.update(batch=3, next_n=next_n, heads=4, head_dim=32, context=40, block_size=block_size)
    args, _ = op.make_inputs(feats, "cpu", 11)
    fused = page_layout_base(args[1], args[2])
    assert fused is not None
    return op, feats, args, fused


@pytest.mark.parametrize(
    "like,extra_args,extra_kwargs",
    [
        (deep_gemm_032, (), {"clean_logits": True}),
        (deep_gemm_032, (False,), {}),  # 0.32's caller: clean_logits=False, indices=None
        (deep_gemm_033, (), {}),
        (deep_gemm_033, (None,), {}),  # 0.33: the 8th positional argument is indices
        (deep_gemm_033, (), {"indices": None}),
    ],
    ids=["032-kw", "032-positional", "033", "033-positional-indices", "033-kw-indices"],
)
def test_deep_gemm_paged_mqa_logits_fp8_goes_to_kernmux(like, extra_args, extra_kwargs):
    op, feats, (q, k_cache, k_scale, weights, lens, table, ctx), fused = _indexer_inputs(8, next_n=2)
    original = Recorder(like)
    fn = indexer.make_deep_gemm(HookRuntime("i", "indexer_logits"), original)
    logits = fn((q, None), fused, weights, lens, table, torch.empty(0), ctx, *extra_args, **extra_kwargs)
    assert not original.calls
    ref = op.reference(q, k_cache, k_scale, weights, lens, table, ctx)
    assert op.compare(logits, ref, feats).passed


def test_deep_gemm_033_positional_indices_are_not_read_as_clean_logits():
    """vLLM 0.33 removed clean_logits: a positional 8th argument is ``indices`` there, and
    varlen indices are not what the op expresses -> DeepGEMM. (A position list written
    for 0.32 would have taken it for clean_logits and dropped the indices.)"""
    _, _, (q, _, _, weights, lens, table, ctx), fused = _indexer_inputs(8, next_n=2)
    original = Recorder(deep_gemm_033)
    fn = indexer.make_deep_gemm(HookRuntime("i", "indexer_logits"), original)
    indices = torch.zeros(6, dtype=torch.int32)
    assert fn((q, None), fused, weights, lens, table, None, ctx, indices) == "vllm"
    assert len(original.calls) == 1
    # clean_logits does not exist in 0.33: a call naming it is vLLM's to reject
    assert fn((q, None), fused, weights, lens, table, None, ctx, clean_logits=True) == "vllm"


@pytest.mark.parametrize("case", ["fp4", "indices", "per_row_lens"])
@pytest.mark.parametrize("like", [deep_gemm_032, deep_gemm_033])
def test_deep_gemm_paged_mqa_logits_other_calls_go_to_deep_gemm(case, like):
    _, _, (q, _, _, weights, lens, table, ctx), fused = _indexer_inputs(8, next_n=2)
    original = Recorder(like)
    fn = indexer.make_deep_gemm(HookRuntime("i", "indexer_logits"), original)
    q_arg, kwargs = (q, None), {}
    if case == "fp4":
        q_arg = (q.view(torch.uint8), torch.ones(1))
    elif case == "indices":
        kwargs["indices"] = torch.zeros(6, dtype=torch.int32)
    else:
        lens = torch.stack([lens - 1, lens], dim=1)
    assert fn(q_arg, fused, weights, lens, table, None, ctx, **kwargs) == "vllm"
    assert len(original.calls) == 1


def test_rocm_paged_mqa_logits_block_size_one_goes_to_kernmux():
    op, feats, (q, k_cache, k_scale, weights, lens, table, ctx), fused = _indexer_inputs(1)
    original = Recorder(rocm_032)
    fn = indexer.make_rocm(HookRuntime("r", "indexer_logits"), original)
    logits = fn(q, fused, weights, lens.view(-1, 1), table, None, ctx, compress_ratio=1)
    assert not original.calls
    assert op.compare(logits, op.reference(q, k_cache, k_scale, weights, lens, table, ctx), feats).passed


@pytest.mark.parametrize("block_size, compress_ratio", [(8, 1), (1, 4)])
def test_rocm_paged_mqa_logits_shuffled_or_c4a_goes_to_vllm(block_size, compress_ratio):
    _, _, (q, _, _, weights, lens, table, ctx), fused = _indexer_inputs(block_size)
    original = Recorder(rocm_032)
    fn = indexer.make_rocm(HookRuntime("r", "indexer_logits"), original)
    assert fn(q, fused, weights, lens, table, None, ctx, compress_ratio=compress_ratio) == "vllm"
