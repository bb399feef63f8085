"""Triton helpers shared by the dequantize kernel and the fused GEMM: E2M1 codes and E8M0
bytes to float32, and a packed weight tile to its values.

E2M1 code ``c`` (bit 3 sign, bits 2..1 exponent ``e``, bit 0 mantissa ``m``) as float32
bits: ``e > 0`` -> exponent field ``e + 126`` with mantissa MSB ``m``, i.e.
``((c & 7) + 252) << 22``; ``c & 7 == 1`` -> 0.5 (``0x3F000000``); ``0`` -> zero; the sign
goes to bit 31 (so code 8 is -0.0). E8M0 byte ``s``: ``s << 23`` is 2^(s-127) for
1 <= s <= 254, ``0`` is 2^-127 (the float32 subnormal ``0x00400000``), 255 is NaN.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def e2m1_to_f32(codes):
    """int32 codes 0..15 -> float32 values."""
    em = codes & 7
    bits = tl.where(em > 1, (em + 252) << 22, tl.where(em == 1, 0x3F000000, 0))
    bits = bits | ((codes & 8) << 28)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def e8m0_to_f32(scales):
    """uint8/int32 E8M0 bytes -> float32 2^(s - 127) (NaN for 255)."""
    s = scales.to(tl.int32)
    bits = tl.where(s == 0, 0x00400000, s << 23)
    bits = tl.where(s == 255, 0x7FC00000, bits)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def dequant_tile(packed, scales, ROWS: tl.constexpr, COLS: tl.constexpr):
    """packed uint8 [ROWS, COLS/2] (element 2i low nibble), scales uint8 [ROWS, COLS/32]
    -> float32 [ROWS, COLS]."""
    codes = packed.to(tl.int32)
    low = e2m1_to_f32(codes & 15)
    high = e2m1_to_f32(codes >> 4)
    values = tl.join(low, high).reshape(ROWS, COLS)
    scale = e8m0_to_f32(scales)
    values = values.reshape(ROWS, COLS // 32, 32) * scale[:, :, None]
    return values.reshape(ROWS, COLS)
