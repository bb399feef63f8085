"""Triton kernels of kernmux's fused MoE (``@triton.jit`` only; launchers in ``triton.py``).

The structure follows the proven one of vLLM's ``fused_moe`` (token slots sorted by
expert and padded per expert to BLOCK_M, one expert per M tile, grouped GEMMs over the
sorted slots), with three differences:

* alignment is one Triton program (counts by atomics, padded prefix sum, per-block
  expert ids, slot scatter by atomics), so a decode step costs one small launch instead
  of a chain of torch ops, and every shape is static (CUDA-graph capturable);
* the gate/up GEMM keeps a gate and an up accumulator per tile and writes
  ``silu(gate) * up`` directly: no [slots, 2I] intermediate and no activation launch;
* the reduction over a token's k + S slots is its own small kernel that can also add
  densely computed shared-expert outputs (the "separate" and "dual-stream" strategies)
  and turns a token with an id outside [0, E + S) into a NaN row (ids are never used
  to address memory before they are range-checked).

Slot m of the flattened [T, K1] ids is token m // K1, column m % K1.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["num_slots", "max_blocks"])
def align_kernel(
    ids_ptr,
    stride_it,
    stride_ij,
    num_slots,
    num_experts,
    cursor_ptr,  # int32 [NE_P] scratch: counts, then per-expert write cursors
    sorted_ptr,  # int32 [max_blocks * BLOCK_M]: slot ids sorted by expert, pad = num_slots
    block_expert_ptr,  # int32 [max_blocks]: expert of each M tile, -1 past the end
    num_padded_ptr,  # int32 [1]: slots after per-expert padding
    max_blocks,
    SLOTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    NE_P: tl.constexpr,
    CHUNK: tl.constexpr,
    BB: tl.constexpr,
):
    """One program: sort the slots by expert, each expert's run padded to BLOCK_M.

    Within an expert, slot order is whatever the atomics give; every row of a GEMM tile
    is computed independently, so the results do not depend on it."""
    offs_e = tl.arange(0, NE_P)
    tl.store(cursor_ptr + offs_e, tl.zeros([NE_P], dtype=tl.int32))
    tl.debug_barrier()
    for start in range(0, num_slots, CHUNK):
        slot = start + tl.arange(0, CHUNK)
        live = slot < num_slots
        expert = tl.load(ids_ptr + (slot // SLOTS) * stride_it + (slot % SLOTS) * stride_ij, mask=live, other=-1)
        ok = live & (expert >= 0) & (expert < num_experts)
        tl.atomic_add(cursor_ptr + expert, 1, mask=ok)
    tl.debug_barrier()
    # Read the counts back through the atomic path (L2), not a possibly stale L1 line.
    counts = tl.atomic_add(cursor_ptr + offs_e, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    total = tl.sum(padded, 0)
    tl.debug_barrier()
    tl.store(cursor_ptr + offs_e, ends - padded)
    tl.store(num_padded_ptr, total)
    block_ends = ends // BLOCK_M
    for b0 in range(0, max_blocks, BB):
        block = b0 + tl.arange(0, BB)
        # The expert of tile b: how many experts' tile ranges end at or before b.
        owner = tl.sum((block_ends[None, :] <= block[:, None]).to(tl.int32), axis=1)
        owner = tl.where(block * BLOCK_M < total, owner, -1)
        tl.store(block_expert_ptr + block, owner, mask=block < max_blocks)
    for p0 in range(0, max_blocks * BLOCK_M, CHUNK):
        pos = p0 + tl.arange(0, CHUNK)
        tl.store(sorted_ptr + pos, tl.full([CHUNK], 0, tl.int32) + num_slots, mask=pos < max_blocks * BLOCK_M)
    tl.debug_barrier()
    for start in range(0, num_slots, CHUNK):
        slot = start + tl.arange(0, CHUNK)
        live = slot < num_slots
        expert = tl.load(ids_ptr + (slot // SLOTS) * stride_it + (slot % SLOTS) * stride_ij, mask=live, other=-1)
        ok = live & (expert >= 0) & (expert < num_experts)
        pos = tl.atomic_add(cursor_ptr + expert, 1, mask=ok)
        tl.store(sorted_ptr + pos, slot, mask=ok)


@triton.jit
def _dot(a, b, acc, IEEE: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b + acc in fp32. IEEE: fp32 operands multiplied in full fp32 (not TF32).
    UPCAST (interpreter only): the Triton 3.9 interpreter multiplies bf16 dot operands
    as raw bits, so they go in as fp32."""
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _tile_ids(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    """(pid_m, pid_n) with GROUP_M M tiles sharing each column band (L2 reuse)."""
    in_group = GROUP_M * num_pid_n
    first_m = (pid // in_group) * GROUP_M
    group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_m
    pid_n = (pid % in_group) // group_m
    return pid_m, pid_n


@triton.jit(do_not_specialize=["num_slots", "max_blocks"])
def gate_up_kernel(
    hidden_ptr,
    w13_ptr,
    act_ptr,  # [max_blocks * BLOCK_M, I] in hidden's dtype, rows in sorted order
    sorted_ptr,
    block_expert_ptr,
    num_padded_ptr,
    num_slots,
    max_blocks,
    inter,
    hidden_size,
    stride_ht,
    stride_hk,
    stride_we,
    stride_wn,
    stride_wk,
    stride_am,
    stride_an,
    SLOTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """act[r, n] = silu(x_t . w13[e, n]) * (x_t . w13[e, I + n]) for sorted row r."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), max_blocks, tl.cdiv(inter, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_ptr + offs_m)
    row_ok = slot < num_slots
    token = (slot // SLOTS).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = hidden_ptr + token[:, None] * stride_ht + offs_k[None, :] * stride_hk
    g_ptrs = w13_ptr + expert * stride_we + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk
    u_ptrs = g_ptrs + inter * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(hidden_size, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            g = tl.load(g_ptrs, mask=n_ok[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < hidden_size - k * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            g = tl.load(g_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc_g = _dot(a, g, acc_g, IEEE, UPCAST)
        acc_u = _dot(a, u, acc_u, IEEE, UPCAST)
        a_ptrs += BLOCK_K * stride_hk
        g_ptrs += BLOCK_K * stride_wk
        u_ptrs += BLOCK_K * stride_wk
    act = acc_g * tl.sigmoid(acc_g) * acc_u
    out_ptrs = act_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_n[None, :] * stride_an
    tl.store(out_ptrs, act.to(act_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit(do_not_specialize=["num_slots", "max_blocks"])
def down_kernel(
    act_ptr,
    w2_ptr,
    weights_ptr,
    slot_out_ptr,  # [num_slots, H] in hidden's dtype, rows in slot order
    sorted_ptr,
    block_expert_ptr,
    num_padded_ptr,
    num_slots,
    max_blocks,
    hidden_size,
    inter,
    stride_am,
    stride_ak,
    stride_2e,
    stride_2n,
    stride_2k,
    stride_wt,
    stride_wj,
    stride_om,
    stride_on,
    SLOTS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """slot_out[m, n] = weights[t, j] * (act[r] . w2[e, n]) for the slot m at sorted row r."""
    pid_m, pid_n = _tile_ids(tl.program_id(0), max_blocks, tl.cdiv(hidden_size, BLOCK_N), GROUP_M)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    slot = tl.load(sorted_ptr + offs_m)
    row_ok = slot < num_slots
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden_size
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :] * stride_ak
    b_ptrs = w2_ptr + expert * stride_2e + offs_n[None, :] * stride_2n + offs_k[:, None] * stride_2k
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(inter, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_ok[None, :], other=0.0)
        else:
            k_ok = offs_k < inter - k * BLOCK_K
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = _dot(a, b, acc, IEEE, UPCAST)
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_2k
    token = (slot // SLOTS).to(tl.int64)
    weight = tl.load(weights_ptr + token * stride_wt + (slot % SLOTS) * stride_wj, mask=row_ok, other=0.0)
    acc = acc * weight[:, None]
    out_ptrs = slot_out_ptr + slot[:, None].to(tl.int64) * stride_om + offs_n[None, :] * stride_on
    tl.store(out_ptrs, acc.to(slot_out_ptr.dtype.element_ty), mask=row_ok[:, None] & n_ok[None, :])


@triton.jit
def reduce_kernel(
    slot_out_ptr,
    shared_out_ptr,  # [S, T, H] dense shared-expert outputs (unused when DENSE == 0)
    weights_ptr,
    ids_ptr,
    out_ptr,
    hidden_size,
    num_experts,
    stride_om,
    stride_on,
    stride_ss,
    stride_st,
    stride_sn,
    stride_wt,
    stride_wj,
    stride_it,
    stride_ij,
    stride_yt,
    stride_yn,
    ROUTED: tl.constexpr,
    DENSE: tl.constexpr,
    COLS_P: tl.constexpr,
    ROUTED_P: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """out[t] = sum of token t's ROUTED slot rows (+ weights[t, ROUTED + s] * shared[s, t]
    for the DENSE shared experts), summed in fp32. NaN row when one of its ids is out of
    range, or a dense shared column does not hold expert E + s (num_experts - DENSE + s)."""
    t = tl.program_id(0).to(tl.int64)
    offs_h = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    h_ok = offs_h < hidden_size
    offs_j = tl.arange(0, ROUTED_P)
    j_ok = offs_j < ROUTED
    rows = slot_out_ptr + (t * ROUTED + offs_j)[:, None] * stride_om + offs_h[None, :] * stride_on
    acc = tl.sum(tl.load(rows, mask=j_ok[:, None] & h_ok[None, :], other=0.0).to(tl.float32), axis=0)
    offs_c = tl.arange(0, COLS_P)
    c_ok = offs_c < ROUTED + DENSE
    ids = tl.load(ids_ptr + t * stride_it + offs_c * stride_ij, mask=c_ok, other=0)
    bad = c_ok & ((ids < 0) | (ids >= num_experts))
    bad = bad | (c_ok & (offs_c >= ROUTED) & (ids != offs_c - ROUTED + num_experts - DENSE))
    for s in tl.static_range(DENSE):
        weight = tl.load(weights_ptr + t * stride_wt + (ROUTED + s) * stride_wj)
        y = tl.load(shared_out_ptr + s * stride_ss + t * stride_st + offs_h * stride_sn, mask=h_ok, other=0.0)
        acc += weight * y.to(tl.float32)
    acc = tl.where(tl.sum(bad.to(tl.int32), axis=0) > 0, float("nan"), acc)
    tl.store(out_ptr + t * stride_yt + offs_h * stride_yn, acc.to(out_ptr.dtype.element_ty), mask=h_ok)


@triton.jit
def silu_mul_kernel(gate_up_ptr, out_ptr, inter, stride_gt, stride_gn, stride_ot, stride_on, BLOCK: tl.constexpr):
    """out[t, n] = silu(gate_up[t, n]) * gate_up[t, I + n], in fp32."""
    t = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < inter
    g = tl.load(gate_up_ptr + t * stride_gt + offs * stride_gn, mask=ok, other=0.0).to(tl.float32)
    u = tl.load(gate_up_ptr + t * stride_gt + (inter + offs) * stride_gn, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + t * stride_ot + offs * stride_on, (g * tl.sigmoid(g) * u).to(out_ptr.dtype.element_ty), mask=ok)
