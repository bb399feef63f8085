"""Every op x every kernel registered here x the op's declared sweep, through the one
numerics check (``kernmux verify``'s): a new op or kernel is tested the moment it is
registered, with no edit here.

On a GPU the full declared sweep runs on CUDA tensors; on CPU a covering subset runs with
Triton in its interpreter (see ``kernmux.dispatch.sweep``). Inputs are fresh each run
(the seed is in the failure message); kernels unavailable here, or that do not support a
problem, are skipped with the reason. Test-only kernels (the engine tests' doubles, some
of which crash by design) are not product kernels and are left out.
"""

from __future__ import annotations

import random

import pytest

from kernmux.dispatch.platform import current_platform
from kernmux.dispatch.registry import REGISTRY
from kernmux.dispatch.sweep import sweep_problems
from kernmux.dispatch.verify import verify_kernel
from tests.conftest import DEVICE, HAS_CUDA


def _cases() -> list:
    cases = []
    for op in REGISTRY.all_ops():
        for features in sweep_problems(op, DEVICE, full=HAS_CUDA):
            label = ",".join(f"{k}={v}" for k, v in sorted(features.items()) if k != "device")
            for name, kernel in sorted(REGISTRY.kernels_of(op.name).items()):
                if kernel.test_only:  # the engine's own test doubles (fault kernels abort or hang by design)
                    continue
                cases.append(pytest.param(op.name, name, features, id=f"{op.name}-{name}-{label}"))
    return cases


@pytest.mark.parametrize(("op_name", "kernel_name", "features"), _cases())
def test_kernel_matches_reference(op_name: str, kernel_name: str, features: dict) -> None:
    seed = random.randrange(2**31)
    result = verify_kernel(op_name, kernel_name, features, seed=seed, platform=current_platform())
    if result.status in ("unavailable", "unsupported"):
        pytest.skip(f"{kernel_name} {result.status} here: {result.detail}")
    assert result.passed, f"{op_name}/{kernel_name} {result.status} (seed {seed}): {result.detail} {dict(result.metrics)}"
