"""Config space, pruning and the shape heuristic of the fused Triton kernel (pure Python:
read at registration, no triton import).

Every key's value 0 means "chosen per problem by :func:`auto_config`". ``MODE`` picks how
the weight tile meets the activations: 1 = dequantize in registers (E2M1 bits -> float32
times the E8M0 scale -> x's dtype) and ``tl.dot``; 2 = ``tl.dot_scaled`` (Triton's own
upcast; compiles and is exact on sm_90 with Triton 3.6, notes/performance.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MODE_DEQUANT, MODE_DOT_SCALED = 1, 2
KEYS = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "SPLIT_K", "num_warps", "num_stages", "MODE")

CONFIG_SPACE: dict[str, tuple[int, ...]] = {
    "BLOCK_M": (0, 16, 32, 64, 128),
    "BLOCK_N": (0, 16, 32, 64, 128, 256),
    "BLOCK_K": (0, 64, 128, 256),
    "GROUP_M": (0, 1, 8),
    # Programs along K for few rows and long K (partials in float32, then one reduce).
    "SPLIT_K": (0, 1, 2, 4, 8, 16),
    "num_warps": (0, 2, 4, 8),
    "num_stages": (0, 2, 3, 4, 5),
    "MODE": (0, MODE_DEQUANT, MODE_DOT_SCALED),
}
DEFAULT_CONFIG: dict[str, int] = {key: 0 for key in KEYS}

# Shared memory a config may use (H100/H200: 227 KB per block; leave room for the
# layout conversions Triton adds).
SMEM_LIMIT = 200 * 1024
# Split-K only where the row count leaves the GPU idle.
SPLIT_K_MAX_TOKENS = 256


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def smem_bytes(config: Mapping[str, int], x_bytes: int = 2) -> int:
    """Pipelined tiles (x, packed w, scales) times stages, plus the dequantized w tile."""
    bm, bn, bk, stages = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"], config["num_stages"]
    per_stage = bm * bk * x_bytes + bn * bk // 2 + bn * bk // 32
    return stages * per_stage + bn * bk * x_bytes


def auto_config(tokens: int, n: int, k: int, units: int = 132, interpret: bool = False) -> dict[str, int]:
    """A config by problem shape (a starting point; the tuning database refines it).

    Decode (few rows) streams the packed weights once: narrow N tiles and split-K until
    there are about two programs per SM. Prefill is a tensor-core GEMM with the weight
    tile dequantized on the way: 128x128 tiles, 8 warps, grouped ordering. Under the
    interpreter small tiles keep tests fast."""
    if interpret:
        return {"BLOCK_M": 16, "BLOCK_N": 16 if n <= 16 else 32, "BLOCK_K": 64, "GROUP_M": 1,
                "SPLIT_K": 2 if k >= 512 and tokens <= 16 else 1, "num_warps": 4, "num_stages": 2, "MODE": MODE_DOT_SCALED}
    if tokens <= 16:
        block_m, block_n, block_k, warps, stages = 16, 64 if n >= 4096 else 32, 256, 4, 4
    elif tokens <= 64:
        block_m, block_n, block_k, warps, stages = _pow2_ceil(tokens), 64, 256, 4, 4
    elif tokens <= 256:
        block_m, block_n, block_k, warps, stages = 64, 128, 128, 4, 4
    else:
        block_m, block_n, block_k, warps, stages = 128, 128, 128, 8, 3
    # Never a tile wider than the problem (rounded up to a power of two).
    block_n = min(block_n, max(16, _pow2_ceil(n)))
    block_k = min(block_k, max(64, _pow2_ceil(k)))
    split = 1
    if tokens <= SPLIT_K_MAX_TOKENS:
        programs = _cdiv(tokens, block_m) * _cdiv(n, block_n)
        k_blocks = _cdiv(k, block_k)
        while split < 16 and programs * split < 2 * units and k_blocks >= 4 * split:
            split *= 2
    return {"BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_M": 8 if tokens > 256 else 1,
            "SPLIT_K": split, "num_warps": warps, "num_stages": stages, "MODE": MODE_DOT_SCALED}


def resolve_config(config: Mapping[str, Any], tokens: int, n: int, k: int, units: int = 132, interpret: bool = False) -> dict[str, int]:
    """``config`` with every 0 (or missing key) replaced by :func:`auto_config`'s value."""
    auto = auto_config(tokens, n, k, units, interpret)
    return {key: int(config.get(key) or 0) or auto[key] for key in KEYS}


def config_problem(config: Mapping[str, Any], feats: Mapping[str, Any]) -> str:
    """Why a (resolved) config cannot or should not run this problem, or ""."""
    tokens, n, k = feats["tokens"], feats["n"], feats["k"]
    full = resolve_config(config, tokens, n, k)
    bm, bn, bk, split = full["BLOCK_M"], full["BLOCK_N"], full["BLOCK_K"], full["SPLIT_K"]
    if bm > max(16, _pow2_ceil(tokens)):
        return f"BLOCK_M={bm} > rows rounded up ({max(16, _pow2_ceil(tokens))})"
    if bn > max(16, _pow2_ceil(n)):
        return f"BLOCK_N={bn} > N rounded up ({max(16, _pow2_ceil(n))})"
    if bk > max(64, _pow2_ceil(k)):
        return f"BLOCK_K={bk} > K rounded up ({max(64, _pow2_ceil(k))})"
    if split > 1 and tokens > SPLIT_K_MAX_TOKENS:
        return f"SPLIT_K={split} for {tokens} rows (split-K only up to {SPLIT_K_MAX_TOKENS})"
    if split > _cdiv(k, bk):
        return f"SPLIT_K={split} > K blocks ({_cdiv(k, bk)})"
    if bm * bn > 128 * 256 or (bm * bn >= 128 * 128 and full["num_warps"] < 4):
        return f"tile {bm}x{bn} too large for {full['num_warps']} warps"
    if smem_bytes(full) > SMEM_LIMIT:
        return f"shared memory {smem_bytes(full) // 1024} KB > {SMEM_LIMIT // 1024} KB"
    return ""


def config_valid(config: Mapping[str, Any], feats: Mapping[str, Any]) -> bool:
    return not config_problem(config, feats)
