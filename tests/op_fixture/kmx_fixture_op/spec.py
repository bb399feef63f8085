"""``fixture_scaled_add(x [N], y [N], alpha) -> x * alpha + y`` (x's dtype)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import Comparison, FeatureSpec, Roofline

OP_NAME = "fixture_scaled_add"
DOC = "x * alpha + y, elementwise (a test fixture op)"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FEATURE_SPECS = (
    FeatureSpec("n", "int", "elements", 1000, minimum=1),
    FeatureSpec("dtype", "str", "dtype of x and y", "fp32", choices=tuple(DTYPES)),
)
SWEEP_DEFAULTS = {"n": (1, 1000, 4099), "dtype": ("fp32", "bf16")}


def reference(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    """x [N], y [N] same dtype, alpha a float -> x * alpha + y computed in fp32, cast back."""
    return (x.float() * alpha + y.float()).to(x.dtype)


def features(x: torch.Tensor, y: torch.Tensor, alpha: float) -> dict[str, Any]:
    return {"n": int(x.shape[0]), "dtype": {v: k for k, v in DTYPES.items()}.get(x.dtype, str(x.dtype)),
            "device": x.device.type}


def validate(x: torch.Tensor, y: torch.Tensor, alpha: float) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() != 1 or x.numel() == 0:
        raise ValueError(f"x: expected a non-empty 1-D tensor, got {getattr(x, 'shape', type(x).__name__)}")
    if not isinstance(y, torch.Tensor) or y.shape != x.shape or y.dtype != x.dtype:
        raise ValueError(f"y: expected the shape and dtype of x {tuple(x.shape)} {x.dtype}")
    if x.dtype not in DTYPES.values():
        raise TypeError(f"x: expected float32 or bfloat16, got {x.dtype}")


def make_inputs(feats: Mapping[str, Any], device: Any, seed: int) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[feats["dtype"]]
    x = torch.randn(feats["n"], generator=gen).to(device=device, dtype=dtype)
    y = torch.randn(feats["n"], generator=gen).to(device=device, dtype=dtype)
    return (x, y, float(torch.rand(1, generator=gen)) * 4 - 2), {}


def compare(out: torch.Tensor, ref: torch.Tensor, feats: Mapping[str, Any]) -> Comparison:
    diff = (out.double() - ref.double()).abs()
    scale = ref.double().abs().clamp_min(1.0)
    err = float((diff / scale).max()) if out.numel() else 0.0
    if torch.isnan(out).any() and not torch.isnan(ref).any():
        return Comparison(False, {"max_rel_err": float("nan")}, "NaN in the output")
    tol = 1e-6 if feats["dtype"] == "fp32" else 1e-2
    return Comparison(err <= tol, {"max_rel_err": err}, "" if err <= tol else f"max rel err {err:.3g} > {tol}")


def fake(x: torch.Tensor, y: torch.Tensor, alpha: float) -> torch.Tensor:
    return torch.empty_like(x)


def bucket(feats: Mapping[str, Any]) -> dict[str, Any]:
    return dict(feats)


def roofline(feats: Mapping[str, Any], platform: Platform) -> Roofline:
    elem = 4 if feats["dtype"] == "fp32" else 2
    return Roofline(bytes=3.0 * feats["n"] * elem, flops=2.0 * feats["n"])
