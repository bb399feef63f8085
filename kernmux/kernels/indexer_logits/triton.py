"""Paged fp8 MQA logits in Triton: one pass over the key cache, nothing materialised.

Each program owns one request and a span of ``TILES * BLOCK_N`` key positions. It
loads the request's queries (all heads, all ``next_n`` queries) and weights once, then
for each tile of ``BLOCK_N`` positions gathers the fp8 keys and fp32 scales through the
block table (one read of each key byte), computes the ``[H, BLOCK_N]`` scores with one
``tl.dot`` per query (the ``next_n`` queries share the loaded tile; config ``mma``
orients it heads x keys or keys x heads), scales, applies
relu, reduces over heads with the weights and writes the logits row(s); positions past
a query's causal limit get ``-inf``. Heads are padded inside the kernel to ``HP``, a
power of two >= 16 (the ``tl.dot`` minimum), with zero queries and zero weights, so the
padding adds exact zeros.

relu keeps NaN (``propagate_nan=ALL``): a NaN query, weight, key or scale gives NaN
logits, the reference's rule, where a plain ``max(x, 0)`` on the GPU returned 0.

Numerics: fp8 e4m3 -> bf16 (and -> tf32) is exact, so ``dot="bf16"`` / ``"tf32"``
multiply exactly and accumulate in fp32; bf16 runs the tensor cores at twice the tf32
rate. ``dot="fp8"`` feeds the fp8 operands to the tensor cores directly (Hopper fp8 MMA
accumulates with reduced precision; verification decides whether a tuned config may
use it).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from kernmux.dispatch.outputs import empty_output
from kernmux.kernels.indexer_logits.checks import maybe_check_values


@triton.jit
def _load_keys(k_ptr, s_ptr, table, pos, end, offs_d, stride_kb, stride_kt, stride_kd, stride_sb, stride_st, stride_tm, PAGE: tl.constexpr):
    """fp8 keys [BLOCK_N, D] and fp32 scales [BLOCK_N] of positions ``pos`` through the
    block table; positions >= ``end`` read nothing (zeros)."""
    mask = pos < end
    page = tl.load(table + (pos // PAGE) * stride_tm, mask=mask, other=0).to(tl.int64)
    slot = pos % PAGE
    k = tl.load(k_ptr + page[:, None] * stride_kb + slot[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=mask[:, None], other=0.0)
    scale = tl.load(s_ptr + page * stride_sb + slot * stride_st, mask=mask, other=0.0)
    return k, scale


@triton.jit
def _logits_of_query(q, w, k, scale, KEYS_FIRST: tl.constexpr):
    """sum_h w[h] * relu((q[h] . k[n]) * scale[n]) for the BLOCK_N keys of the tile.

    KEYS_FIRST: q is [D, HP] and the MMA is keys x heads (the head sum stays within a
    warp); else q is [HP, D] and the MMA is heads x keys."""
    if KEYS_FIRST:
        s = tl.dot(k, q)  # [BLOCK_N, HP] fp32
        s = tl.maximum(s * scale[:, None], 0.0, propagate_nan=tl.PropagateNan.ALL)
        logits = tl.sum(s * w[None, :], axis=1)
    else:
        s = tl.dot(q, tl.trans(k))  # [HP, BLOCK_N] fp32
        s = tl.maximum(s * scale[None, :], 0.0, propagate_nan=tl.PropagateNan.ALL)
        logits = tl.sum(s * w[:, None], axis=0)
    return logits


@triton.jit
def _logits_of_pair(qj, wj, first, k, scale):
    """Both next_n queries from one keys x (2 x heads) MMA: qj is [D, 2 * HP] (query 0's
    heads, then query 1's), wj [2 * HP] their weights, ``first`` marks query 0's columns.
    One N = 2 * HP MMA instead of two of N = HP; the head sums stay within a warp."""
    s = tl.dot(k, qj)  # [BLOCK_N, 2 * HP] fp32
    s = tl.maximum(s * scale[:, None], 0.0, propagate_nan=tl.PropagateNan.ALL) * wj[None, :]
    l0 = tl.sum(tl.where(first[None, :], s, 0.0), axis=1)
    l1 = tl.sum(tl.where(first[None, :], 0.0, s), axis=1)
    return l0, l1


# Sizes and the table/output row strides change with every batch shape; specialising on
# them (divisibility by 16, == 1) would recompile per shape for no gain in this kernel.
@triton.jit(do_not_specialize=["heads", "max_context", "max_blocks", "tiles_per_prog", "stride_tb", "stride_or"])
def _indexer_logits_kernel(
    q_ptr, k_ptr, s_ptr, w_ptr, ctx_ptr, bt_ptr, out_ptr,
    heads, max_context, max_blocks, tiles_per_prog,
    stride_qb, stride_qn, stride_qh, stride_qd,
    stride_kb, stride_kt, stride_kd,
    stride_sb, stride_st,
    stride_wr, stride_wh,
    stride_tb, stride_tm,
    stride_or,
    NEXT_N: tl.constexpr,
    HP: tl.constexpr,
    D: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    OPERAND: tl.constexpr,  # 0: fp8 as loaded, 1: bf16, 2: fp32 (tf32 MMA)
    KEYS_FIRST: tl.constexpr,
    PREFETCH: tl.constexpr,
    JOINT: tl.constexpr,  # next_n == 2 and keys x heads only: both queries in one MMA
):
    b = tl.program_id(0)
    span = tl.program_id(1)
    ctx = tl.load(ctx_ptr + b)
    # Keys that exist for this request: within its context, its block table and the output.
    kv_end = tl.minimum(tl.minimum(ctx, max_blocks * PAGE), max_context)
    first = span * tiles_per_prog * BLOCK_N
    n_tiles = tl.minimum(tl.maximum(tl.cdiv(kv_end - first, BLOCK_N), 0), tiles_per_prog)

    offs_h = tl.arange(0, HP)
    offs_d = tl.arange(0, D)
    offs_n = tl.arange(0, BLOCK_N)
    hmask = offs_h < heads
    q_rows = q_ptr + b.to(tl.int64) * stride_qb + offs_h[:, None] * stride_qh + offs_d[None, :] * stride_qd
    w_row0 = w_ptr + (b * NEXT_N).to(tl.int64) * stride_wr
    out_row0 = out_ptr + (b * NEXT_N).to(tl.int64) * stride_or
    q0 = tl.load(q_rows, mask=hmask[:, None], other=0.0)
    w0 = tl.load(w_row0 + offs_h * stride_wh, mask=hmask, other=0.0)
    if OPERAND == 1:
        q0 = q0.to(tl.bfloat16)
    elif OPERAND == 2:
        q0 = q0.to(tl.float32)
    if KEYS_FIRST:
        q0 = tl.trans(q0)
    if JOINT:
        offs_r = tl.arange(0, 2 * HP)
        r_head = offs_r % HP
        r_query = offs_r // HP
        rmask = r_head < heads
        qj = tl.load(q_ptr + b.to(tl.int64) * stride_qb + r_query[:, None] * stride_qn + r_head[:, None] * stride_qh + offs_d[None, :] * stride_qd, mask=rmask[:, None], other=0.0)
        wj = tl.load(w_row0 + r_query * stride_wr + r_head * stride_wh, mask=rmask, other=0.0)
        first_cols = r_query == 0
        if OPERAND == 1:
            qj = qj.to(tl.bfloat16)
        elif OPERAND == 2:
            qj = qj.to(tl.float32)
        qj = tl.trans(qj)
    if NEXT_N == 2:
        q1 = tl.load(q_rows + stride_qn, mask=hmask[:, None], other=0.0)
        w1 = tl.load(w_row0 + stride_wr + offs_h * stride_wh, mask=hmask, other=0.0)
        if OPERAND == 1:
            q1 = q1.to(tl.bfloat16)
        elif OPERAND == 2:
            q1 = q1.to(tl.float32)
        if KEYS_FIRST:
            q1 = tl.trans(q1)
    table = bt_ptr + b.to(tl.int64) * stride_tb

    # Positions this program may read: its own span, within the request's keys.
    span_end = tl.minimum(kv_end, first + tiles_per_prog * BLOCK_N)
    if PREFETCH:
        k_next, scale_next = _load_keys(k_ptr, s_ptr, table, first + offs_n, span_end, offs_d, stride_kb, stride_kt, stride_kd, stride_sb, stride_st, stride_tm, PAGE)
    for t in range(0, n_tiles):
        pos = first + t * BLOCK_N + offs_n
        kv_mask = pos < kv_end
        if PREFETCH:
            # Register double buffer: the next tile's loads are in flight during this
            # tile's MMA and epilogue (Triton does not pipeline these gathered loads).
            k = k_next
            scale = scale_next
            k_next, scale_next = _load_keys(k_ptr, s_ptr, table, pos + BLOCK_N, span_end, offs_d, stride_kb, stride_kt, stride_kd, stride_sb, stride_st, stride_tm, PAGE)
        else:
            k, scale = _load_keys(k_ptr, s_ptr, table, pos, span_end, offs_d, stride_kb, stride_kt, stride_kd, stride_sb, stride_st, stride_tm, PAGE)
        if OPERAND == 1:
            k = k.to(tl.bfloat16)
        elif OPERAND == 2:
            k = k.to(tl.float32)
        out_mask = pos < max_context

        if JOINT:
            l0, l1 = _logits_of_pair(qj, wj, first_cols, k, scale)
        else:
            l0 = _logits_of_query(q0, w0, k, scale, KEYS_FIRST)
        l0 = tl.where(kv_mask & (pos <= ctx - NEXT_N), l0, float("-inf"))
        tl.store(out_row0 + pos, l0, mask=out_mask)
        if NEXT_N == 2:
            if not JOINT:
                l1 = _logits_of_query(q1, w1, k, scale, KEYS_FIRST)
            l1 = tl.where(kv_mask & (pos <= ctx - 1), l1, float("-inf"))
            tl.store(out_row0 + stride_or + pos, l1, mask=out_mask)

    # The rest of the span lies past the request's context: -inf without touching keys.
    neg_inf = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    for t in range(n_tiles, tiles_per_prog):
        pos = first + t * BLOCK_N + offs_n
        out_mask = pos < max_context
        tl.store(out_row0 + pos, neg_inf, mask=out_mask)
        if NEXT_N == 2:
            tl.store(out_row0 + stride_or + pos, neg_inf, mask=out_mask)


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs_target(device: torch.device) -> int:
    """About four resident programs per SM keep enough key bytes in flight."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    return 4 * _sm_count(index)


def _tiles_per_program(batch: int, tiles_total: int, requested: int, device: torch.device) -> int:
    """``requested`` tiles per program, or (0 = auto) enough spans per request to give
    the GPU ~4 programs per SM, balanced so spans of a request are of equal size."""
    if requested > 0:
        return min(requested, tiles_total)
    spans = max(1, min(tiles_total, -(-_programs_target(device) // batch)))
    return -(-tiles_total // spans)


_OPERANDS = {"fp8": 0, "bf16": 1, "tf32": 2}


def _operand(dot: str) -> int:
    if dot not in _OPERANDS:
        raise ValueError(f"triton indexer_logits: config dot must be one of {sorted(_OPERANDS)}, got {dot!r}")
    if dot == "bf16" and os.environ.get("TRITON_INTERPRET") == "1":
        # The interpreter multiplies bf16 dot operands as raw bits (seen with Triton 3.9);
        # fp32 operands hold fp8 values exactly too, so the CPU result is the same math.
        return _OPERANDS["tf32"]
    return _OPERANDS[dot]


def indexer_logits_triton(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    k_scale: torch.Tensor,
    weights: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    max_context: int,
    *,
    config: dict,
) -> torch.Tensor:
    """Launcher: grid ``(B, spans)``; config keys BLOCK_N, TILES (0 = auto), num_warps,
    num_stages, dot ("bf16" | "fp8" | "tf32"), mma ("hk": heads x keys, "kh": keys x
    heads), prefetch (0/1: load the next tile while computing this one), joint (0/1, with
    next_n = 2 and "kh": both queries in one MMA of 2 x HP columns). Shapes as in the reference; any strides (a unit
    stride in the head dimension, which Triton specialises on, gives vector loads)."""
    maybe_check_values(q, k_cache, k_scale, weights, context_lens, block_table, max_context)
    batch, next_n, heads, head_dim = q.shape
    if next_n not in (1, 2) or head_dim not in (64, 128) or not 1 <= heads <= 128:
        raise ValueError(f"triton indexer_logits handles next_n in (1, 2), head_dim in (64, 128), 1 <= heads <= 128; got next_n={next_n}, head_dim={head_dim}, heads={heads}")
    out = empty_output((batch * next_n, max_context), torch.float32, q.device)
    block_n = int(config["BLOCK_N"])
    tiles_total = -(-max_context // block_n)
    tiles = _tiles_per_program(batch, tiles_total, int(config.get("TILES", 0)), q.device)
    grid = (batch, -(-tiles_total // tiles))
    _indexer_logits_kernel[grid](
        q, k_cache, k_scale, weights, context_lens, block_table, out,
        heads, max_context, block_table.shape[1], tiles,
        *q.stride(),
        *k_cache.stride(),
        *k_scale.stride(),
        *weights.stride(),
        *block_table.stride(),
        out.stride(0),
        NEXT_N=next_n,
        HP=max(16, triton.next_power_of_2(heads)),
        D=head_dim,
        PAGE=k_cache.shape[1],
        BLOCK_N=block_n,
        OPERAND=_operand(config.get("dot", "bf16")),
        KEYS_FIRST=config.get("mma", "hk") == "kh",
        PREFETCH=bool(config.get("prefetch", 0)),
        JOINT=next_n == 2 and config.get("mma", "hk") == "kh" and bool(config.get("joint", 0)),
        num_warps=int(config["num_warps"]),
        num_stages=int(config["num_stages"]),
    )
    return out
