"""PyTorch reference for ``moe_experts``: a loop over the experts hit, fp32 throughout.

This module deliberately avoids ``from __future__ import annotations``: the reference's
signature is the op's signature and ``torch.library`` reads its annotations at runtime.
"""

import torch
import torch.nn.functional as F


def moe_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    activation: str = "silu",
    num_shared: int = 0,
) -> torch.Tensor:
    """The MoE expert computation after routing, shared experts included.

    hidden: [T, H] bf16/fp16/fp32 token activations.
    w13: [E + S, 2I, H] (hidden's dtype); rows [:I] of an expert are the gate
        projection, rows [I:] the up projection.
    w2: [E + S, H, I] (hidden's dtype), the down projection.
    weights: [T, k + S] fp32 routing weights; ids: [T, k + S] int32 expert ids in
        [0, E + S). The last ``num_shared`` = S columns are the shared experts: column
        k + s holds id E + s (as ``moe_topk_softmax(..., num_shared=S)`` returns them).
    activation: "silu" (the only one).

    Returns [T, H] in hidden's dtype::

        out[t] = sum_j weights[t, j] * w2[e] @ (silu(w13[e][:I] @ x_t) * (w13[e][I:] @ x_t)),
        e = ids[t, j]

    computed in fp32 (inputs upcast, fp32 products and sums) and rounded once at the end.
    A slot whose id is outside [0, E + S) raises ValueError naming it.
    """
    tokens, hidden_size = hidden.shape
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    expert_ids = ids.long()
    bad = (expert_ids < 0) | (expert_ids >= num_experts)
    if bool(bad.any()):
        token, slot = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"ids: expected expert ids in [0, {num_experts}), got {int(expert_ids[token, slot])} "
            f"at token {token} slot {slot}"
        )
    x = hidden.float()
    out = torch.zeros(tokens, hidden_size, dtype=torch.float32, device=hidden.device)
    for expert in torch.unique(expert_ids).tolist():
        token_idx, slot_idx = (expert_ids == expert).nonzero(as_tuple=True)
        gate_up = x[token_idx] @ w13[expert].float().t()
        act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        down = act @ w2[expert].float().t()
        out.index_add_(0, token_idx, down * weights[token_idx, slot_idx].float().unsqueeze(1))
    return out.to(hidden.dtype)
