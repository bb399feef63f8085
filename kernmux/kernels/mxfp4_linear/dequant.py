"""``dequant_cublas``: dequantize the whole weight to x's dtype, then one dense GEMM
(``F.linear``: cuBLAS on NVIDIA, hipBLAS on ROCm, oneDNN/ATen on CPU).

The dequantization is a Triton kernel on NVIDIA GPUs (``triton_dequant.py``) and PyTorch
elsewhere (``config["dequant"]``: "auto", "triton" or "torch"; the interpreter tests use
"triton" on CPU). Every call dequantizes again: 0.53 bytes read and 2 written per
weight value, then 2 read by the GEMM -- about 8.5x the weight traffic of a fused
kernel (0.53 bytes per value), which matters at decode and less as M grows.

For fp16 activations the weight is dequantized to fp16: values beyond fp16's range
(|w| > 65504) become inf, as in any fp16 GEMM on such weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch
import torch.nn.functional as F

from kernmux.kernels.mxfp4_linear.formats import dequantize_mxfp4

CONFIG_SPACE = {"dequant": ("auto", "triton", "torch")}
DEFAULT_CONFIG = {"dequant": "auto"}


def _use_triton(choice: str, device: torch.device) -> bool:
    if choice == "triton":
        return True
    if choice == "torch":
        return False
    return device.type == "cuda" and torch.version.hip is None


def dequantize(w: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype, choice: str = "auto") -> torch.Tensor:
    """[N, K] in ``dtype`` from w uint8 [N, K/2] and w_scale uint8 [N, K/32]."""
    if _use_triton(choice, w.device):
        from kernmux.kernels.mxfp4_linear.triton_dequant import dequantize_triton

        return dequantize_triton(w, w_scale, dtype)
    return dequantize_mxfp4(w, w_scale, dtype)


def mxfp4_linear_dequant_cublas(
    x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None,
    *, config: Mapping[str, Any] = DEFAULT_CONFIG,
) -> torch.Tensor:
    """x [M, K] bf16|fp16, w uint8 [N, K/2], w_scale uint8 [N, K/32], bias [N] | None ->
    [M, N] in x's dtype."""
    weight = dequantize(w, w_scale, x.dtype, config.get("dequant", "auto"))
    if bias is not None and bias.dtype == x.dtype:
        return F.linear(x, weight, bias)
    out = F.linear(x, weight)
    if bias is not None:  # a float32 bias: added in float32, rounded once more
        out = (out.float() + bias).to(x.dtype)
    return out
