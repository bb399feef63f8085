"""Fused W4A16 MX FP4 GEMM in Triton: y = x @ dequant(w)^T (+ bias).

One program computes a BLOCK_M x BLOCK_N tile of y over one K range: it streams x
[BLOCK_M, BLOCK_K], the packed weight [BLOCK_N, BLOCK_K/2] and its scales
[BLOCK_N, BLOCK_K/32], and multiplies in float32 accumulation, with the weight tile
either dequantized in registers (MODE 1: E2M1 bits -> float32 times 2^(s-127) -> x's
dtype, ``tl.dot``) or handed to ``tl.dot_scaled`` (MODE 2). The weight is read once per
BLOCK_M rows at 0.53 bytes per value: at decode the kernel moves ~4x fewer bytes than a
bf16 GEMM.

Split-K (SPLIT_K > 1, for few rows and long K): programs along K write float32 partials
[SPLIT_K, M, N] and a second kernel sums them in a fixed order, adds the bias and casts
(deterministic). With SPLIT_K = 1 the bias and the cast are in the epilogue.

Config keys and the shape heuristic: ``triton_config.py``. For fp16 x the weight tile is
dequantized to fp16 (|w| > 65504 becomes inf, as in any fp16 GEMM on such weights).
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
from kernmux.kernels.mxfp4_linear.triton_common import dequant_tile, split_k_reduce_kernel
from kernmux.kernels.mxfp4_linear.triton_config import DEFAULT_CONFIG, MODE_DOT_SCALED, resolve_config


@triton.jit
def _mxfp4_linear_kernel(
    x_ptr, w_ptr, s_ptr, b_ptr, y_ptr, p_ptr,
    M, N, K, K_PER_SPLIT,
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, MODE: tl.constexpr, X_FORMAT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    UPCAST: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    # Grouped ordering: GROUP_M row tiles share each weight tile while it is in L2.
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    k_begin = pid_k * K_PER_SPLIT
    k_end = min(k_begin + K_PER_SPLIT, K)

    offs_k = tl.arange(0, BLOCK_K)
    offs_h = tl.arange(0, BLOCK_K // 2)
    offs_g = tl.arange(0, BLOCK_K // 32)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_xm + (k_begin + offs_k)[None, :] * stride_xk
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_wn + (k_begin // 2 + offs_h)[None, :] * stride_wk
    s_ptrs = s_ptr + cols[:, None] * stride_sn + (k_begin // 32 + offs_g)[None, :] * stride_sk

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        # K is a multiple of 32: masks at BLOCK_K granularity stay group-aligned.
        x = tl.load(x_ptrs, mask=row_ok[:, None] & ((k0 + offs_k)[None, :] < k_end), other=0.0)
        packed = tl.load(w_ptrs, mask=col_ok[:, None] & ((k0 // 2 + offs_h)[None, :] < k_end // 2), other=0)
        scales = tl.load(s_ptrs, mask=col_ok[:, None] & ((k0 // 32 + offs_g)[None, :] < k_end // 32), other=127)
        if MODE == 2:
            acc = tl.dot_scaled(x, None, X_FORMAT, tl.trans(packed), scales, "e2m1", acc)
        else:
            weight = dequant_tile(packed, scales, BLOCK_N, BLOCK_K).to(x_ptr.dtype.element_ty)
            if UPCAST:  # the Triton 3.9 interpreter multiplies bf16 dot operands as raw bits
                acc = tl.dot(x.to(tl.float32), tl.trans(weight).to(tl.float32), acc)
            else:
                acc = tl.dot(x, tl.trans(weight), acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += (BLOCK_K // 2) * stride_wk
        s_ptrs += (BLOCK_K // 32) * stride_sk

    mask = row_ok[:, None] & col_ok[None, :]
    if SPLIT_K == 1:
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(y_ptr + rows[:, None].to(tl.int64) * stride_ym + cols[None, :] * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.store(p_ptr + pid_k * M * N + rows[:, None] * N + cols[None, :], acc, mask=mask)


@functools.lru_cache(maxsize=8)
def _units(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def launch_config(x: torch.Tensor, n: int, config: Mapping[str, Any]) -> dict[str, int]:
    """The config with its 0 entries filled by the shape heuristic for this device."""
    interpret = x.device.type == "cpu" or os.environ.get("TRITON_INTERPRET") == "1"
    units = 132 if interpret else _units(x.device.index if x.device.index is not None else torch.cuda.current_device())
    return resolve_config(config, x.shape[0], n, x.shape[1], units=units, interpret=interpret)


def mxfp4_linear_triton(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
    *, config: Mapping[str, Any] = DEFAULT_CONFIG,
) -> torch.Tensor:
    """x [M, K] bf16|fp16, w uint8 [N, K/2], w_scale uint8 [N, K/32], bias [N] | None ->
    [M, N] in x's dtype. Any strides."""
    m, k = x.shape
    n = w.shape[0]
    cfg = launch_config(x, n, config)
    block_k, split = cfg["BLOCK_K"], cfg["SPLIT_K"]
    k_blocks = triton.cdiv(k, block_k)
    split = max(1, min(split, k_blocks))
    k_per_split = triton.cdiv(k_blocks, split) * block_k
    split = triton.cdiv(k, k_per_split)  # no empty K range
    y = empty_output((m, n), x.dtype, x.device)
    partials = torch.empty((split, m, n), dtype=torch.float32, device=x.device) if split > 1 else y
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]), split)
    _mxfp4_linear_kernel[grid](
        x, w, w_scale, bias if bias is not None else y, y, partials,
        m, n, k, k_per_split,
        x.stride(0), x.stride(1), w.stride(0), w.stride(1), w_scale.stride(0), w_scale.stride(1), y.stride(0), y.stride(1),
        HAS_BIAS=bias is not None, SPLIT_K=split, MODE=cfg["MODE"],
        X_FORMAT="bf16" if x.dtype == torch.bfloat16 else "fp16",
        BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=block_k, GROUP_M=cfg["GROUP_M"],
        UPCAST=x.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if split > 1:
        block = 1024
        split_k_reduce_kernel[(triton.cdiv(m * n, block),)](
            partials, bias if bias is not None else y, y, m, n, y.stride(0), y.stride(1),
            HAS_BIAS=bias is not None, SPLIT_K=split, BLOCK=block, num_warps=4,
        )
    return y


__all__ = ["mxfp4_linear_triton", "launch_config", "MODE_DOT_SCALED"]
