"""Ops and kernels: what an operation means, and the implementations that compute it.

An :class:`Op` owns the semantics (a PyTorch reference), the problem features a
decision may depend on, how to draw inputs and compare outputs, and which arguments
and outputs carry a head axis. A :class:`Kernel` is one implementation of an op with
its provider requirements, a ``supports()`` predicate that gives reasons, a config
space and a default priority.

Kernels whose module imports an optional library (triton, aiter, vllm) are registered
with ``impl="package.module:function"`` so that registration never imports it:
unavailability is a reason shown by ``kernmux ops``, never an ImportError.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.metadata
import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from kernmux.dispatch.platform import Platform

log = logging.getLogger("kernmux")

# In-tree ops are the sub-packages of this package (found by a scan, never listed).
IN_TREE_PACKAGE = "kernmux.kernels"
ENTRY_POINT_GROUP = "kernmux.kernels"
# The attributes an op's spec module provides (see :meth:`Op.from_spec`).
SPEC_REQUIRED = ("OP_NAME", "reference", "FEATURE_SPECS", "features", "validate",
                 "make_inputs", "compare", "fake", "bucket", "roofline")


# --------------------------------------------------------------------------- features


@dataclass(frozen=True)
class FeatureSpec:
    """One problem feature of an op.

    kind: "int", "str" or "bool". ``default`` is what ``verify``/``bench`` use when the
    user does not give the feature; ``choices`` (optional) lists the legal values.
    """

    name: str
    kind: str
    doc: str
    default: Any
    choices: tuple[Any, ...] | None = None
    # Smallest and largest legal values of an int feature (lint flags conditions outside
    # them; a head feature's maximum also bounds split_heads/pad_heads in rules).
    minimum: int | None = None
    maximum: int | None = None

    def parse(self, text: str) -> Any:
        """Parse a command-line value; raises ValueError naming the feature."""
        try:
            if self.kind == "int":
                value: Any = int(text)
            elif self.kind == "bool":
                lowered = str(text).lower()
                if lowered not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError
                value = lowered in ("1", "true", "yes")
            else:
                value = str(text)
        except ValueError:
            raise ValueError(f"feature {self.name!r} expects {self.kind}, got {text!r}") from None
        self.check(value)
        return value

    def check(self, value: Any) -> None:
        """Raise ValueError naming the feature when ``value`` is not among ``choices`` or
        outside ``minimum``/``maximum``."""
        if self.choices is not None and value not in self.choices:
            raise ValueError(f"feature {self.name!r} must be one of {list(self.choices)}, got {value!r}")
        if self.kind == "int" and isinstance(value, int):
            if self.minimum is not None and value < self.minimum:
                raise ValueError(f"feature {self.name!r} must be >= {self.minimum}, got {value}")
            if self.maximum is not None and value > self.maximum:
                raise ValueError(f"feature {self.name!r} must be <= {self.maximum}, got {value}")


@dataclass(frozen=True)
class HeadAxes:
    """Where the head axis lives, so transforms can split or pad any op generically.

    inputs: argument name -> (axis, pad) where pad is "tile" (repeat existing heads:
        right for ops whose heads are independent, e.g. attention) or "zero" (fill
        with zeros: right for ops that sum over heads with per-head weights).
    outputs: output index -> axis to concatenate/slice along, or "sum" when the op
        reduces over heads (chunks are then added, padding must be "zero").
    feature: the feature that counts heads.
    """

    inputs: Mapping[str, tuple[int, str]]
    outputs: Mapping[int, int | str]
    feature: str = "heads"


@dataclass(frozen=True)
class Roofline:
    """Minimum bytes moved through device memory and FLOPs for one call."""

    bytes: float
    flops: float

    def floor_us(self, bandwidth_tbs: float, tflops: float) -> float:
        return max(self.bytes / (bandwidth_tbs * 1e6), self.flops / (tflops * 1e6))


@dataclass(frozen=True)
class Comparison:
    """Outcome of comparing a kernel's outputs with the reference's.

    metrics: op-specific error measures (e.g. ``max_rel_err``, ``cos_min``); always
    JSON-serialisable floats/ints. ``detail`` says what failed, in words."""

    passed: bool
    metrics: Mapping[str, float]
    detail: str = ""


# The precision class of an op whose reference is the only semantics it admits.
EXACT = "exact"


@dataclass(frozen=True)
class PrecisionClass:
    """A coarser semantics than the op's reference that some kernels compute (e.g. W4A4:
    activations quantized too). A kernel of this class is a candidate only where a rule
    allows the class for the op (``allow_precision``).

    reference: the class's own semantics, same signature as the op's reference (e.g. the
        reference with activations quantized the way the kernel quantizes them); kernels
        of the class are checked against it. None: the op's reference.
    compare: the tolerance against that reference; None: the op's compare.
    """

    name: str
    doc: str
    reference: Callable[..., Any] | None = None
    compare: Callable[[Any, Any, Mapping[str, Any]], Comparison] | None = None


@dataclass(frozen=True)
class Op:
    """An operation with one canonical signature and a PyTorch reference.

    reference: the semantics. Its parameters (with type annotations torch can read:
        ``torch.Tensor``, ``Optional[torch.Tensor]``, ``int``, ``float``, ``bool``) are
        the op's signature; it returns a Tensor or a tuple of Tensors.
    features(*args, **kwargs) -> dict: cheap (shapes, dtypes, flags), keys = feature_specs.
    validate(*args, **kwargs) -> None: raises ValueError/TypeError naming the argument,
        what was expected and what was got. Called once per new feature key.
    make_inputs(features, device, seed) -> (args tuple, kwargs dict): fresh random inputs.
    compare(outputs, reference_outputs, features) -> Comparison: the op's tolerance.
    fake(*args, **kwargs): outputs with the right shapes/dtypes (torch.compile meta).
    bucket(features) -> dict: the tuning-database bucket (coarser than features).
    roofline(features, platform) -> Roofline.
    precision: the class name of the reference's own semantics ("exact", or e.g. "W4A16").
    precision_classes: other classes kernels may declare, by name, each with the
        reference and tolerance its kernels are checked against.
    make_nonfinite_inputs(features, device, seed) -> (args tuple, kwargs dict), optional:
        inputs with NaN / inf planted where the reference defines the result (the op's
        "NaN in, NaN out" cases); every kernel must match the reference on them.
    check_features(features) -> None, optional: raises ValueError when feature values
        that pass each :class:`FeatureSpec` cannot form a valid call together (e.g. topk
        larger than experts); what ``validate`` would reject, said in feature names.
    """

    name: str
    doc: str
    reference: Callable[..., Any]
    feature_specs: tuple[FeatureSpec, ...]
    features: Callable[..., dict]
    validate: Callable[..., None]
    make_inputs: Callable[[Mapping[str, Any], Any, int], tuple[tuple, dict]]
    compare: Callable[[Any, Any, Mapping[str, Any]], Comparison]
    fake: Callable[..., Any]
    bucket: Callable[[Mapping[str, Any]], dict]
    roofline: Callable[[Mapping[str, Any], Platform], Roofline]
    head_axes: HeadAxes | None = None
    # Features that may be swept in verify/bench by default (CLI convenience).
    sweep_defaults: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    precision: str = EXACT
    precision_classes: Mapping[str, PrecisionClass] = field(default_factory=dict)

    @property
    def precisions(self) -> tuple[str, ...]:
        """Every precision class a kernel of this op may declare, the reference's first."""
        return (self.precision, *self.precision_classes)

    def _precision_class(self, precision: str | None) -> PrecisionClass | None:
        if precision is None or precision == self.precision:
            return None
        try:
            return self.precision_classes[precision]
        except KeyError:
            raise ValueError(f"op {self.name!r} has no precision class {precision!r}; classes: {', '.join(self.precisions)}") from None

    def reference_for(self, precision: str | None) -> Callable[..., Any]:
        """The semantics a kernel of class ``precision`` is checked against."""
        cls = self._precision_class(precision)
        return self.reference if cls is None or cls.reference is None else cls.reference

    def compare_for(self, precision: str | None) -> Callable[[Any, Any, Mapping[str, Any]], Comparison]:
        """The tolerance for a kernel of class ``precision`` (against ``reference_for``)."""
        cls = self._precision_class(precision)
        return self.compare if cls is None or cls.compare is None else cls.compare
    make_nonfinite_inputs: Callable[[Mapping[str, Any], Any, int], tuple[tuple, dict]] | None = None
    check_features: Callable[[Mapping[str, Any]], None] | None = None

    def validate_features(self, features: Mapping[str, Any]) -> None:
        """Raise ValueError when ``features`` (a full feature dict) describe no valid call:
        a value outside its spec's choices or bounds, or a combination the op's
        ``check_features`` rejects (the CLI's counterpart of ``validate``)."""
        for spec in self.feature_specs:
            if spec.name in features:
                spec.check(features[spec.name])
        if self.check_features is not None:
            self.check_features(features)

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in self.feature_specs) + ("device",)

    def spec(self, name: str) -> FeatureSpec:
        for spec in self.feature_specs:
            if spec.name == name:
                return spec
        if name == "device":
            return FeatureSpec("device", "str", "device type of the inputs", "cpu")
        raise KeyError(name)

    def positional(self, args: Sequence[Any], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
        """``(args, kwargs)`` as the positional tuple, defaults filled, in the reference's
        parameter order: how the hot path and transforms call kernels."""
        import inspect

        bound = inspect.signature(self.reference).bind(*args, **kwargs)
        bound.apply_defaults()
        return tuple(bound.arguments.values())

    @classmethod
    def from_spec(cls, spec: Any) -> Op:
        """The op a spec module describes.

        The module (``kernels/<op>/spec.py``) defines ``OP_NAME``, ``reference``,
        ``FEATURE_SPECS``, ``features``, ``validate``, ``make_inputs``, ``compare``,
        ``fake``, ``bucket`` and ``roofline``; optionally ``DOC`` (default: the
        reference's docstring), ``HEAD_AXES``, ``SWEEP_DEFAULTS``, ``PRECISION`` (the
        reference's class name, default "exact"), ``PRECISION_CLASSES`` (a sequence
        of :class:`PrecisionClass`), ``make_nonfinite_inputs`` and ``check_features``."""
        where = getattr(spec, "__name__", repr(spec))
        missing = [name for name in SPEC_REQUIRED if not hasattr(spec, name)]
        if missing:
            raise TypeError(f"op spec {where} lacks {', '.join(missing)}; expected {', '.join(SPEC_REQUIRED)}")
        doc = getattr(spec, "DOC", None) or (spec.reference.__doc__ or "").strip().split("\n\n")[0]
        return cls(
            name=spec.OP_NAME,
            doc=doc,
            reference=spec.reference,
            feature_specs=tuple(spec.FEATURE_SPECS),
            features=spec.features,
            validate=spec.validate,
            make_inputs=spec.make_inputs,
            compare=spec.compare,
            fake=spec.fake,
            bucket=spec.bucket,
            roofline=spec.roofline,
            head_axes=getattr(spec, "HEAD_AXES", None),
            sweep_defaults=dict(getattr(spec, "SWEEP_DEFAULTS", {})),
            precision=getattr(spec, "PRECISION", EXACT),
            precision_classes={cls.name: cls for cls in getattr(spec, "PRECISION_CLASSES", ())},
            make_nonfinite_inputs=getattr(spec, "make_nonfinite_inputs", None),
            check_features=getattr(spec, "check_features", None),
        )

    def default_features(self, device: str = "cpu") -> dict[str, Any]:
        feats = {spec.name: spec.default for spec in self.feature_specs}
        feats["device"] = device
        return feats


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
