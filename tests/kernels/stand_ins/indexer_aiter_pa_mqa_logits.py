"""Test-only stand-in for AITER's ``pa_mqa_logits`` module (no ROCm here).

It reproduces, in PyTorch, what the AITER wrappers do with their arguments, as read from
the AITER sources: how they slice the fused fp8+scale cache, index the table, split the
grid (including the ``heads // ChunkQ`` ZeroDivisionError of ROCm/aiter#2563 and the
``heads % ChunkQ`` assertion), which positions they write (only chunks covering each
context; the rest keeps what the caller put there), and that stage1 stores whole
``ChunkK`` chunks without a bound check (modelled as an IndexError instead of a silent
out-of-row write). Two flavours: ``main`` (v0.1.7.post3+: ChunkQ/ChunkK arguments;
stage1 takes page-fused caches of any page size only with ``paged_stage1=True``, v0.1.20+,
commit 8abb3607e9) and ``v017`` (v0.1.7-v0.1.7.post2: no ChunkQ argument, ChunkQ fixed
at 32, one token per page). relu is ``max(x, 0)`` as the GPU computes AITER's
``tl.maximum(o, 0.0)``: a NaN score becomes 0 (``relu_keeps_nan=True`` for torch's relu).
Every call is recorded in ``CALLS``.
"""

from __future__ import annotations

import types

import torch

FP8 = torch.float8_e4m3fn
TOTAL_CU = 256


def _unpack(kv_cache: torch.Tensor, head_dim: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """AITER's view of the fused cache: per page, block*D fp8 bytes then block fp32."""
    num_blocks, block, heads_kv, packed = kv_cache.shape
    assert heads_kv == 1
    assert packed == head_dim + 4, f"packed dim {packed} != head_dim + 4"
    flat = kv_cache.reshape(num_blocks, block * packed)
    values = flat[:, : block * head_dim].contiguous().view(FP8).view(num_blocks, block, head_dim)
    scales = flat[:, block * head_dim :].contiguous().view(torch.float32)
    return values, scales, block


def _per_head(q, values, scales, weights, ctx, b, n, next_n, kv_row, block, end, relu_keeps_nan=False):
    """[H, end] weighted relu scores of query (b, n) for positions [0, end), -inf past
    the causal limit; loads past the context are masked to zero as in AITER."""
    pos = torch.arange(end)
    in_ctx = pos < ctx
    index = pos // block
    page = torch.where(in_ctx & (index < kv_row.numel()), kv_row[index.clamp_max(kv_row.numel() - 1)].long(), 0)
    slot = pos % block
    k = torch.where(in_ctx[:, None], values[page, slot].float(), 0.0)
    s = scales[page, slot]
    o = (q[b, n].float() @ k.T) * s[None, :]
    o = o.relu() if relu_keeps_nan else torch.where(o > 0, o, 0.0)
    o = o * weights[b * next_n + n][:, None]
    return torch.where(pos[None, :] <= ctx - next_n + n, o, float("-inf"))


def make_module(flavour: str = "main", *, paged_stage1: bool = True, relu_keeps_nan: bool = False) -> types.ModuleType:
    module = types.ModuleType("aiter.ops.triton.attention.pa_mqa_logits")
    module.CALLS = []

    def stage1_main(q_fp8, kv_cache_fp8, weights, out_qk, context_lens, kv_indices, max_model_len, ChunkQ=64, ChunkK=256, TotalCuCount=None, WavePerEU=2):
        module.CALLS.append(("stage1", dict(ChunkQ=ChunkQ, ChunkK=ChunkK)))
        if not paged_stage1:
            assert kv_cache_fp8.shape[1] == 1, "stage1 before v0.1.20 slices kv[..., :D]: one token per page"
        return _stage1(q_fp8, kv_cache_fp8, weights, out_qk, context_lens, kv_indices, ChunkQ, ChunkK, WavePerEU)

    def stage1_v017(q_fp8, kv_cache_fp8, weights, out_qk, context_lens, kv_indices, max_model_len):
        module.CALLS.append(("stage1", {}))
        assert kv_cache_fp8.shape[1] == 1, "0.1.7 stage1 slices kv[..., :D]: one token per page"
        assert q_fp8.shape[2] % 32 == 0, "0.1.7 stage1: heads % ChunkQ(=32) == 0"
        return _stage1(q_fp8, kv_cache_fp8, weights, out_qk, context_lens, kv_indices, 32, 64, 1)

    def _stage1(q_fp8, kv_cache_fp8, weights, out_qk, context_lens, kv_indices, chunk_q, chunk_k, wave_per_eu):
        batch, next_n, heads, head_dim = q_fp8.shape
        tile_q_count = batch * next_n * (heads // chunk_q)
        split_kv = (max(1, TOTAL_CU // tile_q_count) + 4) // 5 * 5 * wave_per_eu  # ZeroDivisionError
        assert split_kv > 0 and heads % chunk_q == 0
        values, scales, block = _unpack(kv_cache_fp8, head_dim)
        for b in range(batch):
            ctx = int(context_lens[b])
            end = -(-ctx // chunk_k) * chunk_k
            if end > out_qk.shape[2]:
                raise IndexError(f"stage1 stores whole chunks: position {end - 1} is past the buffer row of {out_qk.shape[2]}")
            for n in range(next_n):
                out_qk[:, b * next_n + n, :end] = _per_head(q_fp8, values, scales, weights, ctx, b, n, next_n, kv_indices[b], block, end, relu_keeps_nan)

    def fused(q_fp8, kv_cache, weights, out_logits, context_lens, kv_indices, max_model_len, Preshuffle=False, KVBlockSize=1, ChunkK=256, TotalCuCount=None, WavePerEU=2, **_):
        module.CALLS.append(("fused", dict(Preshuffle=Preshuffle, KVBlockSize=KVBlockSize, ChunkK=ChunkK)))
        batch, next_n, heads, head_dim = q_fp8.shape
        assert ChunkK % KVBlockSize == 0 or KVBlockSize % ChunkK == 0
        assert kv_cache.shape[1] == KVBlockSize
        assert not Preshuffle, "stand-in: preshuffled caches are not modelled"
        if flavour == "v017":
            assert KVBlockSize == 1, "0.1.7 non-preshuffle path asserts KVBlockSize == 1"
        values, scales, block = _unpack(kv_cache, head_dim)
        for b in range(batch):
            ctx = int(context_lens[b])
            end = min(-(-ctx // ChunkK) * ChunkK, max_model_len)
            for n in range(next_n):
                o = _per_head(q_fp8, values, scales, weights, ctx, b, n, next_n, kv_indices[b], block, end, relu_keeps_nan)
                out_logits[b * next_n + n, :end] = o.sum(dim=0)

    module.deepgemm_fp8_paged_mqa_logits_stage1 = stage1_v017 if flavour == "v017" else stage1_main
    module.deepgemm_fp8_paged_mqa_logits = fused
    return module
