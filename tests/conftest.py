"""Test-wide setup: Triton runs in its interpreter when there is no GPU."""

import os

import pytest

try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover - torch is a test requirement
    _HAS_CUDA = False

if not _HAS_CUDA:
    # Must be set before triton is imported anywhere.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _isolate_env(monkeypatch, tmp_path_factory):
    """No test sees the developer's rules, forced kernels or tuning database."""
    monkeypatch.delenv("KERNMUX_RULES", raising=False)
    monkeypatch.delenv("KERNMUX_FORCE", raising=False)
    monkeypatch.setenv("KERNMUX_DB", f"sqlite:///{tmp_path_factory.mktemp('db')}/absent.sqlite")
    monkeypatch.delenv("KERNMUX_STATS_PATH", raising=False)


# Test-only ops (toy_attention) used by the engine, rules and CLI tests.
from tests.dispatch import toy_ops  # noqa: E402

toy_ops.register()
