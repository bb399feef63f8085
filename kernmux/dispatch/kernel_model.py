"""The kernel model: one implementation of an op with its provider requirements, a
``supports()`` predicate that gives reasons, a config space and a default priority.

Kernels whose module imports an optional library (triton, aiter, vllm) give
``impl="package.module:function"``, imported on first call, so that registration never
imports it: unavailability is a reason shown by ``kernmux ops``, never an ImportError.
Re-exported by :mod:`kernmux.dispatch.registry`.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from kernmux.dispatch.platform import Platform

# --------------------------------------------------------------------------- kernels


@dataclass(frozen=True)
class Support:
    """Whether a kernel handles a problem; ``reason`` says why not (or notes why yes)."""

    ok: bool
    reason: str = ""

    def __bool__(self) -> bool:  # pragma: no cover - convenience
        return self.ok


SUPPORTED = Support(True)


def unsupported(reason: str) -> Support:
    return Support(False, reason)


@dataclass(frozen=True)
class Kernel:
    """One implementation of an op.

    requires: distribution -> PEP 440 specifier ("" = any version), all must be installed.
    vendors: platform vendors it runs on (empty = any).
    supports(features, platform) -> Support: shapes/dtypes/platform it handles; features
        include "device" ("cpu"/"cuda") of the inputs.
    config_space: parameter -> candidate values (categorical); may be empty.
    default_config: used when no rule or tuning row gives one.
    default_for(features) -> config: the full config a partial ``default_config`` (e.g.
        ``{}``: the launcher's shape heuristic) resolves to for ``features`` (optional).
        The tuner measures that point first, so a tuned config never loses to the
        untuned kernel on the shape it was tuned for.
    config_valid(config, features) -> bool: prunes invalid combinations (optional).
    impl: the callable, or "module:attr" imported on first use. It takes the op's
        arguments; if config_space is non-empty it also takes keyword ``config``.
    probe: optional callable(platform) -> Support run only for the real platform, to
        check what metadata cannot (e.g. a compiled extension exposes the function).
    priority: higher wins when nothing else decides.
    precision: the precision class it computes (None: the op's reference class); any
        other class makes it a candidate only where a rule allows that class.
    """

    op: str
    name: str
    impl: Callable[..., Any] | str
    requires: Mapping[str, str] = field(default_factory=dict)
    vendors: tuple[str, ...] = ()
    supports: Callable[[Mapping[str, Any], Platform], Support] = lambda features, platform: SUPPORTED
    config_space: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    default_config: Mapping[str, Any] = field(default_factory=dict)
    config_valid: Callable[[Mapping[str, Any], Mapping[str, Any]], bool] | None = None
    default_for: Callable[[Mapping[str, Any]], Mapping[str, Any]] | None = None
    probe: Callable[[Platform], Support] | None = None
    priority: int = 0
    doc: str = ""
    # Test-only kernels are hidden from ``kernmux ops`` and shipped-rule validation.
    test_only: bool = False
    precision: str | None = None

    def availability(self, platform: Platform) -> Support:
        """Libraries present and in range, vendor matches, probe passes (real platform only)."""
        if self.vendors and platform.vendor not in self.vendors:
            return unsupported(f"runs on {'/'.join(self.vendors)}, platform is {platform.vendor}")
        for dist, spec in self.requires.items():
            version = platform.libs.get(dist)
            if version is None:
                return unsupported(f"{dist} not installed")
            if spec:
                try:
                    if not SpecifierSet(spec).contains(Version(version), prereleases=True):
                        return unsupported(f"{dist} {version} does not satisfy {spec}")
                except (InvalidVersion, InvalidSpecifier) as e:
                    return unsupported(f"{dist} version {version!r} not comparable with {spec!r}: {e}")
        if self.probe is not None and not platform.what_if:
            try:
                result = self.probe(platform)
            except Exception as e:  # a probe failing is a reason, not a crash
                return unsupported(f"probe failed: {type(e).__name__}: {e}")
            if not result.ok:
                return result
        return SUPPORTED

    def check(self, features: Mapping[str, Any], platform: Platform) -> Support:
        try:
            return self.supports(features, platform)
        except Exception as e:
            return unsupported(f"supports() raised {type(e).__name__}: {e}")

    def load(self) -> Callable[..., Any]:
        """The implementation callable (imports it on first use)."""
        if callable(self.impl):
            return self.impl
        return _load_impl(self.impl)

    def bind(self, config: Mapping[str, Any] | None = None) -> Callable[..., Any]:
        """A callable taking only the op's arguments, with ``config`` baked in."""
        fn = self.load()
        if not self.config_space:
            return fn
        merged = {**self.default_config, **(config or {})}
        return _BoundKernel(fn, merged)

    def full_config(self, config: Mapping[str, Any] | None) -> dict[str, Any]:
        return {**self.default_config, **(config or {})} if self.config_space else {}

    def resolved_default(self, features: Mapping[str, Any]) -> dict[str, Any]:
        """The config the kernel runs untuned for ``features``: ``default_for`` where
        given (a shape heuristic), else :meth:`full_config` of nothing."""
        if self.default_for is None or not self.config_space:
            return self.full_config(None)
        return {**self.full_config(None), **self.default_for(features)}


class _BoundKernel:
    """fn(*args, config=...) with config fixed; a class so it pickles and prints well."""

    __slots__ = ("fn", "config")

    def __init__(self, fn: Callable[..., Any], config: Mapping[str, Any]):
        self.fn = fn
        self.config = dict(config)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, config=self.config, **kwargs)

    def __repr__(self) -> str:
        return f"<{getattr(self.fn, '__qualname__', self.fn)} config={self.config}>"


_IMPL_CACHE: dict[str, Callable[..., Any]] = {}


def _load_impl(path: str) -> Callable[..., Any]:
    fn = _IMPL_CACHE.get(path)
    if fn is None:
        module_name, _, attr = path.partition(":")
        module = importlib.import_module(module_name)
        fn = getattr(module, attr)
        _IMPL_CACHE[path] = fn
    return fn
