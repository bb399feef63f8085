"""Value checks of sparse MLA decode that cost a device pass (opt-in: every kernel calls
:func:`maybe_check_values` first, which checks only under ``KERNMUX_CHECK_VALUES=1``)."""

from __future__ import annotations

import os
from typing import Optional

import torch

#: Opt-in value checks for every kernel of the op (the same variable for every op; each
#: op reads it itself, op packages being independent of each other).
CHECK_VALUES_ENV = "KERNMUX_CHECK_VALUES"


def values_checked() -> bool:
    """True when ``KERNMUX_CHECK_VALUES`` is 1/true/yes. Read on every call: cheap next to
    the kernels that ask, and settable at run time."""
    return os.environ.get(CHECK_VALUES_ENV, "").strip().lower() in ("1", "true", "yes")


def check_values(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int,
    extra_kv_cache: Optional[torch.Tensor] = None,
    extra_indices: Optional[torch.Tensor] = None,
    attn_sink: Optional[torch.Tensor] = None,
) -> None:
    """The opt-in value check (``KERNMUX_CHECK_VALUES=1``, see the op README):
    every index below ``num_blocks * block_size`` of its cache (negative = invalid, allowed).
    One reduction per index tensor and a host synchronisation."""
    scopes = [("indices", indices, kv_cache)]
    if extra_indices is not None and extra_kv_cache is not None:
        scopes.append(("extra_indices", extra_indices, extra_kv_cache))
    for name, idx, cache in scopes:
        slots = cache.shape[0] * cache.shape[1]
        if idx.numel() and int(idx.max()) >= slots:
            where = tuple(int(i) for i in (idx >= slots).nonzero()[0])
            raise ValueError(
                f"sparse_mla_decode: {name}{list(where)} = {int(idx[where])}: expected a slot below "
                f"num_blocks * block_size = {slots} of its cache (or negative for none)"
            )


def maybe_check_values(*args: object) -> None:
    """:func:`check_values` when ``KERNMUX_CHECK_VALUES`` is set; else nothing."""
    if values_checked():
        check_values(*args)  # type: ignore[arg-type]
