"""Run inside the vLLM venv (by test_vllm_signatures.py): install the kernmux plugin, import
every hooked vLLM module, and print one JSON line with each hook's state and the real
signatures of the functions the hooks replace or read.

Signatures are given as [name, kind, has_default] per parameter, read with
``inspect.signature`` from the installed vLLM, never from a copy of its source.
"""

from __future__ import annotations

import importlib
import inspect
import json
import sys


def describe(fn):
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError) as e:
        return f"unreadable: {e}"
    return [[p.name, p.kind.name, p.default is not inspect.Parameter.empty] for p in params]


def main() -> None:
    import vllm

    from kernmux.integrations import vllm as plugin

    plugin.register()
    targets = {}
    for specs in plugin.SUPPORTED_VERSIONS.values():
        for spec in specs:
            targets[spec.name] = (spec.module, spec.attr)
    out = {"vllm": vllm.__version__, "signatures": {}, "errors": {}}
    extra = {
        "fused.vllm_topk_softmax": ("vllm.model_executor.layers.fused_moe.router.fused_topk_router", "vllm_topk_softmax"),
        "fused._get_padding_mask": ("vllm.model_executor.layers.fused_moe.router.fused_topk_router", "_get_padding_mask"),
        "custom_ops.topk_softmax": ("vllm._custom_ops", "topk_softmax"),
    }
    for key, (module, attr) in {**targets, **extra}.items():
        try:
            fn = getattr(importlib.import_module(module), attr)
            # A hooked target is the replacement now: describe what it wraps.
            out["signatures"][key] = describe(getattr(fn, "__wrapped__", fn))
        except Exception as e:  # reported, asserted on by the test
            out["errors"][key] = f"{type(e).__name__}: {e}"
    try:
        from vllm._aiter_ops import rocm_aiter_ops

        out["signatures"]["aiter_ops.topk_softmax"] = describe(rocm_aiter_ops.topk_softmax)
    except Exception as e:
        out["errors"]["aiter_ops.topk_softmax"] = f"{type(e).__name__}: {e}"
    moe = "vllm.model_executor.layers.fused_moe"
    methods = {
        "experts.cpu.apply": (f"{moe}.experts.cpu_moe", "CPUUnquantizedExperts", "apply"),
        "experts.cpu.process_weights_after_loading": (f"{moe}.experts.cpu_moe", "CPUUnquantizedExperts",
                                                      "process_weights_after_loading"),
        "experts.triton.apply": (f"{moe}.experts.triton_moe", "TritonExperts", "apply"),
        "mxfp4.apply_weights": ("vllm.model_executor.kernels.linear.mxfp4.base", "MxFp4LinearKernel", "apply_weights"),
        "mxfp4.process_weights_after_loading": ("vllm.model_executor.kernels.linear.mxfp4.base", "MxFp4LinearKernel",
                                                "process_weights_after_loading"),
        "mxfp4.is_supported": ("vllm.model_executor.kernels.linear.mxfp4.base", "MxFp4LinearKernel", "is_supported"),
        "mxfp4.can_implement": ("vllm.model_executor.kernels.linear.mxfp4.base", "MxFp4LinearKernel", "can_implement"),
        "mxfp4._get_linear_backend": ("vllm.model_executor.kernels.linear", None, "_get_linear_backend"),
    }
    for key, (module, cls, attr) in methods.items():
        try:
            owner = importlib.import_module(module)
            owner = getattr(owner, cls) if cls else owner
            out["signatures"][key] = describe(getattr(owner, attr))
        except Exception as e:
            out["errors"][key] = f"{type(e).__name__}: {e}"
    out["attrs"] = {}
    try:
        import dataclasses

        from vllm.model_executor.layers.fused_moe import config as moe_config
        from vllm.model_executor.layers.fused_moe.activation import MoEActivation
        from vllm.model_executor.layers.fused_moe.experts import cpu_moe
        from vllm.model_executor.layers.fused_moe.oracle.unquantized import UnquantizedMoeBackend

        out["attrs"]["FusedMoEConfig"] = sorted(
            [f.name for f in dataclasses.fields(moe_config.FusedMoEConfig)]
            + [n for n, v in vars(moe_config.FusedMoEConfig).items() if isinstance(v, property)]
        )
        out["attrs"]["FusedMoEParallelConfig"] = sorted(
            [f.name for f in dataclasses.fields(moe_config.FusedMoEParallelConfig)]
            + [n for n, v in vars(moe_config.FusedMoEParallelConfig).items() if isinstance(v, property)]
        )
        out["attrs"]["MoEActivation.SILU"] = MoEActivation.SILU.name
        out["attrs"]["UnquantizedMoeBackend"] = [b.name for b in UnquantizedMoeBackend]
        out["attrs"]["cpu_classes"] = {
            name: [k.__name__ for k in getattr(cpu_moe, name).__mro__]
            for name in ("CPUUnquantizedExperts", "X86CPUUnquantizedExperts", "ArmCPUUnquantizedExperts",
                         "PowerCPUUnquantizedExperts")
        }
        from vllm.model_executor.kernels import linear

        out["attrs"]["mxfp4_classes"] = sorted(
            name for name in ("MarlinMxFp4LinearKernel", "AiterMxfp4LinearKernel", "EmulationMxfp4LinearKernel")
            if isinstance(getattr(linear, name, None), type)
        )
        out["attrs"]["mxfp4_lists"] = {str(k): [c.__name__ for c in v] for k, v in linear._POSSIBLE_MXFP4_KERNELS.items()}
        out["attrs"]["MxFp4LinearLayerConfig"] = [f.name for f in dataclasses.fields(linear.MxFp4LinearLayerConfig)]
        # The hooked selection on the CPU platform behaves as vLLM's: no MXFP4 linear kernel.
        try:
            linear.init_mxfp4_linear_kernel()
            out["attrs"]["mxfp4_cpu_selection"] = "returned"
        except ValueError as e:
            out["attrs"]["mxfp4_cpu_selection"] = f"ValueError: {str(e).splitlines()[0]}"
    except Exception as e:
        out["errors"]["attrs"] = f"{type(e).__name__}: {e}"

    import vllm.envs as envs

    out["VLLM_MOE_SKIP_PADDING"] = bool(envs.VLLM_MOE_SKIP_PADDING)
    out["VLLM_BATCH_INVARIANT"] = bool(envs.VLLM_BATCH_INVARIANT)
    out["hooks"] = {name: {"status": h["status"], "reason": h["reason"]} for name, h in plugin.state()["hooks"].items()}
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
