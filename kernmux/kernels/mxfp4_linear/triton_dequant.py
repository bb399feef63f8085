"""Triton kernel: MX FP4 weight [N, K/2] + scales [N, K/32] -> [N, K] in bf16/fp16.

One program per (BLOCK_N rows, BLOCK_K columns) tile; reads 0.53 bytes and writes 2 bytes
per value, so it runs at copy speed. Used by the ``dequant_cublas`` kernel.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernmux.dispatch.outputs import empty_output
from kernmux.kernels.mxfp4_linear.triton_common import dequant_tile

BLOCK_N = 32
BLOCK_K = 256


@triton.jit
def _dequant_kernel(
    w_ptr, s_ptr, out_ptr,
    N, K,
    stride_wn, stride_wk, stride_sn, stride_sk, stride_on, stride_ok,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    half = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    groups = pid_k * (BLOCK_K // 32) + tl.arange(0, BLOCK_K // 32)
    row_ok = rows[:, None] < N
    packed = tl.load(w_ptr + rows[:, None] * stride_wn + half[None, :] * stride_wk,
                     mask=row_ok & (half[None, :] < K // 2), other=0)
    scales = tl.load(s_ptr + rows[:, None] * stride_sn + groups[None, :] * stride_sk,
                     mask=row_ok & (groups[None, :] < K // 32), other=127)
    values = dequant_tile(packed, scales, BLOCK_N, BLOCK_K)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    tl.store(out_ptr + rows[:, None] * stride_on + cols[None, :] * stride_ok,
             values.to(out_ptr.dtype.element_ty), mask=row_ok & (cols[None, :] < K))


def dequantize_triton(w: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """w uint8 [N, K/2], w_scale uint8 [N, K/32] -> [N, K] ``dtype`` (bf16/fp16; exact for
    values the dtype represents)."""
    n, k = w.shape[0], 2 * w.shape[1]
    out = empty_output((n, k), dtype, w.device)
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(k, BLOCK_K))
    _dequant_kernel[grid](
        w, w_scale, out, n, k,
        w.stride(0), w.stride(1), w_scale.stride(0), w_scale.stride(1), out.stride(0), out.stride(1),
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4,
    )
    return out
