"""Test-only stand-in for AITER's FP4 GEMM entry points (no ROCm needed).

``dynamic_mxfp4_quant`` is a bit-level transcription of AITER's Triton
``_mxfp4_quant_op`` (ROCm/aiter v0.1.20.post1, aiter/ops/triton/_triton_kernels/quant/
quant.py; the same steps since v0.1.5): amax rounded by adding 2^21 to its float32 bits
and clearing the mantissa, shared exponent floor(log2) - 2 clamped to [-127, 127], then
per element a saturating path (>= 6 -> 0b0111), a denormal path (< 1: add the float
2^22 and subtract its bits -> 0, 0.5 or 1 with round-to-even by the FPU) and a normal
path (round to nearest even on the mantissa bits, then shift). It shares no code with
kernmux's ``formats.quantize_mxfp4``, so the two can be compared.

``gemm_afp4wfp4`` checks what the real wrapper relies on (uint8 operands, [M, K/2] /
[N, K/2] data, [M, K/32] / [N, K/32] scales read through strides, an output of the
requested dtype) and computes the product in float32 from decoded values. Every call is
recorded.
"""

from __future__ import annotations

import types
from typing import Any

import torch

_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def aiter_quant_op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 [M, K] -> (uint8 codes [M, K], uint8 E8M0 [M, K/32]) the way AITER does it."""
    m, k = x.shape
    blocks = x.float().reshape(m, k // 32, 32)
    amax = blocks.abs().amax(dim=-1, keepdim=True)
    amax_bits = amax.view(torch.int32).to(torch.int64)
    amax_bits = (amax_bits + 0x200000) & 0xFF800000
    amax = amax_bits.to(torch.int32).view(torch.float32)
    unbiased = torch.floor(torch.log2(amax)) - 2
    unbiased = torch.clamp(unbiased, min=-127, max=127)
    scale_e8m0 = (unbiased.to(torch.int64) + 127).to(torch.uint8)
    qx = blocks * torch.exp2(-unbiased)
    bits = qx.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    sign = bits & 0x80000000
    bits = bits ^ sign
    qx_abs = bits.to(torch.int32).view(torch.float32)
    saturate = qx_abs >= 6
    denormal = ~saturate & (qx_abs < 1)
    normal = ~(saturate | denormal)
    denorm_exp = (127 - 1) + (23 - 1) + 1
    denorm_mask_int = denorm_exp << 23
    denorm_mask_float = torch.tensor(denorm_mask_int, dtype=torch.int32).view(torch.float32)
    denormal_x = (qx_abs + denorm_mask_float).view(torch.int32).to(torch.int64) - denorm_mask_int
    mant_odd = (bits >> (23 - 1)) & 1
    normal_x = bits + ((1 - 127) << 23) + (1 << 21) - 1
    normal_x = (normal_x + mant_odd) >> (23 - 1)
    codes = torch.full_like(bits, 0x7)
    codes = torch.where(normal, normal_x, codes)
    codes = torch.where(denormal, denormal_x, codes)
    codes = (codes & 0xFF) | (sign >> 28)
    return codes.reshape(m, k).to(torch.uint8), scale_e8m0.reshape(m, k // 32)


def _decode(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    low, high = packed & 0xF, packed >> 4
    codes = torch.stack((low, high), dim=-1).flatten(-2).long()
    values = _E2M1.to(packed.device)[codes]
    powers = torch.exp2(scales.float() - 127)
    powers[scales == 255] = float("nan")
    rows = values.shape[0]
    return (values.view(rows, -1, 32) * powers[..., None]).view(rows, -1)


def make_module() -> types.SimpleNamespace:
    """The two functions the adapter loads, plus ``calls`` (one dict per GEMM)."""
    calls: list[dict[str, Any]] = []

    def dynamic_mxfp4_quant(x: torch.Tensor, scaling_mode: str = "even") -> tuple[torch.Tensor, torch.Tensor]:
        m, n = x.shape
        assert (n // 2) % 2 == 0
        codes, scales = aiter_quant_op(x)
        packed = codes[:, 0::2] | (codes[:, 1::2] << 4)
        # AITER returns the scales as a transposed view of a [K/32, M] buffer.
        buffer = torch.empty((n // 32, m), dtype=torch.uint8, device=x.device)
        buffer.copy_(scales.T)
        return packed, buffer.T

    def gemm_afp4wfp4(x, w, x_scales, w_scales, dtype=torch.bfloat16, y=None, config=None):
        m, half_k = x.shape
        n = w.shape[0]
        for name, tensor in (("x", x), ("w", w), ("x_scales", x_scales), ("w_scales", w_scales)):
            assert tensor.dtype == torch.uint8, f"{name} must be uint8, got {tensor.dtype}"
        assert tuple(w.shape) == (n, half_k), f"w {tuple(w.shape)} vs x {tuple(x.shape)}"
        assert tuple(x_scales.shape) == (m, 2 * half_k // 32), f"x_scales {tuple(x_scales.shape)}"
        assert tuple(w_scales.shape) == (n, 2 * half_k // 32), f"w_scales {tuple(w_scales.shape)}"
        assert dtype in (torch.bfloat16, torch.float16), f"output dtype {dtype}"
        if y is None:
            y = torch.empty((m, n), dtype=dtype, device=x.device)
        assert tuple(y.shape) == (m, n) and y.dtype == dtype
        calls.append({"M": m, "N": n, "K": 2 * half_k, "dtype": dtype, "x_scales_stride": x_scales.stride(), "config": config})
        y.copy_((_decode(x, x_scales) @ _decode(w, w_scales).T).to(dtype))
        return y

    return types.SimpleNamespace(gemm_afp4wfp4=gemm_afp4wfp4, dynamic_mxfp4_quant=dynamic_mxfp4_quant, calls=calls)
