"""AITER adapter for ``moe_topk_softmax`` (ROCm): ``aiter.topk_softmax``, in place.

Signature (ROCm/aiter ``csrc/kernels/topk_softmax_kernels.cu``, read at each tag)::

    topk_softmax(topk_weights, topk_indices, token_expert_indices, gating_output,
                 need_renorm, num_shared_experts=0, shared_expert_scoring_func="")

* "fused" (amd-aiter >= 0.1.12 with S in {1, 2, 4, 8}): one launch over the whole
  ``[T, E + S]`` gating tensor. ``topk_weights`` is ``[T, k + S]`` and receives the routed
  weights and the sigmoid shared weights; ``topk_indices`` is the ``[T, k]`` column view of
  the ids buffer (the kernel takes k from its width and writes only routed ids, so the
  shared ids E + s are written by the caller, as vLLM's fused path does).
* "unfused" (every other case; 0.1.7-0.1.11 accept only the first five arguments, vLLM
  issue #43873): the 5-argument call over the routed columns into ``[T, k]`` buffers,
  then the shared slots are appended with a sigmoid and a copy.

**Row strides on the workspace path.** Expert counts without a single-kernel instance
(not a power of two, or above 512) run ``moeSoftmax`` + ``moeTopK`` through a workspace.
Up to and including v0.1.19 those kernels index rows as ``blockIdx.x * num_cols`` and
``k * block_row``: they ignore the row strides of the gating input and of both outputs
(and ``num_cols`` is the routed count E, so the fused form's ``[T, E + S]`` gating rows
and ``[T, k + S]`` weight rows are misread whatever their layout). Commit ``0cad1d3a95``
(ROCm/aiter PR #4454) threads the strides through; the first tag containing it is
v0.1.19.post1. Before it, this adapter takes the unfused form on that path with
contiguous ``[T, E]`` gating and contiguous ``[T, k]`` outputs, whatever the config asks.

Non-finite logits and padding are the reference's rules, applied here after the call
(AITER's kernel has no padding mask and its NaN behaviour is not documented): rows
without a softmax get NaN weights and ids 0..k-1; padded rows get id -1 in every slot.

Not run on AMD hardware here: argument construction, version gating and the stride bug
are tested against a stand-in module (tests/kernels/stand_ins/aiter_topk_softmax.py).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

import torch
from packaging.version import InvalidVersion, Version

from kernmux.dispatch.outputs import empty_output
from kernmux.dispatch.platform import lib_version
from kernmux.kernels.moe_topk_softmax.postprocess import apply_reference_rules

#: First amd-aiter release whose topk_softmax takes the shared-expert arguments (v0.1.12).
FUSED_SHARED_MIN_VERSION = Version("0.1.12")
#: num_shared_experts values the fused kernel is instantiated for.
FUSED_SHARED_COUNTS = frozenset({1, 2, 4, 8})
#: First tag whose workspace path honours row strides (commit 0cad1d3a95, PR #4454).
STRIDED_WORKSPACE_MIN_VERSION = Version("0.1.19.post1")
#: Largest expert count with a single-kernel (power-of-two) instance: 512 from v0.1.4,
#: 256 in v0.1.1-v0.1.3.
MAX_SINGLE_KERNEL_EXPERTS = 512
_SINGLE_KERNEL_512_SINCE = Version("0.1.4")


def aiter_version() -> str | None:
    """Installed amd-aiter version (metadata only: importing aiter probes ROCm)."""
    return lib_version("amd-aiter")


def _at_least(version: str | None, minimum: Version) -> bool:
    if version is None:
        return False
    try:
        return Version(version) >= minimum
    except InvalidVersion:
        return False


def workspace_path(experts: int, version: str | None = None) -> bool:
    """Whether AITER routes ``experts`` through its softmax workspace (two kernels);
    an unknown version counts as the oldest (the widest workspace range)."""
    largest = MAX_SINGLE_KERNEL_EXPERTS if _at_least(version, _SINGLE_KERNEL_512_SINCE) else MAX_SINGLE_KERNEL_EXPERTS // 2
    return experts > largest or experts & (experts - 1) != 0


def strides_honoured(version: str | None, experts: int) -> bool:
    """Whether the installed AITER reads strided gating / writes strided outputs right
    for this expert count (always on the single-kernel path; from v0.1.19.post1 on the
    workspace path; an unknown version counts as not)."""
    return not workspace_path(experts, version) or _at_least(version, STRIDED_WORKSPACE_MIN_VERSION)


def fused_shared_supported(version: str | None, num_shared: int, experts: int | None = None) -> bool:
    """Whether the 7-argument fused shared-expert form may be called (``experts``: the
    routed count; None checks the version and S only)."""
    if num_shared not in FUSED_SHARED_COUNTS or not _at_least(version, FUSED_SHARED_MIN_VERSION):
        return False
    return experts is None or strides_honoured(version, experts)


def _aiter() -> Any:
    return importlib.import_module("aiter")


def moe_topk_softmax(
    gating_logits: torch.Tensor,
    topk: int,
    renormalize: bool = False,
    num_shared: int = 0,
    is_padding: torch.Tensor | None = None,
    *,
    config: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing through ``aiter.topk_softmax``; contract of the reference (``reference.py``).

    config: ``{"fuse_shared": bool}``; True (default) uses the fused form where the
    installed version, S and the expert count allow it, False always takes the unfused
    path.
    """
    topk_softmax = _aiter().topk_softmax
    version = aiter_version()
    tokens, width = gating_logits.shape
    experts = width - num_shared
    device = gating_logits.device
    weights = empty_output((tokens, topk + num_shared), torch.float32, device)
    ids = empty_output((tokens, topk + num_shared), torch.int32, device)
    token_expert_indices = torch.empty((tokens, topk), dtype=torch.int32, device=device)
    fuse = bool((config or {}).get("fuse_shared", True))

    if num_shared and fuse and fused_shared_supported(version, num_shared, experts):
        # The kernel reads rows with their stride here but expects unit stride along experts.
        logits = gating_logits if gating_logits.stride(1) == 1 else gating_logits.contiguous()
        ids[:, topk:] = torch.arange(experts, experts + num_shared, dtype=torch.int32, device=device)
        topk_softmax(weights, ids[:, :topk], token_expert_indices, logits, renormalize, num_shared, "sigmoid")
    else:
        routed = gating_logits[:, :experts]
        if num_shared == 0 and strides_honoured(version, experts) and routed.stride(1) == 1:
            routed_w, routed_ids = weights, ids  # contiguous [T, k]: written in place
        else:
            routed = routed.contiguous()
            routed_w = torch.empty((tokens, topk), dtype=torch.float32, device=device)
            routed_ids = torch.empty((tokens, topk), dtype=torch.int32, device=device)
        topk_softmax(routed_w, routed_ids, token_expert_indices, routed, renormalize)
        if routed_w is not weights:
            weights[:, :topk] = routed_w
            ids[:, :topk] = routed_ids
        if num_shared:
            weights[:, topk:] = torch.sigmoid(gating_logits[:, experts:].float())
            ids[:, topk:] = torch.arange(experts, experts + num_shared, dtype=torch.int32, device=device)
    apply_reference_rules(gating_logits, experts, topk, weights, ids, is_padding)
    return weights, ids
