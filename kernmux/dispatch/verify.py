"""Run kernels against their op's reference on fresh random inputs.

Shared by ``kernmux verify``, the tuner's numerics gate and the benchmarks' parity
checks: inputs drawn by the op's ``make_inputs`` with a fresh seed, outputs of the
kernel poisoned before the call (NaN / int-min), compared with ``op.compare``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kernmux.dispatch.outputs import poisoned_outputs
from kernmux.dispatch.platform import Platform, current_platform
from kernmux.dispatch.registry import REGISTRY, Registry
from kernmux.dispatch.transforms import apply_transform
from kernmux.dispatch.rule_model import TransformSpec


@dataclass(frozen=True)
class VerifyResult:
    """status: "pass", "fail" (numerics), "error" (raised), "unavailable", "unsupported"."""

    op: str
    kernel: str
    features: Mapping[str, Any]
    status: str
    metrics: Mapping[str, float] = field(default_factory=dict)
    detail: str = ""
    seed: int = 0
    transform: str = ""
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def as_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "kernel": self.kernel,
            "features": dict(self.features),
            "status": self.status,
            "passed": self.passed,
            "metrics": dict(self.metrics),
            "detail": self.detail,
            "seed": self.seed,
            "transform": self.transform,
        }


def _clone(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.clone()
    return value


def verify_kernel(
    op_name: str,
    kernel_name: str,
    features: Mapping[str, Any],
    *,
    seed: int = 0,
    device: str | None = None,
    config: Mapping[str, Any] | None = None,
    transform: TransformSpec | None = None,
    platform: Platform | None = None,
    registry: Registry = REGISTRY,
    check_support: bool = True,
) -> VerifyResult:
    """Verify one kernel on one problem. Never raises for kernel failures."""
    op = registry.op(op_name)
    kernels = registry.kernels_of(op_name)
    if kernel_name not in kernels:
        raise KeyError(f"unknown kernel {kernel_name!r} for {op_name}; known: {', '.join(sorted(kernels))}")
    kernel = kernels[kernel_name]
    platform = platform or current_platform()
    feats = dict(features)
    if device is not None:
        feats["device"] = device
    device = feats.get("device", "cpu")
    tname = transform.text() if transform else ""
    base = dict(op=op_name, kernel=kernel_name, features=feats, seed=seed, transform=tname)
    if check_support:
        available = kernel.availability(platform)
        if not available.ok:
            return VerifyResult(status="unavailable", detail=available.reason, **base)
        support = kernel.check(feats, platform)
        if not support.ok and not transform:
            return VerifyResult(status="unsupported", detail=support.reason, **base)
    start = time.perf_counter()
    args, kwargs = op.make_inputs(feats, device, seed)
    ref_args = tuple(_clone(a) for a in args)
    ref_kwargs = {k: _clone(v) for k, v in kwargs.items()}
    # A kernel of a coarser precision class is judged against its class's semantics.
    expected = op.reference_for(kernel.precision)(*ref_args, **ref_kwargs)
    try:
        fn = apply_transform(kernel.bind(config), op, transform) if transform else kernel.bind(config)
        positional = op.positional(args, kwargs)
        with poisoned_outputs():
            got = fn(*positional)
        _synchronize(device)
    except Exception as e:
        return VerifyResult(status="error", detail=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - start, **base)
    comparison = op.compare_for(kernel.precision)(got, expected, feats)
    return VerifyResult(
        status="pass" if comparison.passed else "fail",
        metrics=dict(comparison.metrics),
        detail=comparison.detail,
        seconds=time.perf_counter() - start,
        **base,
    )


def _synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()
