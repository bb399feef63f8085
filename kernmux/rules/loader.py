"""Load rule files into frozen, validated :class:`Rule` objects.

Parsing uses PyYAML's SafeLoader (never arbitrary objects) at the node level so that
every error names ``file:line`` and says what was expected and what was got. All
validation lives here; :func:`load_rules` is what the dispatcher, ``explain`` and
``rules lint`` share.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from packaging.specifiers import InvalidSpecifier, SpecifierSet

from kernmux.dispatch.platform import PLATFORM_KEYS, VENDORS
from kernmux.dispatch.registry import REGISTRY, Op, Registry
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

SHIPPED_DIR = Path(__file__).parent / "shipped"
TOP_LEVEL_KEYS = ("version", "rules")
RULE_KEYS = ("id", "op", "when", *ACTIONS, "config", "split_heads", "pad_heads", "reason", "link")
TRANSFORM_KEYS = ("split_heads", "pad_heads")
ID_PATTERN = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
RANGE_PATTERN = re.compile(r"^\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*$")
MULTIPLE_PATTERN = re.compile(r"^(!?)%\s*(\d+)$")
SUPPORTED_VERSIONS = (1,)


class RuleError(ValueError):
    """A rule file is malformed. ``location`` is ``file:line``."""

    def __init__(self, location: str, message: str):
        self.location = location
        self.message = message
        super().__init__(f"{location}: {message}")


@dataclass
class _Ctx:
    path: str
    loader: yaml.SafeLoader
    registry: Registry
    layer: str

    def where(self, node: yaml.Node) -> str:
        return f"{self.path}:{node.start_mark.line + 1}"

    def fail(self, node: yaml.Node, message: str) -> RuleError:
        return RuleError(self.where(node), message)

    def value(self, node: yaml.Node) -> Any:
        return self.loader.construct_object(node, deep=True)


def _type_name(node: yaml.Node, value: Any) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    if value is None:
        return "null"
    return f"{type(value).__name__} {value!r}"


def _mapping_items(ctx: _Ctx, node: yaml.Node, what: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
    if not isinstance(node, yaml.MappingNode):
        raise ctx.fail(node, f"{what} must be a mapping, got {_type_name(node, ctx.value(node))}")
    items, seen = [], set()
    for key_node, value_node in node.value:
        key = ctx.value(key_node)
        if not isinstance(key, str):
            raise ctx.fail(key_node, f"{what} keys must be strings, got {key!r}")
        if key in seen:
            raise ctx.fail(key_node, f"duplicate key {key!r} in {what}")
        seen.add(key)
        items.append((key, key_node, value_node))
    return items


# --------------------------------------------------------------------------- loading


def parse_rules_text(text: str, path: str, *, registry: Registry = REGISTRY, layer: str = "user") -> list[Rule]:
    """Parse and validate one rule file's text. Raises :class:`RuleError`."""
    registry.ensure_loaded()
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line = mark.line + 1 if mark is not None else 1
            raise RuleError(f"{path}:{line}", f"YAML syntax error: {e.problem or e}") from None
        except yaml.YAMLError as e:
            raise RuleError(f"{path}:1", f"YAML error: {e}") from None
        ctx = _Ctx(path, loader, registry, layer)
        if root is None:
            raise RuleError(f"{path}:1", "empty rule file; expected a mapping with 'version: 1' and 'rules:'")
        try:
            return _parse_root(ctx, root)
        except yaml.YAMLError as e:  # e.g. an unknown tag deep inside
            raise RuleError(f"{path}:1", f"YAML error: {e}") from None
    finally:
        loader.dispose()


def _parse_root(ctx: _Ctx, root: yaml.Node) -> list[Rule]:
    items = _mapping_items(ctx, root, "rule file")
    keys = {key: (key_node, value_node) for key, key_node, value_node in items}
    for key, key_node, _ in items:
        if key not in TOP_LEVEL_KEYS:
            raise ctx.fail(key_node, f"unknown top-level key {key!r}; expected {list(TOP_LEVEL_KEYS)}")
    if "version" not in keys:
        raise ctx.fail(root, "missing 'version' (expected 'version: 1')")
    version = ctx.value(keys["version"][1])
    if version not in SUPPORTED_VERSIONS or isinstance(version, bool):
        raise ctx.fail(keys["version"][1], f"unsupported version {version!r}; expected one of {list(SUPPORTED_VERSIONS)}")
    if "rules" not in keys:
        raise ctx.fail(root, "missing 'rules' (expected a list of rules)")
    rules_node = keys["rules"][1]
    if isinstance(rules_node, yaml.ScalarNode) and ctx.value(rules_node) is None:
        return []
    if not isinstance(rules_node, yaml.SequenceNode):
        raise ctx.fail(rules_node, f"'rules' must be a list, got {_type_name(rules_node, ctx.value(rules_node))}")
    rules, seen = [], {}
    for node in rules_node.value:
        rule = _parse_rule(ctx, node)
        if rule.id in seen:
            raise ctx.fail(node, f"duplicate rule id {rule.id!r} (first defined at {seen[rule.id]})")
        seen[rule.id] = rule.source
        rules.append(rule)
    return rules


def _parse_rule(ctx: _Ctx, node: yaml.Node) -> Rule:
    items = _mapping_items(ctx, node, "a rule")
    fields = {}
    for key, key_node, value_node in items:
        if key not in RULE_KEYS:
            raise ctx.fail(key_node, f"unknown rule key {key!r}; expected one of {list(RULE_KEYS)}")
        fields[key] = (key_node, value_node)

    def required_str(key: str) -> str:
        if key not in fields:
            raise ctx.fail(node, f"rule is missing {key!r}")
        value = ctx.value(fields[key][1])
        if not isinstance(value, str) or not value.strip():
            raise ctx.fail(fields[key][1], f"{key!r} must be a non-empty string, got {_type_name(fields[key][1], value)}")
        return value.strip()

    rule_id = required_str("id")
    if not ID_PATTERN.match(rule_id):
        raise ctx.fail(fields["id"][1], f"rule id {rule_id!r} must be kebab-case (lowercase letters, digits, '-')")
    op_name = required_str("op")
    if op_name not in ctx.registry.ops:
        known = ", ".join(sorted(name for name in ctx.registry.ops))
        raise ctx.fail(fields["op"][1], f"unknown op {op_name!r}; known ops: {known}")
    op = ctx.registry.ops[op_name]
    reason = required_str("reason")
    link = required_str("link")

    actions = [key for key in ACTIONS if key in fields]
    if not actions:
        raise ctx.fail(node, f"rule {rule_id!r} has no action; expected exactly one of {list(ACTIONS)}")
    if len(actions) > 1:
        raise ctx.fail(fields[actions[1]][0], f"rule {rule_id!r} has {len(actions)} actions {actions}; expected exactly one")
    action = _parse_action(ctx, op, actions[0], fields)
    when = _parse_when(ctx, op, fields["when"][1]) if "when" in fields else ()
    return Rule(
        id=rule_id,
        op=op_name,
        when=when,
        action=action,
        reason=reason,
        link=link,
        source=ctx.where(node),
        layer=ctx.layer,
    )


def _kernel_name(ctx: _Ctx, op: Op, node: yaml.Node) -> str:
    name = ctx.value(node)
    if not isinstance(name, str):
        raise ctx.fail(node, f"kernel name must be a string, got {_type_name(node, name)}")
    kernels = ctx.registry.kernels.get(op.name, {})
    if name not in kernels:
        raise ctx.fail(node, f"unknown kernel {name!r} for op {op.name!r}; known kernels: {', '.join(sorted(kernels))}")
    return name


def _positive_int(ctx: _Ctx, node: yaml.Node, key: str) -> int:
    value = ctx.value(node)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ctx.fail(node, f"{key!r} must be a positive integer, got {_type_name(node, value)}")
    return value


def _parse_config(ctx: _Ctx, op: Op, node: yaml.Node) -> dict[str, Any]:
    config = {}
    for key, _, value_node in _mapping_items(ctx, node, "'config'"):
        value = ctx.value(value_node)
        if isinstance(value, (dict, list)):
            raise ctx.fail(value_node, f"config value {key!r} must be a scalar, got {_type_name(value_node, value)}")
        if isinstance(value, str) and value.startswith("$") and value[1:] not in op.feature_names:
            raise ctx.fail(value_node, f"config {key!r} refers to unknown feature {value!r}; features of {op.name}: {', '.join(op.feature_names)}")
        config[key] = value
    return config


def _parse_action(ctx: _Ctx, op: Op, kind: str, fields: dict) -> Action:
    key_node, node = fields[kind]
    config: dict[str, Any] = {}
    transform: dict[str, int] = {}
    if kind == "allow_precision":
        return _parse_allow_precision(ctx, op, fields)
    if kind in ("prefer", "deny"):
        for extra in ("config", *TRANSFORM_KEYS):
            if extra in fields:
                raise ctx.fail(fields[extra][0], f"{extra!r} is only allowed with 'use' or 'adapt', not with {kind!r}")
        if isinstance(node, yaml.ScalarNode):
            kernels = (_kernel_name(ctx, op, node),)
        elif isinstance(node, yaml.SequenceNode) and node.value:
            kernels = tuple(_kernel_name(ctx, op, item) for item in node.value)
        else:
            raise ctx.fail(node, f"{kind!r} expects a kernel name or a non-empty list of kernel names")
        return Action(kind, kernels)

    # use / adapt: a kernel name, or a mapping {kernel, config?, split_heads?, pad_heads?}
    if isinstance(node, yaml.MappingNode):
        sub = {key: value_node for key, _, value_node in _mapping_items(ctx, node, f"{kind!r}")}
        for key, sub_key_node, _ in _mapping_items(ctx, node, f"{kind!r}"):
            if key not in ("kernel", "config", *TRANSFORM_KEYS):
                raise ctx.fail(sub_key_node, f"unknown key {key!r} in {kind!r}; expected kernel, config, split_heads, pad_heads")
        if "kernel" not in sub:
            raise ctx.fail(node, f"{kind!r} mapping needs 'kernel'")
        kernel = _kernel_name(ctx, op, sub["kernel"])
        if "config" in sub:
            config = _parse_config(ctx, op, sub["config"])
        for key in TRANSFORM_KEYS:
            if key in sub:
                transform[key] = _positive_int(ctx, sub[key], key)
    elif isinstance(node, yaml.ScalarNode):
        kernel = _kernel_name(ctx, op, node)
    else:
        raise ctx.fail(node, f"{kind!r} expects a kernel name or a mapping with 'kernel'")
    if "config" in fields:
        config.update(_parse_config(ctx, op, fields["config"][1]))
    for key in TRANSFORM_KEYS:
        if key in fields:
            transform[key] = _positive_int(ctx, fields[key][1], key)
    if kind == "adapt" and not config and not transform:
        raise ctx.fail(node, "'adapt' must attach a config or a transform (split_heads / pad_heads)")
    if transform and op.head_axes is None:
        raise ctx.fail(key_node, f"op {op.name!r} declares no head axis, so split_heads/pad_heads cannot apply")
    return Action(kind, (kernel,), config, TransformSpec(**transform))


def _parse_allow_precision(ctx: _Ctx, op: Op, fields: dict) -> Action:
    """``allow_precision: W4A4`` or ``[W4A4, ...]``: classes the op declares, not its
    reference class (always allowed)."""
    for extra in ("config", *TRANSFORM_KEYS):
        if extra in fields:
            raise ctx.fail(fields[extra][0], f"{extra!r} is only allowed with 'use' or 'adapt', not with 'allow_precision'")
    node = fields["allow_precision"][1]
    items = node.value if isinstance(node, yaml.SequenceNode) else [node]
    if not items or not all(isinstance(item, yaml.ScalarNode) for item in items):
        raise ctx.fail(node, "'allow_precision' expects a precision class name or a non-empty list of them")
    precisions = []
    for item in items:
        name = ctx.value(item)
        if name == op.precision:
            raise ctx.fail(item, f"{name!r} is the reference class of {op.name!r}, always allowed; name a coarser class ({', '.join(op.precision_classes) or 'none declared'})")
        if not isinstance(name, str) or name not in op.precision_classes:
            declared = ", ".join(op.precision_classes) or f"none: every kernel of {op.name} computes its reference class {op.precision!r}"
            raise ctx.fail(item, f"unknown precision class {name!r} for op {op.name!r}; declared classes: {declared}")
        precisions.append(name)
    return Action("allow_precision", (), precisions=tuple(precisions))


def _parse_when(ctx: _Ctx, op: Op, node: yaml.Node) -> tuple[Condition, ...]:
    conditions = []
    for key, key_node, value_node in _mapping_items(ctx, node, "'when'"):
        if key == "libs":
            for dist, _, spec_node in _mapping_items(ctx, value_node, "'libs'"):
                conditions.append(Condition("lib", dist, _parse_lib_spec(ctx, dist, spec_node)))
        elif key in PLATFORM_KEYS:
            kind = "int" if key == "units" else "str"
            matcher = _parse_matcher(ctx, key, kind, value_node)
            if key == "vendor" and isinstance(matcher, OneOf):
                for vendor in matcher.values:
                    if vendor not in VENDORS:
                        raise ctx.fail(value_node, f"unknown vendor {vendor!r}; expected one of {list(VENDORS)}")
            conditions.append(Condition("platform", key, matcher))
        elif key in op.feature_names:
            spec = op.spec(key)
            conditions.append(Condition("feature", key, _parse_matcher(ctx, key, spec.kind, value_node)))
        else:
            raise ctx.fail(
                key_node,
                f"unknown condition key {key!r} for op {op.name!r}; expected a platform key "
                f"({', '.join(PLATFORM_KEYS)}), 'libs', or a feature ({', '.join(op.feature_names)})",
            )
    return tuple(conditions)


def _parse_lib_spec(ctx: _Ctx, dist: str, node: yaml.Node) -> LibVersion:
    value = ctx.value(node)
    if value is None:
        return LibVersion(None)
    if not isinstance(value, str):
        raise ctx.fail(node, f"libs.{dist} must be a PEP 440 specifier string or null, got {_type_name(node, value)}")
    text = value.strip()
    if text in ("", "*"):
        return LibVersion("")
    try:
        SpecifierSet(text)
    except InvalidSpecifier:
        raise ctx.fail(node, f"libs.{dist}: {value!r} is not a PEP 440 specifier (e.g. '>=0.1.12', '<0.1.22,>=0.1.9')") from None
    return LibVersion(text)


def _scalar_of_kind(ctx: _Ctx, key: str, kind: str, node: yaml.Node, value: Any) -> Any:
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.fail(node, f"{key!r} expects an integer (or a comparison such as '<16' or '16..64'), got {_type_name(node, value)}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ctx.fail(node, f"{key!r} expects true or false, got {_type_name(node, value)}")
    elif not isinstance(value, str):
        raise ctx.fail(node, f"{key!r} expects a string, got {_type_name(node, value)}")
    return value


def _parse_matcher(ctx: _Ctx, key: str, kind: str, node: yaml.Node):
    if isinstance(node, yaml.SequenceNode):
        if not node.value:
            raise ctx.fail(node, f"{key!r}: empty list can never match")
        values = []
        for item in node.value:
            if not isinstance(item, yaml.ScalarNode):
                raise ctx.fail(item, f"{key!r}: list items must be scalars")
            values.append(_scalar_of_kind(ctx, key, kind, item, ctx.value(item)))
        return OneOf(tuple(values))
    if not isinstance(node, yaml.ScalarNode):
        raise ctx.fail(node, f"{key!r} expects a scalar, a list or a comparison string, got a mapping")
    value = ctx.value(node)
    if isinstance(value, str):
        text = value.strip()
        range_match = RANGE_PATTERN.match(text)
        if range_match:
            if kind != "int":
                raise ctx.fail(node, f"{key!r} is a {kind} feature; a range {text!r} only applies to integers")
            lo, hi = int(range_match.group(1)), int(range_match.group(2))
            return Between(lo, hi)
        multiple = MULTIPLE_PATTERN.match(text)
        if multiple:
            if kind != "int":
                raise ctx.fail(node, f"{key!r} is a {kind} feature; {text!r} (multiple of) only applies to integers")
            divisor = int(multiple.group(2))
            if divisor <= 0:
                raise ctx.fail(node, f"{key!r}: divisor in {text!r} must be positive")
            return MultipleOf(divisor, negate=bool(multiple.group(1)))
        for op in COMPARATORS:
            if text.startswith(op):
                bound_text = text[len(op):].strip()
                if kind == "int":
                    try:
                        bound: Any = int(bound_text)
                    except ValueError:
                        raise ctx.fail(node, f"{key!r}: bad comparison {text!r}; expected e.g. '<16', '>=64', '!=8', '16..64', '%32'") from None
                elif op == "!=":
                    bound = bound_text if kind == "str" else bound_text.lower() in ("true", "1", "yes")
                else:
                    raise ctx.fail(node, f"{key!r} is a {kind} feature; comparison {text!r} only applies to integers")
                return Compare(op, bound)
        if kind == "int" and any(ch in text for ch in "<>=!.~%"):
            raise ctx.fail(node, f"{key!r}: bad comparator in {text!r}; expected one of <, <=, >, >=, !=, a range 'lo..hi' or '%N' / '!%N' (multiple of N)")
    return OneOf((_scalar_of_kind(ctx, key, kind, node, value),))


# --------------------------------------------------------------------------- files


def load_rule_file(path: str | os.PathLike, *, registry: Registry = REGISTRY, layer: str = "user") -> list[Rule]:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise RuleError(f"{path}:0", f"cannot read rule file: {e.strerror or e}") from None
    return parse_rules_text(text, str(path), registry=registry, layer=layer)


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
    seen: dict[str, str] = {}
    for path, layer in files:
        for rule in load_rule_file(path, registry=registry, layer=layer):
            if rule.id in seen:
                raise RuleError(rule.source, f"duplicate rule id {rule.id!r} (first defined at {seen[rule.id]})")
            seen[rule.id] = rule.source
            rules.append(rule)
    return RuleSet(tuple(rules), tuple(str(p) for p, _ in files))


def iter_errors(paths: Iterable[str | os.PathLike], *, registry: Registry = REGISTRY) -> list[RuleError]:
    """Every file's first error (lint reports all files, not just the first bad one)."""
    errors = []
    for path in paths:
        try:
            load_rule_file(path, registry=registry)
        except RuleError as e:
            errors.append(e)
    return errors
