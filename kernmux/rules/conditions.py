"""The ``when`` block of a rule: platform keys, library versions and op features, each
parsed into a matcher with its values bounded (no 5,000-digit integers, specifiers of
sane length naming usable versions, PEP 503 distribution names)."""

from __future__ import annotations

import re
from typing import Any

import yaml
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from kernmux.dispatch.platform import PLATFORM_KEYS, VENDORS
from kernmux.dispatch.registry import Op
from kernmux.dispatch.rule_model import (
    COMPARATORS,
    Between,
    Compare,
    Condition,
    LibVersion,
    MultipleOf,
    OneOf,
)
from kernmux.rules.nodes import Ctx, Invalid, describe, mapping_items
from kernmux.rules.source import MAX_INT_DIGITS, show

RANGE_PATTERN = re.compile(r"^\s*(-?\d+)\s*\.\.\s*(-?\d+)\s*$")
MULTIPLE_PATTERN = re.compile(r"^(!?)%\s*(\d+)$")
# PEP 508 distribution names; rules spell them in PEP 503 normalised form.
DIST_NAME = re.compile(r"^([a-z0-9]|[a-z0-9][a-z0-9._-]*[a-z0-9])$", re.IGNORECASE)
MAX_SPECIFIER_CHARS = 200


def normalise_dist(name: str) -> str:
    """PEP 503 normal form of a distribution name (``Amd_Aiter`` -> ``amd-aiter``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_when(ctx: Ctx, op: Op, node: yaml.Node) -> tuple[Condition, ...]:
    errors_before = len(ctx.errors)
    conditions = []
    for key, key_node, value_node in mapping_items(ctx, node, "'when'"):
        condition = ctx.attempt(_parse_condition, ctx, op, key, key_node, value_node)
        if isinstance(condition, list):
            conditions.extend(condition)
    if len(ctx.errors) > errors_before:
        raise Invalid
    return tuple(conditions)


def _parse_condition(ctx: Ctx, op: Op, key: str, key_node: yaml.Node, value_node: yaml.Node) -> list[Condition]:
    if key == "libs":
        errors_before = len(ctx.errors)
        conditions = []
        for dist, dist_node, spec_node in mapping_items(ctx, value_node, "'libs'"):
            if ctx.attempt(_check_dist_name, ctx, dist, dist_node) is None:
                continue
            spec = ctx.attempt(_parse_lib_spec, ctx, dist, spec_node)
            if spec is not None:
                conditions.append(Condition("lib", dist, spec))
        if len(ctx.errors) > errors_before:
            raise Invalid
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


def _check_dist_name(ctx: Ctx, dist: str, node: yaml.Node) -> str:
    if not DIST_NAME.match(dist):
        raise ctx.fail(node, f"libs: {show(dist)} is not a distribution name; expected letters, digits, '-', '_', '.' starting and ending with a letter or digit (PEP 508)")
    normal = normalise_dist(dist)
    if normal != dist:
        raise ctx.fail(node, f"libs: write {show(dist)} in PEP 503 normalised form, {show(normal)}")
    return dist


def _parse_lib_spec(ctx: Ctx, dist: str, node: yaml.Node) -> LibVersion:
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


def _bounded_int(ctx: Ctx, node: yaml.Node, key: str, text: str) -> int:
    digits = text.lstrip("-+ ")
    if len(digits) > MAX_INT_DIGITS:
        raise ctx.fail(node, f"{key!r}: a number of {len(digits)} digits in {show(text)}; expected at most {MAX_INT_DIGITS} digits")
    return int(text)


def _scalar_of_kind(ctx: Ctx, key: str, kind: str, node: yaml.Node, value: Any) -> Any:
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ctx.fail(node, f"{key!r} expects an integer (or a comparison such as '<16' or '16..64'), got {describe(node, value)}")
    elif kind == "bool":
        if not isinstance(value, bool):
            raise ctx.fail(node, f"{key!r} expects true or false, got {describe(node, value)}")
    elif not isinstance(value, str):
        raise ctx.fail(node, f"{key!r} expects a string, got {describe(node, value)}")
    return value


def _parse_matcher(ctx: Ctx, key: str, kind: str, node: yaml.Node):
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
