"""Launchers of kernmux's Triton fused MoE (kernels in ``triton_kernels.py``).

``moe_experts`` is the fused-shared-expert strategy (FSE): all k + S slots of every
token go through one chain — align, gate/up GEMM with the activation, down GEMM with
the routing weight, reduction — four launches whatever T, E or S, all with static
shapes and no host synchronisation (CUDA-graph capturable).

``routed_slots`` and ``reduce_slots`` are the halves the shared-expert strategies in
``shared_dense.py`` reuse: the routed k slots through the grouped GEMMs, then one
reduction that also adds the shared experts computed as dense GEMMs.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from typing import Any

import torch

from kernmux.dispatch.outputs import empty_output
from kernmux.kernels.moe_experts.triton_config import (
    heuristic_config,
    next_power_of_two,
    units_of,
)
from kernmux.kernels.moe_experts.triton_kernels import (
    align_kernel,
    down_kernel,
    gate_up_kernel,
    reduce_kernel,
    silu_mul_kernel,
)

# The interpreter's bf16 dot is wrong (see triton_kernels._dot); read once at import,
# as Triton itself does.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_ALIGN_CHUNK = 1024
_ALIGN_BLOCKS = 32
_REDUCE_BLOCK_H = 512
_SILU_BLOCK = 1024


@functools.lru_cache(maxsize=4096)
def _heuristic(tokens: int, experts: int, topk: int, shared: int, hidden_size: int, inter: int,
               dtype_name: str, units: int) -> tuple[tuple[str, Any], ...]:
    feats = {"tokens": tokens, "experts": experts, "topk": topk, "shared": shared,
             "hidden": hidden_size, "inter": inter, "dtype": dtype_name}
    return tuple(heuristic_config(feats, units).items())


_DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def resolve_config(
    config: Mapping[str, Any] | None,
    tokens: int,
    experts: int,
    topk: int,
    shared: int,
    hidden_size: int,
    inter: int,
    dtype: torch.dtype,
    device: torch.device,
) -> dict[str, Any]:
    """The heuristic default for this shape (cached per shape), overridden key by key by
    ``config``."""
    default = _heuristic(tokens, experts, topk, shared, hidden_size, inter, _DTYPE_NAMES[dtype], units_of(device))
    return {**dict(default), **(config or {})}


def align(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Sort the slots of ``ids`` [T, K1] (any strides) by expert, each expert's run
    padded to ``block_m``.

    Returns (sorted int32 [max_blocks * block_m]: slot ids m = t * K1 + j, padding =
    T * K1; block_expert int32 [max_blocks]: the expert of each tile, -1 past the end;
    num_padded int32 [1]: used length of ``sorted``; max_blocks: the static bound
    cdiv(T K1, block_m) + min(E, T K1)). Ids outside [0, num_experts) are left out.
    """
    tokens, slots_per_token = ids.shape
    num_slots = tokens * slots_per_token
    max_blocks = -(-num_slots // block_m) + min(num_experts, num_slots)
    device = ids.device
    cursor = torch.empty(next_power_of_two(max(16, num_experts)), dtype=torch.int32, device=device)
    sorted_slots = torch.empty(max_blocks * block_m, dtype=torch.int32, device=device)
    block_expert = torch.empty(max_blocks, dtype=torch.int32, device=device)
    num_padded = torch.empty(1, dtype=torch.int32, device=device)
    align_kernel[(1,)](
        ids, ids.stride(0), ids.stride(1), num_slots, num_experts,
        cursor, sorted_slots, block_expert, num_padded, max_blocks,
        SLOTS=slots_per_token, BLOCK_M=block_m, NE_P=cursor.numel(),
        CHUNK=_ALIGN_CHUNK, BB=_ALIGN_BLOCKS, num_warps=4,
    )
    return sorted_slots, block_expert, num_padded, max_blocks


def routed_slots(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    config: Mapping[str, Any],
) -> torch.Tensor:
    """Every slot of ``ids``/``weights`` [T, K1] through the grouped GEMMs.

    Returns slot_out [T * K1, H] in hidden's dtype: row t * K1 + j is
    weights[t, j] * w2[e] @ (silu(gate) * up) for e = ids[t, j]; rows of slots with an
    out-of-range id are left unwritten (``reduce_slots`` turns their token into NaN).
    """
    tokens, hidden_size = hidden.shape
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    slots_per_token = ids.shape[1]
    num_slots = tokens * slots_per_token
    bm, bn, bk = int(config["BLOCK_M"]), int(config["BLOCK_N"]), int(config["BLOCK_K"])
    group_m, warps, stages = int(config["GROUP_M"]), int(config["num_warps"]), int(config["num_stages"])
    ieee = hidden.dtype == torch.float32
    upcast = _INTERPRET and hidden.dtype == torch.bfloat16
    sorted_slots, block_expert, num_padded, max_blocks = align(ids, num_experts, bm)
    act = torch.empty((max_blocks * bm, inter), dtype=hidden.dtype, device=hidden.device)
    gate_up_kernel[(max_blocks * -(-inter // bn),)](
        hidden, w13, act, sorted_slots, block_expert, num_padded, num_slots, max_blocks,
        inter, hidden_size,
        hidden.stride(0), hidden.stride(1), w13.stride(0), w13.stride(1), w13.stride(2),
        act.stride(0), act.stride(1),
        SLOTS=slots_per_token, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m,
        EVEN_K=hidden_size % bk == 0, IEEE=ieee, UPCAST=upcast, num_warps=warps, num_stages=stages,
    )
    slot_out = torch.empty((num_slots, hidden_size), dtype=hidden.dtype, device=hidden.device)
    down_kernel[(max_blocks * -(-hidden_size // bn),)](
        act, w2, weights, slot_out, sorted_slots, block_expert, num_padded, num_slots, max_blocks,
        hidden_size, inter,
        act.stride(0), act.stride(1), w2.stride(0), w2.stride(1), w2.stride(2),
        weights.stride(0), weights.stride(1), slot_out.stride(0), slot_out.stride(1),
        SLOTS=slots_per_token, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group_m,
        EVEN_K=inter % bk == 0, IEEE=ieee, UPCAST=upcast, num_warps=warps, num_stages=stages,
    )
    return slot_out


def reduce_slots(
    slot_out: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    num_experts: int,
    routed: int,
    out: torch.Tensor,
    shared_out: torch.Tensor | None = None,
) -> torch.Tensor:
    """out[t] = sum_j slot_out[t * routed + j] (+ weights[t, routed + s] * shared_out[s, t]
    for each dense shared expert s), in fp32, written in out's dtype. ``ids``/``weights``
    are the full [T, routed + S] tensors; a token with an out-of-range id, or a dense
    shared column not holding expert E + s, gets a NaN row."""
    tokens, hidden_size = out.shape
    dense = 0 if shared_out is None else shared_out.shape[0]
    shared = shared_out if shared_out is not None else slot_out
    shared_strides = (shared_out.stride(0), shared_out.stride(1), shared_out.stride(2)) if shared_out is not None else (0, 0, 0)
    block_h = min(_REDUCE_BLOCK_H, next_power_of_two(hidden_size))
    reduce_kernel[(tokens, -(-hidden_size // block_h))](
        slot_out, shared, weights, ids, out, hidden_size, num_experts,
        slot_out.stride(0), slot_out.stride(1), *shared_strides,
        weights.stride(0), weights.stride(1), ids.stride(0), ids.stride(1),
        out.stride(0), out.stride(1),
        ROUTED=routed, DENSE=dense, COLS_P=next_power_of_two(routed + dense),
        ROUTED_P=next_power_of_two(routed), BLOCK_H=block_h, num_warps=4,
    )
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """[T, 2I] -> [T, I]: silu(gate) * up in fp32, stored in gate_up's dtype."""
    tokens, two_inter = gate_up.shape
    inter = two_inter // 2
    out = torch.empty((tokens, inter), dtype=gate_up.dtype, device=gate_up.device)
    block = min(_SILU_BLOCK, next_power_of_two(inter))
    silu_mul_kernel[(tokens, -(-inter // block))](
        gate_up, out, inter, gate_up.stride(0), gate_up.stride(1), out.stride(0), out.stride(1),
        BLOCK=block, num_warps=4,
    )
    return out


def moe_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    activation: str = "silu",
    num_shared: int = 0,
    *,
    config: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Fused shared experts: all k + S slots in one grouped launch chain.

    Contract of the reference (``reference.py``); any strides. ``config`` keys of
    ``triton_config.CONFIG_SPACE`` override the shape heuristic one by one."""
    tokens, hidden_size = hidden.shape
    out = empty_output((tokens, hidden_size), hidden.dtype, hidden.device)
    if tokens == 0:
        return out
    num_experts, two_inter, _ = w13.shape
    slots_per_token = ids.shape[1]
    cfg = resolve_config(
        config, tokens, num_experts - num_shared, slots_per_token - num_shared, num_shared,
        hidden_size, two_inter // 2, hidden.dtype, hidden.device,
    )
    slot_out = routed_slots(hidden, w13, w2, weights, ids, cfg)
    return reduce_slots(slot_out, weights, ids, num_experts, slots_per_token, out)
