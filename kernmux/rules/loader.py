"""Load rule files into frozen, validated :class:`Rule` objects.

Reading and composing the YAML is bounded (:mod:`kernmux.rules.source`); this module
validates the node tree. Every problem names ``file:line`` and says what was expected
and what was got, and validation goes on after a problem so that one pass finds them
all: :func:`check_rule_file` returns the good rules and every error (what ``rules lint``
shows), :func:`load_rule_file` raises the first error and counts the rest (what the
dispatcher, ``explain`` and the vLLM plugin do). All validation lives here.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import yaml
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from kernmux.dispatch.platform import PLATFORM_KEYS, VENDORS
from kernmux.dispatch.registry import REGISTRY, Kernel, Op, Registry
from kernmux.dispatch.rule_model import (
    ACTIONS,
    COMPARATORS,
    Action,
    Between,
    Compare,
    Condition,
    LibVersion,
    MultipleOf,
    OneOf,
    Rule,
    RuleSet,
    TransformSpec,
)
from kernmux.rules.source import MAX_INT_DIGITS, RuleError, compose, decode, read_bytes, safe_string, show

__all__ = ["RuleError", "check_rule_file", "load_rule_file", "load_rules", "parse_rules_text", "check_rules_text"]

SHIPPED_DIR = Path(__file__).parent / "shipped"
TOP_LEVEL_KEYS = ("version", "rules")
RULE_KEYS = ("id", "op", "when", *ACTIONS, "config", "split_heads", "pad_heads", "reason", "link")
TRANSFORM_KEYS = ("split_heads", "pad_heads")
ID_PATTERN = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
RANGE_PATTERN = re.compile(r"^\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*$")
MULTIPLE_PATTERN = re.compile(r"^(!?)%\s*(\d+)$")
# PEP 508 distribution names; rules spell them in PEP 503 normalised form.
DIST_NAME = re.compile(r"^([a-z0-9]|[a-z0-9][a-z0-9._-]*[a-z0-9])$", re.IGNORECASE)
MAX_SPECIFIER_CHARS = 200
# Transforms on an op whose head feature declares no maximum are capped here: no model
# has this many query heads on one rank, and pad_heads allocates that many per call.
TRANSFORM_HEADS_CEILING = 1024
SUPPORTED_VERSIONS = (1,)
MERGE_TAG = "tag:yaml.org,2002:merge"
STR_TAG = "tag:yaml.org,2002:str"
CONFIG_SCALARS = (bool, int, float, str)

T = TypeVar("T")


def normalise_dist(name: str) -> str:
    """PEP 503 normal form of a distribution name (``Amd_Aiter`` -> ``amd-aiter``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


class _Invalid(Exception):
    """What was being parsed is invalid; its problems are already in ``_Ctx.errors``."""


@dataclass
class _Ctx:
    path: str
    loader: yaml.SafeLoader
    registry: Registry
    layer: str
    errors: list[RuleError] = field(default_factory=list)
    _features: dict[str, frozenset[str]] = field(default_factory=dict)

    def features(self, op: Op) -> frozenset[str]:
        """The op's feature names (``Op.feature_names`` builds a tuple on each call)."""
        names = self._features.get(op.name)
        if names is None:
            names = self._features[op.name] = frozenset(op.feature_names)
        return names

    def where(self, node: yaml.Node) -> str:
        return f"{self.path}:{node.start_mark.line + 1}"

    def fail(self, node: yaml.Node, message: str) -> RuleError:
        return RuleError(self.where(node), message)

    def attempt(self, fn: Callable[..., T], *args: Any) -> T | None:
        """``fn(*args)``, or None after recording the RuleError it raised."""
        try:
            return fn(*args)
        except RuleError as e:
            self.errors.append(e)
            return None
        except _Invalid:
            return None

    def scalar(self, node: yaml.Node, what: str) -> Any:
        """The value of a scalar node; RuleError for a collection, a value YAML cannot
        build (a timestamp out of range, a 5,000-digit integer) or an unprintable string."""
        if not isinstance(node, yaml.ScalarNode):
            raise self.fail(node, f"{what} must be a single value, got {describe(node)}")
        if node.tag == STR_TAG:  # most values: no constructor call needed
            bad = safe_string(node.value)
            if bad:
                raise self.fail(node, f"{what} contains {bad}; expected printable text")
            return node.value
        try:
            value = self.loader.construct_object(node, deep=True)
        except yaml.MarkedYAMLError as e:
            raise self.fail(node, f"{what}: {e.problem or e}") from None
        except (yaml.YAMLError, ValueError, TypeError, OverflowError) as e:
            raise self.fail(node, f"{what}: cannot read {show(node.value)} ({type(e).__name__})") from None
        if isinstance(value, str):
            bad = safe_string(value)
            if bad:
                raise self.fail(node, f"{what} contains {bad}; expected printable text")
        return value


def describe(node: yaml.Node, value: Any = None) -> str:
    """What a node holds, in words, without building (or printing) a collection."""
    if isinstance(node, yaml.MappingNode):
        return "a set" if node.tag == "tag:yaml.org,2002:set" else "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if value is None:
        return "null"
    return f"{type(value).__name__} {show(value)}"


def _mapping_items(ctx: _Ctx, node: yaml.Node, what: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
    """(key, key node, value node) of a mapping, ``<<`` merges applied (explicit keys win,
    then earlier merge sources). A duplicate or non-string key is recorded and skipped."""
    if not isinstance(node, yaml.MappingNode):
        raise ctx.fail(node, f"{what} must be a mapping, got {describe(node, _peek(ctx, node))}")
    items: list[tuple[str, yaml.Node, yaml.Node]] = []
    seen: set[str] = set()
    pending = [node]  # merge sources, depth first (a cycle or repeat is read once)
    visited: set[int] = set()
    while pending:
        current = pending.pop(0)
        if id(current) in visited:
            continue
        visited.add(id(current))
        own: set[str] = set()
        sources = []
        for key_node, value_node in current.value:
            if key_node.tag == MERGE_TAG:
                for source in value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]:
                    if not isinstance(source, yaml.MappingNode):
                        ctx.errors.append(ctx.fail(source, f"'<<' in {what} merges mappings, got {describe(source, _peek(ctx, source))}"))
                        continue
                    sources.append(source)
                continue
            try:
                key = ctx.scalar(key_node, f"a key of {what}")
            except RuleError as e:
                ctx.errors.append(e)
                continue
            if not isinstance(key, str):
                ctx.errors.append(ctx.fail(key_node, f"{what} keys must be strings, got {describe(key_node, key)}"))
                continue
            if key in own:
                ctx.errors.append(ctx.fail(key_node, f"duplicate key {show(key)} in {what}"))
                continue
            own.add(key)
            if key not in seen:  # explicit keys override merged ones
                seen.add(key)
                items.append((key, key_node, value_node))
        pending[:0] = sources
    return items


def _peek(ctx: _Ctx, node: yaml.Node) -> Any:
    """A scalar's value for a message (None when it cannot be built or is a collection)."""
    if not isinstance(node, yaml.ScalarNode):
        return None
    try:
        return ctx.scalar(node, "value")
    except RuleError:
        return node.value


# --------------------------------------------------------------------------- loading


def check_rules_text(text: str, path: str, *, registry: Registry = REGISTRY, layer: str = "user") -> tuple[list[Rule], list[RuleError]]:
    """The valid rules of one file's text and every error found (in file order)."""
    registry.ensure_loaded()
    try:
        root, loader = compose(text, path)
    except RuleError as e:
        return [], [e]
    try:
        if root is None:
            return [], [RuleError(f"{path}:1", "empty rule file; expected a mapping with 'version: 1' and 'rules:'")]
        ctx = _Ctx(path, loader, registry, layer)
        rules = ctx.attempt(_parse_root, ctx, root) or []
        return rules, ctx.errors
    finally:
        loader.dispose()


def _line(error: RuleError) -> int:
    line = error.location.rpartition(":")[2]
    return int(line) if line.isdigit() else 0


def parse_rules_text(text: str, path: str, *, registry: Registry = REGISTRY, layer: str = "user") -> list[Rule]:
    """Parse and validate one rule file's text. Raises the first :class:`RuleError`."""
    rules, errors = check_rules_text(text, path, registry=registry, layer=layer)
    _raise_first(errors)
    return rules


def _raise_first(errors: Sequence[RuleError]) -> None:
    if errors:
        first = errors[0]
        raise RuleError(first.location, first.message, more=len(errors) - 1)


def _parse_root(ctx: _Ctx, root: yaml.Node) -> list[Rule]:
    items = _mapping_items(ctx, root, "rule file")
    keys = {key: (key_node, value_node) for key, key_node, value_node in items}
    for key, key_node, _ in items:
        if key not in TOP_LEVEL_KEYS:
            ctx.errors.append(ctx.fail(key_node, f"unknown top-level key {show(key)}; expected {list(TOP_LEVEL_KEYS)}"))
    if "version" not in keys:
        ctx.errors.append(ctx.fail(root, "missing 'version' (expected 'version: 1')"))
    else:
        ctx.attempt(_check_version, ctx, keys["version"][1])
    if "rules" not in keys:
        raise ctx.fail(root, "missing 'rules' (expected a list of rules)")
    rules_node = keys["rules"][1]
    if isinstance(rules_node, yaml.ScalarNode) and _peek(ctx, rules_node) is None:
        return []
    if not isinstance(rules_node, yaml.SequenceNode):
        raise ctx.fail(rules_node, f"'rules' must be a list, got {describe(rules_node, _peek(ctx, rules_node))}")
    rules, seen = [], {}
    for node in rules_node.value:
        rule = _parse_rule(ctx, node)
        if rule is None:
            continue
        if rule.id in seen:
            ctx.errors.append(ctx.fail(node, f"duplicate rule id {show(rule.id)} (first defined at {seen[rule.id]})"))
            continue
        seen[rule.id] = rule.source
        rules.append(rule)
    return rules


def _check_version(ctx: _Ctx, node: yaml.Node) -> None:
    version = ctx.scalar(node, "'version'")
    if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        raise ctx.fail(node, f"unsupported version {show(version)}; expected one of {list(SUPPORTED_VERSIONS)}")


def _parse_rule(ctx: _Ctx, node: yaml.Node) -> Rule | None:
    """The rule, or None after recording every problem found in it."""
    errors_before = len(ctx.errors)
    items = ctx.attempt(_mapping_items, ctx, node, "a rule")
    if items is None:
        return None
    fields = {}
    for key, key_node, value_node in items:
        if key not in RULE_KEYS:
            ctx.errors.append(ctx.fail(key_node, f"unknown rule key {show(key)}; expected one of {list(RULE_KEYS)}"))
            continue
        fields[key] = (key_node, value_node)

    def required_str(key: str) -> str:
        if key not in fields:
            raise ctx.fail(node, f"rule is missing {key!r}")
        value = ctx.scalar(fields[key][1], repr(key))
        if not isinstance(value, str) or not value.strip():
            raise ctx.fail(fields[key][1], f"{key!r} must be a non-empty string, got {describe(fields[key][1], value)}")
        return value.strip()

    rule_id = ctx.attempt(required_str, "id")
    if rule_id is not None and not ID_PATTERN.match(rule_id):
        ctx.errors.append(ctx.fail(fields["id"][1], f"rule id {show(rule_id)} must be kebab-case (lowercase letters, digits, '-')"))
    label = show(rule_id) if rule_id else "rule"
    op = ctx.attempt(_op_of, ctx, fields, required_str)
    reason = ctx.attempt(required_str, "reason")
    link = ctx.attempt(required_str, "link")

    actions = [key for key in ACTIONS if key in fields]
    action = None
    if not actions:
        ctx.errors.append(ctx.fail(node, f"rule {label} has no action; expected exactly one of {list(ACTIONS)}"))
    elif len(actions) > 1:
        ctx.errors.append(ctx.fail(fields[actions[1]][0], f"rule {label} has {len(actions)} actions {actions}; expected exactly one"))
    elif op is not None:
        action = ctx.attempt(_parse_action, ctx, op, actions[0], fields)
    when = ()
    if op is not None and "when" in fields:
        when = ctx.attempt(_parse_when, ctx, op, fields["when"][1])
    if len(ctx.errors) > errors_before:
        # in line order (fields are checked in a fixed order, not the file's); stable sort
        ctx.errors[errors_before:] = sorted(ctx.errors[errors_before:], key=_line)
        return None
    return Rule(
        id=rule_id,
        op=op.name,
        when=when,
        action=action,
        reason=reason,
        link=link,
        source=ctx.where(node),
        layer=ctx.layer,
    )


def _op_of(ctx: _Ctx, fields: dict, required_str: Callable[[str], str]) -> Op:
    op_name = required_str("op")
    if op_name not in ctx.registry.ops:
        known = ", ".join(sorted(ctx.registry.ops))
        raise ctx.fail(fields["op"][1], f"unknown op {show(op_name)}; known ops: {known}")
    return ctx.registry.ops[op_name]


def _kernel_name(ctx: _Ctx, op: Op, node: yaml.Node) -> str:
    name = ctx.scalar(node, "a kernel name")
    if not isinstance(name, str):
        raise ctx.fail(node, f"kernel name must be a string, got {describe(node, name)}")
    kernels = ctx.registry.kernels.get(op.name, {})
    if name not in kernels:
        raise ctx.fail(node, f"unknown kernel {show(name)} for op {op.name!r}; known kernels: {', '.join(sorted(kernels))}")
    return name


def _transform(ctx: _Ctx, op: Op, node: yaml.Node, key: str) -> int:
    """A head count for ``split_heads``/``pad_heads``: positive, at most the op's heads."""
    value = ctx.scalar(node, repr(key))
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ctx.fail(node, f"{key!r} must be a positive integer, got {describe(node, value)}")
    if op.head_axes is None:
        return value  # reported once by _parse_action
    feature = op.head_axes.feature
    maximum = getattr(op.spec(feature), "maximum", None)
    upper = maximum if maximum is not None else TRANSFORM_HEADS_CEILING
    if value > upper:
        where = f"the most {feature!r} {op.name} takes" if maximum is not None else f"kernmux's ceiling for ops that declare no maximum {feature!r}"
        raise ctx.fail(node, f"{key!r}: {show(value)} is more than {upper}, {where}; expected 1..{upper}")
    return value


def _parse_config(ctx: _Ctx, op: Op, kernel: Kernel | None, node: yaml.Node) -> dict[str, Any]:
    """Config keys and values checked against ``kernel``'s config space ("$feature"
    values stand for the problem's feature and are checked to name one)."""
    config: dict[str, Any] = {}
    items = _mapping_items(ctx, node, "'config'")
    space = kernel.config_space if kernel is not None else None
    if kernel is not None and not space and items:
        raise ctx.fail(node, f"kernel {kernel.name!r} of {op.name} takes no config; got keys {[show(k) for k, _, _ in items[:8]]}")
    for key, key_node, value_node in items:
        value = ctx.attempt(_config_value, ctx, op, kernel, key, key_node, value_node)
        if value is not None:
            config[key] = value
    return config


def _config_value(ctx: _Ctx, op: Op, kernel: Kernel | None, key: str, key_node: yaml.Node, node: yaml.Node) -> Any:
    value = ctx.scalar(node, f"config value {show(key)}")
    if type(value) not in CONFIG_SCALARS:
        raise ctx.fail(node, f"config value {show(key)} must be a number, string or bool, got {describe(node, value)}")
    space = kernel.config_space if kernel is not None else None
    if space and key not in space:
        raise ctx.fail(key_node, f"unknown config key {show(key)} for kernel {kernel.name!r}; expected one of {', '.join(space)}")
    if isinstance(value, str) and value.startswith("$"):
        if value[1:] not in ctx.features(op):
            raise ctx.fail(node, f"config {show(key)} refers to unknown feature {show(value)}; features of {op.name}: {', '.join(op.feature_names)}")
        return value
    if space and not any(type(choice) is type(value) and choice == value for choice in space[key]):
        choices = ", ".join(show(c) for c in space[key])
        raise ctx.fail(node, f"config {key}={show(value)} is not in the config space of kernel {kernel.name!r}; expected one of {choices} (or '$feature')")
    return value


def _parse_action(ctx: _Ctx, op: Op, kind: str, fields: dict) -> Action:
    key_node, node = fields[kind]
    errors_before = len(ctx.errors)
    kernels_of_op = ctx.registry.kernels.get(op.name, {})
    if kind in ("prefer", "deny"):
        for extra in ("config", *TRANSFORM_KEYS):
            if extra in fields:
                ctx.errors.append(ctx.fail(fields[extra][0], f"{extra!r} is only allowed with 'use' or 'adapt', not with {kind!r}"))
        if isinstance(node, yaml.ScalarNode):
            kernels = (ctx.attempt(_kernel_name, ctx, op, node),)
        elif isinstance(node, yaml.SequenceNode) and node.value:
            kernels = tuple(ctx.attempt(_kernel_name, ctx, op, item) for item in node.value)
        else:
            raise ctx.fail(node, f"{kind!r} expects a kernel name or a non-empty list of kernel names")
        if len(ctx.errors) > errors_before:
            raise _Invalid
        return Action(kind, kernels)

    # use / adapt: a kernel name, or a mapping {kernel, config?, split_heads?, pad_heads?}
    config_nodes: list[yaml.Node] = []
    transform_nodes: dict[str, yaml.Node] = {}
    kernel = None
    if isinstance(node, yaml.MappingNode):
        sub = {}
        for key, sub_key_node, value_node in _mapping_items(ctx, node, repr(kind)):
            if key not in ("kernel", "config", *TRANSFORM_KEYS):
                ctx.errors.append(ctx.fail(sub_key_node, f"unknown key {show(key)} in {kind!r}; expected kernel, config, split_heads, pad_heads"))
            sub[key] = value_node
        if "kernel" not in sub:
            ctx.errors.append(ctx.fail(node, f"{kind!r} mapping needs 'kernel'"))
        else:
            kernel = ctx.attempt(_kernel_name, ctx, op, sub["kernel"])
        if "config" in sub:
            config_nodes.append(sub["config"])
        transform_nodes.update({key: sub[key] for key in TRANSFORM_KEYS if key in sub})
    elif isinstance(node, yaml.ScalarNode):
        kernel = ctx.attempt(_kernel_name, ctx, op, node)
    else:
        raise ctx.fail(node, f"{kind!r} expects a kernel name or a mapping with 'kernel'")
    if "config" in fields:
        config_nodes.append(fields["config"][1])
    transform_nodes.update({key: fields[key][1] for key in TRANSFORM_KEYS if key in fields})

    kernel_obj = kernels_of_op.get(kernel) if kernel is not None else None
    config: dict[str, Any] = {}
    for config_node in config_nodes:
        config.update(ctx.attempt(_parse_config, ctx, op, kernel_obj, config_node) or {})
    transform: dict[str, int] = {}
    if transform_nodes and op.head_axes is None:
        ctx.errors.append(ctx.fail(key_node, f"op {op.name!r} declares no head axis, so split_heads/pad_heads cannot apply"))
    for key, transform_node in transform_nodes.items():
        value = ctx.attempt(_transform, ctx, op, transform_node, key)
        if value is not None:
            transform[key] = value
    if kind == "adapt" and not config_nodes and not transform_nodes:
        ctx.errors.append(ctx.fail(node, "'adapt' must attach a config or a transform (split_heads / pad_heads)"))
    if len(ctx.errors) > errors_before:
        raise _Invalid
    return Action(kind, (kernel,), config, TransformSpec(**transform))


def _parse_when(ctx: _Ctx, op: Op, node: yaml.Node) -> tuple[Condition, ...]:
    errors_before = len(ctx.errors)
    conditions = []
    for key, key_node, value_node in _mapping_items(ctx, node, "'when'"):
        condition = ctx.attempt(_parse_condition, ctx, op, key, key_node, value_node)
        if isinstance(condition, list):
            conditions.extend(condition)
    if len(ctx.errors) > errors_before:
        raise _Invalid
    return tuple(conditions)


def _parse_condition(ctx: _Ctx, op: Op, key: str, key_node: yaml.Node, value_node: yaml.Node) -> list[Condition]:
    if key == "libs":
        errors_before = len(ctx.errors)
        conditions = []
        for dist, dist_node, spec_node in _mapping_items(ctx, value_node, "'libs'"):
            if ctx.attempt(_check_dist_name, ctx, dist, dist_node) is None:
                continue
            spec = ctx.attempt(_parse_lib_spec, ctx, dist, spec_node)
            if spec is not None:
                conditions.append(Condition("lib", dist, spec))
        if len(ctx.errors) > errors_before:
            raise _Invalid
        return conditions
    if key in PLATFORM_KEYS:
        kind = "int" if key == "units" else "str"
        matcher = _parse_matcher(ctx, key, kind, value_node)
        if key == "vendor" and isinstance(matcher, OneOf):
            for vendor in matcher.values:
                if vendor not in VENDORS:
                    raise ctx.fail(value_node, f"unknown vendor {show(vendor)}; expected one of {list(VENDORS)}")
        return [Condition("platform", key, matcher)]
    if key in ctx.features(op):
        spec = op.spec(key)
        return [Condition("feature", key, _parse_matcher(ctx, key, spec.kind, value_node))]
    raise ctx.fail(
        key_node,
        f"unknown condition key {show(key)} for op {op.name!r}; expected a platform key "
        f"({', '.join(PLATFORM_KEYS)}), 'libs', or a feature ({', '.join(op.feature_names)})",
    )


def _check_dist_name(ctx: _Ctx, dist: str, node: yaml.Node) -> str:
    if not DIST_NAME.match(dist):
        raise ctx.fail(node, f"libs: {show(dist)} is not a distribution name; expected letters, digits, '-', '_', '.' starting and ending with a letter or digit (PEP 508)")
    normal = normalise_dist(dist)
    if normal != dist:
        raise ctx.fail(node, f"libs: write {show(dist)} in PEP 503 normalised form, {show(normal)}")
    return dist


def _parse_lib_spec(ctx: _Ctx, dist: str, node: yaml.Node) -> LibVersion:
    value = ctx.scalar(node, f"libs.{dist}")
    if value is None:
        return LibVersion(None)
    if not isinstance(value, str):
        raise ctx.fail(node, f"libs.{dist} must be a PEP 440 specifier string or null, got {describe(node, value)}")
    text = value.strip()
    if text in ("", "*"):
        return LibVersion("")
    example = "(e.g. '>=0.1.12', '<0.1.22,>=0.1.9')"
    if len(text) > MAX_SPECIFIER_CHARS:
        raise ctx.fail(node, f"libs.{dist}: specifier of {len(text)} characters; expected at most {MAX_SPECIFIER_CHARS} {example}")
    try:
        specifiers = SpecifierSet(text)
    except InvalidSpecifier:
        raise ctx.fail(node, f"libs.{dist}: {show(value)} is not a PEP 440 specifier {example}") from None
    for spec in specifiers:
        if spec.operator == "===":
            continue  # arbitrary (string) equality: any text; lint says when it can never match
        try:
            Version(spec.version.removesuffix(".*"))
        except (InvalidVersion, ValueError):
            raise ctx.fail(node, f"libs.{dist}: {show(spec.version)} in {show(text)} is not a usable PEP 440 version {example}") from None
    return LibVersion(text)


def _bounded_int(ctx: _Ctx, node: yaml.Node, key: str, text: str) -> int:
    digits = text.lstrip("-+ ")
    if len(digits) > MAX_INT_DIGITS:
        raise ctx.fail(node, f"{key!r}: a number of {len(digits)} digits in {show(text)}; expected at most {MAX_INT_DIGITS} digits")
    return int(text)


def _scalar_of_kind(ctx: _Ctx, key: str, kind: str, node: yaml.Node, value: Any) -> Any:
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.fail(node, f"{key!r} expects an integer (or a comparison such as '<16' or '16..64'), got {describe(node, value)}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ctx.fail(node, f"{key!r} expects true or false, got {describe(node, value)}")
    elif not isinstance(value, str):
        raise ctx.fail(node, f"{key!r} expects a string, got {describe(node, value)}")
    return value


def _parse_matcher(ctx: _Ctx, key: str, kind: str, node: yaml.Node):
    if isinstance(node, yaml.SequenceNode):
        if not node.value:
            raise ctx.fail(node, f"{key!r}: empty list can never match")
        values = []
        for item in node.value:
            if not isinstance(item, yaml.ScalarNode):
                raise ctx.fail(item, f"{key!r}: list items must be scalars, got {describe(item)}")
            values.append(_scalar_of_kind(ctx, key, kind, item, ctx.scalar(item, repr(key))))
        return OneOf(tuple(values))
    if not isinstance(node, yaml.ScalarNode):
        raise ctx.fail(node, f"{key!r} expects a scalar, a list or a comparison string, got {describe(node)}")
    value = ctx.scalar(node, repr(key))
    if isinstance(value, str):
        text = value.strip()
        range_match = RANGE_PATTERN.match(text)
        if range_match:
            if kind != "int":
                raise ctx.fail(node, f"{key!r} is a {kind} feature; a range {show(text)} only applies to integers")
            return Between(_bounded_int(ctx, node, key, range_match.group(1)), _bounded_int(ctx, node, key, range_match.group(2)))
        multiple = MULTIPLE_PATTERN.match(text)
        if multiple:
            if kind != "int":
                raise ctx.fail(node, f"{key!r} is a {kind} feature; {show(text)} (multiple of) only applies to integers")
            divisor = _bounded_int(ctx, node, key, multiple.group(2))
            if divisor <= 0:
                raise ctx.fail(node, f"{key!r}: divisor in {show(text)} must be positive")
            return MultipleOf(divisor, negate=bool(multiple.group(1)))
        for op in COMPARATORS:
            if text.startswith(op):
                bound_text = text[len(op):].strip()
                if kind == "int":
                    if not re.fullmatch(r"[-+]?\d+", bound_text):
                        raise ctx.fail(node, f"{key!r}: bad comparison {show(text)}; expected e.g. '<16', '>=64', '!=8', '16..64', '%32'")
                    bound: Any = _bounded_int(ctx, node, key, bound_text)
                elif op == "!=":
                    bound = bound_text if kind == "str" else bound_text.lower() in ("true", "1", "yes")
                else:
                    raise ctx.fail(node, f"{key!r} is a {kind} feature; comparison {show(text)} only applies to integers")
                return Compare(op, bound)
        if kind == "int" and any(ch in text for ch in "<>=!.~%"):
            raise ctx.fail(node, f"{key!r}: bad comparator in {show(text)}; expected one of <, <=, >, >=, !=, a range 'lo..hi' or '%N' / '!%N' (multiple of N)")
    return OneOf((_scalar_of_kind(ctx, key, kind, node, value),))


# --------------------------------------------------------------------------- files


def check_rule_file(path: str | os.PathLike, *, registry: Registry = REGISTRY, layer: str = "user") -> tuple[list[Rule], list[RuleError]]:
    """The valid rules of a file and every problem found in it (reading included)."""
    name = str(path)
    try:
        text = decode(read_bytes(name), name)
    except RuleError as e:
        return [], [e]
    return check_rules_text(text, name, registry=registry, layer=layer)


def load_rule_file(path: str | os.PathLike, *, registry: Registry = REGISTRY, layer: str = "user") -> list[Rule]:
    """The rules of one file; raises the first :class:`RuleError` (counting the others)."""
    rules, errors = check_rule_file(path, registry=registry, layer=layer)
    _raise_first(errors)
    return rules


def shipped_rule_files() -> list[Path]:
    return sorted(SHIPPED_DIR.glob("*.yaml"))


def user_rule_files(extra: Sequence[str | os.PathLike] = ()) -> list[Path]:
    """--rules files first (most binding), then KERNMUX_RULES (colon-separated)."""
    paths = [Path(p) for p in extra]
    env = os.environ.get("KERNMUX_RULES", "")
    paths += [Path(p) for p in env.split(os.pathsep) if p.strip()]
    return paths


def load_rules(
    extra: Sequence[str | os.PathLike] = (),
    *,
    include_shipped: bool = True,
    registry: Registry = REGISTRY,
) -> RuleSet:
    """All rules in precedence order: --rules, KERNMUX_RULES, then shipped files.

    Raises :class:`RuleError` for the first malformed file or an id defined twice."""
    files: list[tuple[Path, str]] = [(p, "user") for p in user_rule_files(extra)]
    if include_shipped:
        files += [(p, "shipped") for p in shipped_rule_files()]
    rules: list[Rule] = []
    seen: dict[str, Rule] = {}
    for path, layer in files:
        for rule in load_rule_file(path, registry=registry, layer=layer):
            first = seen.get(rule.id)
            if first is not None and first.layer != rule.layer:  # name the user's rule: theirs to rename
                raise RuleError(first.source, f"rule id {rule.id!r} is already used by the {rule.layer} rule at {rule.source}; ids must be unique across layers")
            if first is not None:
                raise RuleError(rule.source, f"duplicate rule id {rule.id!r} (first defined at {first.source})")
            seen[rule.id] = rule
            rules.append(rule)
    return RuleSet(tuple(rules), tuple(str(p) for p, _ in files))


def iter_errors(paths: Iterable[str | os.PathLike], *, registry: Registry = REGISTRY) -> list[RuleError]:
    """Every problem of every file (lint reports all files and all problems)."""
    errors = []
    for path in paths:
        errors += check_rule_file(path, registry=registry)[1]
    return errors
