"""The registry: every op and kernel this process knows, found by a scan of
``kernmux.kernels`` and the ``kernmux.kernels`` entry-point group, loaded once (thread-safe).

What an op is lives in :mod:`kernmux.dispatch.op_model` (:class:`Op` and its features,
comparison, precision classes, roofline); what a kernel is in
:mod:`kernmux.dispatch.kernel_model` (:class:`Kernel`, :class:`Support`). Both are
re-exported here, the one import op packages need: ``register_op(spec_module)``,
``register_kernel(...)``.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from kernmux.dispatch.kernel_model import SUPPORTED, Kernel, Support, unsupported
from kernmux.dispatch.op_model import (
    EXACT,
    SPEC_REQUIRED,
    Comparison,
    FeatureSpec,
    HeadAxes,
    Op,
    PrecisionClass,
    Roofline,
)

__all__ = [
    "EXACT", "ENTRY_POINT_GROUP", "IN_TREE_PACKAGE", "REGISTRY", "SPEC_REQUIRED", "SUPPORTED", "Comparison",
    "FeatureSpec", "HeadAxes", "Kernel", "Op", "PrecisionClass", "Registry", "Roofline", "Support",
    "UnknownOpError", "in_tree_op_packages", "kernel", "register_kernel", "register_op", "replace_kernel",
    "unsupported",
]

log = logging.getLogger("kernmux")

# In-tree ops are the sub-packages of this package (found by a scan, never listed).
IN_TREE_PACKAGE = "kernmux.kernels"
ENTRY_POINT_GROUP = "kernmux.kernels"


# --------------------------------------------------------------------------- registry


class Registry:
    """All ops and kernels known to this process."""

    def __init__(self) -> None:
        self.ops: dict[str, Op] = {}
        self.kernels: dict[str, dict[str, Kernel]] = {}
        # Why a third-party entry point could not be loaded (shown by ``kernmux ops``).
        self.plugin_errors: dict[str, str] = {}
        self._loaded = False
        self._loading = False
        self._lock = threading.RLock()

    def add_op(self, op: Op) -> Op:
        with self._lock:
            if op.name in self.ops and self.ops[op.name] is not op:
                raise ValueError(f"op {op.name!r} registered twice")
            self.ops[op.name] = op
            self.kernels.setdefault(op.name, {})
        return op

    def add_kernel(self, kernel: Kernel) -> Kernel:
        if kernel.op not in self.ops:
            self.ensure_loaded()  # a kernel for an in-tree op may register before its package loads
        with self._lock:
            if kernel.op not in self.ops:
                raise ValueError(f"kernel {kernel.name!r} registered for unknown op {kernel.op!r}")
            op = self.ops[kernel.op]
            if kernel.precision is None:
                kernel = dataclasses.replace(kernel, precision=op.precision)
            elif kernel.precision not in op.precisions:
                raise ValueError(
                    f"kernel {kernel.op}/{kernel.name} declares precision {kernel.precision!r}; "
                    f"{kernel.op} declares {', '.join(op.precisions)}"
                )
            existing = self.kernels[kernel.op].get(kernel.name)
            if existing is not None and existing != kernel:
                raise ValueError(f"kernel {kernel.op}/{kernel.name} registered twice")
            self.kernels[kernel.op][kernel.name] = kernel
        return kernel

    def remove_op(self, name: str) -> None:
        """Tests only: forget a test op and its kernels."""
        with self._lock:
            self.ops.pop(name, None)
            self.kernels.pop(name, None)

    def ensure_loaded(self) -> None:
        """Import every in-tree op package and third-party entry point, once.

        Thread-safe: concurrent first callers wait until loading has finished. A call
        made while this thread is loading (an op package asking the registry during its
        own import) returns at once instead of recursing."""
        if self._loaded:
            return
        with self._lock:
            if self._loaded or self._loading:
                return
            self._loading = True
            try:
                for name in in_tree_op_packages():
                    try:
                        importlib.import_module(name)
                    except Exception as e:  # one broken op package must not take the others down
                        self.plugin_errors[name] = f"{type(e).__name__}: {e}"
                        log.warning("kernmux: op package %s failed to import: %s", name, e)
                for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
                    try:
                        target = ep.load()
                        if callable(target):
                            target()
                    except Exception as e:  # a broken plugin is reported, never fatal
                        self.plugin_errors[ep.name] = f"{type(e).__name__}: {e}"
                        log.warning("kernmux: kernel plugin %r failed to load: %s", ep.name, e)
            finally:
                self._loading = False
            self._loaded = True

    def tracked_libs(self) -> list[str]:
        """Every distribution some registered kernel requires (sorted)."""
        self.ensure_loaded()
        return sorted({dist for kernels in self.kernels.values() for k in kernels.values() for dist in k.requires})

    def op(self, name: str) -> Op:
        self.ensure_loaded()
        try:
            return self.ops[name]
        except KeyError:
            raise UnknownOpError(name, sorted(self.ops)) from None

    def kernels_of(self, op: str) -> dict[str, Kernel]:
        self.ensure_loaded()
        if op not in self.ops:
            raise UnknownOpError(op, sorted(self.ops))
        return self.kernels[op]

    def all_ops(self) -> list[Op]:
        self.ensure_loaded()
        return [self.ops[name] for name in sorted(self.ops)]


class UnknownOpError(KeyError):
    def __init__(self, name: str, known: Sequence[str]):
        self.name = name
        self.known = list(known)
        super().__init__(f"unknown op {name!r}; known ops: {', '.join(self.known) or '(none)'}")

    def __str__(self) -> str:
        return self.args[0]


def in_tree_op_packages() -> list[str]:
    """The sub-packages of ``kernmux.kernels``: each defines one op (a package scan)."""
    import pkgutil

    package = importlib.import_module(IN_TREE_PACKAGE)
    return sorted(
        f"{IN_TREE_PACKAGE}.{info.name}"
        for info in pkgutil.iter_modules(package.__path__)
        if info.ispkg and not info.name.startswith("_")
    )


REGISTRY = Registry()


def register_op(op: Op | Any) -> Op:
    """Register an op: an :class:`Op`, or the op's spec module (:meth:`Op.from_spec`).

    Called at import of ``kernmux/kernels/<op>/__init__.py`` (or a plugin's package)."""
    if not isinstance(op, Op):
        op = Op.from_spec(op)
    return REGISTRY.add_op(op)


def register_kernel(**spec: Any) -> Kernel:
    """Register a kernel from keyword fields of :class:`Kernel` (``impl`` may be a
    "module:attr" string, imported only when the kernel is first called)."""
    return REGISTRY.add_kernel(Kernel(**spec))


def kernel(op: str, name: str, **spec: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator form: ``@kernel("my_op", "torch", priority=0)`` over the implementation."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        REGISTRY.add_kernel(Kernel(op=op, name=name, impl=fn, **spec))
        return fn

    return wrap


def replace_kernel(kernel: Kernel, **changes: Any) -> Kernel:
    return dataclasses.replace(kernel, **changes)
