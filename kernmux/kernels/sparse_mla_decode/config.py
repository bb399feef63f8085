"""Config space and shape limits of the Triton kernel (pure Python: read at registration)."""

from __future__ import annotations

# 0 = chosen per problem by ``auto_tile`` (H_BLOCK, N_BLOCK, num_warps, num_stages
# together) or, for SPLITS, enough programs to cover the SMs once.
DEFAULT_CONFIG: dict[str, int] = {"H_BLOCK": 0, "N_BLOCK": 0, "SPLITS": 0, "num_warps": 0, "num_stages": 0, "FP8_MODE": 0, "LAYOUT": 0}

# LAYOUT: which kernel body. TILES: four d_v/4 column tiles per gathered row, any head
# group (triton.py). WIDE: 64 heads on two warpgroups, one latent tile, S split by slots
# and O by columns between the warpgroups (triton_wide.py). SPLIT_S: the four-tile body
# with S split by slots the same way (64 heads, 8 warps).
LAYOUT_AUTO, LAYOUT_TILES, LAYOUT_WIDE, LAYOUT_SPLIT_S = 0, 1, 2, 3


def two_group_tile(layout: int) -> dict[str, int]:
    """The tile of a two-warpgroup layout when not given: 8 warps of 64 heads, 32 slots a
    step, three row buffers (num_stages 5: 158-194 KB shared memory; faster than two
    buffers for both bodies on the H100). Triton 3.6 on the H100: 255 registers, no spills
    for the one-tile body with one scope, 18-60 bytes with two scopes or split-S."""
    return {"H_BLOCK": 64, "N_BLOCK": 32, "num_warps": 8, "num_stages": 5}


CONFIG_SPACE: dict[str, tuple[int, ...]] = {
    "H_BLOCK": (0, 16, 32, 64),  # heads per program (one gathered row serves all of them)
    "N_BLOCK": (0, 16, 32, 64),  # slots gathered per step
    "SPLITS": (0, 1, 2, 4, 8, 16, 32, 64),  # programs per (query, head group) over the slots
    "num_warps": (0, 4, 8),
    "num_stages": (0, 1, 2, 3, 4, 5),
    # fp8 KV: 0 = dequantise each gathered tile (fp8 * scale -> bf16); 1 = convert to bf16
    # and fold the per-tile scales into the scores and probabilities; 2 = the same with
    # fp16 operands (native fp8 -> fp16 conversion; q pre-scaled by a power of two).
    "FP8_MODE": (0, 1, 2),  # four-tile layout only; the wide layout dequantises rows
    "LAYOUT": (0, 1, 2, 3),
}
TILE_KEYS = ("H_BLOCK", "N_BLOCK", "num_warps", "num_stages")


def auto_tile(kv_dtype: str, heads: int, queries: int) -> dict[str, int]:
    """Tile shape and layout by problem, the fastest candidates of the H100 sweeps
    (benchmarks/results/sparse_mla_decode_summary.md). 16-head groups (mma.sync, no
    spills) for few (query, head) rows. From 64 heads and 512 (query, head) rows the
    two-warpgroup layouts: the one-tile WIDE body, except for bf16 from 8192 rows, where
    the four-tile SPLIT_S body was faster (B 128: 227 against 267 us at h_q 64, 389
    against 454-514 us at h_q 128). Fewer heads keep the earlier four-tile choices."""
    tiles = {"LAYOUT": LAYOUT_TILES}
    rows = queries * heads
    if kv_dtype == "fp8":
        if heads <= 16:
            return {**tiles, "H_BLOCK": 16, "N_BLOCK": 32, "num_warps": 4, "num_stages": 3}
        if heads >= 64 and rows >= 512:
            return {"LAYOUT": LAYOUT_WIDE, **two_group_tile(LAYOUT_WIDE)}
        if rows >= 512:
            return {**tiles, "H_BLOCK": 64, "N_BLOCK": 32, "num_warps": 8, "num_stages": 2}
        return {**tiles, "H_BLOCK": 32, "N_BLOCK": 64, "num_warps": 8, "num_stages": 3}
    if heads >= 64 and rows >= 8192:
        return {"LAYOUT": LAYOUT_SPLIT_S, **two_group_tile(LAYOUT_SPLIT_S)}
    if heads >= 64 and rows >= 512:
        return {"LAYOUT": LAYOUT_WIDE, **two_group_tile(LAYOUT_WIDE)}
    if heads > 16 and rows >= 8192:
        return {**tiles, "H_BLOCK": 64, "N_BLOCK": 32, "num_warps": 8, "num_stages": 2}
    return {**tiles, "H_BLOCK": 16, "N_BLOCK": 64, "num_warps": 8, "num_stages": 3}


def triton_shape_reason(d_qk: int, d_v: int, kv_dtype: str) -> str:
    """Empty when the Triton kernel handles these sizes, else why not."""
    tile = d_v // 4
    if d_v % 4 or tile < 16 or tile & (tile - 1):
        return f"d_v={d_v}: needs d_v/4 a power of two >= 16"
    d_pe = d_qk - d_v
    if d_pe and (d_pe < 16 or d_pe & (d_pe - 1)):
        return f"d_qk - d_v = {d_pe}: needs 0 or a power of two >= 16"
    if kv_dtype == "fp8" and d_v != 512:
        return f"fp8 KV needs d_v = 512 (four 128-column scale tiles), got {d_v}"
    return ""
