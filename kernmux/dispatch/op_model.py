"""The op model: what an operation means (a PyTorch reference), the problem features a
decision may depend on, how to draw inputs and compare outputs, which arguments and
outputs carry a head axis, its precision classes and roofline.

Split from :mod:`kernmux.dispatch.registry` (which re-exports every name here), so that
each file has one purpose: this one describes ops, ``kernel_model`` kernels, the
registry holds both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kernmux.dispatch.platform import Platform

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
