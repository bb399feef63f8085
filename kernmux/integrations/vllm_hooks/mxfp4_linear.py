"""MXFP4 linear layers: kernmux's ``mxfp4_linear`` decision drives vLLM's kernel choice.

Where vLLM 0.32 and 0.33 decide it. Every MXFP4 linear scheme (Quark OCP MX,
compressed-tensors W4A4 MXFP4, INC, online MXFP4) calls
``vllm.model_executor.kernels.linear.init_mxfp4_linear_kernel(activation_quant_key=None)``
once per layer; it walks ``_POSSIBLE_MXFP4_KERNELS[platform]`` (CUDA: FlashInfer >
Marlin > Humming > B12x > Emulation; ROCm: [0.33: RDNA3 W4A8 >] AITER > Emulation) and
returns an instance of the first class that is supported, not disabled and can
implement the config. The scheme then calls the instance's
``process_weights_after_loading(layer)`` (which repacks the layer's weights for that
kernel) and ``apply_weights(layer, x, bias)`` per forward. (The MXFP4 *MoE* oracle,
``fused_moe.oracle.mxfp4.select_mxfp4_moe_backend``, chooses grouped MoE kernels: a
different computation from this op, so kernmux's ``mxfp4_linear`` decision does not
drive it.)

The hook returns a stand-in for vLLM's instance. When the layer's weights are known
(``process_weights_after_loading``: ``n``, ``k``, dtype, bias) it asks kernmux for the
``mxfp4_linear`` decision at ``KERNMUX_VLLM_MXFP4_TOKENS`` rows (default 16, a decode
batch: vLLM fixes one kernel per layer for every batch size, because the weights are
repacked for it) and maps the kernel kernmux chose to the vLLM class that runs the same
computation:

==============  =================================  ===========================================
kernmux kernel  vLLM class                         same computation because
==============  =================================  ===========================================
marlin          ``MarlinMxFp4LinearKernel``        kernmux's adapter calls the same
                                                   ``prepare_fp4_layer_for_marlin`` +
                                                   ``apply_fp4_marlin_linear``
aiter (W4A4)    ``AiterMxfp4LinearKernel``         ``dynamic_mxfp4_quant`` + ``gemm_afp4wfp4``
                                                   (AITER's ASM variant where vLLM enables it)
dequant_cublas  ``EmulationMxfp4LinearKernel``     dequantize the weight to x's dtype, then
                                                   ``F.linear`` -- without activation QDQ only
torch, triton   none                               vLLM has no fp32-reference or Triton MXFP4
                                                   linear kernel: vLLM's choice stays
==============  =================================  ===========================================

The switch keeps the precision class the checkpoint declares: a layer whose config
quantizes activations (``activation_quant_key`` set, e.g. ``kMxfp4Dynamic``) only moves
to a W4A4 kernel, a weight-only layer only to a W4A16 one. It also needs the class to be
in vLLM's list for this platform, not in ``VLLM_DISABLED_KERNELS``, supported here,
accepting the quantization scheme (0.33) and able to implement the config. vLLM's choice
stays, with a log line, when anything of that fails, when kernmux chose a kernel vLLM
does not have, when the user picked a linear backend (``--linear-backend``), under
``VLLM_BATCH_INVARIANT``, or when kernmux cannot decide.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from typing import Any

from kernmux.integrations.vllm_hooks.base import HookRuntime, HookSpec

log = logging.getLogger("kernmux")

MODULE = "vllm.model_executor.kernels.linear"
OP = "mxfp4_linear"
TOKENS_ENV = "KERNMUX_VLLM_MXFP4_TOKENS"
DEFAULT_TOKENS = 16
# kernmux kernel -> (vLLM class name, precision class the switch needs: "W4A16" for a
# weight-only config, "W4A4" for a config that quantizes activations).
VLLM_KERNELS: dict[str, tuple[str, str]] = {
    "marlin": ("MarlinMxFp4LinearKernel", "W4A16"),
    "dequant_cublas": ("EmulationMxfp4LinearKernel", "W4A16"),
    "aiter": ("AiterMxfp4LinearKernel", "W4A4"),
}
NO_VLLM_KERNEL = {
    "torch": "kernmux's float32 reference; vLLM has no float32 MXFP4 linear kernel",
    "triton": "kernmux's fused W4A16 Triton GEMM; vLLM 0.32/0.33 have no Triton MXFP4 linear kernel",
}


def _vllm_pieces_missing(module: Any) -> str | None:
    for name in ("_POSSIBLE_MXFP4_KERNELS", "current_platform", "envs"):
        if not hasattr(module, name):
            return f"{MODULE} has no {name} in this vLLM (the hook reads vLLM's kernel list)"
    return None


def decision_tokens() -> int:
    text = os.environ.get(TOKENS_ENV, "").strip()
    if not text:
        return DEFAULT_TOKENS
    try:
        tokens = int(text)
    except ValueError:
        tokens = 0
    if tokens < 1:
        log.warning("kernmux: %s=%r is not a positive integer; deciding at %d rows", TOKENS_ENV, text, DEFAULT_TOKENS)
        return DEFAULT_TOKENS
    return tokens


def layer_features(layer: Any, tokens: int) -> dict[str, Any] | str:
    """The op's features for a vLLM MXFP4 linear layer before its weights are repacked
    (``weight`` uint8 [N, K/2] packed E2M1, ``weight_scale`` uint8 [N, K/32]), or why not."""
    weight = getattr(layer, "weight", None)
    if weight is None or getattr(weight, "dim", lambda: 0)() != 2 or str(weight.dtype) != "torch.uint8":
        return f"layer weight is not packed MXFP4 (got {getattr(weight, 'dtype', None)} {tuple(getattr(weight, 'shape', ()))})"
    dtype = {"torch.bfloat16": "bf16", "torch.float16": "fp16"}.get(str(getattr(layer, "params_dtype", None)))
    if dtype is None:
        return f"activation dtype {getattr(layer, 'params_dtype', None)} (the op takes bf16/fp16)"
    return {
        "tokens": int(tokens),
        "n": int(weight.shape[0]),
        "k": int(weight.shape[1]) * 2,
        "dtype": dtype,
        "bias": getattr(layer, "bias", None) is not None,
        "device": weight.device.type,
    }


def class_problem(module: Any, cls: Any, config: Any) -> str | None:
    """Why vLLM would not run ``cls`` for ``config`` here, or None."""
    platform = module.current_platform
    if cls not in module._POSSIBLE_MXFP4_KERNELS.get(getattr(platform, "_enum", None), []):
        return f"{cls.__name__} is not in vLLM's MXFP4 kernel list for this platform"
    if cls.__name__ in getattr(module.envs, "VLLM_DISABLED_KERNELS", ()):
        return f"{cls.__name__} is in VLLM_DISABLED_KERNELS"
    supported, reason = cls.is_supported()
    if not supported:
        return f"{cls.__name__} is not supported here: {reason}"
    scheme = getattr(cls, "_supports_quant_scheme", None)  # 0.33: checked with the module's kMxfp4Static
    if scheme is not None and not scheme(getattr(module, "kMxfp4Static", None), config.activation_quant_key):
        return f"{cls.__name__} does not implement MXFP4 x {config.activation_quant_key}"
    ok, reason = cls.can_implement(config)
    return None if ok else f"{cls.__name__} cannot implement the layer: {reason}"


def user_choice(module: Any) -> str | None:
    """A setting under which vLLM's own choice must stand."""
    if getattr(module.envs, "VLLM_BATCH_INVARIANT", False):
        return "VLLM_BATCH_INVARIANT is set"
    get_backend = getattr(module, "_get_linear_backend", None)
    backend = get_backend(quantization="mxfp4") if get_backend is not None else "auto"
    return None if backend == "auto" else f"--linear-backend {backend!r} chosen by the user"


def decide(features: dict[str, Any]) -> Any:
    """kernmux's decision for ``mxfp4_linear`` at ``features`` (the process-wide dispatcher:
    rules, tuning database, self-check; logged and kept for the statistics dump)."""
    from kernmux.runtime import default_dispatcher

    return default_dispatcher().decide(OP, features)


def choose(module: Any, vllm_kernel: Any, layer: Any, runtime: HookRuntime) -> Any:
    """The kernel instance to run for ``layer``: the vLLM class mapped from kernmux's
    decision, or ``vllm_kernel`` (vLLM's own) with a log line saying why."""

    def keep(why: str) -> Any:
        runtime.passthrough()
        log.info("kernmux: MXFP4 linear %s keeps vLLM's %s: %s", _layer_name(layer), type(vllm_kernel).__name__, why)
        return vllm_kernel

    config = vllm_kernel.config
    why = user_choice(module)
    if why:
        return keep(why)
    features = layer_features(layer, decision_tokens())
    if isinstance(features, str):
        return keep(features)
    from kernmux.dispatch.resolver import NoKernelError

    try:
        decision = decide(features)
    except NoKernelError as e:
        return keep(f"kernmux has no kernel for it ({e})")
    if decision.kernel in NO_VLLM_KERNEL:
        return keep(f"kernmux chose {decision.kernel} ({decision.source}): {NO_VLLM_KERNEL[decision.kernel]}")
    name, precision = VLLM_KERNELS.get(decision.kernel, (None, ""))
    if name is None:
        return keep(f"kernmux chose {decision.kernel}, which no vLLM MXFP4 linear kernel runs")
    declared = "W4A16" if config.activation_quant_key is None else "W4A4"
    if precision != declared:
        return keep(
            f"kernmux chose {decision.kernel} ({precision}) but the layer's config is {declared} "
            f"(activation_quant_key={config.activation_quant_key})"
        )
    cls = getattr(module, name, None)
    if cls is None:
        return keep(f"this vLLM has no {name}")
    problem = class_problem(module, cls, config)
    if problem:
        return keep(problem)
    runtime.hit()
    if type(vllm_kernel) is cls:
        log.info("kernmux: MXFP4 linear %s: kernmux's %s (%s) is vLLM's choice too: %s",
                 _layer_name(layer), decision.kernel, decision.source, name)
        return vllm_kernel
    log.info("kernmux: MXFP4 linear %s: %s instead of vLLM's %s (kernmux: %s by %s at %d rows)",
             _layer_name(layer), name, type(vllm_kernel).__name__, decision.kernel, decision.source, features["tokens"])
    return cls(config)


def _layer_name(layer: Any) -> str:
    prefix = getattr(layer, "prefix", None) or getattr(layer, "layer_name", None)
    weight = getattr(layer, "weight", None)
    shape = tuple(getattr(weight, "shape", ()))
    return f"{prefix} {shape}" if prefix else str(shape)


class Mxfp4KernelChoice:
    """What ``init_mxfp4_linear_kernel`` returns under kernmux: vLLM's kernel until the
    layer's weights are known, then the one :func:`choose` picks (once per layer)."""

    def __init__(self, vllm_kernel: Any, module: Any, runtime: HookRuntime) -> None:
        self.vllm_kernel = vllm_kernel
        self.kernel = vllm_kernel
        self._module = module
        self._runtime = runtime
        self._chosen = False

    def process_weights_after_loading(self, layer: Any) -> None:
        if not self._chosen:
            self._chosen = True
            if not self._runtime.disabled:
                try:
                    self.kernel = choose(self._module, self.vllm_kernel, layer, self._runtime)
                except Exception as e:
                    self._runtime.fail(e)
                    self.kernel = self.vllm_kernel
        self.kernel.process_weights_after_loading(layer)

    def apply_weights(self, layer: Any, x: Any, bias: Any = None) -> Any:
        return self.kernel.apply_weights(layer, x, bias)

    def __getattr__(self, name: str) -> Any:
        # Anything else (config, use_asm_gemm, ...) is the chosen kernel's.
        if name in ("kernel", "vllm_kernel"):
            raise AttributeError(name)
        return getattr(self.kernel, name)


def make_init_kernel(runtime: HookRuntime, original: Callable[..., Any]) -> Callable[..., Any]:
    """Replacement for ``init_mxfp4_linear_kernel(activation_quant_key=None)``: vLLM's
    selection runs first (it raises as vLLM does when nothing implements the layer)."""

    def init_mxfp4_linear_kernel(*args: Any, **kwargs: Any) -> Any:
        kernel = original(*args, **kwargs)
        if runtime.disabled:
            return kernel
        module = sys.modules.get(getattr(original, "__module__", ""), None) or sys.modules.get(MODULE)
        return Mxfp4KernelChoice(kernel, module, runtime)

    init_mxfp4_linear_kernel.__wrapped__ = original  # type: ignore[attr-defined]
    return init_mxfp4_linear_kernel


LINEAR = HookSpec(
    name="mxfp4_linear.kernel",
    op=OP,
    module=MODULE,
    attr="init_mxfp4_linear_kernel",
    params=("activation_quant_key",),
    make=make_init_kernel,
    replaces=(
        "kernels.linear.init_mxfp4_linear_kernel: the per-layer choice of the MXFP4 linear "
        "kernel (FlashInfer/Marlin/Humming/B12x/Emulation on CUDA, AITER/Emulation on ROCm) "
        "is driven by kernmux's mxfp4_linear decision where a vLLM kernel runs the same computation"
    ),
    skip_if=_vllm_pieces_missing,
)
