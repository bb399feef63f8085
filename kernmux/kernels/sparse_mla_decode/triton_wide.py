"""Sparse MLA decode in Triton for wide head groups: 64 heads on two warpgroups.

Same grid, arguments and partials as ``triton._sparse_mla_decode_kernel`` (head group,
query, split; LSE combine in ``triton._combine_kernel``), built for ``H_BLOCK = 64`` with
8 warps, where every dot is a Hopper ``wgmma`` (M = 64 per warpgroup):

* one latent tile per step: the gathered rows [N, d_v] (fp8 rows dequantised in
  registers, one scale per 128 columns) serve as K for ``S = Q K^T`` and as V for
  ``O += P V``; the rope tail is a second, ``d_qk - d_v``-wide tile.
* S is split by slots between the two warpgroups ([4, 2] warps), O by columns
  (each warpgroup holds a [64, d_v / 2] fp32 accumulator, 128 registers a thread).
  Triton lays out a dot whose result reaches another dot as [num_warps, 1], which with
  64 rows on 8 warps makes both warpgroups compute the whole S; the softmax therefore
  sits in a run-time branch (``if taken > 0``, always true) whose results the layout
  pass does not follow, and the QK^T products are scaled before they are summed (a
  plain sum of dots is folded back into one accumulator chain).
"""

from __future__ import annotations

import triton
import triton.language as tl

from kernmux.kernels.sparse_mla_decode.triton_common import _dot, _finish_row, _normaliser, _softmax_step

@triton.jit
def _load_rows(row_ptr, valid, N: tl.constexpr, D_V: tl.constexpr, IS_FP8: tl.constexpr):
    """The latent of the gathered rows [N, D_V] as bf16 (zeros where invalid); fp8 rows
    are scaled per 128 columns by the fp32 scales stored after the latent (fp8.py)."""
    if IS_FP8:
        T: tl.constexpr = D_V // 128
        t = tl.arange(0, T)
        c = tl.arange(0, 128)
        ptrs = row_ptr.to(tl.pointer_type(tl.float8e4nv))[:, None, None] + (t * 128)[None, :, None] + c[None, None, :]
        raw = tl.load(ptrs, mask=valid[:, None, None], other=0.0)
        sc_ptr = (row_ptr + D_V).to(tl.pointer_type(tl.float32))
        scale = tl.load(sc_ptr[:, None] + t[None, :], mask=valid[:, None], other=0.0)
        tile = tl.reshape((raw.to(tl.float32) * scale[:, :, None]).to(tl.bfloat16), (N, D_V))
    else:
        cols = tl.arange(0, D_V)
        tile = tl.load(row_ptr[:, None] + cols[None, :], mask=valid[:, None], other=0.0)
    return tile


@triton.jit
def _row_ptrs(kv_ptr, slot, valid, block_size, stride_blk, stride_tok):
    """Start of each selected slot's row in the paged cache [N] (slot 0 where invalid)."""
    slot = tl.where(valid, slot, 0).to(tl.int64)
    return kv_ptr + (slot // block_size) * stride_blk + (slot % block_size) * stride_tok


@triton.jit
def _attend_wide(
    acc, m_i, l_i, q, q_pe,
    kv_ptr, idx_ptr, start, end, block_size, stride_blk, stride_tok, qk_scale, taken,
    IS_FP8: tl.constexpr, D_V: tl.constexpr, D_PE: tl.constexpr, PE_OFF: tl.constexpr,
    N_BLOCK: tl.constexpr, UPCAST: tl.constexpr,
):
    """Online softmax over slots idx_ptr[start:end] of one cache (one scope)."""
    for n0 in range(start, end, N_BLOCK):
        offs_n = n0 + tl.arange(0, N_BLOCK)
        slot = tl.load(idx_ptr + offs_n, mask=offs_n < end, other=-1)
        valid = slot >= 0
        row_ptr = _row_ptrs(kv_ptr, slot, valid, block_size, stride_blk, stride_tok)
        kv = _load_rows(row_ptr, valid, N_BLOCK, D_V, IS_FP8)
        s = _dot(q, tl.trans(kv), tl.zeros((q.shape[0], N_BLOCK), dtype=tl.float32), UPCAST) * qk_scale
        if D_PE > 0:
            pe_ptr = (row_ptr + PE_OFF).to(tl.pointer_type(tl.bfloat16))
            pe_cols = tl.arange(0, D_PE)
            k_pe = tl.load(pe_ptr[:, None] + pe_cols[None, :], mask=valid[:, None], other=0.0)
            s += _dot(q_pe, tl.trans(k_pe), tl.zeros_like(s), UPCAST) * qk_scale
        s = tl.where(valid[None, :], s, float("-inf"))
        if taken > 0:
            m_new, alpha, p, l_i = _softmax_step(s, m_i, l_i)
            p = p.to(tl.bfloat16)  # here, so that P crosses between warpgroups in bf16
        else:  # never: a no-op step
            m_new, alpha, p = m_i, tl.full(l_i.shape, 1.0, tl.float32), tl.zeros_like(s).to(tl.bfloat16)
        acc = _dot(p, kv, acc * alpha[:, None], UPCAST)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _sparse_mla_decode_wide_kernel(
    q_ptr, stride_qb, stride_qs, stride_qh,
    kv_ptr, idx_ptr, stride_ib, stride_is, topk, block_size, stride_blk, stride_tok,
    xkv_ptr, xidx_ptr, stride_xb, stride_xs, xtopk, xblock_size, stride_xblk, stride_xtok,
    sink_ptr, o_ptr, lse_ptr, part_o_ptr, part_lse_ptr,
    heads, s_q, qk_scale, blocks_a, blocks_b, splits,
    IS_FP8: tl.constexpr, HAS_EXTRA: tl.constexpr, HAS_SINK: tl.constexpr, FINAL: tl.constexpr,
    D_V: tl.constexpr, D_PE: tl.constexpr, PE_OFF: tl.constexpr,
    H_BLOCK: tl.constexpr, N_BLOCK: tl.constexpr, UPCAST: tl.constexpr,
):
    pid_h = tl.program_id(0)
    pid_q = tl.program_id(1)
    split = tl.program_id(2)
    b = pid_q // s_q
    t = pid_q % s_q
    offs_h = pid_h * H_BLOCK + tl.arange(0, H_BLOCK)
    h_mask = offs_h < heads
    offs_v = tl.arange(0, D_V)

    q_row = q_ptr + b.to(tl.int64) * stride_qb + t * stride_qs + offs_h[:, None] * stride_qh
    q = tl.load(q_row + offs_v[None, :], mask=h_mask[:, None], other=0.0)
    if D_PE > 0:
        offs_pe = tl.arange(0, D_PE)
        q_pe = tl.load(q_row + D_V + offs_pe[None, :], mask=h_mask[:, None], other=0.0)
    else:
        q_pe = q  # unused
    acc = tl.zeros((H_BLOCK, D_V), dtype=tl.float32)
    m_i = tl.full((H_BLOCK,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((H_BLOCK,), dtype=tl.float32)

    # This split's share of each scope, in whole N_BLOCK blocks.
    lo = (split * blocks_a) // splits * N_BLOCK
    hi = tl.minimum((split + 1) * blocks_a // splits * N_BLOCK, topk)
    idx_row = idx_ptr + b.to(tl.int64) * stride_ib + t * stride_is
    acc, m_i, l_i = _attend_wide(
        acc, m_i, l_i, q, q_pe, kv_ptr, idx_row, lo, hi, block_size, stride_blk, stride_tok, qk_scale, heads,
        IS_FP8, D_V, D_PE, PE_OFF, N_BLOCK, UPCAST,
    )
    if HAS_EXTRA:
        lo = (split * blocks_b) // splits * N_BLOCK
        hi = tl.minimum((split + 1) * blocks_b // splits * N_BLOCK, xtopk)
        xidx_row = xidx_ptr + b.to(tl.int64) * stride_xb + t * stride_xs
        acc, m_i, l_i = _attend_wide(
            acc, m_i, l_i, q, q_pe, xkv_ptr, xidx_row, lo, hi, xblock_size, stride_xblk, stride_xtok, qk_scale, heads,
            IS_FP8, D_V, D_PE, PE_OFF, N_BLOCK, UPCAST,
        )

    inv_l, lse2 = _normaliser(m_i, l_i)  # NaN l (a NaN score) stays NaN, never "empty"
    row = pid_q.to(tl.int64) * heads + offs_h
    if FINAL:
        o, lse = _finish_row(acc * inv_l[:, None], lse2, sink_ptr, offs_h, h_mask, HAS_SINK)
        tl.store(o_ptr + row[:, None] * D_V + offs_v[None, :], o.to(tl.bfloat16), mask=h_mask[:, None])
        tl.store(lse_ptr + row, lse, mask=h_mask)
    else:
        prow = (pid_q.to(tl.int64) * splits + split) * heads + offs_h
        tl.store(part_o_ptr + prow[:, None] * D_V + offs_v[None, :], acc * inv_l[:, None], mask=h_mask[:, None])
        tl.store(part_lse_ptr + prow, lse2, mask=h_mask)
