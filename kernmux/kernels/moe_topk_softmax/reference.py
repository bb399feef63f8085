"""PyTorch reference for ``moe_topk_softmax``: the unfused routing chain, fp32 math.

This module deliberately avoids ``from __future__ import annotations``: the reference's
signature is the op's signature and ``torch.library`` reads its annotations at runtime.
"""

import torch


def moe_topk_softmax(
    gating_logits: torch.Tensor,
    topk: int,
    renormalize: bool = False,
    num_shared: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens to experts: softmax over routed experts, top-k, shared slots appended.

    gating_logits: [T, E + S] fp32/bf16/fp16; the last S = ``num_shared`` columns are
        shared-expert gates, the first E columns routed-expert logits.
    topk: k routed experts per token, 1 <= k <= E.
    renormalize: divide the k routed weights by their sum (shared slots untouched).
    num_shared: S, the number of shared-expert gate columns (0..8).

    Returns (weights fp32 [T, k + S], ids int32 [T, k + S]):
      - slots 0..k-1: the k largest softmax(logits[:, :E]) probabilities (fp32), in
        descending order; equal probabilities go to the lower expert index first;
      - slot k + s: id E + s, weight sigmoid(logits[:, E + s]) in fp32.
    """
    tokens, width = gating_logits.shape
    experts = width - num_shared
    logits = gating_logits.float()
    probs = torch.softmax(logits[:, :experts], dim=-1)
    # A stable descending sort keeps equal probabilities in index order, which is the
    # tie rule; torch.topk does not promise any order among equal values.
    sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    routed_w = sorted_probs[:, :topk]
    routed_ids = sorted_ids[:, :topk]
    if renormalize:
        routed_w = routed_w / routed_w.sum(dim=-1, keepdim=True)

    routed_ids = routed_ids.to(torch.int32)
    if num_shared == 0:
        return routed_w, routed_ids
    # torch.cat writes every element, so no poisoned allocation is needed here; it also
    # keeps the function free of in-place writes, which torch.compile handles best.
    shared_w = torch.sigmoid(logits[:, experts:])
    shared_ids = torch.arange(
        experts, experts + num_shared, dtype=torch.int32, device=gating_logits.device
    ).expand(tokens, num_shared)
    return torch.cat([routed_w, shared_w], dim=1), torch.cat([routed_ids, shared_ids], dim=1)
