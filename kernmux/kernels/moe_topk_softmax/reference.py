"""PyTorch reference for ``moe_topk_softmax``: the unfused routing chain, fp32 math.

This module deliberately avoids ``from __future__ import annotations``: the reference's
signature is the op's signature and ``torch.library`` reads its annotations at runtime.
"""

from typing import Optional

import torch

#: Id written into every slot of a padded row (vLLM's ``is_padding`` convention).
PADDING_ID = -1


def moe_topk_softmax(
    gating_logits: torch.Tensor,
    topk: int,
    renormalize: bool = False,
    num_shared: int = 0,
    is_padding: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens to experts: softmax over routed experts, top-k, shared slots appended.

    gating_logits: [T, E + S] fp32/bf16/fp16; the last S = ``num_shared`` columns are
        shared-expert gates, the first E columns routed-expert logits.
    topk: k routed experts per token, 1 <= k <= E.
    renormalize: divide the k routed weights by their sum (shared slots untouched).
    num_shared: S, the number of shared-expert gate columns (0..8).
    is_padding: optional [T] bool; True marks a row that is not a real token (CUDA-graph
        or data-parallel padding). Such a row gets id -1 in every slot (routed and
        shared), so expert kernels and all-to-all dispatch skip it; its weights are
        computed as for any row. This is what vLLM's ``topk_softmax`` does with its
        ``is_padding`` argument (vLLM PR #48979, in 0.32.0 and 0.33.0: the kernel writes
        -1 to every routed id of a padded row and leaves weights and source rows as
        computed).

    Returns (weights fp32 [T, k + S], ids int32 [T, k + S]):
      - slots 0..k-1: the k largest softmax(logits[:, :E]) probabilities (fp32), in
        descending order; equal probabilities go to the lower expert index first;
      - slot k + s: id E + s, weight sigmoid(logits[:, E + s]) in fp32.

    Non-finite logits (the fp32 arithmetic above, spelled out):
      - -inf routed logits are experts with probability 0 (a finite answer);
      - a row whose routed logits hold a NaN or a +inf, or are all -inf, has no softmax:
        all its probabilities are NaN, so its k routed weights are NaN and, NaN ties
        going to the lower index, its routed ids are 0 .. k-1;
      - a NaN shared gate gives a NaN weight in its slot only (ids unchanged).
      No kernel may turn such a NaN into a finite weight (vLLM's own kernel, for one,
      clamps NaN probabilities to 0; its adapter restores the NaN).
    """
    tokens, width = gating_logits.shape
    experts = width - num_shared
    logits = gating_logits.float()
    probs = torch.softmax(logits[:, :experts], dim=-1)
    # A stable descending sort keeps equal probabilities in index order, which is the
    # tie rule; torch.topk does not promise any order among equal values. NaN sorts
    # above every number, and all-NaN rows keep index order: ids 0 .. k-1.
    sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    routed_w = sorted_probs[:, :topk]
    routed_ids = sorted_ids[:, :topk]
    if renormalize:
        routed_w = routed_w / routed_w.sum(dim=-1, keepdim=True)

    routed_ids = routed_ids.to(torch.int32)
    if num_shared == 0:
        weights, ids = routed_w, routed_ids
    else:
        # torch.cat writes every element, so no poisoned allocation is needed here; it
        # also keeps the function free of in-place writes, which torch.compile handles best.
        shared_w = torch.sigmoid(logits[:, experts:])
        shared_ids = torch.arange(
            experts, experts + num_shared, dtype=torch.int32, device=gating_logits.device
        ).expand(tokens, num_shared)
        weights = torch.cat([routed_w, shared_w], dim=1)
        ids = torch.cat([routed_ids, shared_ids], dim=1)
    if is_padding is not None:
        ids = ids.masked_fill(is_padding.view(tokens, 1), PADDING_ID)
    return weights, ids
