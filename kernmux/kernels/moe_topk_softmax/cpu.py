"""``moe_topk_softmax`` on CPU tensors: softmax, then one ``torch.topk`` over packed keys.

The reference finds the top k with a full stable sort of every row, which on CPU costs
far more than the softmax itself. Here each probability is packed with its expert index
into one int64 key whose order is the reference's order:

    key = bits(p) * 2**32 + (2**31 - 1 - index)

``bits(p)`` is the IEEE-754 bit pattern of the fp32 probability; for the non-negative
numbers a softmax yields it orders exactly as the values do, so a larger probability has
a larger key, and among equal probabilities the lower index has the larger key. All keys
of a row are distinct, so ``torch.topk`` (which promises no order among equal values) has
exactly one answer, the reference's: descending probability, ties to the lower index.

NaN rows (a NaN or +inf logit, or all logits -inf) are NaN in every column; their NaNs
are keyed as 2.0, above every probability, which yields ids 0..k-1 as in the reference,
while their weights are read from the probabilities themselves (NaN). Everything else —
fp32 softmax of the same expression, renormalisation, shared slots, padded rows — is the
reference's own code, so weights are bitwise equal to it.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from kernmux.kernels.moe_topk_softmax.reference import PADDING_ID

# A key's low 32 bits: 2**31 - 1 - index (non-negative for any expert count < 2**31).
_LOW_BASE = 2**31 - 1
# Stand-in for NaN probabilities in the keys: larger than any probability (<= 1).
_NAN_KEY_VALUE = 2.0

_LOW_KEYS: dict[int, torch.Tensor] = {}


def _low_keys(experts: int) -> torch.Tensor:
    """``2**31 - 1 - arange(experts)`` as int64 (cached per expert count)."""
    low = _LOW_KEYS.get(experts)
    if low is None:
        low = _LOW_BASE - torch.arange(experts, dtype=torch.int64)
        _LOW_KEYS[experts] = low
    return low


def top_ids(probs: torch.Tensor, topk: int) -> torch.Tensor:
    """Ids ``[T, topk]`` int64 of the ``topk`` largest of ``probs`` ``[T, E]`` (fp32, each
    row non-negative or all NaN) in the reference's order: descending, ties to the lower
    index, NaN above every number (an all-NaN row gives 0..topk-1, whatever its NaNs'
    signs and payloads)."""
    bits = torch.nan_to_num(probs, nan=_NAN_KEY_VALUE).view(torch.int32)
    keys = torch.add(_low_keys(probs.shape[1]), bits, alpha=1 << 32)
    return keys.topk(topk, dim=-1).indices


def top_k(probs: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights fp32 ``[T, topk]``, ids int32 ``[T, topk]``) of ``probs`` ``[T, E]`` in the
    reference's order (see :func:`top_ids`); weights are ``probs``' own values."""
    ids = top_ids(probs, topk)
    return probs.gather(1, ids), ids.to(torch.int32)


def routing_with(
    select: Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]],
    module: str,
) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """A ``moe_topk_softmax`` kernel (the reference's signature, CPU tensors) that is the
    reference's routing chain with its top-k replaced by ``select(probs fp32 [T, E], topk)
    -> (weights fp32 [T, k], ids int32 [T, k])``. The fp32 softmax, renormalisation,
    shared slots and padded rows are the reference's own expressions, so weights stay
    bitwise equal to it whenever ``select`` returns the probabilities it picked.
    ``module``: where the kernel is bound (its ``__module__``, so it pickles by name)."""

    def moe_topk_softmax(
        gating_logits: torch.Tensor,
        topk: int,
        renormalize: bool = False,
        num_shared: int = 0,
        is_padding: Optional[torch.Tensor] = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Same contract as the reference (``reference.py``): gating_logits ``[T, E + S]``
        fp32/bf16/fp16 on CPU -> (weights fp32 ``[T, k + S]``, ids int32 ``[T, k + S]``)."""
        tokens, width = gating_logits.shape
        experts = width - num_shared
        logits = gating_logits.float()
        # No slice without shared columns: at one token a view costs as much as the softmax.
        probs = torch.softmax(logits[:, :experts] if num_shared else logits, dim=-1)
        routed_w, routed_ids = select(probs, topk)
        if renormalize:
            routed_w = routed_w / routed_w.sum(dim=-1, keepdim=True)

        if num_shared == 0:
            weights, ids = routed_w, routed_ids
        else:
            shared_w = torch.sigmoid(logits[:, experts:])
            shared_ids = torch.arange(experts, experts + num_shared, dtype=torch.int32).expand(tokens, num_shared)
            weights = torch.cat([routed_w, shared_w], dim=1)
            ids = torch.cat([routed_ids, shared_ids], dim=1)
        if is_padding is not None:
            ids = ids.masked_fill(is_padding.view(tokens, 1), PADDING_ID)
        return weights, ids

    moe_topk_softmax.__module__ = module
    moe_topk_softmax.__qualname__ = "moe_topk_softmax"
    return moe_topk_softmax


moe_topk_softmax = routing_with(top_k, __name__)
