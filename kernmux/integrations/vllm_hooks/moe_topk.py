"""MoE routing top-k (softmax scoring, optional fused shared-expert slots) -> ``kernmux.ops.moe_topk_softmax``.

Two vLLM code paths compute softmax top-k routing:

* ``moe_topk.fused`` — GPU routers. ``fused_topk_router.dispatch_topk_softmax_func(
  use_rocm_aiter)`` picks ``vllm_topk_softmax`` (the CUDA ``topk_softmax`` op) or
  ``rocm_aiter_ops.topk_softmax`` (AITER); ``fused_topk`` (FusedTopKRouter, and the
  degenerate-group GroupedTopKRouter through it) and ``AiterSharedRoutedFusedMoERouter``
  (ROCm fused shared experts: ``num_shared_experts`` + ``"sigmoid"``) call what it
  returns. The replacement factory returns a function with the same calling convention
  that fills vLLM's buffers from kernmux, so kernmux's rules/tuning decide between AITER,
  Triton and the rest instead of the ``VLLM_ROCM_USE_AITER*`` flags.
* ``moe_topk.cpu`` — ``cpu_router._softmax_topk(router_logits, top_k, renormalize)``,
  called by ``CPURouter`` (every MoE layer on the CPU platform) for plain softmax routing.

Calls outside what the op expresses (another shared-expert scoring function, extra
arguments) go to vLLM's function unchanged.

The padding mask. vLLM 0.32/0.33's ``vllm_topk_softmax`` passes ``is_padding`` (the
forward context's mask, sliced to the token count, by the module's
``_get_padding_mask``, which returns None unless ``VLLM_MOE_SKIP_PADDING`` is on -- its
default -- and a forward context is set) to ``_moe_C::topk_softmax``, which writes id -1
to every routed slot of a padded row (PR #48979). The replacement reads the mask through
that same function and hands it to ``kernmux.ops.moe_topk_softmax(..., is_padding=)``,
whose kernels do exactly that; where vLLM's own choice was AITER
(``rocm_aiter_ops.topk_softmax``, which takes no mask), no mask is passed either.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from kernmux.integrations.vllm_hooks.base import HookRuntime, HookSpec, compiling, ops_module

FUSED_MODULE = "vllm.model_executor.layers.fused_moe.router.fused_topk_router"
CPU_MODULE = "vllm.model_executor.layers.fused_moe.router.cpu_router"
OP = "moe_topk_softmax"
_MAX_CACHED_FUNCS = 64
_MISSING = object()
# The calling convention of vllm_topk_softmax / rocm_aiter_ops.topk_softmax.
_TOPK_PARAMS = (
    "topk_weights", "topk_indices", "token_expert_indices", "gating_output",
    "renormalize", "num_shared_experts", "shared_expert_scoring_func",
)
_TOPK_KEYWORDS = frozenset(_TOPK_PARAMS)
_TOPK_DEFAULTS = {
    **{name: _MISSING for name in _TOPK_PARAMS[:4]},
    "renormalize": False, "num_shared_experts": 0, "shared_expert_scoring_func": "",
}


def padding_source(module: Any, vllm_fn: Callable[..., Any]) -> Callable[[int], Any] | None:
    """The function that gives vLLM's padding mask for ``num_tokens`` rows when ``vllm_fn``
    (the top-k function vLLM's factory chose) applies one, else None: vLLM's CUDA
    ``vllm_topk_softmax`` applies ``_get_padding_mask(num_tokens)``; AITER's does not."""
    if module is None or vllm_fn is not getattr(module, "vllm_topk_softmax", None):
        return None
    return getattr(module, "_get_padding_mask", None)


def make_dispatch(runtime: HookRuntime, original_factory: Callable[..., Any]) -> Callable[..., Any]:
    """Replacement for ``dispatch_topk_softmax_func``: same arguments (passed through to
    vLLM's factory, whose answer is kept as the fallback), returns a kernmux-backed
    top-k function."""
    wrapped: dict[Any, Callable[..., Any]] = {}
    module = sys.modules.get(getattr(original_factory, "__module__", ""))

    def dispatch_topk_softmax_func(*args: Any, **kwargs: Any) -> Callable[..., Any]:
        vllm_fn = original_factory(*args, **kwargs)
        if runtime.disabled:
            return vllm_fn
        try:
            fn = wrapped.get(vllm_fn)
        except TypeError:  # unhashable callable: build one per call
            return make_topk_softmax(runtime, vllm_fn, padding_source(module, vllm_fn))
        if fn is None:
            fn = make_topk_softmax(runtime, vllm_fn, padding_source(module, vllm_fn))
            if len(wrapped) < _MAX_CACHED_FUNCS:
                wrapped[vllm_fn] = fn
        return fn

    dispatch_topk_softmax_func.__wrapped__ = original_factory  # type: ignore[attr-defined]
    dispatch_topk_softmax_func.__doc__ = (
        "kernmux: returns a top-k softmax function backed by kernmux.ops.moe_topk_softmax "
        "(vLLM's choice is kept as its fallback)."
    )
    return dispatch_topk_softmax_func


def make_topk_softmax(
    runtime: HookRuntime, vllm_fn: Callable[..., Any], padding: Callable[[int], Any] | None = None
) -> Callable[..., Any]:
    """A function with vLLM's top-k softmax calling convention backed by kernmux.

    (topk_weights fp32 [T, k] or [T, k + S], topk_indices int [T, k],
     token_expert_indices int32 [T, k] or None, gating_output [T, E + S], renormalize,
     num_shared_experts=S, shared_expert_scoring_func) -> (topk_weights, topk_indices),
    written in place like vLLM's: routed weights/ids in the first k slots, the S shared
    weights (sigmoid of the last S logits) after them when the weight buffer has room,
    token_expert_indices[t, j] = j * T + t (the source-row map vLLM's kernel writes).
    padding: vLLM's mask source for this function (see :func:`padding_source`); padded
    rows get id -1 as vLLM's kernel writes them.
    """

    def topk_softmax(*args: Any, **kwargs: Any) -> Any:
        if runtime.disabled or len(args) > len(_TOPK_PARAMS) or not _TOPK_KEYWORDS.issuperset(kwargs):
            runtime.passthrough()
            return vllm_fn(*args, **kwargs)
        values = dict(_TOPK_DEFAULTS)
        values.update(zip(_TOPK_PARAMS, args))
        values.update(kwargs)
        if any(values[name] is _MISSING for name in _TOPK_PARAMS[:4]):
            return vllm_fn(*args, **kwargs)  # vLLM reports the missing argument itself
        weights, indices = values["topk_weights"], values["topk_indices"]
        shared = int(values["num_shared_experts"] or 0)
        scoring = values["shared_expert_scoring_func"] or ""
        k = indices.shape[-1]
        expressible = (
            scoring in ("", "sigmoid")
            and (shared == 0 or scoring == "sigmoid")
            and weights.shape[-1] in (k, k + shared)
        )
        if not expressible:
            runtime.passthrough()
            return vllm_fn(*args, **kwargs)
        mask = padding(indices.shape[0]) if padding is not None else None
        call = (weights, indices, values["token_expert_indices"], values["gating_output"], k,
                bool(values["renormalize"]), shared, mask)
        if compiling():
            return _fill(*call)
        try:
            out = _fill(*call)
        except Exception as e:
            runtime.fail(e)
            return vllm_fn(*args, **kwargs)
        runtime.hit()
        return out

    topk_softmax.__wrapped__ = vllm_fn  # type: ignore[attr-defined]
    return topk_softmax


def _fill(
    topk_weights: Any, topk_indices: Any, token_expert_indices: Any, gating_output: Any,
    k: int, renormalize: bool, shared: int, is_padding: Any = None,
) -> tuple[Any, Any]:
    import torch

    weights, ids = ops_module().moe_topk_softmax(gating_output, k, bool(renormalize), shared, is_padding)
    topk_weights.copy_(weights[:, : topk_weights.shape[-1]])
    topk_indices.copy_(ids[:, :k])
    if token_expert_indices is not None:
        tokens = gating_output.shape[0]
        rows = torch.arange(k * tokens, dtype=token_expert_indices.dtype, device=token_expert_indices.device)
        token_expert_indices.copy_(rows.view(k, tokens).t())
    return topk_weights, topk_indices


def make_cpu_softmax_topk(runtime: HookRuntime, original: Callable[..., Any]) -> Callable[..., Any]:
    """Replacement for ``cpu_router._softmax_topk(router_logits [T, E], top_k, renormalize)
    -> (weights fp32 [T, k], ids int32 [T, k])`` (contiguous: vLLM's CPU MoE kernel
    ignores strides)."""

    def _softmax_topk(router_logits: Any, top_k: int, renormalize: bool) -> tuple[Any, Any]:
        if runtime.disabled:
            return original(router_logits, top_k, renormalize)
        if compiling():
            weights, ids = ops_module().moe_topk_softmax(router_logits, top_k, renormalize)
            return weights.contiguous(), ids.contiguous()
        try:
            weights, ids = ops_module().moe_topk_softmax(router_logits, int(top_k), bool(renormalize))
            out = weights.contiguous(), ids.contiguous()
        except Exception as e:
            runtime.fail(e)
            return original(router_logits, top_k, renormalize)
        runtime.hit()
        return out

    _softmax_topk.__wrapped__ = original  # type: ignore[attr-defined]
    return _softmax_topk


FUSED = HookSpec(
    name="moe_topk.fused",
    op=OP,
    module=FUSED_MODULE,
    attr="dispatch_topk_softmax_func",
    params=("use_rocm_aiter",),
    make=make_dispatch,
    replaces=(
        "fused_topk_router.dispatch_topk_softmax_func: the choice between vLLM's CUDA "
        "topk_softmax and AITER topk_softmax (fused_topk, FusedTopKRouter, "
        "AiterSharedRoutedFusedMoERouter incl. the fused shared-expert slots); the "
        "is_padding mask passed on as vLLM passes it"
    ),
)

CPU = HookSpec(
    name="moe_topk.cpu",
    op=OP,
    module=CPU_MODULE,
    attr="_softmax_topk",
    params=("router_logits", "top_k", "renormalize"),
    make=make_cpu_softmax_topk,
    replaces="cpu_router._softmax_topk: CPURouter's softmax top-k (torch.topk + logsumexp)",
)
