"""Sparse MLA decode in Triton: split over the selected slots, then an LSE combine.

Grid of the main kernel: (head group, query, split). One program takes ``H_BLOCK`` heads
of one query and a contiguous share of that query's selected slots in both scopes; it
gathers ``N_BLOCK`` cache rows at a time straight from the paged cache (never copied
into a gathered buffer), and uses each row for all of its heads: ``S = Q[H, d_qk] @
K^T[d_qk, N]``, online softmax in base 2, ``O += P[H, N] @ V[N, d_v]`` with V the first
``d_v`` columns of the same rows. The latent is handled as four column tiles of
``d_v / 4`` (one fp32 scale each for fp8, dequantised in registers), plus the rope tail.
Head groups are the fastest grid axis, so the programs that read the same rows run
together and share them through L2.

With one split the main kernel finishes the rows itself (sink, empty rows, bf16 store);
otherwise it writes fp32 partials ``(o / l, log2-sum-exp)`` and ``_combine_kernel`` merges
the splits by LSE, applies the sink and writes o and lse.

Config ``LAYOUT`` (config.py) picks the body: the four-tile body here, with S split by
slots between two warpgroups for 64-head programs (SPLIT_S), or the one-tile body of
``triton_wide.py`` (WIDE); the launcher below serves both.

Length (~420 lines): one ``@triton.jit`` body and its launcher; splitting a jit kernel
across files costs readability more than it saves (shared helpers are in triton_common.py).
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any, Optional

import torch
import triton
import triton.language as tl

from kernmux.dispatch.outputs import empty_output
from kernmux.kernels.sparse_mla_decode.checks import maybe_check_values
from kernmux.kernels.sparse_mla_decode.triton_common import _abs_max, _dot, _finish_row, _normaliser, _softmax_step
from kernmux.kernels.sparse_mla_decode.triton_wide import _sparse_mla_decode_wide_kernel
from kernmux.kernels.sparse_mla_decode.config import (
    DEFAULT_CONFIG,
    LAYOUT_SPLIT_S,
    LAYOUT_TILES,
    LAYOUT_WIDE,
    TILE_KEYS,
    auto_tile,
    two_group_tile,
)

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def _load_tile(row_ptr, valid, col0, DT: tl.constexpr, IS_FP8: tl.constexpr, FP8_MODE: tl.constexpr, D_V: tl.constexpr):
    """Columns [col0, col0 + DT) of the gathered rows [N, DT] (zeros where invalid), as the
    MMA operand type: bf16, or for fp8 latent by FP8_MODE: 0 dequantised in registers
    (fp8 * scale -> bf16); 1 converted to bf16, 2 converted to fp16 (both exact; the
    caller applies the scales to S and P instead)."""
    cols = col0 + tl.arange(0, DT)
    if IS_FP8:
        ptrs = row_ptr.to(tl.pointer_type(tl.float8e4nv))[:, None] + cols[None, :]
        tile = tl.load(ptrs, mask=valid[:, None], other=0.0)
        if FP8_MODE == 0:
            scale = _load_scale(row_ptr, valid, col0 // DT, D_V)
            tile = (tile.to(tl.float32) * scale[:, None]).to(tl.bfloat16)
        elif FP8_MODE == 2:
            tile = tile.to(tl.float16)
        else:
            tile = tile.to(tl.bfloat16)
    else:
        tile = tl.load(row_ptr[:, None] + cols[None, :], mask=valid[:, None], other=0.0)
    return tile


@triton.jit
def _load_scale(row_ptr, valid, tile: tl.constexpr, D_V: tl.constexpr):
    """fp32 scale of latent tile ``tile`` of each gathered fp8 row [N] (0 where invalid)."""
    return tl.load((row_ptr + D_V).to(tl.pointer_type(tl.float32)) + tile, mask=valid, other=0.0)


@triton.jit
def _attend(
    acc0, acc1, acc2, acc3, m_i, l_i,
    q0, q1, q2, q3, q_pe, q_unscale,
    kv_ptr, idx_ptr, start, end, block_size, stride_blk, stride_tok, qk_scale, taken,
    IS_FP8: tl.constexpr, D_V: tl.constexpr, D_PE: tl.constexpr, PE_OFF: tl.constexpr,
    N_BLOCK: tl.constexpr, UPCAST: tl.constexpr, FP8_MODE: tl.constexpr,
    PE_TILE: tl.constexpr, SPLIT_S: tl.constexpr,
):
    """Online softmax over slots idx_ptr[start:end] of one cache (one scope).
    fp8 rows: latent tiles in e4m3 with one fp32 scale each at byte D_V + 4 t.
    SPLIT_S: the softmax runs inside ``if taken > 0`` (taken is always > 0). The branch
    hides from Triton's layout choice that S feeds the second dot (it follows uses, not
    the results of an scf.if), so with 64 heads on two warpgroups S is split by slots
    ([4, 2] warps, each row block of S computed once) instead of computed by both
    warpgroups ([8, 1] warps over 64 rows: every S twice)."""
    DT: tl.constexpr = D_V // 4
    for n0 in range(start, end, N_BLOCK):
        offs_n = n0 + tl.arange(0, N_BLOCK)
        slot = tl.load(idx_ptr + offs_n, mask=offs_n < end, other=-1)
        valid = slot >= 0
        slot = tl.where(valid, slot, 0).to(tl.int64)
        row_ptr = kv_ptr + (slot // block_size) * stride_blk + (slot % block_size) * stride_tok
        k0 = _load_tile(row_ptr, valid, 0, DT, IS_FP8, FP8_MODE, D_V)
        k1 = _load_tile(row_ptr, valid, DT, DT, IS_FP8, FP8_MODE, D_V)
        k2 = _load_tile(row_ptr, valid, 2 * DT, DT, IS_FP8, FP8_MODE, D_V)
        k3 = _load_tile(row_ptr, valid, 3 * DT, DT, IS_FP8, FP8_MODE, D_V)
        s = tl.zeros((q0.shape[0], N_BLOCK), dtype=tl.float32)
        if IS_FP8 and FP8_MODE != 0:
            # S = sum_t scale_t[n] * (q_t . fp8_t[n]): one dot per scale tile.
            sc0 = _load_scale(row_ptr, valid, 0, D_V)
            sc1 = _load_scale(row_ptr, valid, 1, D_V)
            sc2 = _load_scale(row_ptr, valid, 2, D_V)
            sc3 = _load_scale(row_ptr, valid, 3, D_V)
            s = _dot(q0, tl.trans(k0), s, UPCAST) * sc0[None, :]
            s += _dot(q1, tl.trans(k1), tl.zeros_like(s), UPCAST) * sc1[None, :]
            s += _dot(q2, tl.trans(k2), tl.zeros_like(s), UPCAST) * sc2[None, :]
            s += _dot(q3, tl.trans(k3), tl.zeros_like(s), UPCAST) * sc3[None, :]
            s = s * q_unscale  # fp16 q was pre-scaled by a power of two
        elif SPLIT_S:
            # Scaled and summed, not chained through the accumulator: a dot whose result
            # reaches another dot gets the [num_warps, 1] layout (see SPLIT_S above), and
            # a plain sum of dots is folded back into a chain by the compiler.
            s = _dot(q0, tl.trans(k0), tl.zeros_like(s), UPCAST) * qk_scale + _dot(q1, tl.trans(k1), tl.zeros_like(s), UPCAST) * qk_scale
            s += _dot(q2, tl.trans(k2), tl.zeros_like(s), UPCAST) * qk_scale + _dot(q3, tl.trans(k3), tl.zeros_like(s), UPCAST) * qk_scale
        else:
            s = _dot(q0, tl.trans(k0), s, UPCAST)
            s = _dot(q1, tl.trans(k1), s, UPCAST)
            s = _dot(q2, tl.trans(k2), s, UPCAST)
            s = _dot(q3, tl.trans(k3), s, UPCAST)
        if D_PE > 0:
            # The rope tail is read as a DT-wide tile (columns >= D_PE masked off) so that
            # every gather of the step shares one layout: the slot load then stays a single
            # load the pipeliner can issue ahead of the row loads.
            pe_ptr = (row_ptr + PE_OFF).to(tl.pointer_type(tl.bfloat16))
            pe_cols = tl.arange(0, PE_TILE)
            k_pe = tl.load(pe_ptr[:, None] + pe_cols[None, :], mask=valid[:, None] & (pe_cols[None, :] < D_PE), other=0.0)
            if SPLIT_S and not (IS_FP8 and FP8_MODE != 0):
                s += _dot(q_pe, tl.trans(k_pe), tl.zeros_like(s), UPCAST) * qk_scale
            else:
                s = _dot(q_pe, tl.trans(k_pe), s, UPCAST)
        if not SPLIT_S or (IS_FP8 and FP8_MODE != 0):
            s = s * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        if SPLIT_S:
            if taken > 0:
                m_new, alpha, p, l_i = _softmax_step(s, m_i, l_i)
            else:
                m_new, alpha, p = m_i, tl.full(l_i.shape, 1.0, tl.float32), tl.zeros_like(s)  # no slots: a no-op step
        else:
            m_new, alpha, p, l_i = _softmax_step(s, m_i, l_i)
        if IS_FP8 and FP8_MODE != 0:
            # O_t += (P * scale_t) @ fp8_t: the V scale of row n folded into column n of P.
            acc0 = _dot((p * sc0[None, :]).to(k0.dtype), k0, acc0 * alpha[:, None], UPCAST)
            acc1 = _dot((p * sc1[None, :]).to(k1.dtype), k1, acc1 * alpha[:, None], UPCAST)
            acc2 = _dot((p * sc2[None, :]).to(k2.dtype), k2, acc2 * alpha[:, None], UPCAST)
            acc3 = _dot((p * sc3[None, :]).to(k3.dtype), k3, acc3 * alpha[:, None], UPCAST)
        else:
            pb = p.to(tl.bfloat16)
            acc0 = _dot(pb, k0, acc0 * alpha[:, None], UPCAST)
            acc1 = _dot(pb, k1, acc1 * alpha[:, None], UPCAST)
            acc2 = _dot(pb, k2, acc2 * alpha[:, None], UPCAST)
            acc3 = _dot(pb, k3, acc3 * alpha[:, None], UPCAST)
        m_i = m_new
    return acc0, acc1, acc2, acc3, m_i, l_i


@triton.jit
def _sparse_mla_decode_kernel(
    q_ptr, stride_qb, stride_qs, stride_qh,
    kv_ptr, idx_ptr, stride_ib, stride_is, topk, block_size, stride_blk, stride_tok,
    xkv_ptr, xidx_ptr, stride_xb, stride_xs, xtopk, xblock_size, stride_xblk, stride_xtok,
    sink_ptr, o_ptr, lse_ptr, part_o_ptr, part_lse_ptr,
    heads, s_q, qk_scale, blocks_a, blocks_b, splits,
    IS_FP8: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_SINK: tl.constexpr, FINAL: tl.constexpr,
    D_V: tl.constexpr, D_PE: tl.constexpr, PE_OFF: tl.constexpr,
    H_BLOCK: tl.constexpr, N_BLOCK: tl.constexpr, UPCAST: tl.constexpr, FP8_MODE: tl.constexpr,
    PE_TILE: tl.constexpr, SPLIT_S: tl.constexpr,
):
    pid_h = tl.program_id(0)
    pid_q = tl.program_id(1)
    split = tl.program_id(2)
    DT: tl.constexpr = D_V // 4
    b = pid_q // s_q
    t = pid_q % s_q
    offs_h = pid_h * H_BLOCK + tl.arange(0, H_BLOCK)
    h_mask = offs_h < heads
    offs_t = tl.arange(0, DT)

    q_row = q_ptr + b.to(tl.int64) * stride_qb + t * stride_qs + offs_h[:, None] * stride_qh
    q0 = tl.load(q_row + offs_t[None, :], mask=h_mask[:, None], other=0.0)
    q1 = tl.load(q_row + DT + offs_t[None, :], mask=h_mask[:, None], other=0.0)
    q2 = tl.load(q_row + 2 * DT + offs_t[None, :], mask=h_mask[:, None], other=0.0)
    q3 = tl.load(q_row + 3 * DT + offs_t[None, :], mask=h_mask[:, None], other=0.0)
    if D_PE > 0:
        offs_pe = tl.arange(0, PE_TILE)
        q_pe = tl.load(q_row + D_V + offs_pe[None, :], mask=h_mask[:, None] & (offs_pe[None, :] < D_PE), other=0.0)
    else:
        q_pe = q0  # unused
    q_unscale = 1.0
    if IS_FP8 and FP8_MODE == 2:
        # fp16 operands: bring the largest |q| of this program to <= 2^14 by a power of
        # two (exact), so q cannot overflow fp16; S is scaled back after the dots.
        q_max = tl.maximum(tl.maximum(_abs_max(q0.to(tl.float32)), _abs_max(q1.to(tl.float32))),
                           tl.maximum(_abs_max(q2.to(tl.float32)), _abs_max(q3.to(tl.float32))))
        shift = tl.minimum(14.0 - tl.ceil(tl.log2(tl.maximum(q_max, 1e-30))), 0.0)
        q_scale = tl.exp2(shift)
        q_unscale = tl.exp2(-shift)
        q0 = (q0.to(tl.float32) * q_scale).to(tl.float16)
        q1 = (q1.to(tl.float32) * q_scale).to(tl.float16)
        q2 = (q2.to(tl.float32) * q_scale).to(tl.float16)
        q3 = (q3.to(tl.float32) * q_scale).to(tl.float16)

    acc0 = tl.zeros((H_BLOCK, DT), dtype=tl.float32)
    acc1 = tl.zeros((H_BLOCK, DT), dtype=tl.float32)
    acc2 = tl.zeros((H_BLOCK, DT), dtype=tl.float32)
    acc3 = tl.zeros((H_BLOCK, DT), dtype=tl.float32)
    m_i = tl.full((H_BLOCK,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((H_BLOCK,), dtype=tl.float32)

    # This split's share of each scope, in whole N_BLOCK blocks.
    lo = (split * blocks_a) // splits * N_BLOCK
    hi = tl.minimum((split + 1) * blocks_a // splits * N_BLOCK, topk)
    idx_row = idx_ptr + b.to(tl.int64) * stride_ib + t * stride_is
    acc0, acc1, acc2, acc3, m_i, l_i = _attend(
        acc0, acc1, acc2, acc3, m_i, l_i, q0, q1, q2, q3, q_pe, q_unscale,
        kv_ptr, idx_row, lo, hi, block_size, stride_blk, stride_tok, qk_scale, heads,
        IS_FP8, D_V, D_PE, PE_OFF, N_BLOCK, UPCAST, FP8_MODE, PE_TILE, SPLIT_S,
    )
    if HAS_EXTRA:
        lo = (split * blocks_b) // splits * N_BLOCK
        hi = tl.minimum((split + 1) * blocks_b // splits * N_BLOCK, xtopk)
        xidx_row = xidx_ptr + b.to(tl.int64) * stride_xb + t * stride_xs
        acc0, acc1, acc2, acc3, m_i, l_i = _attend(
            acc0, acc1, acc2, acc3, m_i, l_i, q0, q1, q2, q3, q_pe, q_unscale,
            xkv_ptr, xidx_row, lo, hi, xblock_size, stride_xblk, stride_xtok, qk_scale, heads,
            IS_FP8, D_V, D_PE, PE_OFF, N_BLOCK, UPCAST, FP8_MODE, PE_TILE, SPLIT_S,
        )

    # l = 0: no valid slot in this share (or at all); NaN l: a NaN score, kept NaN.
    inv_l, lse2 = _normaliser(m_i, l_i)
    row = pid_q.to(tl.int64) * heads + offs_h  # (query, head) row of o / lse
    if FINAL:
        out_ptr = o_ptr + row[:, None] * D_V + offs_t[None, :]
        o, lse = _finish_row(acc0 * inv_l[:, None], lse2, sink_ptr, offs_h, h_mask, HAS_SINK)
        tl.store(out_ptr, o.to(tl.bfloat16), mask=h_mask[:, None])
        o, lse = _finish_row(acc1 * inv_l[:, None], lse2, sink_ptr, offs_h, h_mask, HAS_SINK)
        tl.store(out_ptr + DT, o.to(tl.bfloat16), mask=h_mask[:, None])
        o, lse = _finish_row(acc2 * inv_l[:, None], lse2, sink_ptr, offs_h, h_mask, HAS_SINK)
        tl.store(out_ptr + 2 * DT, o.to(tl.bfloat16), mask=h_mask[:, None])
        o, lse = _finish_row(acc3 * inv_l[:, None], lse2, sink_ptr, offs_h, h_mask, HAS_SINK)
        tl.store(out_ptr + 3 * DT, o.to(tl.bfloat16), mask=h_mask[:, None])
        tl.store(lse_ptr + row, lse, mask=h_mask)
    else:
        # Partials laid out [query, split, head, d_v] / [query, split, head].
        prow = (pid_q.to(tl.int64) * splits + split) * heads + offs_h
        out_ptr = part_o_ptr + prow[:, None] * D_V + offs_t[None, :]
        tl.store(out_ptr, acc0 * inv_l[:, None], mask=h_mask[:, None])
        tl.store(out_ptr + DT, acc1 * inv_l[:, None], mask=h_mask[:, None])
        tl.store(out_ptr + 2 * DT, acc2 * inv_l[:, None], mask=h_mask[:, None])
        tl.store(out_ptr + 3 * DT, acc3 * inv_l[:, None], mask=h_mask[:, None])
        tl.store(part_lse_ptr + prow, lse2, mask=h_mask)


@triton.jit
def _combine_kernel(
    part_o_ptr, part_lse_ptr, sink_ptr, o_ptr, lse_ptr, heads, splits,
    HAS_SINK: tl.constexpr, D_V: tl.constexpr, H_BLOCK: tl.constexpr,
):
    """Merge the splits of H_BLOCK heads of one query by their base-2 LSE."""
    pid_h = tl.program_id(0)
    pid_q = tl.program_id(1)
    offs_h = pid_h * H_BLOCK + tl.arange(0, H_BLOCK)
    h_mask = offs_h < heads
    offs_d = tl.arange(0, D_V)
    m = tl.full((H_BLOCK,), float("-inf"), dtype=tl.float32)
    den = tl.zeros((H_BLOCK,), dtype=tl.float32)
    acc = tl.zeros((H_BLOCK, D_V), dtype=tl.float32)
    for s in range(0, splits):
        prow = (pid_q.to(tl.int64) * splits + s) * heads + offs_h
        lse_s = tl.load(part_lse_ptr + prow, mask=h_mask, other=float("-inf"))
        o_s = tl.load(part_o_ptr + prow[:, None] * D_V + offs_d[None, :], mask=h_mask[:, None], other=0.0)
        m_new = tl.maximum(m, lse_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        w = tl.exp2(lse_s - m_safe)
        den = den * alpha + w
        acc = acc * alpha[:, None] + o_s * w[:, None]
        m = m_new
    inv_den, lse2 = _normaliser(m, den)
    o = acc * inv_den[:, None]
    o, lse = _finish_row(o, lse2, sink_ptr, offs_h, h_mask, HAS_SINK)
    row = pid_q.to(tl.int64) * heads + offs_h
    tl.store(o_ptr + row[:, None] * D_V + offs_d[None, :], o.to(tl.bfloat16), mask=h_mask[:, None])
    tl.store(lse_ptr + row, lse, mask=h_mask)


# --------------------------------------------------------------------------- launcher

@functools.lru_cache(maxsize=None)
def _units(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def resolve_config(
    config: Mapping[str, Any] | None, heads: int, queries: int, topk: int, device: torch.device, kv_dtype: str = "bf16"
) -> dict[str, int]:
    """Fill the automatic (0) entries of a config for this problem."""
    cfg = {**DEFAULT_CONFIG, **(config or {})}
    two_groups = cfg["LAYOUT"] in (LAYOUT_WIDE, LAYOUT_SPLIT_S)
    tile = auto_tile(kv_dtype, heads, queries)
    if two_groups:  # these layouts are defined for 64 heads on 8 warps
        tile = {**tile, **two_group_tile(cfg["LAYOUT"])}
        cfg["H_BLOCK"], cfg["num_warps"] = tile["H_BLOCK"], tile["num_warps"]
    for key in TILE_KEYS:
        if not cfg[key]:
            cfg[key] = tile[key]
    if not cfg["LAYOUT"]:
        same = all(cfg[k] == tile[k] for k in ("H_BLOCK", "num_warps"))
        cfg["LAYOUT"] = tile["LAYOUT"] if same else LAYOUT_TILES
    blocks_a = triton.cdiv(topk, cfg["N_BLOCK"])
    if not cfg["SPLITS"]:
        programs = queries * triton.cdiv(heads, cfg["H_BLOCK"])
        if cfg["LAYOUT"] == LAYOUT_WIDE:
            # One program per SM (shared memory): a second, mostly idle wave costs more
            # than a few idle SMs in one.
            cfg["SPLITS"] = max(1, min(64, _units(device) // programs))
        else:
            cfg["SPLITS"] = max(1, min(64, triton.cdiv(_units(device), programs)))
    # Every split gets at least one block of the main scope.
    cfg["SPLITS"] = max(1, min(cfg["SPLITS"], blocks_a))
    return cfg


def _cache_args(cache: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    return cache, cache.shape[1], cache.stride(0), cache.stride(1)


def sparse_mla_decode_triton(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int,
    extra_kv_cache: Optional[torch.Tensor] = None,
    extra_indices: Optional[torch.Tensor] = None,
    attn_sink: Optional[torch.Tensor] = None,
    *,
    config: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``reference.sparse_mla_decode``; d_v % 4 == 0 with d_v / 4 a power
    of two (fp8: d_v = 512), d_qk - d_v zero or a power of two >= 16."""
    maybe_check_values(q, kv_cache, indices, sm_scale, d_v, extra_kv_cache, extra_indices, attn_sink)
    batch, s_q, heads, d_qk = q.shape
    d_pe = d_qk - d_v
    is_fp8 = kv_cache.dtype == torch.uint8
    if q.stride(-1) != 1:
        q = q.contiguous()
    queries = batch * s_q
    topk = indices.shape[-1]
    has_extra = extra_kv_cache is not None and extra_indices is not None

    o = empty_output((batch, s_q, heads, d_v), torch.bfloat16, q.device)
    lse = empty_output((batch, s_q, heads), torch.float32, q.device)
    if queries == 0 or heads == 0:
        return o, lse

    cfg = resolve_config(config, heads, queries, topk, q.device, "fp8" if is_fp8 else "bf16")
    h_block, n_block, splits = cfg["H_BLOCK"], cfg["N_BLOCK"], cfg["SPLITS"]
    blocks_a = triton.cdiv(topk, n_block)
    if has_extra:
        xtopk = extra_indices.shape[-1]
        xkv, xbs, xsb, xst = _cache_args(extra_kv_cache)
        xidx = extra_indices
    else:
        xtopk, xkv, xbs, xsb, xst, xidx = 0, kv_cache, 1, 0, 0, indices
    blocks_b = triton.cdiv(xtopk, n_block)
    kv, bs, sb, st = _cache_args(kv_cache)
    final = splits == 1
    if final:
        part_o = part_lse = o  # unused
    else:
        part_o = torch.empty((queries, splits, heads, d_v), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((queries, splits, heads), dtype=torch.float32, device=q.device)
    sink = attn_sink if attn_sink is not None else lse  # unused when absent
    pe_off = d_v + 4 * (d_v // 128) if is_fp8 else d_v

    grid = (triton.cdiv(heads, h_block), queries, splits)
    args = (
        q, q.stride(0), q.stride(1), q.stride(2),
        kv, indices, indices.stride(0), indices.stride(1), topk, bs, sb, st,
        xkv, xidx, xidx.stride(0), xidx.stride(1), xtopk, xbs, xsb, xst,
        sink, o, lse, part_o, part_lse,
        heads, s_q, float(sm_scale) * LOG2E, blocks_a, blocks_b, splits,
    )
    common = dict(
        IS_FP8=is_fp8, HAS_EXTRA=has_extra, HAS_SINK=attn_sink is not None, FINAL=final,
        D_V=d_v, D_PE=d_pe, PE_OFF=pe_off, H_BLOCK=h_block, N_BLOCK=n_block,
        UPCAST=os.environ.get("TRITON_INTERPRET") == "1", num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if cfg["LAYOUT"] == LAYOUT_WIDE:
        _sparse_mla_decode_wide_kernel[grid](*args, **common)
    else:
        split_s = cfg["LAYOUT"] == LAYOUT_SPLIT_S
        _sparse_mla_decode_kernel[grid](
            *args, **common, FP8_MODE=int(cfg["FP8_MODE"]) if is_fp8 else 0,
            # Split S: the rope tail as its own d_pe-wide tile (the 64-head body is laid
            # out per dot anyway); otherwise as wide as the latent tiles (one gather layout).
            PE_TILE=max(d_pe, 16) if split_s else d_v // 4, SPLIT_S=split_s,
        )
    if not final:
        combine_heads = 4
        _combine_kernel[(triton.cdiv(heads, combine_heads), queries)](
            part_o, part_lse, sink, o, lse, heads, splits,
            HAS_SINK=attn_sink is not None, D_V=d_v, H_BLOCK=combine_heads, num_warps=4,
        )
    return o, lse
