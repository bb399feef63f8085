"""The rule model: frozen, validated rules matched against (features, platform).

A rule is "when <conditions> then <one action>". Conditions are on platform keys
(vendor, arch, device, units), library versions (PEP 440 specifiers; None = not
installed) and op features (scalar, list, "<16", "<=16", ">64", ">=64", "!=8", "16..64",
"%32" = a multiple of 32, "!%32" = not a multiple of 32).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from kernmux.dispatch.platform import Platform

ACTIONS = ("use", "prefer", "deny", "adapt", "allow_precision")
COMPARATORS = ("<=", ">=", "!=", "<", ">")  # two-character ones first when parsing


# --------------------------------------------------------------------------- matchers


@dataclass(frozen=True)
class OneOf:
    """Value equals one of ``values`` (a scalar in YAML is a one-element list)."""

    values: tuple[Any, ...]

    def __call__(self, value: Any) -> bool:
        return value in self.values

    def text(self) -> str:
        return str(self.values[0]) if len(self.values) == 1 else "[" + ", ".join(map(str, self.values)) + "]"


@dataclass(frozen=True)
class Compare:
    """``value <op> bound`` for op in <, <=, >, >=, != ."""

    op: str
    bound: Any

    def __call__(self, value: Any) -> bool:
        if self.op == "!=":
            return value != self.bound
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            return False
        return {
            "<": value < self.bound,
            "<=": value <= self.bound,
            ">": value > self.bound,
            ">=": value >= self.bound,
        }[self.op]

    def text(self) -> str:
        return f"{self.op}{self.bound}"


@dataclass(frozen=True)
class Between:
    """``lo <= value <= hi`` (YAML ``"16..64"``)."""

    lo: int
    hi: int

    def __call__(self, value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and self.lo <= value <= self.hi

    def text(self) -> str:
        return f"{self.lo}..{self.hi}"


@dataclass(frozen=True)
class MultipleOf:
    """``value % divisor == 0`` (YAML ``"%32"``), or its negation (``"!%32"``)."""

    divisor: int
    negate: bool = False

    def __call__(self, value: Any) -> bool:
        if not isinstance(value, int) or isinstance(value, bool):
            return False
        return (value % self.divisor == 0) != self.negate

    def text(self) -> str:
        return f"{'!' if self.negate else ''}%{self.divisor}"


@dataclass(frozen=True)
class LibVersion:
    """A library installed with a version in ``spec`` ("" = any version), or, when
    ``spec`` is None, the library absent."""

    spec: str | None

    def __call__(self, version: str | None) -> bool:
        if self.spec is None:
            return version is None
        if version is None:
            return False
        if not self.spec:
            return True
        try:
            return SpecifierSet(self.spec).contains(Version(version), prereleases=True)
        except InvalidVersion:
            return False

    def text(self) -> str:
        return "not installed" if self.spec is None else (self.spec or "installed")


Matcher = OneOf | Compare | Between | MultipleOf | LibVersion


@dataclass(frozen=True)
class Condition:
    """One ``when`` entry. kind: "platform", "lib" or "feature"."""

    kind: str
    key: str
    matcher: Matcher

    def value_of(self, features: Mapping[str, Any], platform: Platform) -> Any:
        if self.kind == "platform":
            return getattr(platform, self.key)
        if self.kind == "lib":
            return platform.libs.get(self.key)
        return features.get(self.key)

    def holds(self, features: Mapping[str, Any], platform: Platform) -> bool:
        return self.matcher(self.value_of(features, platform))

    def text(self) -> str:
        name = f"libs.{self.key}" if self.kind == "lib" else self.key
        return f"{name} {self.matcher.text()}"


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True)
class TransformSpec:
    """Head transforms: split into chunks of at most ``split_heads`` heads, each chunk
    padded up to ``pad_heads`` heads. None = not applied."""

    split_heads: int | None = None
    pad_heads: int | None = None

    def __bool__(self) -> bool:
        return self.split_heads is not None or self.pad_heads is not None

    def as_dict(self) -> dict[str, int]:
        out = {}
        if self.pad_heads is not None:
            out["pad_heads"] = self.pad_heads
        if self.split_heads is not None:
            out["split_heads"] = self.split_heads
        return out

    def text(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.as_dict().items())


@dataclass(frozen=True)
class Action:
    """kind: use | prefer | deny | adapt | allow_precision. ``kernels``: one for
    use/adapt, several for prefer/deny, none for allow_precision. ``config`` values may
    be ``"$feature"`` (the feature's value). ``precisions``: the precision classes an
    allow_precision rule admits (kernels of other classes than the op's reference are
    candidates only where such a rule matches)."""

    kind: str
    kernels: tuple[str, ...]
    config: Mapping[str, Any] = field(default_factory=dict)
    transform: TransformSpec = TransformSpec()
    precisions: tuple[str, ...] = ()

    def resolved_config(self, features: Mapping[str, Any]) -> dict[str, Any]:
        out = {}
        for key, value in self.config.items():
            if isinstance(value, str) and value.startswith("$"):
                value = features.get(value[1:])
            out[key] = value
        return out


@dataclass(frozen=True)
class Rule:
    id: str
    op: str
    when: tuple[Condition, ...]
    action: Action
    reason: str
    link: str
    source: str  # "file:line" where the rule starts
    layer: str = "shipped"  # "shipped" or "user"

    def matches(self, features: Mapping[str, Any], platform: Platform) -> bool:
        return all(cond.holds(features, platform) for cond in self.when)

    def first_mismatch(self, features: Mapping[str, Any], platform: Platform) -> Condition | None:
        for cond in self.when:
            if not cond.holds(features, platform):
                return cond
        return None

    def summary(self) -> str:
        action = self.action
        if action.kind in ("use", "adapt"):
            what = action.kernels[0]
            extras = [action.transform.text()] if action.transform else []
            if action.config:
                extras.append(f"config={dict(action.config)}")
            if extras:
                what += f" ({'; '.join(extras)})"
        elif action.kind == "allow_precision":
            what = "[" + ", ".join(action.precisions) + "]"
        else:
            what = "[" + ", ".join(action.kernels) + "]"
        return f"{self.id}: {action.kind} {what}"


@dataclass(frozen=True)
class RuleSet:
    """Rules in precedence order: user layers first, shipped last."""

    rules: tuple[Rule, ...] = ()
    files: tuple[str, ...] = ()

    def for_op(self, op: str) -> tuple[Rule, ...]:
        return tuple(rule for rule in self.rules if rule.op == op)
