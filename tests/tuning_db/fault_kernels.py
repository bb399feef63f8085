"""A TEST-ONLY op with deliberately bad kernels, for the tuner's isolation and gate tests.

Op ``tuning_fault_test``: ``y = x * scale`` for a 1-D fp32 tensor ``x`` of ``n`` elements.
Kernels (all ``test_only=True``; never shipped, hidden from ``kernmux ops``):

- ``torch``   the reference (computes in float64 and rounds: deliberately not the fastest)
- ``good``    correct, with a small config space (chunk x order) so the search has points
- ``abort``   calls ``os.abort()``                          -> crashed
- ``segv``    dereferences NULL through ctypes              -> crashed
- ``hang``    sleeps far past any trial timeout             -> timeout
- ``nan``     returns NaN everywhere                        -> numerics_failed
- ``wrong``   returns x * scale + 0.5                       -> numerics_failed
- ``partial`` writes only the first half of its output      -> numerics_failed (poisoned)
- ``raises``  raises RuntimeError                           -> error
- ``sleepy``  correct but slow (sleeps SLEEPY_S per call), a config space of
              SLEEPY_STEPS points: trials long enough to kill a tune or stop its
              database in the middle of one

Importing this module registers the op once per process (workers import it by name).
"""

from __future__ import annotations

import ctypes
import os
import time
from collections.abc import Mapping
from typing import Any

import torch

from kernmux.dispatch.outputs import empty_output
from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import (
    REGISTRY,
    Comparison,
    FeatureSpec,
    Op,
    Roofline,
    register_kernel,
    register_op,
)

OP = "tuning_fault_test"
BAD_KERNELS = {
    "abort": "crashed",
    "segv": "crashed",
    "hang": "timeout",
    "nan": "numerics_failed",
    "wrong": "numerics_failed",
    "partial": "numerics_failed",
    "raises": "error",
}
GOOD_SPACE = {"chunk": (1, 2, 3, 4, 5, 6, 7, 8), "order": ("fwd", "rev")}
SLEEPY_S = float(os.environ.get("KERNMUX_TEST_SLEEPY_S", "0.02"))
SLEEPY_STEPS = 8


def reference(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x: [n] fp32 -> [n] fp32 = x * scale (computed in float64)."""
    return (x.double() * scale).to(torch.float32)


def _features(x: torch.Tensor, scale: float) -> dict:
    return {"n": int(x.shape[0]), "device": x.device.type}


def _validate(x: torch.Tensor, scale: float) -> None:
    if x.dim() != 1 or x.dtype != torch.float32:
        raise ValueError(f"x: expected a 1-D float32 tensor, got shape {tuple(x.shape)} {x.dtype}")


def _make_inputs(features: Mapping[str, Any], device: Any, seed: int) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(int(features["n"]), generator=gen, dtype=torch.float32).to(device)
    return (x, 1.5), {}


def _compare(out: torch.Tensor, ref: torch.Tensor, features: Mapping[str, Any]) -> Comparison:
    diff = (out.double() - ref.double()).abs()
    nan = int(torch.isnan(out).sum())
    max_abs = float(diff.max()) if diff.numel() else 0.0
    metrics = {"max_abs_err": max_abs, "nan_count": nan}
    if nan:
        return Comparison(False, metrics, f"{nan} NaN outputs of {out.numel()}")
    if max_abs > 1e-5:
        return Comparison(False, metrics, f"max abs error {max_abs:.3g} > 1e-5")
    return Comparison(True, metrics, "")


def _bucket(features: Mapping[str, Any]) -> dict:
    n = int(features["n"])
    return {"n": 1 << max(0, (n - 1).bit_length()), "device": features.get("device", "cpu")}


def _roofline(features: Mapping[str, Any], platform: Platform) -> Roofline:
    n = int(features["n"])
    return Roofline(bytes=8.0 * n, flops=float(n))


def good(x: torch.Tensor, scale: float, *, config: dict) -> torch.Tensor:
    out = empty_output(x.shape, torch.float32, x.device)
    chunks = list(zip(x.chunk(config["chunk"]), out.chunk(config["chunk"])))
    if config["order"] == "rev":
        chunks.reverse()
    for src, dst in chunks:
        torch.mul(src, scale, out=dst)
    return out


def sleepy(x: torch.Tensor, scale: float, *, config: dict) -> torch.Tensor:
    time.sleep(SLEEPY_S)
    return reference(x, scale)


def abort_kernel(x: torch.Tensor, scale: float) -> torch.Tensor:
    os.abort()


def segv_kernel(x: torch.Tensor, scale: float) -> torch.Tensor:
    ctypes.string_at(0)  # reads address 0: SIGSEGV
    raise AssertionError("unreachable")


def hang_kernel(x: torch.Tensor, scale: float) -> torch.Tensor:
    time.sleep(3600)
    return x * scale


def nan_kernel(x: torch.Tensor, scale: float) -> torch.Tensor:
    return torch.full_like(x, float("nan"))


def wrong_kernel(x: torch.Tensor, scale: float) -> torch.Tensor:
    return x * scale + 0.5


def partial_kernel(x: torch.Tensor, scale: float) -> torch.Tensor:
    out = empty_output(x.shape, torch.float32, x.device)
    half = x.shape[0] // 2
    torch.mul(x[:half], scale, out=out[:half])  # forgets the second half
    return out


def raises_kernel(x: torch.Tensor, scale: float) -> torch.Tensor:
    raise RuntimeError("deliberate failure of a test kernel")


_IMPLS = {
    "torch": (reference, 0),
    "abort": (abort_kernel, 10),
    "segv": (segv_kernel, 10),
    "hang": (hang_kernel, 10),
    "nan": (nan_kernel, 10),
    "wrong": (wrong_kernel, 10),
    "partial": (partial_kernel, 10),
    "raises": (raises_kernel, 10),
}


def register() -> None:
    """Register the op and its kernels (idempotent)."""
    if OP in REGISTRY.ops:
        return
    register_op(
        Op(
            name=OP,
            doc="TEST ONLY: y = x * scale, with deliberately faulty kernels",
            reference=reference,
            feature_specs=(FeatureSpec("n", "int", "number of elements", 1024),),
            features=_features,
            validate=_validate,
            make_inputs=_make_inputs,
            compare=_compare,
            fake=lambda x, scale: torch.empty_like(x),
            bucket=_bucket,
            roofline=_roofline,
        )
    )
    for name, (fn, priority) in _IMPLS.items():
        register_kernel(op=OP, name=name, impl=fn, priority=priority, test_only=True,
                        doc=f"test-only kernel {name!r}")
    register_kernel(
        op=OP, name="good", impl=good, priority=20, test_only=True,
        config_space=GOOD_SPACE, default_config={"chunk": 1, "order": "fwd"},
        config_valid=lambda config, features: config["chunk"] <= int(features["n"]),
        doc="test-only correct kernel with a config space",
    )
    register_kernel(
        op=OP, name="sleepy", impl=sleepy, priority=5, test_only=True,
        config_space={"step": tuple(range(SLEEPY_STEPS))}, default_config={"step": 0},
        doc="test-only correct, slow kernel with a config space",
    )


register()
