"""The reference's rules for non-finite rows and padded rows, applied after a library
kernel (AITER, vLLM) that does not follow them itself."""

from __future__ import annotations

import torch

from kernmux.kernels.moe_topk_softmax.reference import PADDING_ID


def apply_reference_rules(
    gating_logits: torch.Tensor, experts: int, topk: int, weights: torch.Tensor, ids: torch.Tensor,
    is_padding: torch.Tensor | None,
) -> None:
    """In place on ``weights``/``ids`` ``[T, k + S]``: the reference's rules that a
    library kernel may not follow. Rows whose routed logits have no softmax (a NaN or
    +inf, or all -inf: their max is not finite) get NaN weights and ids 0..k-1 in the
    routed slots; padded rows get id -1 in every slot. A few small launches, no host
    synchronisation."""
    row_max = gating_logits[:, :experts].amax(dim=1)  # NaN propagates through amax
    undefined = ~torch.isfinite(row_max).view(-1, 1)
    slots = torch.arange(topk, dtype=torch.int32, device=ids.device).view(1, topk)
    weights[:, :topk] = torch.where(undefined, float("nan"), weights[:, :topk])
    ids[:, :topk] = torch.where(undefined, slots, ids[:, :topk])
    if is_padding is not None:
        ids.masked_fill_(is_padding.view(-1, 1), PADDING_ID)
