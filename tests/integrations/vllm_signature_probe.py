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
    import vllm.envs as envs

    out["VLLM_MOE_SKIP_PADDING"] = bool(envs.VLLM_MOE_SKIP_PADDING)
    out["hooks"] = {name: {"status": h["status"], "reason": h["reason"]} for name, h in plugin.state()["hooks"].items()}
    sys.stdout.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
