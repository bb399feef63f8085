"""``moe_topk_softmax``: MoE routing — softmax over routed experts, top-k, shared slots.

``moe_topk_softmax(gating_logits [T, E + S], topk, renormalize=False, num_shared=0,
is_padding=None [T] bool) -> (weights fp32 [T, k + S], ids int32 [T, k + S])``; semantics
(ties, non-finite rows, padded rows) in ``reference.py``.

Kernels: ``torch`` (the reference), ``numba`` (CPU: softmax and a Numba top-k per row;
the CPU default where numba is installed), ``torch_topk`` (CPU: softmax and one
``torch.topk`` over keys that encode the tie rule; the CPU default without numba), ``torch_compile`` (the reference
under Inductor), ``triton`` (one fused launch), ``aiter`` (ROCm ``aiter.topk_softmax``), ``vllm`` (vLLM's
compiled ``_moe_C::topk_softmax``). Registration imports none of triton, aiter or vllm.

Default priorities put the adapters that have never run on this project's machines
(``aiter``, ``vllm``: 10) below the GPU-verified ``triton`` (20): a kernel nobody here has
checked is chosen only by a rule or a measurement, never by default.
``fuse.fuse_router_weights`` builds the ``[E + S, hidden]`` gate whose matmul yields
these logits in one GEMM.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from collections.abc import Mapping
from typing import Any

from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import (
    SUPPORTED,
    Support,
    register_kernel,
    register_op,
    unsupported,
)
from kernmux.kernels.moe_topk_softmax import spec
from kernmux.kernels.moe_topk_softmax.reference import moe_topk_softmax as reference
from kernmux.kernels.moe_topk_softmax.triton_config import (
    CONFIG_SPACE as TRITON_CONFIG_SPACE,
)
from kernmux.kernels.moe_topk_softmax.triton_config import (
    MAX_EXPERTS as TRITON_MAX_EXPERTS,
)
from kernmux.kernels.moe_topk_softmax.triton_config import (
    MAX_TOPK as TRITON_MAX_TOPK,
)
from kernmux.kernels.moe_topk_softmax.triton_config import config_valid as triton_config_valid
from kernmux.kernels.moe_topk_softmax.triton_config import default_for as triton_default_for

OP_NAME = spec.OP_NAME
_PKG = "kernmux.kernels.moe_topk_softmax"

OP = register_op(spec)


# ---------------------------------------------------------------------- supports()


@functools.lru_cache(maxsize=1)
def _cpp_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "g++", "c++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _compile_supports(features: Mapping[str, Any], platform: Platform) -> Support:
    if features["device"] == "cpu" and _cpp_compiler() is None:
        return unsupported("torch.compile on CPU tensors needs a C++ compiler (none of $CXX, g++, c++, clang++ found)")
    return SUPPORTED


def _triton_supports(features: Mapping[str, Any], platform: Platform) -> Support:
    if features["device"] == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return unsupported("Triton needs GPU tensors (CPU only under TRITON_INTERPRET=1)")
    if features["experts"] > TRITON_MAX_EXPERTS:
        return unsupported(f"experts={features['experts']} > {TRITON_MAX_EXPERTS} (one tile per row)")
    if features["topk"] > TRITON_MAX_TOPK:
        return unsupported(f"topk={features['topk']} > {TRITON_MAX_TOPK} (picks are unrolled)")
    return SUPPORTED


def _torch_topk_supports(features: Mapping[str, Any], platform: Platform) -> Support:
    if features["device"] != "cpu":
        return unsupported(f"CPU tensors only (not measured on GPUs, where triton is the default), got {features['device']}")
    return SUPPORTED


def _numba_probe(platform: Platform) -> Support:
    try:
        importlib.import_module("numba")
    except Exception as e:  # e.g. "Numba needs NumPy 2.3 or less": not usable, say why
        return unsupported(f"numba is installed but does not import: {e}")
    return SUPPORTED


def _aiter_supports(features: Mapping[str, Any], platform: Platform) -> Support:
    if features["device"] != "cuda":
        return unsupported(f"aiter runs on GPU tensors (torch device 'cuda' on ROCm), got {features['device']}")
    return SUPPORTED


def _aiter_probe(platform: Platform) -> Support:
    if importlib.util.find_spec("aiter") is None:
        return unsupported("amd-aiter metadata present but module 'aiter' not importable")
    aiter = importlib.import_module("aiter")
    if not hasattr(aiter, "topk_softmax"):
        return unsupported("this aiter build has no topk_softmax")
    return SUPPORTED


def _vllm_probe(platform: Platform) -> Support:
    from kernmux.kernels.moe_topk_softmax import vllm as adapter

    try:
        adapter.load_op()
        adapter.call_plan()
    except (ImportError, ValueError) as e:
        return unsupported(str(e))
    device = "cpu" if platform.vendor == "cpu" else "cuda"
    if not adapter.has_kernel_for(device):
        return unsupported(f"{adapter.OP_NAME} has no {device} kernel in this vLLM build")
    return SUPPORTED


def _vllm_supports(features: Mapping[str, Any], platform: Platform) -> Support:
    if platform.what_if:
        return SUPPORTED  # judged on metadata only
    from kernmux.kernels.moe_topk_softmax import vllm as adapter

    if not adapter.has_kernel_for(features["device"]):
        return unsupported(f"{adapter.OP_NAME} has no kernel for {features['device']} tensors in this build")
    return SUPPORTED


# ---------------------------------------------------------------------- kernels

register_kernel(
    op=OP_NAME,
    name="torch",
    impl=reference,
    priority=0,
    doc="The reference: the unfused PyTorch chain (softmax, stable sort, renormalise, sigmoid, cat).",
)

register_kernel(
    op=OP_NAME,
    name="torch_topk",
    impl=f"{_PKG}.cpu:moe_topk_softmax",
    supports=_torch_topk_supports,
    # Above every other kernel that runs on CPU tensors (torch 0, torch_compile -5, and
    # vllm 10 where its build has a CPU kernel): the reference's full stable sort is the
    # slow part of routing on CPU (benchmarks/results/moe_topk_softmax_cpu.md).
    priority=15,
    doc="CPU: fp32 softmax, then one torch.topk over int64 keys (probability bits, then "
    "reversed index) whose order is the reference's tie rule; no sort.",
)

register_kernel(
    op=OP_NAME,
    name="numba",
    impl=f"{_PKG}.cpu_select:moe_topk_softmax",
    requires={"numba": ">=0.59"},
    supports=_torch_topk_supports,
    probe=_numba_probe,
    # Above torch_topk: the same answer without torch.topk's per-row nth_element, whose
    # mispredicted branches dominate on fresh logits (benchmarks/results/moe_topk_softmax_cpu.md).
    # Needs the "cpu" extra; without numba, torch_topk stays the CPU default.
    priority=16,
    doc="CPU: fp32 softmax, then a Numba top-k per row (group maxima bound the k-th "
    "largest, the few experts above it are ranked); bitwise the reference's answer.",
)

register_kernel(
    op=OP_NAME,
    name="torch_compile",
    impl=f"{_PKG}.compiled:moe_topk_softmax",
    requires={"torch": ">=2.4"},
    supports=_compile_supports,
    # Below the eager reference: a first call per new shape compiles for seconds (28 s
    # seen inside vLLM on CPU), so it is chosen only by a measurement or a rule.
    priority=-5,
    doc="The reference under torch.compile (Inductor), one compiled function per variant.",
)

register_kernel(
    op=OP_NAME,
    name="triton",
    impl=f"{_PKG}.triton:moe_topk_softmax",
    requires={"triton": ">=3.0"},
    supports=_triton_supports,
    config_space=TRITON_CONFIG_SPACE,
    default_config={},  # empty: the launcher's shape heuristic (triton_config.heuristic_config)
    default_for=triton_default_for,
    config_valid=triton_config_valid,
    priority=20,
    doc="One fused Triton launch: tile of rows in registers, top-k by reductions or a "
    "bitonic network; E <= 1024 (any, e.g. 160/288), k <= 16, S <= 8, fp32/bf16/fp16.",
)

register_kernel(
    op=OP_NAME,
    name="aiter",
    impl=f"{_PKG}.aiter:moe_topk_softmax",
    requires={"amd-aiter": ""},
    vendors=("rocm",),
    supports=_aiter_supports,
    config_space={"fuse_shared": (True, False)},
    default_config={"fuse_shared": True},
    probe=_aiter_probe,
    priority=10,
    doc="aiter.topk_softmax: 7-argument fused shared-expert form for amd-aiter >= 0.1.12 "
    "and S in {1,2,4,8} (non-power-of-two or > 512 experts only from 0.1.19.post1, where "
    "the workspace path honours row strides), else the 5-argument form on contiguous "
    "buffers plus a shared-slot append. Unverified on AMD hardware.",
)

register_kernel(
    op=OP_NAME,
    name="vllm",
    impl=f"{_PKG}.vllm:moe_topk_softmax",
    requires={"vllm": ""},
    supports=_vllm_supports,
    probe=_vllm_probe,
    priority=10,
    doc="vLLM's compiled _moe_C::topk_softmax (call built from the installed schema, "
    "is_padding passed where it has one); shared slots appended separately; NaN rows "
    "restored to the reference's rule. Unverified on a GPU here.",
)
