"""Test-only stand-in for the parts of ``aiter`` the moe_experts adapter calls (no ROCm).

Emulates, from ROCm/aiter v0.1.20.post1:

* ``aiter.ActivationType`` (an enum with ``Silu``);
* ``aiter.ops.shuffle.shuffle_weight(x, layout=(16, 16))``: the same view/permute as
  the real one for 2-byte elements (asserts rows % 16 and columns % 32, sets
  ``is_shuffled``);
* ``aiter.fused_moe.fused_moe(hidden_states, w1, w2, topk_weight, topk_ids,
  expert_mask=None, activation=..., quant_type=..., ...)``: un-shuffles weights flagged
  ``is_shuffled``, asserts a bf16/fp16 output dtype and int32/fp32 routing as the real
  one does, and computes the MoE with an independent fp32 torch loop. With an
  ``expert_mask`` it reproduces ROCm/aiter#5595: the last top-k column is dropped.

Every call is recorded so tests can check how the adapter built it.
"""

from __future__ import annotations

import enum
import types
from typing import Any

import torch


class ActivationType(enum.Enum):
    No = 0
    Silu = 1
    Gelu = 2


class QuantType(enum.Enum):
    No = 0


def shuffle_weight(x: torch.Tensor, layout=(16, 16), use_int4: bool = False) -> torch.Tensor:
    in_rows, in_k = layout
    block_k = in_k * 2
    pack = 16 // x.element_size()
    assert x.shape[-2] % in_rows == 0, f"{x.shape[-2]} % {in_rows}"
    assert x.shape[-1] % block_k == 0, f"{x.shape[-1]} % {block_k}"
    out = x.view(-1, x.shape[-2] // in_rows, in_rows, x.shape[-1] // block_k, block_k // pack, pack)
    out = out.permute(0, 1, 3, 4, 2, 5).contiguous().view(*x.shape)
    out.is_shuffled = True
    return out


def unshuffle_weight(x: torch.Tensor, layout=(16, 16)) -> torch.Tensor:
    in_rows, in_k = layout
    block_k = in_k * 2
    pack = 16 // x.element_size()
    rows, cols = x.shape[-2], x.shape[-1]
    out = x.reshape(-1, rows // in_rows, cols // block_k, block_k // pack, in_rows, pack)
    return out.permute(0, 1, 4, 2, 3, 5).contiguous().view(*x.shape)


def _moe(hidden, w1, w2, weight, ids):
    inter = w1.shape[1] // 2
    out = torch.zeros(hidden.shape, dtype=torch.float32)
    for t in range(hidden.shape[0]):
        x = hidden[t].float()
        for j in range(ids.shape[1]):
            e = int(ids[t, j])
            gate_up = w1[e].float() @ x
            act = torch.nn.functional.silu(gate_up[:inter]) * gate_up[inter:]
            out[t] += float(weight[t, j]) * (w2[e].float() @ act)
    return out.to(hidden.dtype)


def make_module() -> types.ModuleType:
    """A package named ``aiter`` with ``fused_moe`` and ``ops.shuffle`` submodules."""
    aiter = types.ModuleType("aiter")
    aiter.__path__ = []  # a package, so "aiter.fused_moe" imports
    aiter.ActivationType = ActivationType
    aiter.QuantType = QuantType
    aiter.calls: list[dict[str, Any]] = []
    aiter.shuffles: list[tuple[int, ...]] = []

    def shuffle(x, layout=(16, 16), use_int4=False):
        aiter.shuffles.append(tuple(x.shape))
        return shuffle_weight(x, layout, use_int4)

    def fused_moe(hidden_states, w1, w2, topk_weight, topk_ids, expert_mask=None,
                  activation=ActivationType.Silu, quant_type=QuantType.No, doweight_stage1=False,
                  *rest: Any, **kwargs: Any) -> torch.Tensor:
        aiter.calls.append({
            "expert_mask": expert_mask,
            "activation": activation,
            "quant_type": quant_type,
            "w1_shuffled": getattr(w1, "is_shuffled", False),
            "w2_shuffled": getattr(w2, "is_shuffled", False),
            "contiguous": all(t.is_contiguous() for t in (hidden_states, w1, w2, topk_weight, topk_ids)),
            "extra": (rest, kwargs),
        })
        assert hidden_states.dtype in (torch.bfloat16, torch.float16), f"Fused_moe unsupported out dtype: {hidden_states.dtype}"
        assert topk_ids.dtype == torch.int32 and topk_weight.dtype == torch.float32
        if activation != ActivationType.Silu:
            raise ValueError(f"stand-in knows Silu only, got {activation}")
        if getattr(w1, "is_shuffled", False):
            w1, w2 = unshuffle_weight(w1), unshuffle_weight(w2)
        if expert_mask is not None:  # ROCm/aiter#5595: topk -= int(is_ep) drops a column
            topk_ids, topk_weight = topk_ids[:, :-1], topk_weight[:, :-1]
        return _moe(hidden_states, w1, w2, topk_weight, topk_ids)

    fused = types.ModuleType("aiter.fused_moe")
    fused.fused_moe = fused_moe
    ops = types.ModuleType("aiter.ops")
    ops.__path__ = []
    shuffle_mod = types.ModuleType("aiter.ops.shuffle")
    shuffle_mod.shuffle_weight = shuffle
    aiter.fused_moe = fused
    aiter.ops = ops
    ops.shuffle = shuffle_mod
    aiter.submodules = {"aiter.fused_moe": fused, "aiter.ops": ops, "aiter.ops.shuffle": shuffle_mod}
    return aiter
