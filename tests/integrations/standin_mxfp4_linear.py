"""A stand-in for ``vllm.model_executor.kernels.linear`` as far as the ``mxfp4_linear.kernel``
hook reads it: ``init_mxfp4_linear_kernel(activation_quant_key=None)`` walking
``_POSSIBLE_MXFP4_KERNELS[current_platform._enum]`` the way vllm 0.32.0/0.33.0 do (skip
``VLLM_DISABLED_KERNELS``, ``is_supported()``, [0.33: ``_supports_quant_scheme``],
``can_implement(config)``, instantiate), and kernel classes named as vLLM's with their
``can_implement`` rules (read from ``kernels/linear/mxfp4/{marlin,aiter,emulation,
flashinfer}.py``). Instances record which layer they prepared and ran.
"""

from __future__ import annotations

import enum
import types
from dataclasses import dataclass
from typing import Any


class PlatformEnum(enum.Enum):
    CUDA = 1
    ROCM = 2
    CPU = 5


class QuantKey(str):
    pass


kMxfp4Static = QuantKey("mxfp4-static")
kMxfp4Dynamic = QuantKey("mxfp4-dynamic")
kFp8Dynamic = QuantKey("fp8-dynamic")


@dataclass
class MxFp4LinearLayerConfig:
    activation_quant_key: QuantKey | None = None


class MxFp4LinearKernel:
    SUPPORTED = True

    def __init__(self, config: MxFp4LinearLayerConfig) -> None:
        assert self.can_implement(config)[0]
        assert self.is_supported()[0]
        self.config = config
        self.prepared: list[Any] = []
        self.applied = 0

    @classmethod
    def is_supported(cls, compute_capability: int | None = None) -> tuple[bool, str | None]:
        return (True, None) if cls.SUPPORTED else (False, f"{cls.__name__} not available (stand-in)")

    def process_weights_after_loading(self, layer: Any) -> None:
        self.prepared.append(layer)

    def apply_weights(self, layer: Any, x: Any, bias: Any = None) -> Any:
        self.applied += 1
        return (type(self).__name__, x, bias)


class FlashInferMxFp4LinearKernel(MxFp4LinearKernel):
    @classmethod
    def can_implement(cls, config):
        ok = config.activation_quant_key == kMxfp4Dynamic
        return ok, None if ok else "W4A4 only"


class MarlinMxFp4LinearKernel(MxFp4LinearKernel):
    @classmethod
    def can_implement(cls, config):
        ok = config.activation_quant_key in (None, kMxfp4Dynamic)
        return ok, None if ok else "only supports MXFP4 dynamic or unquantized activations"


class AiterMxfp4LinearKernel(MxFp4LinearKernel):
    @classmethod
    def can_implement(cls, config):
        ok = config.activation_quant_key == kMxfp4Dynamic
        return ok, None if ok else "AITER MXFP4 linear needs dynamic MXFP4 activations"


class EmulationMxfp4LinearKernel(MxFp4LinearKernel):
    HAS_QUARK = True

    @classmethod
    def can_implement(cls, config):
        if config.activation_quant_key not in (None, kMxfp4Dynamic):
            return False, "only supports MXFP4 or MXFP6 or unquantized activations"
        return (True, None) if cls.HAS_QUARK else (False, "amd-quark package not available")


def make(platform: PlatformEnum = PlatformEnum.CUDA, *, version: str = "0.32", linear_backend: str = "auto") -> types.ModuleType:
    module = types.ModuleType("vllm.model_executor.kernels.linear")
    module.current_platform = types.SimpleNamespace(_enum=platform)
    module.envs = types.SimpleNamespace(VLLM_DISABLED_KERNELS=[], VLLM_BATCH_INVARIANT=False)
    module.kMxfp4Static = kMxfp4Static
    classes = {c.__name__: c for c in (FlashInferMxFp4LinearKernel, MarlinMxFp4LinearKernel,
                                       AiterMxfp4LinearKernel, EmulationMxfp4LinearKernel)}
    if version == "0.33":  # 0.33 adds _supports_quant_scheme (MXFP4 weights x None|MXFP4 activations)
        classes = {
            name: type(name, (cls,), {"_supports_quant_scheme": classmethod(
                lambda c, weight_key, activation_key: weight_key == kMxfp4Static and activation_key in (None, kMxfp4Dynamic))})
            for name, cls in classes.items()
        }
    for name, cls in classes.items():
        setattr(module, name, cls)
    module._POSSIBLE_MXFP4_KERNELS = {
        PlatformEnum.CUDA: [classes["FlashInferMxFp4LinearKernel"], classes["MarlinMxFp4LinearKernel"],
                            classes["EmulationMxfp4LinearKernel"]],
        PlatformEnum.ROCM: [classes["AiterMxfp4LinearKernel"], classes["EmulationMxfp4LinearKernel"]],
    }
    module._get_linear_backend = lambda *, quantization: linear_backend

    def init_mxfp4_linear_kernel(activation_quant_key: QuantKey | None = None) -> MxFp4LinearKernel:
        config = MxFp4LinearLayerConfig(activation_quant_key=activation_quant_key)
        reasons = []
        for cls in module._POSSIBLE_MXFP4_KERNELS.get(module.current_platform._enum, []):
            if cls.__name__ in module.envs.VLLM_DISABLED_KERNELS:
                continue
            ok, why = cls.is_supported()
            if ok and hasattr(cls, "_supports_quant_scheme"):
                ok, why = cls._supports_quant_scheme(kMxfp4Static, activation_quant_key), "scheme"
            if ok:
                ok, why = cls.can_implement(config)
            if ok:
                return cls(config)
            reasons.append(f"{cls.__name__}: {why}")
        raise ValueError("Failed to find a kernel that can implement the MXFP4 linear layer. " + "; ".join(reasons))

    init_mxfp4_linear_kernel.__module__ = module.__name__
    module.init_mxfp4_linear_kernel = init_mxfp4_linear_kernel
    return module
