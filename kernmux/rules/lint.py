"""``kernmux rules lint``: every problem of every file in one run.

- errors: whatever the loader refuses (each with ``file:line``; all of them, not only a
  file's first), ids defined twice among the files, and a user file reusing the id of a
  shipped rule (the dispatcher refuses to load such a pair);
- never matches: a condition no value can satisfy (a feature value outside the
  feature's declared choices or range, an empty range, an arch of another vendor, a
  library version no release can have, ...), or an action whose kernels can never run
  under the rule's own vendor condition;
- shadowed: a ``use`` rule that can never win because an earlier ``use`` rule for the
  same op matches whenever it does (:mod:`kernmux.rules.shadow`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

from kernmux.dispatch.platform import VENDORS
from kernmux.dispatch.registry import REGISTRY, Registry
from kernmux.dispatch.rule_model import (
    Between,
    Compare,
    Condition,
    LibVersion,
    OneOf,
    Rule,
)
from kernmux.rules.loader import check_rule_file, shipped_rule_files
from kernmux.rules.shadow import implies, shadowed
from kernmux.rules.source import show

__all__ = ["LintProblem", "LintReport", "implies", "lint_files", "never_matches", "shadowed"]

ARCH_VENDOR_PREFIX = {"cuda": ("sm_",), "rocm": ("gfx",), "cpu": ("cpu",)}


@dataclass(frozen=True)
class LintProblem:
    location: str  # file:line
    kind: str  # "error", "never-matches", "shadowed"
    message: str

    def text(self) -> str:
        return f"{self.location}: {self.kind}: {self.message}"


@dataclass
class LintReport:
    files: list[str] = field(default_factory=list)
    rules: int = 0
    problems: list[LintProblem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def add(self, location: str, kind: str, message: str) -> None:
        self.problems.append(LintProblem(location, kind, message))

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "files": self.files,
            "rules": self.rules,
            "problems": [p.__dict__ for p in self.problems],
        }


def lint_files(paths: Sequence[str | os.PathLike] | None = None, *, registry: Registry = REGISTRY) -> LintReport:
    """Lint ``paths`` (shipped files when None), all together as one rule set.

    User files are also checked against the shipped rules' ids."""
    registry.ensure_loaded()
    linting_shipped = not paths
    files = [str(p) for p in (paths if paths else shipped_rule_files())]
    report = LintReport(files=files)
    all_rules: list[Rule] = []
    seen: dict[str, str] = {}
    for path in files:
        rules, errors = check_rule_file(path, registry=registry, layer="shipped" if linting_shipped else "user")
        reported = set()
        for error in errors:  # a shared (aliased) block is reported once, not per rule using it
            if (error.location, error.message) not in reported:
                reported.add((error.location, error.message))
                report.add(error.location, "error", error.message)
        for rule in rules:
            if rule.id in seen:
                report.add(rule.source, "error", f"duplicate rule id {show(rule.id)} (first defined at {seen[rule.id]})")
                continue
            seen[rule.id] = rule.source
            all_rules.append(rule)
    if not linting_shipped:
        _check_shipped_ids(report, all_rules, files, registry)
    report.rules = len(all_rules)
    for rule in all_rules:
        reason = never_matches(rule, registry)
        if reason:
            report.add(rule.source, "never-matches", f"rule {show(rule.id)} can never match: {reason}")
    for rule, earlier in shadowed(all_rules):
        report.add(rule.source, "shadowed", f"use rule {show(rule.id)} is shadowed by {show(earlier.id)} at {earlier.source}, which matches whenever it does")
    return report


def _check_shipped_ids(report: LintReport, rules: Sequence[Rule], files: Sequence[str], registry: Registry) -> None:
    """A user rule reusing a shipped rule's id (explain and the runtime refuse the pair)."""
    linted = {_same_file_key(f) for f in files}
    shipped: dict[str, str] = {}
    for path in shipped_rule_files():
        if _same_file_key(path) in linted:
            continue
        for rule in check_rule_file(path, registry=registry, layer="shipped")[0]:
            shipped.setdefault(rule.id, rule.source)
    for rule in rules:
        if rule.id in shipped:
            report.add(
                rule.source, "error",
                f"rule id {show(rule.id)} is already used by the shipped rule at {shipped[rule.id]}; "
                "ids must be unique across layers (explain and the runtime refuse to load both)",
            )


def _same_file_key(path: str | os.PathLike) -> object:
    try:
        info = os.stat(path)
        return (info.st_dev, info.st_ino)
    except OSError:
        return str(Path(path).absolute())


def _condition_unsatisfiable(cond: Condition, registry: Registry, rule: Rule) -> str | None:
    matcher = cond.matcher
    if isinstance(matcher, Between) and matcher.lo > matcher.hi:
        return f"range {matcher.text()} is empty"
    if cond.kind == "feature":
        spec = registry.ops[rule.op].spec(cond.key)
        if spec.choices is not None:
            allowed = [v for v in spec.choices if matcher(v)]
            if not allowed:
                return f"{cond.key} must be one of {list(spec.choices)}, condition is {show(matcher.text())}"
        if spec.kind == "int":
            outside = _outside_range(matcher, spec.minimum, getattr(spec, "maximum", None))
            if outside:
                return f"{cond.key} is {outside}, condition is {show(matcher.text())}"
    if cond.kind == "platform" and cond.key == "vendor" and isinstance(matcher, OneOf):
        bad = [v for v in matcher.values if v not in VENDORS]
        if bad:
            return f"vendor {bad} is not one of {list(VENDORS)}"
    if cond.kind == "lib" and isinstance(matcher, LibVersion) and matcher.spec:
        return _specifier_unsatisfiable(cond.key, matcher.spec)
    return None


def _outside_range(matcher, low: int | None, high: int | None) -> str | None:
    """Why an int condition admits no value in [low, high] (None bounds: unbounded)."""
    if low is not None:
        below = (
            (isinstance(matcher, OneOf) and all(v < low for v in matcher.values))
            or (isinstance(matcher, Compare) and matcher.op in ("<", "<=") and not matcher(low))
            or (isinstance(matcher, Between) and matcher.hi < low)
        )
        if below:
            return f"at least {low}"
    if high is not None:
        above = (
            (isinstance(matcher, OneOf) and all(v > high for v in matcher.values))
            or (isinstance(matcher, Compare) and matcher.op in (">", ">=") and not matcher(high))
            or (isinstance(matcher, Between) and matcher.lo > high)
        )
        if above:
            return f"at most {high}"
    return None


def _specifier_unsatisfiable(dist: str, text: str) -> str | None:
    """Why no installed version can satisfy ``text``: lower bounds above upper bounds
    (``>=2,<1``) or an arbitrary equality (``===x``) with text no version prints as."""
    lows, highs = [], []
    for spec in SpecifierSet(text):
        if spec.operator == "===":
            try:
                Version(spec.version)
            except (InvalidVersion, ValueError):
                return f"libs.{dist} {show(text)}: {show(spec.version)} is not a PEP 440 version, so '===' matches no installed release"
            continue
        try:
            version = Version(spec.version.removesuffix(".*"))
        except (InvalidVersion, ValueError):  # the loader refuses these; never crash lint
            return f"libs.{dist} {show(text)}: {show(spec.version)} is not a PEP 440 version"
        if spec.operator in (">", ">="):
            lows.append((version, spec.operator))
        elif spec.operator in ("<", "<="):
            highs.append((version, spec.operator))
    for low, lop in lows:
        for high, hop in highs:
            if low > high or (low == high and (lop == ">" or hop == "<")):
                return f"libs.{dist} {show(text)} admits no version"
    return None


def never_matches(rule: Rule, registry: Registry = REGISTRY) -> str | None:
    """Why ``rule`` can never match (or its action never apply), or None."""
    vendors = None
    arches = None
    for cond in rule.when:
        problem = _condition_unsatisfiable(cond, registry, rule)
        if problem:
            return problem
        if cond.kind == "platform" and cond.key == "vendor" and isinstance(cond.matcher, OneOf):
            vendors = set(cond.matcher.values)
        if cond.kind == "platform" and cond.key == "arch" and isinstance(cond.matcher, OneOf):
            arches = set(cond.matcher.values)
    if vendors is not None and arches is not None:
        prefixes = tuple(p for v in vendors for p in ARCH_VENDOR_PREFIX.get(v, ()))
        if not any(str(a).startswith(prefixes) for a in arches):
            return f"arch {sorted(arches)} never belongs to vendor {sorted(vendors)}"
    # The action's kernels can never run under the rule's vendor condition.
    if vendors is not None and rule.action.kind in ("use", "adapt", "prefer"):
        kernels = registry.kernels.get(rule.op, {})
        runnable = [
            name for name in rule.action.kernels
            if not kernels[name].vendors or set(kernels[name].vendors) & vendors
        ]
        if not runnable:
            return f"kernel(s) {list(rule.action.kernels)} never run on vendor {sorted(vendors)}"
    # A lib condition requiring a version while another requires it absent.
    by_lib: dict[str, list[LibVersion]] = {}
    for cond in rule.when:
        if cond.kind == "lib":
            by_lib.setdefault(cond.key, []).append(cond.matcher)
    for dist, matchers in by_lib.items():
        if any(m.spec is None for m in matchers) and any(m.spec is not None for m in matchers):
            return f"libs.{dist} is required both absent and present"
    return None
