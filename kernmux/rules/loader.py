"""Load rule files into frozen, validated :class:`Rule` objects.

Reading and composing the YAML is bounded (:mod:`kernmux.rules.source`); the node tree
is validated here (a rule's fields and actions), in :mod:`kernmux.rules.conditions` (its
``when`` block) and :mod:`kernmux.rules.nodes` (values and mappings). Every problem names
``file:line`` and says what was expected and what was got, and validation goes on after a
problem so that one pass finds them all: :func:`check_rule_file` returns the good rules
and every error (what ``rules lint`` shows), :func:`load_rule_file` raises the first
error and counts the rest (what the dispatcher, ``explain`` and the vLLM plugin do).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml

from kernmux.dispatch.registry import REGISTRY, Kernel, Op, Registry
from kernmux.dispatch.rule_model import ACTIONS, Action, Rule, RuleSet, TransformSpec
from kernmux.rules.conditions import normalise_dist, parse_when
from kernmux.rules.nodes import Ctx, Invalid, describe, mapping_items, peek
from kernmux.rules.source import RuleError, compose, decode, read_bytes, show

__all__ = ["RuleError", "check_rule_file", "check_rules_text", "load_rule_file", "load_rules", "normalise_dist", "parse_rules_text"]

SHIPPED_DIR = Path(__file__).parent / "shipped"
TOP_LEVEL_KEYS = ("version", "rules")
RULE_KEYS = ("id", "op", "when", *ACTIONS, "config", "split_heads", "pad_heads", "reason", "link")
TRANSFORM_KEYS = ("split_heads", "pad_heads")
ID_PATTERN = re.compile(r"^[a-z0-9]+(-[a-z0-9]+)*$")
# Transforms on an op whose head feature declares no maximum are capped here: no model
# has this many query heads on one rank, and pad_heads allocates that many per call.
TRANSFORM_HEADS_CEILING = 1024
SUPPORTED_VERSIONS = (1,)
CONFIG_SCALARS = (bool, int, float, str)


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
        ctx = Ctx(path, loader, registry, layer)
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


def _parse_root(ctx: Ctx, root: yaml.Node) -> list[Rule]:
    items = mapping_items(ctx, root, "rule file")
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
    if isinstance(rules_node, yaml.ScalarNode) and peek(ctx, rules_node) is None:
        return []
    if not isinstance(rules_node, yaml.SequenceNode):
        raise ctx.fail(rules_node, f"'rules' must be a list, got {describe(rules_node, peek(ctx, rules_node))}")
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


def _check_version(ctx: Ctx, node: yaml.Node) -> None:
    version = ctx.scalar(node, "'version'")
    if isinstance(version, bool) or version not in SUPPORTED_VERSIONS:
        raise ctx.fail(node, f"unsupported version {show(version)}; expected one of {list(SUPPORTED_VERSIONS)}")


def _parse_rule(ctx: Ctx, node: yaml.Node) -> Rule | None:
    """The rule, or None after recording every problem found in it."""
    errors_before = len(ctx.errors)
    items = ctx.attempt(mapping_items, ctx, node, "a rule")
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
        when = ctx.attempt(parse_when, ctx, op, fields["when"][1])
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


def _op_of(ctx: Ctx, fields: dict, required_str: Callable[[str], str]) -> Op:
    op_name = required_str("op")
    if op_name not in ctx.registry.ops:
        known = ", ".join(sorted(ctx.registry.ops))
        raise ctx.fail(fields["op"][1], f"unknown op {show(op_name)}; known ops: {known}")
    return ctx.registry.ops[op_name]


def _kernel_name(ctx: Ctx, op: Op, node: yaml.Node) -> str:
    name = ctx.scalar(node, "a kernel name")
    if not isinstance(name, str):
        raise ctx.fail(node, f"kernel name must be a string, got {describe(node, name)}")
    kernels = ctx.registry.kernels.get(op.name, {})
    if name not in kernels:
        raise ctx.fail(node, f"unknown kernel {show(name)} for op {op.name!r}; known kernels: {', '.join(sorted(kernels))}")
    return name


def _transform(ctx: Ctx, op: Op, node: yaml.Node, key: str) -> int:
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


def _parse_config(ctx: Ctx, op: Op, kernel: Kernel | None, node: yaml.Node) -> dict[str, Any]:
    """Config keys and values checked against ``kernel``'s config space ("$feature"
    values stand for the problem's feature and are checked to name one)."""
    config: dict[str, Any] = {}
    items = mapping_items(ctx, node, "'config'")
    space = kernel.config_space if kernel is not None else None
    if kernel is not None and not space and items:
        raise ctx.fail(node, f"kernel {kernel.name!r} of {op.name} takes no config; got keys {[show(k) for k, _, _ in items[:8]]}")
    for key, key_node, value_node in items:
        value = ctx.attempt(_config_value, ctx, op, kernel, key, key_node, value_node)
        if value is not None:
            config[key] = value
    return config


def _config_value(ctx: Ctx, op: Op, kernel: Kernel | None, key: str, key_node: yaml.Node, node: yaml.Node) -> Any:
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


def _parse_action(ctx: Ctx, op: Op, kind: str, fields: dict) -> Action:
    key_node, node = fields[kind]
    errors_before = len(ctx.errors)
    kernels_of_op = ctx.registry.kernels.get(op.name, {})
    if kind == "allow_precision":
        return _parse_allow_precision(ctx, op, fields)
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
            raise Invalid
        return Action(kind, kernels)

    # use / adapt: a kernel name, or a mapping {kernel, config?, split_heads?, pad_heads?}
    config_nodes: list[yaml.Node] = []
    transform_nodes: dict[str, yaml.Node] = {}
    kernel = None
    if isinstance(node, yaml.MappingNode):
        sub = {}
        for key, sub_key_node, value_node in mapping_items(ctx, node, repr(kind)):
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
        raise Invalid
    return Action(kind, (kernel,), config, TransformSpec(**transform))


def _parse_allow_precision(ctx: Ctx, op: Op, fields: dict) -> Action:
    """``allow_precision: W4A4`` or ``[W4A4, ...]``: classes the op declares, not its
    reference class (always allowed)."""
    errors_before = len(ctx.errors)
    for extra in ("config", *TRANSFORM_KEYS):
        if extra in fields:
            ctx.errors.append(ctx.fail(fields[extra][0], f"{extra!r} is only allowed with 'use' or 'adapt', not with 'allow_precision'"))
    node = fields["allow_precision"][1]
    items = node.value if isinstance(node, yaml.SequenceNode) else [node]
    if not items or not all(isinstance(item, yaml.ScalarNode) for item in items):
        raise ctx.fail(node, "'allow_precision' expects a precision class name or a non-empty list of them")
    precisions = []
    for item in items:
        name = ctx.scalar(item, "a precision class")
        if name == op.precision:
            ctx.errors.append(ctx.fail(item, f"{show(name)} is the reference class of {op.name!r}, always allowed; name a coarser class ({', '.join(op.precision_classes) or 'none declared'})"))
        elif not isinstance(name, str) or name not in op.precision_classes:
            declared = ", ".join(op.precision_classes) or f"none: every kernel of {op.name} computes its reference class {op.precision!r}"
            ctx.errors.append(ctx.fail(item, f"unknown precision class {show(name)} for op {op.name!r}; declared classes: {declared}"))
        else:
            precisions.append(name)
    if len(ctx.errors) > errors_before:
        raise Invalid
    return Action("allow_precision", (), precisions=tuple(precisions))


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
