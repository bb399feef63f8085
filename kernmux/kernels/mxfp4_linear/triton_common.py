"""Triton helpers shared by the dequantize kernel, the fused GEMM and the decode kernel:
E2M1 codes and E8M0 bytes to float32, a packed weight tile to its values, and the
deterministic split-K reduction.

E2M1 code ``c`` (bit 3 sign, bits 2..1 exponent ``e``, bit 0 mantissa ``m``) as float32
bits: ``e > 0`` -> exponent field ``e + 126`` with mantissa MSB ``m``, i.e.
``((c & 7) + 252) << 22``; ``c & 7 == 1`` -> 0.5 (``0x3F000000``); ``0`` -> zero; the sign
goes to bit 31 (so code 8 is -0.0). E8M0 byte ``s``: ``s << 23`` is 2^(s-127) for
1 <= s <= 254, ``0`` is 2^-127 (the float32 subnormal ``0x00400000``), 255 is NaN.

The decode kernel's cheaper form (:func:`e2m1_halves`): the code's bits placed
in an IEEE half as ``sign << 15 | (c & 7) << 9`` make the half ``value * 2^-14`` for
every code (code 1 lands on the half subnormal 2^-15, which is exact: half subnormals
are never flushed), two codes per 32-bit word at once, then one exact conversion each;
the 2^14 is folded into the block's scale (:func:`e8m0_factors`).
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


@triton.jit
def e2m1_halves(words, J: tl.constexpr):
    """int32 words of 8 E2M1 codes (code j in bits 4j..4j+3 = element j of the word) ->
    float32 ``value * 2^-14`` of elements J (low half) and J + 4 (high half), J < 4.

    Both codes land in one int32 as two IEEE halves (module docstring): code J's bits 0-2 go to bits 9-11 and its sign to bit 15 (code J + 4: 25-27
    and 31), two shifts and two masks for two values, then two exact conversions."""
    if J == 3:
        exponent = words >> 3  # the bits an arithmetic shift fills are masked off
    else:
        exponent = words << (9 - 4 * J)
    h = (exponent & 0x0E000E00) | ((words << (12 - 4 * J)) & -2147450880)  # 0x80008000: both signs
    low = h.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    high = (h >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return low, high


@triton.jit
def split_by_position(xv):
    """[A, B, 8] -> the 8 slices [A, B] by position in the word (in-thread splits)."""
    c0, c1 = tl.split(xv.reshape(xv.shape[0], xv.shape[1], 2, 2, 2))
    b0c0, b1c0 = tl.split(c0)
    b0c1, b1c1 = tl.split(c1)
    x0, x4 = tl.split(b0c0)
    x2, x6 = tl.split(b1c0)
    x1, x5 = tl.split(b0c1)
    x3, x7 = tl.split(b1c1)
    return x0, x1, x2, x3, x4, x5, x6, x7


@triton.jit
def join_in_k_order(w0, w1, w2, w3, w4, w5, w6, w7):
    """Eight [A, B, C] tensors (element j of every word) -> [A, B, C, 8] in k order
    (in-thread joins)."""
    return tl.join(tl.join(tl.join(w0, w4), tl.join(w2, w6)), tl.join(tl.join(w1, w5), tl.join(w3, w7))).reshape(
        w0.shape[0], w0.shape[1], w0.shape[2], 8)


@triton.jit
def e8m0_factors(scales):
    """uint8 E8M0 bytes s -> float32 (f1, f2) with f1 * f2 = 2^(s - 127) * 2^14, the
    factor that turns a decoded ``value * 2^-14`` into the weight value.

    2^(s - 113) exceeds float32 for s > 240, hence two exact factors: f1 = 2^(min(s, 240)
    - 113) and f2 = 2^(max(s, 240) - 240) (1 unless s > 240); a product overflows
    only where the true value does. s = 255 (NaN) makes f2 NaN."""
    s = scales.to(tl.int32)
    f1 = ((tl.minimum(s, 240) + 14) << 23).to(tl.float32, bitcast=True)
    f2 = tl.where(s == 255, 0x7FC00000, (tl.maximum(s, 240) - 113) << 23).to(tl.float32, bitcast=True)
    return f1, f2


@triton.jit
def split_k_reduce_kernel(
    p_ptr, b_ptr, y_ptr, M, N, stride_ym, stride_yn,
    HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
):
    """y = sum over splits of float32 partials [SPLIT_K, M, N] (+ bias), cast to y's
    dtype. The splits are added in index order: deterministic."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in range(SPLIT_K):  # fixed order: deterministic
        acc += tl.load(p_ptr + split * M * N + offs, mask=ok, other=0.0)
    row = offs // N
    col = offs % N
    if HAS_BIAS:
        acc += tl.load(b_ptr + col, mask=ok, other=0.0).to(tl.float32)
    tl.store(y_ptr + row * stride_ym + col * stride_yn, acc.to(y_ptr.dtype.element_ty), mask=ok)
