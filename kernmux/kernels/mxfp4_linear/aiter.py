"""AITER adapter: ``dynamic_mxfp4_quant`` on x, then the Triton ``gemm_afp4wfp4`` (W4A4).

Precision class W4A4: AITER quantizes the activations to MX FP4 too, so the answer is
coarser than the op's W4A16 reference. It is checked against ``mxfp4_linear_w4a4``
(x quantized the way ``dynamic_mxfp4_quant`` does) and is a candidate only where a rule
allows W4A4 for ``mxfp4_linear`` (``allow_precision: [W4A4]``; none is shipped).

Not verified on AMD hardware (none here): the call is tested against a stand-in module
(tests/kernels/stand_ins/aiter_mxfp4.py). Facts, read from ROCm/aiter at the tags named:

- ``gemm_afp4wfp4(x, w, x_scales, w_scales, dtype=bf16, y=None, config=None)``: x uint8
  [M, K/2], w uint8 [N, K/2] (transposed inside), x_scales [M, K/32], w_scales [N, K/32],
  both E8M0 and read through their strides; output bf16 or fp16. The same positional
  order from v0.1.2 to v0.1.20.post1 (v0.1.20 adds ``skip_reduce``). Module
  ``aiter.ops.triton.gemm_afp4wfp4`` up to v0.1.9, ``aiter.ops.triton.gemm.basic.
  gemm_afp4wfp4`` from v0.1.10 (the old name stays importable through the
  ``_BACKWARD_COMPAT_MAP`` of ``aiter/ops/triton/__init__.py`` from v0.1.10 on; vLLM
  0.32/0.33 import the old name).
- ``dynamic_mxfp4_quant(x) -> (x_fp4 uint8 [M, K/2], scales uint8 [M, K/32])``, the
  scales a transposed view; ``aiter.ops.triton.quant`` in every tag checked.
- ``arch_info.is_fp4_avail()``: gfx950 only up to v0.1.11.post1, gfx950 and gfx1250
  from v0.1.12; the GEMM asserts it.
- Before v0.1.12 the kernel loads scales without a mask when K is not a multiple of
  BLOCK_SIZE_K (up to 1024 in the shipped configs): out-of-range bytes, possibly 0xFF =
  NaN, enter the product (fixed by "Fix scale masking", PR #2671). A rule denies those K.
- The ASM ``gemm_a4w4`` is not used here: it needs pre-shuffled weights and scales,
  changed its return convention in v0.1.9 (an older-style ``out`` argument lands in
  ``bias``, vLLM PR #40754) and gives garbage for ``K % 256 != 0`` (ROCm/aiter#4176).

The bias (AITER's GEMM has none) is added to the rounded output, as vLLM's
``AiterMxfp4LinearKernel.apply_weights`` does.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch

from kernmux.dispatch.outputs import empty_output

GEMM_MODULES = ("aiter.ops.triton.gemm.basic.gemm_afp4wfp4", "aiter.ops.triton.gemm_afp4wfp4")
QUANT_MODULES = ("aiter.ops.triton.quant",)


def _first(modules: tuple[str, ...], attr: str):
    errors = []
    for name in modules:
        try:
            return getattr(importlib.import_module(name), attr)
        except (ImportError, AttributeError) as e:
            errors.append(f"{name}.{attr}: {type(e).__name__}: {e}")
    raise ImportError("AITER FP4 entry point not found (" + "; ".join(errors) + ")")


def load_functions():
    """(gemm_afp4wfp4, dynamic_mxfp4_quant) from the installed AITER."""
    return _first(GEMM_MODULES, "gemm_afp4wfp4"), _first(QUANT_MODULES, "dynamic_mxfp4_quant")


def mxfp4_linear_aiter(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [M, K] bf16|fp16, w uint8 [N, K/2], w_scale uint8 [N, K/32], bias [N] | None ->
    [M, N] in x's dtype, activations quantized to MX FP4 (W4A4)."""
    gemm, quantize = load_functions()
    x_fp4, x_scales = quantize(x)
    y = empty_output((x.shape[0], w.shape[0]), x.dtype, x.device)
    gemm(x_fp4, w, x_scales, w_scale, x.dtype, y)
    if bias is not None:
        if bias.dtype == y.dtype:
            y += bias
        else:
            y.copy_(y.float() + bias)
    return y


def probe() -> bool:
    """The entry points import (the real platform only: importing AITER probes ROCm)."""
    load_functions()
    return True
