"""``moe_topk_softmax`` as the reference under ``torch.compile`` (Inductor).

What a user would pick instead of a hand-written kernel. One compiled function per
(dtype, renormalize, num_shared > 0, padding mask given) — the Python-level branches of
the reference — so
each variant keeps its own Dynamo cache entry and none is evicted by the others'
recompilations; token and expert counts stay dynamic within a variant.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Callable
from typing import Any

import torch

from kernmux.kernels.moe_topk_softmax.reference import moe_topk_softmax as _reference

_COMPILED: dict[tuple[Any, ...], Callable[..., Any]] = {}
_LOCK = threading.Lock()


def _compiled_for(key: tuple[Any, ...]) -> Callable[..., Any]:
    fn = _COMPILED.get(key)
    if fn is None:
        with _LOCK:
            fn = _COMPILED.get(key)
            if fn is None:
                # Dynamo keeps its cache (and its recompile limit) per code object: a
                # copy of the reference's code per variant gives each its own.
                code = _reference.__code__.replace()
                clone = types.FunctionType(
                    code, _reference.__globals__, _reference.__name__, _reference.__defaults__
                )
                fn = torch.compile(clone, fullgraph=True, dynamic=True)
                _COMPILED[key] = fn
    return fn


def moe_topk_softmax(
    gating_logits: torch.Tensor,
    topk: int,
    renormalize: bool = False,
    num_shared: int = 0,
    is_padding: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as the reference (see ``reference.py``); compiled on first use."""
    key = (gating_logits.dtype, gating_logits.device.type, bool(renormalize), num_shared > 0, is_padding is not None)
    return _compiled_for(key)(gating_logits, topk, renormalize, num_shared, is_padding)
