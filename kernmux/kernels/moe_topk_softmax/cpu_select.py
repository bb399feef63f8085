"""``moe_topk_softmax`` on CPU tensors: torch's softmax, then a branch-light top-k in Numba.

Why not ``torch.topk``: on CPU it runs ``nth_element`` per row, whose comparisons the
branch predictor cannot learn on fresh logits; at T=128, E=160 that costs ~1 us per row,
several times the softmax. Here each row is selected in three passes of simple loops:

1. the maxima of groups of neighbouring experts, 16 to a group where that leaves at
   least k groups, else about 2k groups (no branches);
2. ``tau``, the k-th largest of those maxima: the k groups above it hold k distinct
   experts >= ``tau``, so every expert of the top k is >= ``tau`` (no branches: each
   group's rank is a count);
3. the experts >= ``tau`` (about k of them on real logits) collected in index order and
   ranked by (probability descending, index ascending), the reference's tie rule.

Probabilities are compared as their IEEE-754 bit patterns (uint32): for the non-negative
numbers a softmax yields these order exactly as the values do. A row holding a NaN (a
softmax makes such a row NaN throughout) is selected again with every NaN keyed above
every number, which is the reference's order (NaN first, ties to the lower index).
Weights are read from the probabilities themselves, so they are bitwise the reference's.

The selection is plain Python (``select_rows``) compiled by Numba on first use
(``cache=True``: later processes load it from Numba's cache). Without Numba the kernel is
not offered (``kernmux ops`` and ``explain`` say why) and ``torch_topk`` is the CPU default.
"""

from __future__ import annotations

import threading
from typing import Any, Callable, Optional

import numpy as np
import torch

from kernmux.kernels.moe_topk_softmax.cpu import routing_with

# uint32 bit pattern of +inf; a NaN of either sign is above it (probabilities are below).
_INF_BITS = 0x7F800000
# Key for a NaN probability: above +inf, so above every probability.
_NAN_KEY = 0x7F800001
# Experts per group where there are enough of them (at least k groups): a loop of a fixed
# 16 compiles to a few vector instructions.
_GROUP = 16
# Past this many candidates (rows of many equal probabilities: zeros, equal logits) the
# O(n^2) rank of pass 3 gives way to k passes of O(n).
_RANK_LIMIT_PER_K = 4


def select_rows(probs: Any, k: int) -> tuple[Any, Any]:
    """Top ``k`` of each row of ``probs`` (``[T, E]`` float32 numpy array, each row >= 0
    or holding NaN): (weights ``[T, k]`` float32, ids ``[T, k]`` int32), in the
    reference's order. Plain Python; Numba compiles it (the outputs are allocated here:
    at one token, every torch allocation and conversion around the call costs as much
    as the selection)."""
    bits = probs.view(np.uint32)
    tokens, experts = bits.shape
    out_w = np.empty((tokens, k), np.float32)
    out_i = np.empty((tokens, k), np.int32)
    group = _GROUP if experts >= _GROUP * k else max(1, experts // (2 * k))
    fixed = group == _GROUP
    groups = (experts + group - 1) // group
    gmax = np.empty(groups, np.uint32)
    clean = np.empty(experts, np.uint32)
    cand = np.empty(experts, np.int64)
    cval = np.empty(experts, np.uint32)
    order = np.empty(experts, np.int64)
    for t in range(tokens):
        row = bits[t]
        # Pass 1: group maxima; a maximum above +inf means a NaN: key NaNs above every
        # number (one key for every NaN, so they tie to the lower index) and redo.
        for sweep in range(2):
            top = np.uint32(0)
            for g in range(groups):
                lo = g * group
                m = row[lo]
                if fixed and lo + _GROUP <= experts:
                    for e in range(lo + 1, lo + _GROUP):
                        m = max(m, row[e])
                else:
                    for e in range(lo + 1, min(lo + group, experts)):
                        m = max(m, row[e])
                gmax[g] = m
                top = max(top, m)
            if top <= _INF_BITS or sweep == 1:
                break
            for e in range(experts):
                v = row[e]
                clean[e] = _NAN_KEY if (v & 0x7FFFFFFF) > _INF_BITS else v
            row = clean
        # Pass 2: tau, the k-th largest group maximum (duplicates counted).
        tau = np.uint32(_NAN_KEY)
        for a in range(groups):
            v = gmax[a]
            rank = 0
            for b in range(groups):
                rank += gmax[b] > v
            if rank < k:
                tau = min(tau, v)
        # Pass 3: candidates >= tau in index order, then ordered (value desc, index asc).
        n = 0
        for e in range(experts):
            v = row[e]
            cand[n] = e
            cval[n] = v
            n += v >= tau
        if n <= _RANK_LIMIT_PER_K * k:
            for a in range(n):
                v = cval[a]
                rank = 0
                for b in range(a):
                    rank += cval[b] >= v
                for b in range(a + 1, n):
                    rank += cval[b] > v
                order[rank] = cand[a]
        else:
            # Many ties: k passes, each taking the first (lowest-index) largest left.
            for j in range(k):
                best = -1
                for a in range(n):
                    if cand[a] >= 0 and (best < 0 or cval[a] > cval[best]):
                        best = a
                order[j] = cand[best]
                cand[best] = -1
        for j in range(k):
            e = order[j]
            out_i[t, j] = e
            out_w[t, j] = probs[t, e]
    return out_w, out_i


_COMPILED: Optional[Callable[..., tuple[Any, Any]]] = None
_COMPILE_LOCK = threading.Lock()


def compiled_select() -> Callable[..., tuple[Any, Any]]:
    """``select_rows`` compiled by Numba (once per process; from Numba's cache when a
    previous process compiled it, and without the cache where Numba finds no writable
    place for one: a read-only install and no user cache directory)."""
    global _COMPILED
    if _COMPILED is None:
        with _COMPILE_LOCK:
            if _COMPILED is None:
                import numba

                try:
                    _COMPILED = numba.njit(cache=True, nogil=True, boundscheck=False)(select_rows)
                except RuntimeError:  # "cannot cache function ...: no locator available"
                    _COMPILED = numba.njit(nogil=True, boundscheck=False)(select_rows)
    return _COMPILED


def top_k(probs: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights fp32 ``[T, topk]``, ids int32 ``[T, topk]``): the ``topk`` largest of
    ``probs`` (``[T, E]`` fp32 CPU, rows non-negative or NaN), descending, ties to the
    lower index, NaN above every number."""
    weights, ids = compiled_select()(probs.contiguous().numpy(), topk)
    return torch.from_numpy(weights), torch.from_numpy(ids)


moe_topk_softmax = routing_with(top_k, __name__)
