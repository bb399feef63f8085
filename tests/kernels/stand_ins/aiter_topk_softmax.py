"""Test-only stand-in for the ``aiter`` module's ``topk_softmax`` (no ROCm needed).

Emulates the two call forms documented in notes/aiter.md and ROCm/aiter
``csrc/kernels/topk_softmax_kernels.cu``, with the checks the real binding makes:

* 5 arguments (amd-aiter 0.1.7-0.1.11): ``(topk_weights [T,k], topk_indices [T,k],
  token_expert_indices [T,k], gating_output [T,E], need_renorm)``; a 7-argument call
  raises the TypeError vLLM issue #43873 quotes.
* 7 arguments (>= 0.1.12): ``(..., gating_output [T,E+S], need_renorm,
  num_shared_experts, shared_expert_scoring_func)``; k is the width of topk_indices,
  topk_weights is [T, k+S] and gets the shared sigmoid weights, ids only for the routed
  slots; num_shared_experts must be one of 1, 2, 4, 8 and the scoring "sigmoid".

With ``strided_workspace=False`` (every tag up to v0.1.19) the workspace path (expert
counts that are not a power of two, or above ``single_kernel_max``) reproduces the
stride bug of ``moeSoftmax``/``moeTopK``: gating rows are read at ``row * E`` (E the
routed count) and weights/ids written at ``row * k`` from the start of each tensor,
whatever their strides (fixed by commit 0cad1d3a95, first tagged v0.1.19.post1).
With ``nan_to_zero=True`` NaN/inf probabilities count as 0, as vLLM's kernel does
(AITER's own NaN behaviour is undocumented): the adapter must restore the NaN rule.

Every call is recorded (argument count, shapes, strides) so tests can check how the
adapter built it. The math is an independent torch implementation of the routing.
"""

from __future__ import annotations

import types
from typing import Any

import torch


def _route(gating: torch.Tensor, k: int, renorm: bool, nan_to_zero: bool) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.softmax(gating.float(), dim=-1)
    if nan_to_zero:
        probs = torch.where(torch.isfinite(probs), probs, torch.zeros_like(probs))
    values, ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    values, ids = values[:, :k], ids[:, :k]
    if renorm:
        values = values / values.sum(dim=-1, keepdim=True)
    return values, ids.to(torch.int32)


def make_module(
    max_args: int, *, strided_workspace: bool = True, single_kernel_max: int = 512, nan_to_zero: bool = False
) -> types.ModuleType:
    """A module named ``aiter`` whose topk_softmax accepts at most ``max_args`` arguments."""
    module = types.ModuleType("aiter")
    module.calls: list[dict[str, Any]] = []

    def topk_softmax(*args: Any) -> None:
        if len(args) > max_args:
            raise TypeError(f"topk_softmax(): expected at most {max_args} argument(s) but received {len(args)}")
        weights, indices, token_expert_indices, gating, need_renorm = args[:5]
        num_shared = args[5] if len(args) > 5 else 0
        scoring = args[6] if len(args) > 6 else ""
        module.calls.append(
            {
                "nargs": len(args),
                "gating_shape": tuple(gating.shape),
                "gating_contiguous": gating.is_contiguous(),
                "weights_shape": tuple(weights.shape),
                "indices_shape": tuple(indices.shape),
                "indices_stride": tuple(indices.stride()),
                "num_shared": num_shared,
                "scoring": scoring,
                "need_renorm": need_renorm,
            }
        )
        k = indices.shape[-1]
        experts = gating.shape[-1] - num_shared
        if gating.stride(-1) != 1:
            raise RuntimeError("gating_output must have unit stride along experts")
        if num_shared:
            if num_shared not in (1, 2, 4, 8):
                raise RuntimeError(f"Unsupported num_shared_experts: {num_shared}. Supported values: 1, 2, 4, 8")
            if scoring != "sigmoid":
                raise RuntimeError(f"Unsupported shared expert scoring function: {scoring}")
        if weights.shape != (gating.shape[0], k + num_shared):
            raise RuntimeError(f"topk_weights shape {tuple(weights.shape)} != {(gating.shape[0], k + num_shared)}")
        tokens = gating.shape[0]
        workspace = experts > single_kernel_max or experts & (experts - 1) != 0
        module.calls[-1]["workspace"] = workspace
        if workspace and not strided_workspace:
            # Row offsets computed as if every tensor were a dense [T, E] / [T, k] block.
            dense_in = torch.as_strided(gating, (tokens, experts), (experts, 1))
            values, ids = _route(dense_in, k, bool(need_renorm), nan_to_zero)
            torch.as_strided(weights, (tokens, k), (k, 1)).copy_(values)
            torch.as_strided(indices, (tokens, k), (k, 1)).copy_(ids)
        else:
            values, ids = _route(gating[:, :experts], k, bool(need_renorm), nan_to_zero)
            weights[:, :k] = values
            indices.copy_(ids)
        token_expert_indices.copy_(
            torch.arange(k, dtype=torch.int32).unsqueeze(0) * gating.shape[0]
            + torch.arange(gating.shape[0], dtype=torch.int32).unsqueeze(1)
        )
        if num_shared:
            weights[:, k:] = torch.sigmoid(gating[:, experts:].float())

    module.topk_softmax = topk_softmax
    return module
