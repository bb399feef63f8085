"""Per-weight-tensor cache of vendor layouts (AITER's shuffled, vLLM CPU's prepacked).

Engines convert expert weights to a kernel's layout once, at load time. kernmux's op
takes plain [E+S, 2I, H] / [E+S, H, I] tensors, so an adapter whose library needs
another layout converts on first use and keeps the result for as long as the source
tensor lives, unchanged: the key holds the tensor's identity, storage pointer, shape,
strides, dtype and in-place version counter (inference tensors have none), and the
entry is dropped when the source tensor is freed. The converted copy doubles that
weight's memory.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from typing import Any

import torch

_CACHE: dict[tuple[Any, ...], torch.Tensor] = {}
_LOCK = threading.Lock()


def _key(tensor: torch.Tensor, tag: str) -> tuple[Any, ...]:
    # Inference tensors (made under torch.inference_mode, as engines run) have no
    # version counter: their key cannot see in-place writes.
    version = None if tensor.is_inference() else tensor._version
    return (id(tensor), tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride()),
            tensor.dtype, version, tag)


def _forget(ident: int) -> None:
    with _LOCK:
        for key in [k for k in _CACHE if k[0] == ident]:
            del _CACHE[key]


def converted(tensor: torch.Tensor, tag: str, convert: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """``convert(tensor)``, computed once per (tensor, tag) while the tensor is alive
    and not modified in place."""
    key = _key(tensor, tag)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    result = convert(tensor)
    with _LOCK:
        stale = [k for k in _CACHE if k[0] == key[0] and k[-1] == tag]
        for k in stale:  # an older version of the same tensor
            del _CACHE[k]
        if not stale:
            weakref.finalize(tensor, _forget, key[0])
        _CACHE[key] = result
    return result


def cached_entries() -> int:
    """How many converted tensors are held (tests)."""
    return len(_CACHE)
