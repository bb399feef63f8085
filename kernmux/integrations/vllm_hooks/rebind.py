"""Rebinding a module-level function everywhere it is bound, now or when imported later.

vLLM calls its dispatch functions through module globals (``fused_topk`` looks up
``dispatch_topk_softmax_func`` in its own module) and many modules hold copies made
by ``from x import f``. Replacing ``x.f`` alone misses those copies, so
:func:`rebind_everywhere` scans ``sys.modules`` for every module attribute that *is*
the original object and replaces each one. Modules not imported yet are handled by
:class:`PostImportHooks`: a ``sys.meta_path`` finder that runs a callback right after
the module's code executed, before anyone can copy the original out of it.
"""

from __future__ import annotations

import importlib.abc
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any


@dataclass
class Binding:
    """One replaced attribute: ``module.attr`` was ``original``, is now ``replacement``."""

    module: ModuleType
    attr: str
    original: Any
    replacement: Any

    @property
    def where(self) -> str:
        return f"{self.module.__name__}.{self.attr}"

    def restore(self) -> bool:
        """Put the original back if our replacement is still there (someone else may
        have rebound it since); returns whether it did."""
        if self.module.__dict__.get(self.attr) is self.replacement:
            setattr(self.module, self.attr, self.original)
            return True
        return False


def find_bindings(
    obj: Any, names: frozenset[str] | None = None, *, skip_prefixes: tuple[str, ...] = ("kernmux",)
) -> list[tuple[ModuleType, str]]:
    """Every (module, attribute) in ``sys.modules`` whose value is ``obj`` itself.

    names: only attributes with one of these names. Matching by identity alone is not
    enough: one stub object can stand for several functions (vLLM binds the same
    "unavailable" stub to every FlashMLA entry point when the extension is missing)."""
    found: list[tuple[ModuleType, str]] = []
    for name, module in list(sys.modules.items()):
        if module is None or name.startswith(skip_prefixes):
            continue
        namespace = getattr(module, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for attr, value in list(namespace.items()):
            if value is obj and (names is None or attr in names):
                found.append((module, attr))
    return found


def rebind_everywhere(
    module: ModuleType, attr: str, replacement: Any, aliases: tuple[str, ...] = ()
) -> list[Binding]:
    """Replace ``module.attr`` and every imported copy of the same object bound under
    the same name (or one of ``aliases``, for ``from x import f as g`` copies).

    Returns the bindings made (the defining module's first). Raises AttributeError if
    ``module`` has no ``attr``."""
    original = getattr(module, attr)
    bindings = [Binding(module, attr, original, replacement)]
    setattr(module, attr, replacement)
    for other, other_attr in find_bindings(original, frozenset((attr, *aliases))):
        if other is module and other_attr == attr:
            continue
        setattr(other, other_attr, replacement)
        bindings.append(Binding(other, other_attr, original, replacement))
    return bindings


class PostImportHooks(importlib.abc.MetaPathFinder):
    """Run ``callback(module)`` right after a named module is first executed.

    Installed at the front of ``sys.meta_path``; it only answers for module names with
    a pending callback, delegating the actual finding to the finders behind it and
    wrapping the found loader's ``exec_module``. A callback that raises is reported to
    ``on_error`` and never breaks the import."""

    def __init__(self, on_error: Callable[[str, BaseException], None]) -> None:
        self._pending: dict[str, list[Callable[[ModuleType], None]]] = {}
        self._busy: set[str] = set()
        self._lock = threading.RLock()
        self._on_error = on_error

    def when_imported(self, name: str, callback: Callable[[ModuleType], None]) -> bool:
        """Run ``callback`` now if ``name`` is imported (returns True), else after its import."""
        module = sys.modules.get(name)
        if module is not None:
            callback(module)
            return True
        with self._lock:
            self._pending.setdefault(name, []).append(callback)
            if self not in sys.meta_path:
                sys.meta_path.insert(0, self)
        return False

    def pending(self) -> list[str]:
        return sorted(self._pending)

    def clear(self) -> None:
        with self._lock:
            self._pending.clear()
            if self in sys.meta_path:
                sys.meta_path.remove(self)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        if fullname not in self._pending or fullname in self._busy:
            return None
        self._busy.add(fullname)
        try:
            spec = None
            for finder in sys.meta_path:
                if finder is self or not hasattr(finder, "find_spec"):
                    continue
                spec = finder.find_spec(fullname, path, target)
                if spec is not None:
                    break
        finally:
            self._busy.discard(fullname)
        loader = getattr(spec, "loader", None)
        if spec is None or loader is None or not hasattr(loader, "exec_module"):
            return spec
        original_exec = loader.exec_module

        def exec_module(module: ModuleType) -> None:
            original_exec(module)
            self._fire(fullname, module)

        # Per-instance override: source loaders are one object per module.
        loader.exec_module = exec_module
        return spec

    def _fire(self, name: str, module: ModuleType) -> None:
        with self._lock:
            callbacks = self._pending.pop(name, [])
            if not self._pending and self in sys.meta_path:
                sys.meta_path.remove(self)
        for callback in callbacks:
            try:
                callback(module)
            except Exception as e:  # never break vLLM's import
                self._on_error(name, e)
