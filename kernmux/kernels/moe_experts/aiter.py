"""AITER adapter for ``moe_experts`` (ROCm): ``aiter.fused_moe.fused_moe``.

Signature, unchanged in its leading arguments from amd-aiter v0.1.1 to v0.1.20.post1
(``aiter/fused_moe.py`` at each tag)::

    fused_moe(hidden_states, w1 [E, 2I, H], w2 [E, H, I], topk_weight, topk_ids,
              expert_mask=None, activation=ActivationType.Silu, quant_type=QuantType.No, ...)

returning a new [T, H] tensor (bf16/fp16 only: it asserts its output dtype). The shared
experts are extra expert slots: ids/weights already carry them (FSE, as vLLM's
``VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS`` path does). ``expert_mask`` (expert
parallelism) is never passed: the op has every expert local, and from v0.1.16 AITER's
``get_2stage_cfgs`` strips one top-k column whenever a mask is given (``topk -=
int(is_ep)``), which with a real shared-expert column yields wrong output
(ROCm/aiter#5595, open).

Weights: vLLM shuffles unquantized MoE weights to AITER's (16, 16) layout and marks them
``is_shuffled`` before calling ``fused_moe`` (vLLM 0.32 ``fused_moe/oracle/
unquantized.py``); config ``shuffle`` (default True) does the same, once per weight
tensor (``weight_cache``); False passes the plain layout.

Not run on AMD hardware by this project: argument construction is tested against a
stand-in module (tests/kernels/stand_ins/aiter_moe_experts.py); numerics are unverified.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import torch

from kernmux.dispatch.outputs import empty_output
from kernmux.kernels.moe_experts.weight_cache import converted


def _shuffled(weight: torch.Tensor) -> torch.Tensor:
    shuffle_weight = importlib.import_module("aiter.ops.shuffle").shuffle_weight

    def convert(tensor: torch.Tensor) -> torch.Tensor:
        out = shuffle_weight(tensor.contiguous(), layout=(16, 16))
        out.is_shuffled = True
        return out

    return converted(weight, "aiter-shuffle-16x16", convert)


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
    """Contract of the reference (``reference.py``), through ``aiter.fused_moe``."""
    tokens, hidden_size = hidden.shape
    if tokens == 0:
        return empty_output((0, hidden_size), hidden.dtype, hidden.device)
    fused_moe = importlib.import_module("aiter.fused_moe").fused_moe
    activation_type = importlib.import_module("aiter").ActivationType.Silu
    if bool((config or {}).get("shuffle", True)):
        w1, w2_ = _shuffled(w13), _shuffled(w2)
    else:
        w1, w2_ = w13.contiguous(), w2.contiguous()
    return fused_moe(
        hidden.contiguous(), w1, w2_, weights.contiguous(), ids.contiguous(),
        expert_mask=None, activation=activation_type,
    )
