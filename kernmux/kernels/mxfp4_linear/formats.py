"""OCP MX FP4: E2M1 elements, two per byte, and one E8M0 scale per 32 consecutive values.

The format (OCP Microscaling Formats (MX) v1.0, sections 5.3 and 6.3):

- E2M1 (4 bits: sign, 2 exponent bits with bias 1, 1 mantissa bit): the magnitudes
  {0, 0.5, 1, 1.5, 2, 3, 4, 6}, code = index in that list, bit 3 = sign (so -0 exists).
  No inf, no NaN.
- Packing: element ``2i`` of a row in the low nibble of byte ``i``, element ``2i + 1`` in
  the high nibble.
- E8M0 scale: an unsigned byte ``s`` meaning ``2^(s - 127)`` (``2^-127`` .. ``2^127``);
  ``255`` is NaN (every element of the block is then NaN).
- A value is ``e2m1 * 2^(s - 127)``.

Quantization (``quantize_mxfp4``) per block of 32 values along the last axis:

- ``scale_rule="ocp"`` (the spec): shared exponent ``floor(log2(amax)) - 2`` (``2`` =
  emax of E2M1, whose largest value 6 = 1.5 * 2^2), clamped to the E8M0 range [-127, 127];
  an all-zero block gets the smallest scale (byte 0). Values of a block scaled into
  [6, 8) saturate to 6.
- ``scale_rule="even"``: AITER's ``dynamic_mxfp4_quant`` default (its comment names
  quark's ``even_round``): ``amax`` is first rounded to a power of two by adding 2^21 to
  its float32 bits and clearing the mantissa, which raises the exponent by one when the
  mantissa is at least 1.75, so fewer values saturate (ROCm/aiter v0.1.20.post1,
  ``aiter/ops/triton/_triton_kernels/quant/quant.py`` ``_mxfp4_quant_op``; the same
  constant in every tag from v0.1.5).
- Elements: ``value / 2^shared_exp`` rounded to the nearest E2M1 value, ties to the even
  code (the one whose mantissa bit is 0: 0.25 -> 0, 0.75 -> 1, 2.5 -> 2, 5 -> 4),
  magnitudes from 6 up saturate to 6, the sign is kept (also of zero).
- A block holding NaN or +-inf gets the NaN scale (255): it dequantizes to NaN, so a
  non-finite weight is never turned into a finite one.

All functions here are plain PyTorch (CPU or GPU) and are the semantics the kernels
are checked against.
"""

from __future__ import annotations

import functools

import torch

BLOCK = 32  # values per E8M0 scale
E2M1_EMAX = 2  # exponent of E2M1's largest normal (6 = 1.5 * 2^2)
E2M1_MAX = 6.0
E8M0_BIAS = 127
E8M0_NAN = 255
SCALE_RULES = ("ocp", "even")

# Magnitude of each E2M1 code 0..7; codes 8..15 are the negatives (8 is -0).
E2M1_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def e2m1_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [16]: the value of every E2M1 code (code 8 is -0.0)."""
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=device)
    return torch.cat([mags, -mags])


def e8m0_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """float32 [256]: ``2^(s - 127)`` for every E8M0 byte, NaN for 255 (2^-127 is a
    float32 subnormal and is exact)."""
    exps = torch.arange(256, dtype=torch.float64) - E8M0_BIAS
    table = torch.ldexp(torch.ones(256, dtype=torch.float64), exps.to(torch.int64)).to(torch.float32)
    table[E8M0_NAN] = float("nan")
    return table.to(device)


@functools.lru_cache(maxsize=16)
def _tables(device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Cached (E2M1, E8M0) tables per device (private: never handed out for writing)."""
    return e2m1_table(device), e8m0_table(device)


def unpack_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> int64 codes [..., K] (element 2i from the low nibble)."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"packed E2M1 must be uint8, got {packed.dtype}")
    low = (packed & 0x0F).to(torch.int64)
    high = (packed >> 4).to(torch.int64)
    return torch.stack((low, high), dim=-1).flatten(-2)


def pack_e2m1(codes: torch.Tensor) -> torch.Tensor:
    """int codes [..., K] (K even, values 0..15) -> uint8 [..., K/2], element 2i low."""
    if codes.shape[-1] % 2:
        raise ValueError(f"the last dimension must be even to pack two codes per byte, got {codes.shape[-1]}")
    pairs = codes.to(torch.uint8).unflatten(-1, (-1, 2))
    return pairs[..., 0] | (pairs[..., 1] << 4)


def dequantize_mxfp4(w: torch.Tensor, w_scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w uint8 [N, K/2], w_scale uint8 [N, K/32] -> [N, K] in ``dtype`` (exact in float32;
    blocks with scale 255 are NaN)."""
    if w.dim() != 2 or w_scale.dim() != 2:
        raise ValueError(f"expected 2-D w [N, K/2] and w_scale [N, K/32], got {tuple(w.shape)} and {tuple(w_scale.shape)}")
    rows, k = w.shape[0], 2 * w.shape[1]
    if w_scale.dtype != torch.uint8:
        raise TypeError(f"w_scale must be uint8 (E8M0), got {w_scale.dtype}")
    if tuple(w_scale.shape) != (rows, k // BLOCK):
        raise ValueError(f"w_scale must be [N, K/32] = [{rows}, {k // BLOCK}], got {list(w_scale.shape)}")
    e2m1, e8m0 = _tables(str(w.device))
    values = e2m1[unpack_e2m1(w)]
    scales = e8m0[w_scale.to(torch.int64)]
    out = values.view(rows, k // BLOCK, BLOCK) * scales[..., None]
    return out.view(rows, k).to(dtype)


def _shared_exponent(amax: torch.Tensor, scale_rule: str) -> torch.Tensor:
    """float32 amax [...] (finite, >= 0) -> int64 shared exponent in [-127, 127]."""
    if scale_rule == "even":
        bits = amax.contiguous().view(torch.int32)
        rounded = ((bits + 0x200000) & -0x800000).view(torch.float32)  # & 0xFF800000
        amax = rounded
    elif scale_rule != "ocp":
        raise ValueError(f"scale_rule must be one of {SCALE_RULES}, got {scale_rule!r}")
    # frexp: amax = m * 2^e with m in [0.5, 1), so floor(log2(amax)) = e - 1 exactly
    # (also for float32 subnormals); amax = 0 gives the smallest scale.
    _, exponent = torch.frexp(amax)
    shared = exponent.to(torch.int64) - 1 - E2M1_EMAX
    shared = torch.where(amax > 0, shared, torch.full_like(shared, -E8M0_BIAS))
    # "even" rounding of an amax near the float32 maximum overflows to inf (AITER's
    # log2 then clamps to the largest scale).
    shared = torch.where(torch.isinf(amax), torch.full_like(shared, E8M0_BIAS), shared)
    return shared.clamp(-E8M0_BIAS, E8M0_BIAS)


def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """int64 exponents in [-127, 127] -> exact float32 powers of two (2^-127 is subnormal)."""
    return torch.ldexp(torch.ones_like(exponent, dtype=torch.float64), exponent).to(torch.float32)


def round_to_e2m1(scaled: torch.Tensor) -> torch.Tensor:
    """float32 values already divided by their block scale -> E2M1 codes (int64, 0..15):
    nearest magnitude, ties to the even code, saturating at 6, sign kept (NaN -> 0)."""
    mags = torch.tensor(E2M1_MAGNITUDES, dtype=torch.float32, device=scaled.device)
    a = scaled.abs().nan_to_num(nan=0.0).clamp(max=E2M1_MAX)
    upper = torch.searchsorted(mags, a.contiguous()).clamp(max=len(E2M1_MAGNITUDES) - 1)  # first mag >= a
    lower = (upper - 1).clamp(min=0)
    d_low = a - mags[lower]
    d_up = mags[upper] - a
    pick_up = (d_up < d_low) | ((d_up == d_low) & (upper % 2 == 0))
    code = torch.where(pick_up, upper, lower)
    negative = torch.signbit(scaled)
    return code + 8 * negative.to(torch.int64)


def quantize_mxfp4(x: torch.Tensor, scale_rule: str = "ocp") -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``x`` [R, K] (bf16/fp16/fp32, K a multiple of 32) to MX FP4 along K.

    Returns (packed uint8 [R, K/2], scales uint8 [R, K/32]). ``scale_rule``: "ocp" (the
    spec; use this to make weights) or "even" (how AITER's ``dynamic_mxfp4_quant``
    quantizes activations). See the module docstring for every rounding detail."""
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D tensor [R, K], got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise TypeError(f"expected a floating-point tensor, got {x.dtype}")
    rows, k = x.shape
    if k % BLOCK:
        raise ValueError(f"K must be a multiple of {BLOCK}, got {k}")
    blocks = x.float().reshape(rows, k // BLOCK, BLOCK)
    finite = torch.isfinite(blocks).all(dim=-1)
    amax = torch.where(finite, blocks.abs().amax(dim=-1), torch.zeros((), device=x.device))
    shared = _shared_exponent(amax, scale_rule)
    # Multiplying by a power of two is exact (down to float32 subnormals, which round to
    # 0 in E2M1 anyway), so the rounding below sees the true ratio.
    scaled = blocks * _pow2(-shared)[..., None]
    codes = round_to_e2m1(scaled).reshape(rows, k)
    scales = torch.where(finite, shared + E8M0_BIAS, torch.full_like(shared, E8M0_NAN)).to(torch.uint8)
    return pack_e2m1(codes), scales


def quantize_dequantize(x: torch.Tensor, scale_rule: str = "ocp") -> torch.Tensor:
    """``x`` [R, K] through MX FP4 and back, float32 (what a W4A4 kernel sees of x)."""
    packed, scales = quantize_mxfp4(x, scale_rule)
    return dequantize_mxfp4(packed, scales)
