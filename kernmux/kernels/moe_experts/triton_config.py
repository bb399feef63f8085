"""Config space of the Triton fused-MoE kernels, importable without Triton.

One config drives both grouped GEMMs (as vLLM's tuned tables do): ``BLOCK_M`` sorted
slot rows per tile (one expert per tile), ``BLOCK_N`` output columns (for the gate/up
GEMM, columns of each half: the program holds a gate and an up accumulator), ``BLOCK_K``
the reduction step, ``GROUP_M`` tiles of M sharing a column band (L2 reuse of weights),
``num_warps`` and ``num_stages`` (software pipelining depth).
4 x 5 x 4 x 3 x 2 x 4 = 1,920 points before :func:`config_valid` prunes them.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

CONFIG_SPACE: dict[str, tuple[Any, ...]] = {
    "BLOCK_M": (16, 32, 64, 128),
    "BLOCK_N": (16, 32, 64, 128, 256),
    "BLOCK_K": (32, 64, 128, 256),
    "GROUP_M": (1, 8, 16),
    "num_warps": (4, 8),
    "num_stages": (2, 3, 4, 5),
}

_ELEM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Shared memory one program may use (H100/H200: 227 KiB per block; headroom for the
# compiler's own buffers).
_SMEM_BYTES = 200 * 1024
# fp32 accumulator registers per thread above which the tile spills.
_MAX_ACC_REGS = 128


def next_power_of_two(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def config_valid(config: Mapping[str, Any], features: Mapping[str, Any]) -> bool:
    """False for configs that overflow shared memory or registers, or whose tiles are far
    larger than the problem (a tile wider than the next power of two of its dimension
    only adds masked work)."""
    bm, bn, bk = int(config["BLOCK_M"]), int(config["BLOCK_N"]), int(config["BLOCK_K"])
    warps, stages = int(config["num_warps"]), int(config["num_stages"])
    elem = _ELEM_BYTES.get(str(features.get("dtype")), 2)
    # Gate/up GEMM: an A tile and two B tiles per stage; two accumulators.
    if stages * (bm * bk + 2 * bk * bn) * elem > _SMEM_BYTES:
        return False
    if 2 * bm * bn > _MAX_ACC_REGS * 32 * warps:
        return False
    hidden, inter = int(features["hidden"]), int(features["inter"])
    slots = max(1, int(features["tokens"]) * (int(features["topk"]) + int(features["shared"])))
    if bm > max(16, next_power_of_two(slots)):
        return False
    if bn > max(16, next_power_of_two(max(hidden, inter))):
        return False
    return bk <= max(32, next_power_of_two(max(hidden, inter)))


def rows_per_expert(tokens: int, experts: int, topk: int, shared: int) -> float:
    """Average slot rows of each expert a call hits (slots over distinct experts hit)."""
    slots = tokens * (topk + shared)
    return slots / max(1, min(experts + shared, slots))


def heuristic_config(features: Mapping[str, Any], units: int = 132) -> dict[str, Any]:
    """The untuned default, by rows per expert hit (the M of each grouped GEMM).

    Shaped after vLLM's tuned H200 tables for bf16 (vLLM 0.32 ``fused_moe/configs/
    E=128,N=768,device_name=NVIDIA_H200.json`` and ``E=512,N=512,...``): decode-sized
    problems use 16-row tiles, 4 warps and deep pipelines (weights streamed once), large
    ones 64-128-row tiles with 64-deep K steps. Here the gate/up GEMM keeps two
    accumulators, so ``BLOCK_N`` is half of vLLM's N tile for the same registers. At
    decode the column tile is narrowed until there are about four programs per SM
    (``units``), so that every SM streams weights. Not measured on a GPU by this
    project yet: ``kernmux tune`` searches :data:`CONFIG_SPACE` around it.
    """
    tokens, experts = int(features["tokens"]), int(features["experts"])
    topk, shared = int(features["topk"]), int(features["shared"])
    hidden, inter = int(features["hidden"]), int(features["inter"])
    fp32 = features.get("dtype") == "fp32"
    rows = rows_per_expert(tokens, experts, topk, shared)
    hit = min(experts + shared, max(1, tokens * (topk + shared)))
    if rows <= 16:
        config = {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 1, "num_warps": 4, "num_stages": 4}
        # Narrow the column tile until the gate/up GEMM has ~4 programs per SM.
        while config["BLOCK_N"] > 16 and hit * -(-min(hidden, inter) // config["BLOCK_N"]) < 4 * units:
            config["BLOCK_N"] //= 2
    elif rows <= 48:
        config = {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
    elif rows <= 128:
        config = {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3}
    else:
        config = {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 8, "num_stages": 3}
    if fp32:  # twice the bytes per element: halve the K step to stay in shared memory
        config["BLOCK_K"] = max(32, config["BLOCK_K"] // 2)
    # Never wider than the problem.
    config["BLOCK_N"] = min(config["BLOCK_N"], max(16, next_power_of_two(max(hidden, inter))))
    config["BLOCK_K"] = min(config["BLOCK_K"], max(32, next_power_of_two(max(hidden, inter))))
    return config


@functools.lru_cache(maxsize=8)
def _units(device_index: int) -> int:
    import torch

    return torch.cuda.get_device_properties(device_index).multi_processor_count


def units_of(device: Any) -> int:
    """SMs (CUs) of ``device`` (a ``torch.device``); 132 (an H100/H200) off a GPU, e.g.
    for CPU tensors in the interpreter."""
    if device.type != "cuda":
        return 132
    import torch

    return _units(device.index if device.index is not None else torch.cuda.current_device())


def default_for(features: Mapping[str, Any]) -> dict[str, Any]:
    """The config an empty default resolves to for ``features`` on the GPU at hand, as
    the launcher resolves it (the tuner measures it first)."""
    import torch

    cuda = features.get("device") == "cuda" and torch.cuda.is_available()
    return heuristic_config(features, units_of(torch.device("cuda" if cuda else "cpu")))
