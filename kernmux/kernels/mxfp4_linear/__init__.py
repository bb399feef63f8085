"""``mxfp4_linear``: y = x @ dequant(w)^T (+ bias) with OCP MX FP4 weights.

``mxfp4_linear(x [M, K] bf16|fp16, w uint8 [N, K/2], w_scale uint8 [N, K/32], bias [N] |
None) -> [M, N]``; format in ``formats.py`` (with ``quantize_mxfp4`` to make weights),
semantics in ``reference.py``, features/tolerance/roofline in ``spec.py``.

Kernels (registration imports none of triton, aiter or vllm):

- ``torch``: the reference (float32 dequantize + matmul);
- ``dequant_cublas``: dequantize the whole weight (Triton on NVIDIA, PyTorch elsewhere),
  then ``F.linear`` (one extra pass over the weight per call, then a dense GEMM);
- ``triton``: kernmux's fused W4A16 GEMM (weights dequantized per tile, split-K for few
  rows) -- reads ~4x fewer bytes than bf16 at decode;
- ``triton_gemv``: kernmux's decode kernel (M <= 16): streams the packed weights with
  128-bit loads, split-K reduced in the same launch, CUDA-core FMAs or ``tl.dot`` by M;
- ``aiter``: AITER ``gemm_afp4wfp4`` + ``dynamic_mxfp4_quant`` on gfx950/gfx1250,
  precision class **W4A4** (a candidate only where a rule allows W4A4); unverified on
  AMD hardware;
- ``marlin``: vLLM's FP4 Marlin linear on NVIDIA sm_80+ where vLLM 0.32/0.33 is
  installed; unverified here (no NVIDIA GPU with vLLM).

Version- and platform-specific knowledge lives in
``kernmux/rules/shipped/mxfp4_linear.yaml``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import SUPPORTED, Support, register_kernel, register_op, unsupported
from kernmux.kernels.mxfp4_linear import spec, triton_config, triton_gemv_config
from kernmux.kernels.mxfp4_linear.dequant import CONFIG_SPACE as DEQUANT_CONFIG_SPACE
from kernmux.kernels.mxfp4_linear.dequant import DEFAULT_CONFIG as DEQUANT_DEFAULT_CONFIG
from kernmux.kernels.mxfp4_linear.formats import dequantize_mxfp4, quantize_mxfp4  # noqa: F401 - public helpers
from kernmux.kernels.mxfp4_linear.reference import mxfp4_linear as reference

OP = register_op(spec)
OP_NAME = OP.name
_PKG = "kernmux.kernels.mxfp4_linear"
AITER_ARCHES = ("gfx950", "gfx1250")


def _sm_version(arch: str) -> int | None:
    if arch.startswith("sm_"):
        digits = "".join(ch for ch in arch[3:] if ch.isdigit())
        return int(digits) if digits else None
    return None


def _triton_supports(feats: Mapping[str, Any], platform: Platform) -> Support:
    if feats["device"] == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return unsupported("CPU tensors run Triton only under TRITON_INTERPRET=1")
    if feats["device"] not in ("cpu", "cuda"):
        return unsupported(f"Triton needs CUDA (or CPU under the interpreter) tensors, got {feats['device']}")
    sm = _sm_version(platform.arch)
    if feats["device"] == "cuda" and sm is not None and sm < 80:
        return unsupported(f"bf16 tensor-core dots need sm_80 or newer, platform is {platform.arch}")
    return SUPPORTED


def _gemv_supports(feats: Mapping[str, Any], platform: Platform) -> Support:
    if feats["tokens"] > triton_gemv_config.MAX_TOKENS:
        return unsupported(f"decode kernel: M <= {triton_gemv_config.MAX_TOKENS} rows, got {feats['tokens']} (the triton GEMM takes larger M)")
    return _triton_supports(feats, platform)


def _aiter_supports(feats: Mapping[str, Any], platform: Platform) -> Support:
    """Structural limits; version-specific AITER knowledge is in the rules."""
    if feats["device"] != "cuda":
        return unsupported(f"AITER needs GPU tensors (torch device 'cuda' on ROCm), got {feats['device']!r}")
    if platform.arch not in AITER_ARCHES:
        return unsupported(
            f"AITER's FP4 GEMM asserts arch_info.is_fp4_avail(): {'/'.join(AITER_ARCHES)} only "
            f"(ROCm/aiter v0.1.20.post1), platform is {platform.arch}"
        )
    return SUPPORTED


def _marlin_supports(feats: Mapping[str, Any], platform: Platform) -> Support:
    if feats["device"] != "cuda":
        return unsupported(f"Marlin needs CUDA tensors, got {feats['device']!r}")
    sm = _sm_version(platform.arch)
    if sm is None or sm < 80:
        return unsupported(f"Marlin FP4 is used here on sm_80 or newer, platform is {platform.arch}")
    return SUPPORTED


def _aiter_probe(platform: Platform) -> Support:
    from kernmux.kernels.mxfp4_linear.aiter import probe

    probe()
    return SUPPORTED


def _marlin_probe(platform: Platform) -> Support:
    from kernmux.kernels.mxfp4_linear.marlin import probe

    ok, reason = probe()
    return SUPPORTED if ok else unsupported(reason)


register_kernel(
    op=OP_NAME,
    name="torch",
    impl=reference,
    priority=0,
    doc="PyTorch reference: float32 dequantize and matmul (materialises the float32 weight)",
)

register_kernel(
    op=OP_NAME,
    name="dequant_cublas",
    impl=f"{_PKG}.dequant:mxfp4_linear_dequant_cublas",
    config_space=DEQUANT_CONFIG_SPACE,
    default_config=DEQUANT_DEFAULT_CONFIG,
    priority=10,
    doc="dequantize the weight to x's dtype (Triton on NVIDIA, PyTorch elsewhere), then F.linear (cuBLAS)",
)

register_kernel(
    op=OP_NAME,
    name="triton",
    impl=f"{_PKG}.triton:mxfp4_linear_triton",
    requires={"triton": ">=3.0"},
    vendors=("cuda", "cpu"),
    supports=_triton_supports,
    config_space=triton_config.CONFIG_SPACE,
    default_config=triton_config.DEFAULT_CONFIG,
    config_valid=triton_config.config_valid,
    priority=20,
    doc="fused W4A16 Triton GEMM: E2M1 tiles dequantized in registers or tl.dot_scaled, split-K for few rows",
)

register_kernel(
    op=OP_NAME,
    name="triton_gemv",
    impl=f"{_PKG}.triton_gemv:mxfp4_linear_triton_gemv",
    requires={"triton": ">=3.0"},
    vendors=("cuda", "cpu"),
    supports=_gemv_supports,
    config_space=triton_gemv_config.CONFIG_SPACE,
    default_config=triton_gemv_config.DEFAULT_CONFIG,
    config_valid=triton_gemv_config.config_valid,
    priority=25,
    doc="MX FP4 decode kernel (M <= 16): 128-bit weight streaming, split-K reduced in one launch, FMA or tl.dot by M",
)

register_kernel(
    op=OP_NAME,
    name="aiter",
    impl=f"{_PKG}.aiter:mxfp4_linear_aiter",
    requires={"amd-aiter": ">=0.1.5"},
    vendors=("rocm",),
    supports=_aiter_supports,
    probe=_aiter_probe,
    precision="W4A4",
    priority=30,
    doc="AITER dynamic_mxfp4_quant + gemm_afp4wfp4 (activations quantized: W4A4); unverified on AMD hardware",
)

register_kernel(
    op=OP_NAME,
    name="marlin",
    impl=f"{_PKG}.marlin:mxfp4_linear_marlin",
    requires={"vllm": ">=0.32.0,<0.34"},
    vendors=("cuda",),
    supports=_marlin_supports,
    probe=_marlin_probe,
    priority=15,
    doc="vLLM's FP4 Marlin linear (weight-only); unverified here (needs an NVIDIA GPU and vLLM 0.32/0.33)",
)
