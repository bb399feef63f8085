"""kernmux: declarative kernel dispatch and autotuning for LLM inference kernels.

``kernmux.ops.<op>(...)`` is the entry point an inference engine calls; everything
else (rules, tuning database, CLI) decides which implementation that call runs.
Heavy dependencies (torch, triton, sqlalchemy, optuna) are imported lazily.
"""

from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy so that ``import kernmux`` (and ``kernmux --help``) never imports torch.
    if name == "ops":
        import importlib

        return importlib.import_module("kernmux.ops")
    raise AttributeError(f"module 'kernmux' has no attribute {name!r}")
