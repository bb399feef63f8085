"""Value checks of ``indexer_logits`` (context lengths within the table and the output,
page ids within the cache): one host synchronisation each. The reference runs them on
every call; kernels only under ``KERNMUX_CHECK_VALUES=1`` (:func:`maybe_check_values`)."""

from __future__ import annotations

import os

import torch

#: Opt-in value checks for every kernel of the op (the same variable for every op; each
#: op reads it itself, op packages being independent of each other).
CHECK_VALUES_ENV = "KERNMUX_CHECK_VALUES"


def values_checked() -> bool:
    """True when ``KERNMUX_CHECK_VALUES`` is 1/true/yes. Read on every call: cheap next to
    the kernels that ask, and settable at run time."""
    return os.environ.get(CHECK_VALUES_ENV, "").strip().lower() in ("1", "true", "yes")


def check_lens(context_lens: torch.Tensor, block_table: torch.Tensor, num_blocks: int, block_size: int, max_context: int) -> None:
    """Value checks the kernels cannot afford (each synchronises the device once)."""
    lens = context_lens.to(torch.long)
    limit = min(max_context, block_table.shape[1] * block_size)
    bad = (lens < 0) | (lens > limit)
    if bool(bad.any()):
        b = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"context_lens[{b}] = {int(lens[b])} must lie in [0, min(max_context={max_context}, "
            f"max_blocks*block_size={block_table.shape[1] * block_size})]"
        )
    page_start = torch.arange(block_table.shape[1], device=block_table.device) * block_size
    needed = page_start[None, :] < lens.to(block_table.device)[:, None]
    pages = block_table.to(torch.long)
    outside = needed & ((pages < 0) | (pages >= num_blocks))
    if bool(outside.any()):
        b, m = (int(x) for x in outside.nonzero()[0])
        raise ValueError(f"block_table[{b}, {m}] = {int(pages[b, m])} lies outside [0, {num_blocks}) within the context of request {b}")


def maybe_check_values(q, k_cache, k_scale, weights, context_lens, block_table, max_context) -> None:
    """:func:`check_lens` on a kernel's arguments when ``KERNMUX_CHECK_VALUES`` is set."""
    if values_checked():
        check_lens(context_lens, block_table, k_cache.shape[0], k_cache.shape[1], max_context)
