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
    """Stands in for vLLM's function: records calls, answers a sentinel."""

    def __init__(self):
        self.calls = []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return "vllm"


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


def test_deep_gemm_paged_mqa_logits_fp8_goes_to_kernmux():
    op, feats, (q, k_cache, k_scale, weights, lens, table, ctx), fused = _indexer_inputs(8, next_n=2)
    original = Recorder()
    fn = indexer.make_deep_gemm(HookRuntime("i", "indexer_logits"), original)
    logits = fn((q, None), fused, weights, lens, table, torch.empty(0), ctx, clean_logits=True)
    assert not original.calls
    ref = op.reference(q, k_cache, k_scale, weights, lens, table, ctx)
    assert op.compare(logits, ref, feats).passed


@pytest.mark.parametrize("case", ["fp4", "indices", "per_row_lens"])
def test_deep_gemm_paged_mqa_logits_other_calls_go_to_deep_gemm(case):
    _, _, (q, _, _, weights, lens, table, ctx), fused = _indexer_inputs(8, next_n=2)
    original = Recorder()
    fn = indexer.make_deep_gemm(HookRuntime("i", "indexer_logits"), original)
    q_arg, kwargs = (q, None), {}
    if case == "fp4":
        q_arg = (q.view(torch.uint8), torch.ones(1))
    elif case == "indices":
        kwargs["indices"] = torch.zeros(6, dtype=torch.int32)
    else:
        lens = torch.stack([lens - 1, lens], dim=1)
    assert fn(q_arg, fused, weights, lens, table, None, ctx, True, **kwargs) == "vllm"
    assert len(original.calls) == 1


def test_rocm_paged_mqa_logits_block_size_one_goes_to_kernmux():
    op, feats, (q, k_cache, k_scale, weights, lens, table, ctx), fused = _indexer_inputs(1)
    original = Recorder()
    fn = indexer.make_rocm(HookRuntime("r", "indexer_logits"), original)
    logits = fn(q, fused, weights, lens.view(-1, 1), table, None, ctx, compress_ratio=1)
    assert not original.calls
    assert op.compare(logits, op.reference(q, k_cache, k_scale, weights, lens, table, ctx), feats).passed


@pytest.mark.parametrize("block_size, compress_ratio", [(8, 1), (1, 4)])
def test_rocm_paged_mqa_logits_shuffled_or_c4a_goes_to_vllm(block_size, compress_ratio):
    _, _, (q, _, _, weights, lens, table, ctx), fused = _indexer_inputs(block_size)
    original = Recorder()
    fn = indexer.make_rocm(HookRuntime("r", "indexer_logits"), original)
    assert fn(q, fused, weights, lens, table, None, ctx, compress_ratio=compress_ratio) == "vllm"
