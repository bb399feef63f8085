"""Test-only stand-in for vLLM's ``marlin_utils_fp4`` (no NVIDIA GPU or CUDA vLLM needed).

The three functions the adapter uses, with the exact signatures of vllm 0.32.0 / 0.33.0
(``SIGNATURES`` below; a test compares them with the installed vLLM where one exists)
and the checks the real ``prepare_fp4_layer_for_marlin`` makes on the module it is given
(``output_size_per_partition``, ``input_size_per_partition``, ``params_dtype``, ``weight``
of shape (N, K/2), MXFP4 because there is no ``weight_global_scale``). "Repacking" keeps
the uint8 weight viewed as int32 and transposed (the real first step) and the scales
converted to ``params_dtype`` through float8_e8m0fnu (the real conversion, so fp16's
range limits show the same way). ``apply_fp4_marlin_linear`` decodes that and computes
in float32 with the bias added before the one cast, as Marlin's epilogue does.
"""

from __future__ import annotations

import types
from typing import Any

import torch

SIGNATURES = {
    "prepare_fp4_layer_for_marlin": "(layer: torch.nn.modules.module.Module, input_dtype: torch.dtype | None = None) -> None",
    "apply_fp4_marlin_linear": (
        "(input: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, weight_global_scale: torch.Tensor | None, "
        "workspace: torch.Tensor | None, size_n: int, size_k: int, bias: torch.Tensor | None = None, "
        "input_dtype: torch.dtype | None = None, use_fp32_reduce: bool = True) -> torch.Tensor"
    ),
}

_E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])


def make_module(supported: bool = True) -> types.SimpleNamespace:
    calls: list[dict[str, Any]] = []
    prepared: list[torch.nn.Module] = []

    def is_fp4_marlin_supported() -> bool:
        return supported

    def prepare_fp4_layer_for_marlin(layer: torch.nn.Module, input_dtype: torch.dtype | None = None) -> None:
        is_nvfp4 = hasattr(layer, "weight_global_scale")
        assert not is_nvfp4, "this stand-in covers MXFP4 only"
        part_size_n = layer.output_size_per_partition
        part_size_k = layer.input_size_per_partition
        param_dtype = layer.params_dtype
        assert layer.weight.shape == (part_size_n, part_size_k // 2)
        assert layer.weight.dtype == torch.uint8 and layer.weight_scale.dtype == torch.uint8
        assert layer.weight_scale.shape == (part_size_n, part_size_k // 32)
        qweight = layer.weight.view(torch.int32).T.contiguous()
        layer.weight = torch.nn.Parameter(qweight, requires_grad=False)
        weight_scale = layer.weight_scale.T.contiguous().view(torch.float8_e8m0fnu).to(param_dtype)
        layer.weight_scale = torch.nn.Parameter(weight_scale, requires_grad=False)
        if getattr(layer, "bias", None) is not None:
            assert layer.bias.shape == (part_size_n,)
        prepared.append(layer)

    def apply_fp4_marlin_linear(
        input: torch.Tensor,
        weight: torch.Tensor,
        weight_scale: torch.Tensor,
        weight_global_scale: torch.Tensor | None,
        workspace: torch.Tensor | None,
        size_n: int,
        size_k: int,
        bias: torch.Tensor | None = None,
        input_dtype: torch.dtype | None = None,
        use_fp32_reduce: bool = True,
    ) -> torch.Tensor:
        assert weight_global_scale is None, "MXFP4 has no global scale"
        assert weight.dtype == torch.int32 and weight.shape == (size_k // 8, size_n)
        assert weight_scale.shape == (size_k // 32, size_n) and weight_scale.dtype == input.dtype
        if bias is not None:
            assert bias.shape == (size_n,) and bias.dtype == input.dtype
        calls.append({"size_n": size_n, "size_k": size_k, "bias": bias is not None, "workspace": workspace})
        packed = weight.T.contiguous().view(torch.uint8)  # [N, K/2]
        codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2).long()
        values = _E2M1.to(input.device)[codes].view(size_n, size_k // 32, 32)
        dequant = (values * weight_scale.T.float()[..., None]).view(size_n, size_k).to(input.dtype)
        out = input.float() @ dequant.float().T
        if bias is not None:
            out = out + bias.float()
        return out.to(input.dtype)

    return types.SimpleNamespace(
        is_fp4_marlin_supported=is_fp4_marlin_supported,
        prepare_fp4_layer_for_marlin=prepare_fp4_layer_for_marlin,
        apply_fp4_marlin_linear=apply_fp4_marlin_linear,
        calls=calls,
        prepared=prepared,
    )
