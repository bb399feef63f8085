"""Config space and shape limits of the Triton kernel (pure Python: read at registration)."""

from __future__ import annotations

DEFAULT_CONFIG: dict[str, int] = {"H_BLOCK": 0, "N_BLOCK": 32, "SPLITS": 0, "num_warps": 0, "num_stages": 3, "FP8_MODE": 0}
CONFIG_SPACE: dict[str, tuple[int, ...]] = {
    "H_BLOCK": (0, 16, 32, 64),  # heads per program; 0: 16 up to 16 heads, else 32
    "N_BLOCK": (16, 32, 64),  # slots gathered per step
    "SPLITS": (0, 1, 2, 4, 8, 16, 32, 64),  # programs per (query, head group); 0: cover the SMs once
    "num_warps": (0, 4, 8),  # 0: 4 for 16-head groups, else 8
    "num_stages": (1, 2, 3, 4),
    # fp8 KV: 0 = dequantise each gathered tile (fp8 * scale -> bf16); 1 = convert to bf16
    # and fold the per-tile scales into the scores and probabilities; 2 = the same with
    # fp16 operands (native fp8 -> fp16 conversion; q pre-scaled by a power of two).
    "FP8_MODE": (0, 1, 2),
}


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
