"""Resolution: which kernel (config, transform) runs for one (op, features, platform).

The precedence is written once, as the table :data:`PRECEDENCE`; the explain trace
walks the same table. Filters apply first and always: a kernel must be available on the
platform, not denied by a matching rule, not marked failed for this key, of the op's
reference precision class or a class a matching ``allow_precision`` rule admits, and
must support the (possibly transformed) problem.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import REGISTRY, Kernel, Op, Registry, Support
from kernmux.dispatch.transforms import transformed_head_counts
from kernmux.dispatch.tuning import TuningSource, borrow_nearest
from kernmux.dispatch.rule_model import Rule, RuleSet, TransformSpec

# Candidate statuses, in the order the explain trace lists them.
STATUSES = ("chosen", "allowed", "denied", "failed", "unsupported", "unavailable")


@dataclass(frozen=True)
class Candidate:
    kernel: str
    status: str
    reason: str = ""
    precision: str = ""  # the kernel's precision class

    def as_dict(self) -> dict[str, str]:
        return {"kernel": self.kernel, "status": self.status, "reason": self.reason, "precision": self.precision}


@dataclass(frozen=True)
class Choice:
    """What one precedence level picked."""

    kernel: str
    config: Mapping[str, Any] = field(default_factory=dict)
    transform: TransformSpec = TransformSpec()
    detail: str = ""
    rule: str | None = None
    row_id: Any = None
    borrowed_from: Mapping[str, Any] | None = None
    distance: float | None = None


@dataclass(frozen=True)
class Decision:
    """The resolved kernel for one (op, features, platform) and the trace behind it."""

    op: str
    features: Mapping[str, Any]
    kernel: str
    config: Mapping[str, Any]
    transform: TransformSpec
    source: str  # a level name of PRECEDENCE
    detail: str
    rules: tuple[tuple[str, str], ...]  # (rule id, summary) of every matching rule
    candidates: tuple[Candidate, ...]
    notes: tuple[str, ...]
    fallbacks: tuple[str, ...]  # survivors tried next, in order, if the kernel raises
    platform: Platform
    rule: str | None = None
    row_id: Any = None
    precision: str = ""  # the chosen kernel's precision class
    reference_precision: str = ""  # the op's reference class
    precision_rule: str | None = None  # the allow_precision rule admitting a coarser class
    # A tuning decision taken from the nearest tuned bucket: that bucket, and its distance.
    borrowed_from: Mapping[str, Any] | None = None
    distance: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "op": self.op,
            "kernel": self.kernel,
            "precision": self.precision,
            "reference_precision": self.reference_precision,
            "precision_rule": self.precision_rule,
            "config": dict(self.config),
            "transform": self.transform.as_dict() or None,
            "source": self.source,
            "detail": self.detail,
            "rule": self.rule,
            "tuning_row": self.row_id,
            "borrowed_from": dict(self.borrowed_from) if self.borrowed_from is not None else None,
            "distance": self.distance,
            "rules": [{"id": rid, "summary": text} for rid, text in self.rules],
            "candidates": [c.as_dict() for c in self.candidates],
            "fallbacks": list(self.fallbacks),
            "notes": list(self.notes),
            "features": dict(self.features),
            "platform": self.platform.as_dict(),
        }


class NoKernelError(RuntimeError):
    """No kernel survived the filters; the message names each candidate and why."""

    def __init__(self, op: str, features: Mapping[str, Any], candidates: Sequence[Candidate]):
        self.op = op
        self.features = dict(features)
        self.candidates = list(candidates)
        reasons = "; ".join(f"{c.kernel} {c.status}: {c.reason}" for c in candidates) or "no kernels registered"
        feats = ", ".join(f"{k}={v}" for k, v in features.items())
        super().__init__(f"no kernel for {op} ({feats}): {reasons}")


@dataclass
class _Context:
    op: Op
    kernels: Mapping[str, Kernel]
    features: Mapping[str, Any]
    platform: Platform
    matching: tuple[Rule, ...]
    survivors: dict[str, Support]
    adapt: dict[str, tuple[dict[str, Any], TransformSpec, list[str]]]
    tuning: TuningSource | None
    force: Mapping[str, str]
    notes: list[str]


# --------------------------------------------------------------------------- levels


def _level_force(ctx: _Context) -> Choice | None:
    name = ctx.force.get(ctx.op.name)
    if name is None:
        return None
    if name in ctx.survivors:
        return Choice(name, detail=f"KERNMUX_FORCE={ctx.op.name}={name}")
    ctx.notes.append(f"KERNMUX_FORCE names {name!r} for {ctx.op.name}, but it did not survive the filters; ignored")
    return None


def _level_use_rule(ctx: _Context) -> Choice | None:
    for rule in ctx.matching:
        if rule.action.kind != "use":
            continue
        kernel = rule.action.kernels[0]
        if kernel in ctx.survivors and _transform_ok(ctx, kernel, rule.action.transform):
            return Choice(
                kernel,
                config=rule.action.resolved_config(ctx.features),
                transform=rule.action.transform,
                detail=f"rule {rule.id}: {rule.reason}",
                rule=rule.id,
            )
        ctx.notes.append(f"use rule {rule.id} names {kernel!r}, which did not survive the filters; skipped")
    return None


def _level_tuning(ctx: _Context) -> Choice | None:
    if ctx.tuning is None:
        return None
    bucket = ctx.op.bucket(ctx.features)
    pick, notes = ctx.tuning.lookup(ctx.op.name, bucket, ctx.platform, sorted(ctx.survivors))
    ctx.notes.extend(notes)
    if pick is None:  # never tuned here: the nearest tuned bucket, within reach
        pick, notes = borrow_nearest(ctx.tuning, ctx.op, ctx.features, bucket, ctx.platform, ctx.kernels,
                                     sorted(ctx.survivors))
        ctx.notes.extend(notes)
    if pick is None:
        return None
    if pick.kernel not in ctx.survivors:
        ctx.notes.append(f"tuning row {pick.row_id} picks {pick.kernel!r}, which did not survive the filters; skipped")
        return None
    return Choice(pick.kernel, config=dict(pick.config), detail=pick.detail, row_id=pick.row_id,
                  borrowed_from=getattr(pick, "borrowed_from", None), distance=getattr(pick, "distance", None))


def _prefer_order(ctx: _Context) -> list[str]:
    order: list[str] = []
    for rule in ctx.matching:
        if rule.action.kind == "prefer":
            order += [k for k in rule.action.kernels if k not in order]
    return order


def _level_prefer(ctx: _Context) -> Choice | None:
    for rule in ctx.matching:
        if rule.action.kind != "prefer":
            continue
        for kernel in rule.action.kernels:
            if kernel in ctx.survivors:
                return Choice(kernel, detail=f"rule {rule.id}: {rule.reason}", rule=rule.id)
    return None


def _level_priority(ctx: _Context) -> Choice | None:
    if not ctx.survivors:
        return None
    best = max(ctx.survivors, key=lambda name: (ctx.kernels[name].priority, name))
    return Choice(best, detail=f"highest default priority ({ctx.kernels[best].priority}) among survivors")


@dataclass(frozen=True)
class Level:
    name: str
    description: str
    pick: Callable[[_Context], Choice | None]


# Most binding first. Filters (availability, deny rules, runtime failures, supports())
# are applied before any level, always.
PRECEDENCE: tuple[Level, ...] = (
    Level("force", "KERNMUX_FORCE environment override", _level_force),
    Level("rule", "first matching 'use' rule (user files before shipped)", _level_use_rule),
    Level("tuning_db", "fastest validated measurement in the tuning database", _level_tuning),
    Level("prefer", "merged 'prefer' lists of matching rules", _level_prefer),
    Level("priority", "kernel default priority", _level_priority),
)


# --------------------------------------------------------------------------- filters


def parse_force(text: str | None = None) -> dict[str, str]:
    """``KERNMUX_FORCE="op=kernel[,op=kernel]"`` -> {op: kernel}."""
    text = os.environ.get("KERNMUX_FORCE", "") if text is None else text
    out = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        op, sep, kernel = item.partition("=")
        if not sep or not op.strip() or not kernel.strip():
            raise ValueError(f"KERNMUX_FORCE entry {item!r} is not 'op=kernel'")
        out[op.strip()] = kernel.strip()
    return out


def _transform_ok(ctx: _Context, kernel: str, transform: TransformSpec) -> bool:
    if not transform:
        return True
    return _supports_transformed(ctx.op, ctx.kernels[kernel], ctx.features, ctx.platform, transform).ok


def _supports_transformed(op: Op, kernel: Kernel, features: Mapping[str, Any], platform: Platform, transform: TransformSpec) -> Support:
    if not transform or op.head_axes is None:
        return kernel.check(features, platform)
    feature = op.head_axes.feature
    heads = features.get(feature)
    if not isinstance(heads, int):
        return kernel.check(features, platform)
    for count in transformed_head_counts(transform, heads):
        support = kernel.check({**features, feature: count}, platform)
        if not support.ok:
            return Support(False, f"with {transform.text()} ({feature}={count}): {support.reason}")
    return Support(True, f"with {transform.text()}")


def _adaptations(matching: Sequence[Rule], features: Mapping[str, Any]) -> dict[str, tuple[dict[str, Any], TransformSpec, list[str]]]:
    """kernel -> (config, transform, rule ids) from matching adapt rules; earlier wins."""
    out: dict[str, tuple[dict[str, Any], TransformSpec, list[str]]] = {}
    for rule in matching:
        if rule.action.kind != "adapt":
            continue
        kernel = rule.action.kernels[0]
        config, transform, ids = out.get(kernel, ({}, TransformSpec(), []))
        config = {**rule.action.resolved_config(features), **config}
        if not transform and rule.action.transform:
            transform = rule.action.transform
        out[kernel] = (config, transform, ids + [rule.id])
    return out


def _allowed_precisions(op: Op, matching: Sequence[Rule]) -> dict[str, str]:
    """precision class -> id of the first matching rule that allows it (the op's
    reference class is always allowed)."""
    allowed = {op.precision: ""}
    for rule in matching:
        if rule.action.kind == "allow_precision":
            for precision in rule.action.precisions:
                allowed.setdefault(precision, rule.id)
    return allowed


def _by_status(candidates) -> tuple[Candidate, ...]:
    return tuple(sorted(candidates, key=lambda c: (STATUSES.index(c.status), c.kernel)))


def resolve(
    op_name: str,
    features: Mapping[str, Any],
    platform: Platform,
    rules: RuleSet,
    *,
    tuning: TuningSource | None = None,
    failed: Mapping[str, str] | None = None,
    force: Mapping[str, str] | None = None,
    registry: Registry = REGISTRY,
) -> Decision:
    """Resolve one decision. ``failed`` maps kernel -> error text for this feature key.

    Raises :class:`NoKernelError` when no kernel survives the filters."""
    op = registry.op(op_name)
    kernels = registry.kernels_of(op_name)
    failed = failed or {}
    force = parse_force() if force is None else force
    op_rules = rules.for_op(op_name)
    matching = tuple(rule for rule in op_rules if rule.matches(features, platform))
    adapt = _adaptations(matching, features)
    denied = {}
    for rule in matching:
        if rule.action.kind == "deny":
            for kernel in rule.action.kernels:
                denied.setdefault(kernel, f"denied by rule {rule.id}: {rule.reason}")

    allowed_precisions = _allowed_precisions(op, matching)

    statuses: dict[str, Candidate] = {}
    survivors: dict[str, Support] = {}
    for name in sorted(kernels):
        kernel = kernels[name]
        precision = kernel.precision or op.precision
        available = kernel.availability(platform)
        if not available.ok:
            statuses[name] = Candidate(name, "unavailable", available.reason, precision)
        elif name in denied:
            statuses[name] = Candidate(name, "denied", denied[name], precision)
        elif name in failed:
            why = failed[name]
            why = why if why.startswith("self-check") else f"raised at runtime for this problem: {why}"
            statuses[name] = Candidate(name, "failed", why, precision)
        elif precision not in allowed_precisions:
            reason = (f"precision {precision} not allowed for {op_name} (reference class {op.precision}): "
                      f"add a rule with allow_precision: [{precision}]")
            statuses[name] = Candidate(name, "denied", reason, precision)
        else:
            transform = adapt.get(name, ({}, TransformSpec(), []))[1]
            support = _supports_transformed(op, kernel, features, platform, transform)
            if support.ok:
                survivors[name] = support
                reason = support.reason
                if allowed_precisions[precision]:
                    note = f"precision {precision} allowed by rule {allowed_precisions[precision]}"
                    reason = f"{reason}; {note}" if reason else note
                statuses[name] = Candidate(name, "allowed", reason, precision)
            else:
                statuses[name] = Candidate(name, "unsupported", support.reason, precision)

    if not survivors:
        raise NoKernelError(op_name, features, _by_status(statuses.values()))

    ctx = _Context(op, kernels, features, platform, matching, survivors, adapt, tuning, force, [])
    choice, source = None, ""
    for level in PRECEDENCE:
        choice = level.pick(ctx)
        if choice is not None:
            source = level.name
            break
    assert choice is not None  # the priority level always picks when survivors exist

    adapt_config, adapt_transform, adapt_ids = adapt.get(choice.kernel, ({}, TransformSpec(), []))
    # adapt config is a constraint (e.g. a pinned block size that avoids a crash), so it
    # overrides what a use rule or a tuning row chose.
    overridden = sorted(k for k in adapt_config if k in choice.config and choice.config[k] != adapt_config[k])
    config = {**kernels[choice.kernel].full_config(None), **choice.config, **adapt_config}
    if overridden:
        ctx.notes.append(f"adapt rule(s) {', '.join(adapt_ids)} override {source} config for {', '.join(overridden)}")
    transform = choice.transform or adapt_transform
    if adapt_ids:
        ctx.notes.append(f"adapted by rule(s) {', '.join(adapt_ids)}")

    prefer = _prefer_order(ctx)
    rest = sorted(
        (name for name in survivors if name != choice.kernel),
        key=lambda n: (prefer.index(n) if n in prefer else len(prefer), -kernels[n].priority, n),
    )
    chosen = statuses[choice.kernel]
    statuses[choice.kernel] = Candidate(choice.kernel, "chosen", chosen.reason, chosen.precision)
    candidates = _by_status(statuses.values())
    return Decision(
        op=op_name,
        features=dict(features),
        kernel=choice.kernel,
        config=config,
        transform=transform,
        source=source,
        detail=choice.detail,
        rules=tuple((rule.id, rule.summary()) for rule in matching),
        candidates=candidates,
        notes=tuple(ctx.notes),
        fallbacks=tuple(rest),
        platform=platform,
        rule=choice.rule,
        row_id=choice.row_id,
        precision=chosen.precision,
        reference_precision=op.precision,
        precision_rule=allowed_precisions.get(chosen.precision) or None,
        borrowed_from=choice.borrowed_from,
        distance=choice.distance,
    )
