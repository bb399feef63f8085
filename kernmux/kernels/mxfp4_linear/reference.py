"""The semantics of ``mxfp4_linear`` (W4A16) and of its coarser W4A4 class."""

from __future__ import annotations

from typing import Optional

import torch

from kernmux.kernels.mxfp4_linear.formats import dequantize_mxfp4, quantize_dequantize


def _linear_fp32(x32: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    out = x32 @ dequantize_mxfp4(w, w_scale).T
    if bias is not None:
        out = out + bias.float()
    return out.to(dtype)


def mxfp4_linear(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = x @ dequant(w)^T (+ bias) for OCP MX FP4 weights (W4A16).

    x [M, K] bf16|fp16; w uint8 [N, K/2] (two E2M1 values per byte, element 2i in the
    low nibble); w_scale uint8 [N, K/32] (E8M0: 2^(s - 127) per 32 consecutive k, 255 =
    NaN); bias [N] (x's dtype or float32) or None -> y [M, N] in x's dtype.

    The weight is dequantized exactly to float32, the product is a float32 matmul
    (PyTorch's float32 matmul precision setting applies), bias is added in float32 and
    the result is cast once. Activations are not quantized."""
    return _linear_fp32(x.float(), w, w_scale, bias, x.dtype)


def mxfp4_linear_w4a4(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The W4A4 class: as :func:`mxfp4_linear`, with x first quantized to MX FP4 per 32
    consecutive k the way AITER's ``dynamic_mxfp4_quant`` does (``scale_rule="even"``,
    elements round to nearest even, saturating at 6) and dequantized. A block of x
    holding NaN or inf becomes NaN (NaN in, NaN out; AITER's own handling of non-finite
    activations is not verified here)."""
    return _linear_fp32(quantize_dequantize(x, "even"), w, w_scale, bias, x.dtype)
