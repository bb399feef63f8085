"""Fuse the router and the shared-expert gate into one projection.

Models such as Qwen3-Next have a router ``[E, hidden]`` and a per-token shared-expert gate
``[S, hidden]`` (S = 1 there). Stacking them gives one ``[E + S, hidden]`` matrix, so a
single matmul produces exactly the ``[T, E + S]`` gating logits ``moe_topk_softmax`` takes
(routed columns first, shared gates last) — one GEMM instead of two, and no copy to
assemble the logits (vLLM PR #39280).
"""

from __future__ import annotations

import torch


def fuse_router_weights(
    router_weight: torch.Tensor,
    shared_gate_weight: torch.Tensor,
    router_bias: torch.Tensor | None = None,
    shared_gate_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Stack router and shared-gate weights (and biases) for one fused gate matmul.

    router_weight: [E, hidden]. shared_gate_weight: [S, hidden], or [hidden] for S = 1.
    Biases, if any: [E] and [S] (both or neither). All on one device, one dtype.
    Returns (weight [E + S, hidden], bias [E + S] or None), new contiguous tensors, such
    that ``F.linear(x, weight, bias)`` == ``cat([F.linear(x, router...),
    F.linear(x, shared...)], -1)``.
    """
    if router_weight.dim() != 2:
        raise ValueError(f"router_weight: expected [experts, hidden], got shape {tuple(router_weight.shape)}")
    shared = shared_gate_weight.unsqueeze(0) if shared_gate_weight.dim() == 1 else shared_gate_weight
    if shared.dim() != 2 or shared.shape[1] != router_weight.shape[1]:
        raise ValueError(
            f"shared_gate_weight: expected [num_shared, {router_weight.shape[1]}] or "
            f"[{router_weight.shape[1]}], got shape {tuple(shared_gate_weight.shape)}"
        )
    if shared.dtype != router_weight.dtype or shared.device != router_weight.device:
        raise ValueError(
            f"shared_gate_weight: expected dtype {router_weight.dtype} on {router_weight.device} "
            f"like router_weight, got {shared.dtype} on {shared.device}"
        )
    weight = torch.cat([router_weight, shared], dim=0).contiguous()
    if (router_bias is None) != (shared_gate_bias is None):
        raise ValueError("router_bias/shared_gate_bias: expected both or neither, got one")
    if router_bias is None:
        return weight, None
    if router_bias.shape != (router_weight.shape[0],):
        raise ValueError(f"router_bias: expected shape ({router_weight.shape[0]},), got {tuple(router_bias.shape)}")
    shared_bias = shared_gate_bias.reshape(-1)
    if shared_bias.shape != (shared.shape[0],):
        raise ValueError(f"shared_gate_bias: expected {shared.shape[0]} values, got shape {tuple(shared_gate_bias.shape)}")
    return weight, torch.cat([router_bias, shared_bias.to(router_bias.dtype)]).contiguous()
