"""AITER adapter for ``moe_topk_softmax`` (ROCm): ``aiter.topk_softmax``, in place.

Signature (notes/aiter.md, ROCm/aiter ``csrc/kernels/topk_softmax_kernels.cu``)::

    topk_softmax(topk_weights, topk_indices, token_expert_indices, gating_output,
                 need_renorm, num_shared_experts=0, shared_expert_scoring_func="")

* amd-aiter >= 0.1.12 with S in {1, 2, 4, 8} ("fused"): one launch over the whole
  ``[T, E + S]`` gating tensor. ``topk_weights`` is ``[T, k + S]`` and receives the routed
  weights and the sigmoid shared weights; ``topk_indices`` is the ``[T, k]`` column view of
  the ids buffer (the kernel takes k from its width and writes only routed ids, so the
  shared ids E + s are written by the caller, as vLLM's fused path does).
* Otherwise ("unfused"; amd-aiter 0.1.7-0.1.11 accept only the first five arguments,
  vLLM issue #43873): the 5-argument call over the routed columns into ``[T, k]``
  buffers, then the shared slots are appended with a sigmoid and a copy.

Not run on AMD hardware here: argument construction and version gating are tested
against a stand-in module (tests/kernels/stand_ins/aiter_topk_softmax.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import torch
from packaging.version import InvalidVersion, Version

from kernmux.dispatch.outputs import empty_output
from kernmux.dispatch.platform import lib_version

#: First amd-aiter release whose topk_softmax takes the shared-expert arguments.
FUSED_SHARED_MIN_VERSION = Version("0.1.12")
#: num_shared_experts values the fused kernel is instantiated for.
FUSED_SHARED_COUNTS = frozenset({1, 2, 4, 8})


def aiter_version() -> str | None:
    """Installed amd-aiter version (metadata only: importing aiter probes ROCm)."""
    return lib_version("amd-aiter")


def fused_shared_supported(version: str | None, num_shared: int) -> bool:
    """Whether the 7-argument fused shared-expert form may be called."""
    if version is None or num_shared not in FUSED_SHARED_COUNTS:
        return False
    try:
        return Version(version) >= FUSED_SHARED_MIN_VERSION
    except InvalidVersion:
        return False


def _aiter() -> Any:
    return importlib.import_module("aiter")


def moe_topk_softmax(
    gating_logits: torch.Tensor,
    topk: int,
    renormalize: bool = False,
    num_shared: int = 0,
    *,
    config: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing through ``aiter.topk_softmax``; contract of the reference (``reference.py``).

    config: ``{"fuse_shared": bool}``; True (default) uses the fused form where the
    installed version and S allow it, False always takes the unfused path.
    """
    topk_softmax = _aiter().topk_softmax
    tokens, width = gating_logits.shape
    experts = width - num_shared
    device = gating_logits.device
    # The kernel reads rows with a stride but expects unit stride along experts.
    logits = gating_logits if gating_logits.stride(1) == 1 else gating_logits.contiguous()
    weights = empty_output((tokens, topk + num_shared), torch.float32, device)
    ids = empty_output((tokens, topk + num_shared), torch.int32, device)
    token_expert_indices = torch.empty((tokens, topk), dtype=torch.int32, device=device)

    if num_shared == 0:
        topk_softmax(weights, ids, token_expert_indices, logits, renormalize)
        return weights, ids

    shared_ids = torch.arange(experts, experts + num_shared, dtype=torch.int32, device=device)
    fuse = bool((config or {}).get("fuse_shared", True))
    if fuse and fused_shared_supported(aiter_version(), num_shared):
        ids[:, topk:] = shared_ids
        topk_softmax(
            weights, ids[:, :topk], token_expert_indices, logits, renormalize, num_shared, "sigmoid"
        )
        return weights, ids

    routed_w = torch.empty((tokens, topk), dtype=torch.float32, device=device)
    routed_ids = torch.empty((tokens, topk), dtype=torch.int32, device=device)
    topk_softmax(
        routed_w, routed_ids, token_expert_indices, logits[:, :experts].contiguous(), renormalize
    )
    weights[:, :topk] = routed_w
    ids[:, :topk] = routed_ids
    weights[:, topk:] = torch.sigmoid(logits[:, experts:].float())
    ids[:, topk:] = shared_ids
    return weights, ids
