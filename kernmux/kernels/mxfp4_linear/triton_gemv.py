"""Decode kernel (M <= 16) for MX FP4 weights: y = x @ dequant(w)^T (+ bias), memory-bound.

Each program owns ``BLOCK_N`` output columns (rows of w), up to 16 rows of x and one K
range (split-K). Per iteration it streams the packed weights as 32-bit words in a
``[BLOCK_N, BLOCK_K/32, 4]`` tile -- one scale group (16 contiguous bytes) per thread
and 128-bit load; rows of w are K/2 bytes, a multiple of 16 -- their scales
``[BLOCK_N, BLOCK_K/32]`` and x. Value j of a word (its nibble j) is decoded together
with value j + 4: two shifts and two masks place both codes in one word as two IEEE
halves equal to ``value * 2^-14`` (exact, no table), then each converts exactly to
float32 (``triton_common.e2m1_halves``); the 2^14 is folded into the scale (``e8m0_factors``).
Accumulation is float32 in every mode.

- ``MODE_FMA`` (1): x is split by position in the word (in-thread), products summed
  within each thread over its scale group, multiplied once per (row, group) by the
  group's factors, kept per group until the end of the K range, then summed.
- ``MODE_DOT`` (2) / ``MODE_DOT_BY_POSITION`` (3): each value times its factors, rounded
  to x's dtype (exact for bf16; fp16 overflows beyond 65504 as in any fp16 GEMM), then
  ``tl.dot(w, x^T)`` with x padded to 16 rows: one dot over the tile put back in k order
  (2), or eight dots, one per position, against x split by position (3).

Split-K partials (float32 ``[splits, M, N]``) are summed in split order either by the
last program of each output tile to arrive (``REDUCE_LAST_PROGRAM``: an arrival counter
per tile that the last program resets to 0, so the counters stay zero between launches)
or by a second kernel (``REDUCE_KERNEL``); the bias is added and the result cast once.
Both are deterministic and give the same bits. The arrival counters are kept per device
and stream (two streams never share one; a CUDA graph keeps those of the stream it was
captured on, so two graphs captured on one stream must not be replayed concurrently);
a launch whose tiles exceed them uses the second kernel.

Semantics match the reference (dequantize to float32, float32 products, one cast):
each weight value is ``e2m1 * 2^-14`` times ``2^(s - 113)`` (exact as two factors), the
NaN scale (255) gives NaN, NaN/inf in x propagate as in the float32 product; only the
summation order differs (per group, then per split). In ``MODE_FMA`` the products
``x * e2m1 * 2^-14`` are formed before the scale: activations below ~2^-110 in
magnitude lose bits there (float32 subnormals), far below any activation a model makes,
and a weight beyond float32 (scale byte 253/254 with a large code: inf in the
reference's dequantization, never made by the OCP quantizer from finite weights) gives
a finite product where the reference gives inf or NaN. The dot modes form every weight
value and agree with the reference there.

Config keys, cost model and the shape heuristic: ``triton_gemv_config.py``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import torch
import triton
import triton.language as tl

from kernmux.dispatch.outputs import empty_output
from kernmux.kernels.mxfp4_linear.triton_common import (
    e2m1_halves,
    e8m0_factors,
    join_in_k_order,
    split_by_position,
    split_k_reduce_kernel,
)
from kernmux.kernels.mxfp4_linear.triton_gemv_config import (
    DEFAULT_CONFIG,
    MODE_FMA,
    REDUCE_LAST_PROGRAM,
    block_m,
    resolve_config,
    splits_run,
)

# Arrival counters per (device, stream): tiles of one launch beyond this use the second
# reduce kernel (N = 1M columns of 16).
COUNTER_SLOTS = 1 << 16


@triton.jit
def _dot(weight, x, acc, UPCAST: tl.constexpr):
    """acc [BLOCK_N, BLOCK_M] += weight [BLOCK_N, k] @ x [BLOCK_M, k]^T (float32)."""
    if UPCAST:  # the interpreter: bf16 operands as raw bits (Triton 3.9), fp16 sums in fp16
        return tl.dot(weight.to(tl.float32), tl.trans(x).to(tl.float32), acc)
    return tl.dot(weight, tl.trans(x), acc)


@triton.jit
def _load_weights(w_ptrs, s_ptrs, col_ok, g_ok, EVEN_K: tl.constexpr):
    """Packed words [BLOCK_N, GROUPS, 4] and scales [BLOCK_N, GROUPS] of one block
    (outside N or K: code 0 and scale 127, i.e. +0 times 1)."""
    if EVEN_K:
        words = tl.load(w_ptrs, mask=col_ok[:, None, None], other=0)
        scales = tl.load(s_ptrs, mask=col_ok[:, None], other=127)
    else:
        words = tl.load(w_ptrs, mask=col_ok[:, None, None] & g_ok[None, :, None], other=0)
        scales = tl.load(s_ptrs, mask=col_ok[:, None] & g_ok[None, :], other=127)
    return words, scales


@triton.jit
def _load_x(x_ptrs, g_ok, EVEN_K: tl.constexpr):
    """One row of x for one block: [GROUPS, 4, 8] (outside K: 0)."""
    if EVEN_K:
        return tl.load(x_ptrs)
    return tl.load(x_ptrs, mask=g_ok[:, None, None], other=0.0)


@triton.jit
def _fma_row(w0, w1, w2, w3, w4, w5, w6, w7, f1, f2, xv):
    """One row of x [GROUPS, 4, 8] against the decoded tile (w_j [BLOCK_N, GROUPS, 4]:
    element j of every word): [BLOCK_N, GROUPS] group sums times the factors (one after
    the other: f1 * f2 alone may overflow where the product does not)."""
    x0, x1, x2, x3, x4, x5, x6, x7 = split_by_position(xv.to(tl.float32))
    # Explicit fused multiply-adds (not left to the compiler's contraction setting).
    words = w0 * x0[None]
    words = tl.fma(w4, x4[None], words)
    words = tl.fma(w1, x1[None], words)
    words = tl.fma(w5, x5[None], words)
    words = tl.fma(w2, x2[None], words)
    words = tl.fma(w6, x6[None], words)
    words = tl.fma(w3, x3[None], words)
    words = tl.fma(w7, x7[None], words)
    return tl.sum(words, axis=2) * f1 * f2


@triton.jit
def _fma_loop(w_ptrs, s_ptrs, x_ptrs, x1_step, col_ok, offs_g, g_begin, groups_end, stride_xk, stride_sk,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, TWO_ROWS: tl.constexpr, EVEN_K: tl.constexpr,
              PREFETCH: tl.constexpr):
    """MODE_FMA over one K range: [BLOCK_N, GROUPS] float32 sums for the first row and
    the second (TWO_ROWS).

    PREFETCH: the next block's words, scales and x are loaded before this block is
    decoded (twice the bytes in flight per thread for ~20 more registers; Triton's own
    pipelining applies to loops with a dot only). With EVEN_K the last prefetch reloads
    the last block (pointers stop advancing) rather than masking every load."""
    GROUPS: tl.constexpr = BLOCK_K // 32
    acc0 = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, GROUPS), dtype=tl.float32)
    if PREFETCH:
        g_ok = (g_begin + offs_g) < groups_end
        words, scales = _load_weights(w_ptrs, s_ptrs, col_ok, g_ok, EVEN_K)
        xa = _load_x(x_ptrs, g_ok, EVEN_K)
        xb = _load_x(x_ptrs + x1_step, g_ok, EVEN_K) if TWO_ROWS else xa
    for g0 in range(g_begin, groups_end, GROUPS):
        if PREFETCH:
            cur_words, cur_scales, cur_a, cur_b = words, scales, xa, xb
            more = g0 + GROUPS < groups_end
            if EVEN_K:
                step = more.to(tl.int32)
            else:
                step = 1
            w_ptrs += step * (BLOCK_K // 8)
            s_ptrs += step * GROUPS * stride_sk
            x_ptrs += step * BLOCK_K * stride_xk
            g_ok = (g0 + GROUPS + offs_g) < groups_end
            words, scales = _load_weights(w_ptrs, s_ptrs, col_ok, g_ok, EVEN_K)
            xa = _load_x(x_ptrs, g_ok, EVEN_K)
            xb = _load_x(x_ptrs + x1_step, g_ok, EVEN_K) if TWO_ROWS else xa
        else:
            g_ok = (g0 + offs_g) < groups_end
            cur_words, cur_scales = _load_weights(w_ptrs, s_ptrs, col_ok, g_ok, EVEN_K)
            cur_a = _load_x(x_ptrs, g_ok, EVEN_K)
            cur_b = _load_x(x_ptrs + x1_step, g_ok, EVEN_K) if TWO_ROWS else cur_a
            w_ptrs += BLOCK_K // 8
            s_ptrs += GROUPS * stride_sk
            x_ptrs += BLOCK_K * stride_xk
        # [BLOCK_N, GROUPS, 4] each: element j of every word, value * 2^-14.
        w0, w4 = e2m1_halves(cur_words, 0)
        w1, w5 = e2m1_halves(cur_words, 1)
        w2, w6 = e2m1_halves(cur_words, 2)
        w3, w7 = e2m1_halves(cur_words, 3)
        f1, f2 = e8m0_factors(cur_scales)  # [BLOCK_N, GROUPS]
        acc0 += _fma_row(w0, w1, w2, w3, w4, w5, w6, w7, f1, f2, cur_a)
        if TWO_ROWS:
            acc1 += _fma_row(w0, w1, w2, w3, w4, w5, w6, w7, f1, f2, cur_b)
    return acc0, acc1


@triton.jit
def _dot_loop(w_ptrs, s_ptrs, x_ptr, rows, row_ok, col_ok, offs_g, k_begin, groups_end, stride_xm, stride_xk, stride_sk,
              MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
              EVEN_K: tl.constexpr, UPCAST: tl.constexpr):
    """MODE_DOT (2) and MODE_DOT_BY_POSITION (3) over one K range: [BLOCK_N, BLOCK_M]
    float32 (Triton pipelines the loads over num_stages)."""
    GROUPS: tl.constexpr = BLOCK_K // 32
    dtype = x_ptr.dtype.element_ty
    if MODE == 2:
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + (k_begin + offs_k[None, :]) * stride_xk
    else:
        offs_q = tl.arange(0, GROUPS * 4)  # words of the block
        offs_e = tl.arange(0, 8)
        x_ptrs = (x_ptr + rows[:, None, None].to(tl.int64) * stride_xm
                  + (k_begin + offs_q[None, :, None] * 8 + offs_e[None, None, :]) * stride_xk)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for g0 in range(k_begin // 32, groups_end, GROUPS):
        words, scales = _load_weights(w_ptrs, s_ptrs, col_ok, (g0 + offs_g) < groups_end, EVEN_K)
        w0, w4 = e2m1_halves(words, 0)
        w1, w5 = e2m1_halves(words, 1)
        w2, w6 = e2m1_halves(words, 2)
        w3, w7 = e2m1_halves(words, 3)
        f1, f2 = e8m0_factors(scales)
        f1 = f1[:, :, None]
        f2 = f2[:, :, None]
        if MODE == 2:
            if EVEN_K:
                xv = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            else:
                xv = tl.load(x_ptrs, mask=row_ok[:, None] & ((g0 * 32 + offs_k) < groups_end * 32)[None, :], other=0.0)
            # Back in k order: [BLOCK_N, GROUPS, 4 words, 8 positions] -> [BLOCK_N, BLOCK_K].
            weight = join_in_k_order(w0 * f1 * f2, w1 * f1 * f2, w2 * f1 * f2, w3 * f1 * f2,
                                 w4 * f1 * f2, w5 * f1 * f2, w6 * f1 * f2, w7 * f1 * f2)
            acc = _dot(weight.to(dtype).reshape(BLOCK_N, BLOCK_K), xv, acc, UPCAST)
        else:
            if EVEN_K:
                xv = tl.load(x_ptrs, mask=row_ok[:, None, None], other=0.0)
            else:
                q_ok = (g0 * 4 + offs_q) < groups_end * 4
                xv = tl.load(x_ptrs, mask=row_ok[:, None, None] & q_ok[None, :, None], other=0.0)
            x0, x1, x2, x3, x4, x5, x6, x7 = split_by_position(xv)  # [BLOCK_M, GROUPS * 4] each
            acc = _dot((w0 * f1 * f2).to(dtype).reshape(BLOCK_N, BLOCK_K // 8), x0, acc, UPCAST)
            acc = _dot((w1 * f1 * f2).to(dtype).reshape(BLOCK_N, BLOCK_K // 8), x1, acc, UPCAST)
            acc = _dot((w2 * f1 * f2).to(dtype).reshape(BLOCK_N, BLOCK_K // 8), x2, acc, UPCAST)
            acc = _dot((w3 * f1 * f2).to(dtype).reshape(BLOCK_N, BLOCK_K // 8), x3, acc, UPCAST)
            acc = _dot((w4 * f1 * f2).to(dtype).reshape(BLOCK_N, BLOCK_K // 8), x4, acc, UPCAST)
            acc = _dot((w5 * f1 * f2).to(dtype).reshape(BLOCK_N, BLOCK_K // 8), x5, acc, UPCAST)
            acc = _dot((w6 * f1 * f2).to(dtype).reshape(BLOCK_N, BLOCK_K // 8), x6, acc, UPCAST)
            acc = _dot((w7 * f1 * f2).to(dtype).reshape(BLOCK_N, BLOCK_K // 8), x7, acc, UPCAST)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K // 8
        s_ptrs += GROUPS * stride_sk
    return acc


@triton.jit
def _mxfp4_gemv_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, p_ptr, c_ptr,
    M, N, K, K_PER_SPLIT, NUM_SPLITS,
    stride_xm, stride_xk, stride_wn, stride_sn, stride_sk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, REDUCE_HERE: tl.constexpr, MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
    PREFETCH: tl.constexpr, UPCAST: tl.constexpr,
):
    """Grid (N tiles, splits, M tiles). w_ptr: the packed weights as int32 words [N, K/8]
    (stride_wn in words). Partials p_ptr float32 [splits, M, N]; c_ptr int32 arrival
    counters (REDUCE_HERE)."""
    GROUPS: tl.constexpr = BLOCK_K // 32
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    k_begin = tl.multiple_of(pid_k * K_PER_SPLIT, 32)
    groups_end = tl.minimum(k_begin + K_PER_SPLIT, K) // 32

    offs_g = tl.arange(0, GROUPS)
    offs_w = tl.arange(0, 4)  # words of one scale group
    w_ptrs = (w_ptr + cols[:, None, None].to(tl.int64) * stride_wn
              + (k_begin // 8 + offs_g[None, :, None] * 4 + offs_w[None, None, :]))
    s_ptrs = s_ptr + cols[:, None].to(tl.int64) * stride_sn + (k_begin // 32 + offs_g[None, :]) * stride_sk

    if MODE == 1:
        row0 = pid_m * BLOCK_M
        offs_e = tl.arange(0, 8)  # values of one word
        x_ptrs = (x_ptr + row0.to(tl.int64) * stride_xm
                  + (k_begin + offs_g[:, None, None] * 32 + offs_w[None, :, None] * 8 + offs_e[None, None, :]) * stride_xk)
        # The second row (BLOCK_M == 2) reads the first again when M is odd (not stored).
        x1_step = tl.where(row0 + 1 < M, stride_xm, 0)
        acc0, acc1 = _fma_loop(w_ptrs, s_ptrs, x_ptrs, x1_step, col_ok, offs_g, k_begin // 32, groups_end, stride_xk, stride_sk,
                               BLOCK_N, BLOCK_K, BLOCK_M == 2, EVEN_K, PREFETCH)
        if BLOCK_M == 2:
            out = tl.trans(tl.join(tl.sum(acc0, axis=1), tl.sum(acc1, axis=1)))
        else:
            out = tl.sum(acc0, axis=1)[None, :]
    else:
        acc = _dot_loop(w_ptrs, s_ptrs, x_ptr, rows, row_ok, col_ok, offs_g, k_begin, groups_end, stride_xm, stride_xk, stride_sk,
                        MODE, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, UPCAST)
        out = tl.trans(acc)  # [BLOCK_M, BLOCK_N]

    mask = row_ok[:, None] & col_ok[None, :]
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :] * stride_yn
    if not SPLIT:
        if HAS_BIAS:
            out += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tile_offs = rows[:, None].to(tl.int64) * N + cols[None, :]
        tl.store(p_ptr + pid_k * M * N + tile_offs, out, mask=mask)
        if REDUCE_HERE:
            # Every thread's partials are written before the arrival is counted (release);
            # the last to arrive reads them all from L2 (acquire, .cg).
            tl.debug_barrier()
            tile = pid_m * tl.num_programs(0) + pid_n
            arrived = tl.atomic_add(c_ptr + tile, 1, sem="acq_rel", scope="gpu")
            if arrived == NUM_SPLITS - 1:
                total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
                for split in range(NUM_SPLITS):  # fixed order: deterministic
                    total += tl.load(p_ptr + split * M * N + tile_offs, mask=mask, other=0.0, cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
                tl.store(y_ptrs, total.to(y_ptr.dtype.element_ty), mask=mask)
                tl.atomic_xchg(c_ptr + tile, 0, sem="relaxed", scope="gpu")


@functools.lru_cache(maxsize=8)
def _units(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=4096)
def _resolved(config_items: tuple, tokens: int, n: int, k: int, units: int, interpret: bool) -> dict[str, int]:
    return resolve_config(dict(config_items), tokens, n, k, units=units, interpret=interpret)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def launch_config(x: torch.Tensor, n: int, config: Mapping[str, Any]) -> dict[str, int]:
    """The config with its 0 entries filled by the shape heuristic for this device
    (cached per shape and config)."""
    interpret = x.device.type == "cpu" or _interpreting()
    units = 132 if interpret else _units(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return _resolved(tuple(sorted(config.items())), x.shape[0], n, x.shape[1], units, interpret)


_COUNTERS: dict[tuple, torch.Tensor] = {}


def _tile_counters(device: torch.device) -> torch.Tensor:
    """int32 [COUNTER_SLOTS] zeros for this device and the current stream (kept zero by
    the kernel between launches; allocated once, also when first needed during CUDA-graph
    capture, where the zeroing is recorded with the graph)."""
    if device.type == "cuda":
        key = (device.index, torch.cuda.current_stream(device).cuda_stream)
    else:
        key = (device.type, 0)
    counters = _COUNTERS.get(key)
    if counters is None:
        counters = _COUNTERS.setdefault(key, torch.zeros(COUNTER_SLOTS, dtype=torch.int32, device=device))
    return counters


def _as_words(w: torch.Tensor) -> torch.Tensor:
    """Packed weights uint8 [N, K/2] as int32 words [N, K/8] (code j of a word = element
    j: little-endian bytes, low nibble first); a copy only for rows that are not
    contiguous, 4-byte aligned bytes (never for a weight made by ``quantize_mxfp4``)."""
    if w.stride(1) != 1 or w.stride(0) % 4 or w.storage_offset() % 4:
        w = w.contiguous()
    return w.view(torch.int32)


def mxfp4_linear_triton_gemv(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
    *, config: Mapping[str, Any] = DEFAULT_CONFIG,
) -> torch.Tensor:
    """x [M, K] bf16|fp16 (M <= 16 intended; any M runs), w uint8 [N, K/2], w_scale
    uint8 [N, K/32], bias [N] | None -> [M, N] in x's dtype. Any strides."""
    m, k = x.shape
    n = w.shape[0]
    cfg = launch_config(x, n, config)
    mode, block_n, block_k = cfg["MODE"], cfg["BLOCK_N"], cfg["BLOCK_K"]
    rows = block_m(mode, m)
    splits, k_per_split = splits_run(k, block_k, cfg["SPLIT_K"])
    grid = (triton.cdiv(n, block_n), splits, triton.cdiv(m, rows))
    y = empty_output((m, n), x.dtype, x.device)
    split = splits > 1
    reduce_here = split and cfg["REDUCE"] == REDUCE_LAST_PROGRAM and grid[0] * grid[2] <= COUNTER_SLOTS
    partials = torch.empty((splits, m, n), dtype=torch.float32, device=x.device) if split else y
    counters = _tile_counters(x.device) if reduce_here else partials
    has_bias = bias is not None
    words = _as_words(w)
    _mxfp4_gemv_kernel[grid](
        x, words, w_scale, bias if has_bias else y, y, partials, counters,
        m, n, k, k_per_split, splits,
        x.stride(0), x.stride(1), words.stride(0), w_scale.stride(0), w_scale.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=has_bias, SPLIT=split, REDUCE_HERE=reduce_here, MODE=mode,
        BLOCK_M=rows, BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k % block_k == 0, PREFETCH=mode == MODE_FMA and cfg["num_stages"] > 1,
        UPCAST=mode != MODE_FMA and _interpreting(),
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split and not reduce_here:
        block = 1024
        split_k_reduce_kernel[(triton.cdiv(m * n, block),)](
            partials, bias if has_bias else y, y, m, n, y.stride(0), y.stride(1),
            HAS_BIAS=has_bias, SPLIT_K=splits, BLOCK=block, num_warps=4,
        )
    return y


__all__ = ["COUNTER_SLOTS", "launch_config", "mxfp4_linear_triton_gemv"]
