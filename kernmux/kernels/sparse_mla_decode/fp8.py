"""The fp8 KV-cache layout of sparse MLA decode (DeepSeek V3.2 semantics) and its codecs.

One cache slot (token) is a row of ``fp8_row_bytes(d_qk, d_v)`` bytes held as uint8::

    bytes [0, d_v)                      fp8 e4m3fn latent, column c quantised with scale s[c // 128]
    bytes [d_v, d_v + 4 * d_v/128)      fp32 scales s[t], t = 0 .. d_v/128 - 1 (little-endian)
    bytes [.., + 2 * (d_qk - d_v))      bf16 rope columns d_v .. d_qk - 1, not quantised

Dequantised value of latent column c: ``float(fp8[c]) * s[c // 128]``. For the V3.2 shape
(d_qk 576, d_v 512) this is FlashMLA's ``V32_FP8Sparse`` row: 512 + 16 + 128 = 656 bytes.
The quantiser below picks power-of-two scales (FlashMLA's ue8m0 rounding of amax / 448),
so a dequantised value is exact in bf16; kernels must accept any positive fp32 scale.
A cache is ``[num_blocks, block_size, row_bytes]`` uint8 with a unit last stride; the block
stride may be padded (FlashMLA allocates ``block_size + 1`` rows per block).
"""

from __future__ import annotations

import torch

TILE = 128  # latent columns per fp32 scale
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def fp8_row_bytes(d_qk: int, d_v: int) -> int:
    """Bytes per cache slot of the fp8 layout (656 for d_qk 576, d_v 512)."""
    if d_v % TILE:
        raise ValueError(f"fp8 KV needs d_v a multiple of {TILE}, got d_v={d_v}")
    return d_v + 4 * (d_v // TILE) + 2 * (d_qk - d_v)


def quantize_kv(kv: torch.Tensor, d_v: int, *, pad_block: int = 0) -> torch.Tensor:
    """bf16 cache ``[num_blocks, block_size, d_qk]`` -> uint8 ``[num_blocks, block_size, row_bytes]``.

    pad_block: extra (unused) rows allocated per block, so the result's block stride is
    ``(block_size + pad_block) * row_bytes`` (a non-contiguous view, like FlashMLA's).
    """
    if kv.dim() != 3:
        raise ValueError(f"kv must be [num_blocks, block_size, d_qk], got shape {tuple(kv.shape)}")
    num_blocks, block_size, d_qk = kv.shape
    row = fp8_row_bytes(d_qk, d_v)
    storage = torch.empty((num_blocks, block_size + pad_block, row), dtype=torch.uint8, device=kv.device)
    out = storage[:, :block_size]
    tiles = d_v // TILE
    latent = kv[..., :d_v].float().reshape(num_blocks, block_size, tiles, TILE)
    amax = latent.abs().amax(dim=-1)
    scale = torch.pow(2.0, torch.ceil(torch.log2(torch.clamp_min(amax / FP8_MAX, 1e-4))))
    quant = (latent / scale.unsqueeze(-1)).to(torch.float8_e4m3fn).reshape(num_blocks, block_size, d_v)
    out[..., :d_v] = quant.view(torch.uint8)
    out[..., d_v : d_v + 4 * tiles] = scale.to(torch.float32).contiguous().view(torch.uint8)
    if d_qk > d_v:
        out[..., d_v + 4 * tiles :] = kv[..., d_v:].to(torch.bfloat16).contiguous().view(torch.uint8)
    return out


def dequantize_rows(rows: torch.Tensor, d_qk: int, d_v: int) -> torch.Tensor:
    """uint8 rows ``[..., row_bytes]`` -> fp32 ``[..., d_qk]`` (exact)."""
    tiles = d_v // TILE
    lead = rows.shape[:-1]
    rows = rows.contiguous()
    latent = rows[..., :d_v].view(torch.float8_e4m3fn).float().reshape(*lead, tiles, TILE)
    scale = rows[..., d_v : d_v + 4 * tiles].contiguous().view(torch.float32)
    out = (latent * scale.unsqueeze(-1)).reshape(*lead, d_v)
    if d_qk > d_v:
        rope = rows[..., d_v + 4 * tiles :].contiguous().view(torch.bfloat16).float()
        out = torch.cat([out, rope], dim=-1)
    return out
