"""``kernmux rules lint``: malformed files, rules that can never match, shadowed rules.

Malformed files are :class:`RuleError` from the loader. Beyond that, two semantic
checks the loader cannot make one rule at a time:

- never matches: a condition no value can satisfy (a feature value outside the
  feature's declared choices, an empty range, an arch of another vendor, ...), or an
  action whose kernels can never run under the rule's own vendor condition;
- shadowed: a ``use`` rule that can never win because an earlier ``use`` rule for the
  same op matches whenever it does.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from kernmux.dispatch.platform import VENDORS
from kernmux.dispatch.registry import REGISTRY, Registry
from kernmux.rules.loader import RuleError, load_rule_file, shipped_rule_files
from kernmux.dispatch.rule_model import Between, Compare, Condition, LibVersion, OneOf, Rule

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

    def as_dict(self) -> dict:
        return {
            "ok": self.ok,
            "files": self.files,
            "rules": self.rules,
            "problems": [p.__dict__ for p in self.problems],
        }


def lint_files(paths: Sequence[str | os.PathLike] | None = None, *, registry: Registry = REGISTRY) -> LintReport:
    """Lint ``paths`` (shipped files when None), all together as one rule set."""
    registry.ensure_loaded()
    files = [str(p) for p in (paths if paths else shipped_rule_files())]
    report = LintReport(files=files)
    all_rules: list[Rule] = []
    seen: dict[str, str] = {}
    for path in files:
        try:
            rules = load_rule_file(path, registry=registry)
        except RuleError as e:
            report.problems.append(LintProblem(e.location, "error", e.message))
            continue
        for rule in rules:
            if rule.id in seen:
                report.problems.append(LintProblem(rule.source, "error", f"duplicate rule id {rule.id!r} (first defined at {seen[rule.id]})"))
                continue
            seen[rule.id] = rule.source
            all_rules.append(rule)
    report.rules = len(all_rules)
    for rule in all_rules:
        reason = never_matches(rule, registry)
        if reason:
            report.problems.append(LintProblem(rule.source, "never-matches", f"rule {rule.id!r} can never match: {reason}"))
    for rule, earlier in shadowed(all_rules):
        report.problems.append(
            LintProblem(rule.source, "shadowed", f"use rule {rule.id!r} is shadowed by {earlier.id!r} at {earlier.source}, which matches whenever it does")
        )
    return report


def _condition_unsatisfiable(cond: Condition, registry: Registry, rule: Rule) -> str | None:
    matcher = cond.matcher
    if isinstance(matcher, Between) and matcher.lo > matcher.hi:
        return f"range {matcher.text()} is empty"
    if cond.kind == "feature":
        spec = registry.ops[rule.op].spec(cond.key)
        if spec.choices is not None:
            allowed = [v for v in spec.choices if matcher(v)]
            if not allowed:
                return f"{cond.key} must be one of {list(spec.choices)}, condition is {matcher.text()}"
        if spec.kind == "int" and spec.minimum is not None:
            low = spec.minimum
            below = (
                (isinstance(matcher, OneOf) and all(v < low for v in matcher.values))
                or (isinstance(matcher, Compare) and matcher.op in ("<", "<=") and not matcher(low))
                or (isinstance(matcher, Between) and matcher.hi < low)
            )
            if below:
                return f"{cond.key} is at least {low}, condition is {matcher.text()}"
    if cond.kind == "platform" and cond.key == "vendor" and isinstance(matcher, OneOf):
        bad = [v for v in matcher.values if v not in VENDORS]
        if bad:
            return f"vendor {bad} is not one of {list(VENDORS)}"
    if cond.kind == "lib" and isinstance(matcher, LibVersion) and matcher.spec:
        from packaging.specifiers import SpecifierSet

        if _specifier_empty(SpecifierSet(matcher.spec)):
            return f"libs.{cond.key} {matcher.spec!r} admits no version"
    return None


def _specifier_empty(spec) -> bool:
    """True when lower bounds exceed upper bounds (e.g. '>=2,<1')."""
    from packaging.version import Version

    lows, highs = [], []
    for s in spec:
        v = Version(s.version.replace(".*", ""))
        if s.operator in (">", ">="):
            lows.append((v, s.operator))
        elif s.operator in ("<", "<="):
            highs.append((v, s.operator))
    for low, lop in lows:
        for high, hop in highs:
            if low > high or (low == high and (lop == ">" or hop == "<")):
                return True
    return False


def never_matches(rule: Rule, registry: Registry = REGISTRY) -> str | None:
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


def _implies(general: Condition, specific_conditions: dict[tuple[str, str], Condition]) -> bool:
    """True when every value satisfying the specific rule's condition on the same key
    also satisfies ``general`` (conservative: unknown cases count as not implied)."""
    specific = specific_conditions.get((general.kind, general.key))
    if specific is None:
        return False
    if general.matcher == specific.matcher:
        return True
    if isinstance(specific.matcher, OneOf):
        return all(general.matcher(value) for value in specific.matcher.values)
    if isinstance(specific.matcher, Between) and isinstance(general.matcher, (Between, Compare)):
        lo, hi = specific.matcher.lo, specific.matcher.hi
        if hi - lo <= 4096:
            return all(general.matcher(v) for v in range(lo, hi + 1))
    return False


def shadowed(rules: Sequence[Rule]) -> list[tuple[Rule, Rule]]:
    """(rule, earlier rule) pairs where an earlier ``use`` rule always wins."""
    out = []
    uses = [r for r in rules if r.action.kind == "use"]
    for i, rule in enumerate(uses):
        conds = {(c.kind, c.key): c for c in rule.when}
        for earlier in uses[:i]:
            if earlier.op != rule.op:
                continue
            if all(_implies(cond, conds) for cond in earlier.when):
                out.append((rule, earlier))
                break
    return out
