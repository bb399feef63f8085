"""Reading a composed rule file's YAML nodes: values, mappings (with ``<<`` merges) and
problems, each at ``file:line``.

:class:`Ctx` is what the loader's validators share: it builds scalar values with the
checks every value needs (bounded, printable) and collects problems so that validation
goes on after the first one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import yaml

from kernmux.dispatch.registry import Op, Registry
from kernmux.rules.source import RuleError, safe_string, show

MERGE_TAG = "tag:yaml.org,2002:merge"
STR_TAG = "tag:yaml.org,2002:str"

T = TypeVar("T")


class Invalid(Exception):
    """What was being parsed is invalid; its problems are already in ``Ctx.errors``."""


@dataclass
class Ctx:
    """What the validators of one file share: its name, the loader that built its nodes
    (to construct values), the registry, the layer and the problems found so far."""

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
        except Invalid:
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


def mapping_items(ctx: Ctx, node: yaml.Node, what: str) -> list[tuple[str, yaml.Node, yaml.Node]]:
    """(key, key node, value node) of a mapping, ``<<`` merges applied (explicit keys win,
    then earlier merge sources). A duplicate or non-string key is recorded and skipped."""
    if not isinstance(node, yaml.MappingNode):
        raise ctx.fail(node, f"{what} must be a mapping, got {describe(node, peek(ctx, node))}")
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
                        ctx.errors.append(ctx.fail(source, f"'<<' in {what} merges mappings, got {describe(source, peek(ctx, source))}"))
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


def peek(ctx: Ctx, node: yaml.Node) -> Any:
    """A scalar's value for a message (None when it cannot be built or is a collection)."""
    if not isinstance(node, yaml.ScalarNode):
        return None
    try:
        return ctx.scalar(node, "value")
    except RuleError:
        return node.value
