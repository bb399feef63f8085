"""Run kernels against their op's reference on fresh random inputs (``kernmux verify``).

A thin layer over the one numerics check (:func:`kernmux.dispatch.numerics.check_numerics`),
shared with the tuner's trials and the benchmarks' parity checks: this module adds the
availability/support filter and a result that names the op, kernel, features and seed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kernmux.dispatch.numerics import check_numerics
from kernmux.dispatch.platform import Platform, current_platform
from kernmux.dispatch.registry import REGISTRY, Registry
from kernmux.dispatch.rule_model import TransformSpec


@dataclass(frozen=True)
class VerifyResult:
    """status: "pass", "fail" (numerics), "error" (raised), "unavailable", "unsupported" (by the
    kernel, or non-finite inputs asked of an op that has none)."""

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
    nonfinite: bool = False,
) -> VerifyResult:
    """Verify one kernel on one problem. Never raises for kernel failures.

    features: the op's features ("device" picks where inputs are made; ``device``
        overrides it). config: the kernel's config (default: its default config).
    transform: run the kernel through this transform (support is then not checked: the
        transform exists to meet the kernel's constraints).
    nonfinite: inputs from the op's ``make_nonfinite_inputs`` (status "unsupported"
        when the op has none)."""
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
    result = check_numerics(op, kernel, feats, device=device, seed=seed, config=config, transform=transform,
                            nonfinite=nonfinite)
    # The check's statuses (pass, fail, error, unsupported) are verify's.
    return VerifyResult(status=result.status, metrics=dict(result.metrics), detail=result.detail,
                        seconds=result.seconds, **base)
