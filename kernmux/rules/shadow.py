"""Shadowed ``use`` rules, found without comparing every pair.

A ``use`` rule R is shadowed by an earlier ``use`` rule E of the same op when E matches
whenever R does: every condition of E is on a key R also constrains, and R's condition
there implies E's. So only earlier rules whose condition keys are a subset of R's can
shadow it, and on each such key E's matcher must equal R's or accept a value R admits.

Rules are indexed as they are read, by op, then by the set of their condition keys, then
per key by matcher and by each listed value; R is checked only against the candidates
of its most selective key. 20,000 rules take seconds instead of hours.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

from kernmux.dispatch.rule_model import (
    Between,
    Compare,
    Condition,
    Matcher,
    OneOf,
    Rule,
)

Key = tuple[str, str]
# A Between up to this wide is checked value by value against the general matcher.
ENUMERABLE_RANGE = 4096


def implies(general: Condition, specific_conditions: dict[Key, Condition]) -> bool:
    """True when every value satisfying the specific rule's condition on the same key
    also satisfies ``general`` (conservative: unknown cases count as not implied)."""
    specific = specific_conditions.get((general.kind, general.key))
    if specific is None:
        return False
    return general.matcher == specific.matcher or _covers(general.matcher, specific.matcher)


def _covers(general: Matcher, specific: Matcher) -> bool:
    """Every value ``specific`` admits, ``general`` admits too (exact for lists, ranges
    and one-sided comparisons of integers; otherwise only when the matchers are equal)."""
    kind = type(specific)
    if kind is OneOf:
        return all(general(value) for value in specific.values)
    if kind is Between:
        lo, hi = specific.lo, specific.hi
        if lo > hi:
            return False  # admits nothing: reported as never matching instead
        if type(general) is Between:
            return general.lo <= lo and hi <= general.hi
        if type(general) is Compare and isinstance(general.bound, int):
            # one-sided comparisons admit an interval: it holds both ends or not all
            return not lo <= general.bound <= hi if general.op == "!=" else general(lo) and general(hi)
        if hi - lo <= ENUMERABLE_RANGE:
            return all(general(v) for v in range(lo, hi + 1))
        return False
    if kind is Compare and type(general) is Compare and specific.op in _BELOW | _ABOVE:
        side = _BELOW if specific.op in _BELOW else _ABOVE
        if general.op in side and isinstance(general.bound, int) and isinstance(specific.bound, int):
            return general(_inner_end(specific))
    return general == specific


_BELOW, _ABOVE = frozenset(("<", "<=")), frozenset((">", ">="))


def _inner_end(compare: Compare) -> int:
    """The extreme integer a one-sided comparison admits (``<16`` -> 15, ``>=8`` -> 8)."""
    offset = {"<": -1, "<=": 0, ">": 1, ">=": 0}[compare.op]
    return compare.bound + offset


def _covers_all(general: tuple[tuple[Key, Matcher], ...], specific: dict[Key, Matcher]) -> bool:
    """Each general matcher covers the specific one on its key (a plain loop: this is
    the inner loop of the shadow check)."""
    for key, matcher in general:
        other = specific[key]
        if matcher is other:
            continue
        if type(other) is OneOf and len(other.values) == 1:
            if not matcher(other.values[0]):
                return False
        elif not _covers(matcher, other):
            return False
    return True


_NO_WITNESS = object()


def _witness(matcher: Matcher) -> tuple[object, bool]:
    """(a value the matcher admits, or _NO_WITNESS; whether range-like matchers may cover
    it). An earlier OneOf covers a list or a small range only if it lists the witness."""
    kind = type(matcher)
    if kind is OneOf:
        return matcher.values[0], True
    if kind is Between:
        small = 0 <= matcher.hi - matcher.lo <= ENUMERABLE_RANGE
        return (matcher.lo if small else _NO_WITNESS), matcher.lo <= matcher.hi
    if kind is Compare and matcher.op != "!=":
        return _NO_WITNESS, True
    return _NO_WITNESS, False


@dataclass
class _Group:
    """Earlier use rules of one op sharing one set of condition keys."""

    keys: frozenset[Key]
    rules: dict[int, tuple[Rule, tuple[tuple[Key, Matcher], ...]]] = field(default_factory=dict)
    by_matcher: dict[Key, dict[Matcher, list[int]]] = field(default_factory=dict)
    by_value: dict[Key, dict[object, list[int]]] = field(default_factory=dict)
    ranges: dict[Key, list[int]] = field(default_factory=dict)  # positions with a non-OneOf matcher

    def add(self, position: int, rule: Rule, matchers: dict[Key, Matcher]) -> None:
        self.rules[position] = (rule, tuple(matchers.items()))
        for key, matcher in matchers.items():
            self.by_matcher.setdefault(key, {}).setdefault(matcher, []).append(position)
            if type(matcher) is OneOf:
                values = self.by_value.setdefault(key, {})
                for value in set(matcher.values):
                    values.setdefault(value, []).append(position)
            else:
                self.ranges.setdefault(key, []).append(position)

    def candidates(self, matchers: dict[Key, Matcher]) -> list[int]:
        """Positions that may shadow a rule with ``matchers``: on the key where they are
        fewest, those with the same matcher, or listing a value the rule admits, or a
        range-like matcher. A superset of the shadowing ones, in rule order."""
        if not self.keys:
            return list(self.rules)
        best: list[list[int]] | None = None
        best_size = 0
        for key in self.keys:
            matcher = matchers[key]
            lists = [self.by_matcher.get(key, {}).get(matcher, [])]
            witness, ranges = _witness(matcher)
            if witness is not _NO_WITNESS:
                lists.append(self.by_value.get(key, {}).get(witness, []))
            if ranges:
                lists.append(self.ranges.get(key, []))
            size = sum(map(len, lists))
            if best is None or size < best_size:
                best, best_size = lists, size
                if not size:
                    return []
        if len(best) == 1:
            return best[0]  # appended in rule order
        return sorted(set(itertools.chain.from_iterable(best)))


def shadowed(rules: Sequence[Rule]) -> list[tuple[Rule, Rule]]:
    """(rule, earliest earlier ``use`` rule that matches whenever it does), in order."""
    out = []
    groups: dict[str, dict[frozenset[Key], _Group]] = {}
    canonical: dict[Matcher, Matcher] = {}  # equal matchers become one object: "is" suffices
    for position, rule in enumerate(rules):
        if rule.action.kind != "use":
            continue
        matchers = {(c.kind, c.key): canonical.setdefault(c.matcher, c.matcher) for c in rule.when}
        keys = frozenset(matchers)
        op_groups = groups.setdefault(rule.op, {})
        winner: tuple[int, Rule] | None = None
        for group in _subset_groups(op_groups, keys):
            for candidate in group.candidates(matchers):
                if winner is not None and candidate > winner[0]:
                    break
                earlier, earlier_matchers = group.rules[candidate]
                if _covers_all(earlier_matchers, matchers):
                    winner = (candidate, earlier)
                    break
        if winner is not None:
            out.append((rule, winner[1]))
        group = op_groups.get(keys)
        if group is None:
            group = op_groups[keys] = _Group(keys)
        group.add(position, rule, matchers)
    return out


def _subset_groups(op_groups: dict[frozenset[Key], _Group], keys: frozenset[Key]):
    """The groups whose key set is a subset of ``keys``: by enumerating the subsets when
    there are fewer of them than groups, else by testing each group."""
    if len(keys) < 16 and 2 ** len(keys) < len(op_groups):
        ordered = sorted(keys)
        for size in range(len(ordered) + 1):
            for subset in itertools.combinations(ordered, size):
                group = op_groups.get(frozenset(subset))
                if group is not None:
                    yield group
    else:
        for group_keys, group in op_groups.items():
            if group_keys <= keys:
                yield group

