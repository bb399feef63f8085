"""Test-wide setup: the device the suite runs on, and isolation from the user's setup.

The suite runs on whatever device is present: with a CUDA GPU, kernels are tested on it
(fixture ``device`` = "cuda") and tests marked ``gpu`` run; without one, Triton runs in
its interpreter on CPU tensors (``TRITON_INTERPRET=1``, set before triton is imported)
and ``gpu`` tests are skipped with that reason.
"""

import os

import pytest

try:
    import torch

    HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a test requirement
    HAS_CUDA = False

DEVICE = "cuda" if HAS_CUDA else "cpu"

if not HAS_CUDA:
    # Must be set before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (runs in the GPU suite: benchmarks/results/gpu_test_run_*.txt)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> str:
    """"cuda" when a GPU is present, else "cpu" (Triton then runs in its interpreter)."""
    return DEVICE


@pytest.fixture(autouse=True)
def _isolate_env(monkeypatch, tmp_path_factory, request):
    """No test sees the developer's rules, forced kernels or tuning database."""
    monkeypatch.delenv("KERNMUX_RULES", raising=False)
    monkeypatch.delenv("KERNMUX_FORCE", raising=False)
    monkeypatch.setenv("KERNMUX_DB", f"sqlite:///{tmp_path_factory.mktemp('db')}/absent.sqlite")
    monkeypatch.delenv("KERNMUX_STATS_PATH", raising=False)
    # No assertion depends on how busy the machine is: every measured timing counts as
    # tight, except in tests of the dispersion gate itself (marked ``dispersion_gate``:
    # they judge synthetic rows by the shipped bound).
    if request.node.get_closest_marker("dispersion_gate") is None:
        monkeypatch.setenv("KERNMUX_DISPERSION_BOUND", "1e9")
    else:
        monkeypatch.delenv("KERNMUX_DISPERSION_BOUND", raising=False)


# Test-only ops (toy_attention) used by the engine, rules and CLI tests.
from tests.dispatch import toy_ops  # noqa: E402

toy_ops.register()


def subprocess_pythonpath(*first: object) -> str:
    """PYTHONPATH for a child process: ``first`` entries, this checkout, then whatever the
    environment already had (a machine may carry packages outside site-packages)."""
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    kept = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != root]
    return os.pathsep.join([*(str(p) for p in first), str(root), *kept])
