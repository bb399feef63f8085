"""The search over kernel x config: the space, the samplers and the ask/tell loop.

Space: for one feature set, every available kernel that supports it, each with its own
config space (only the valid points; conditional on the kernel). optuna sees a
categorical ``kernel`` and, for the chosen kernel only, one categorical per config
parameter named ``"<kernel>.<param>"``.

Loop (one per tuning process; several processes may share one study through optuna's
RDB storage): ask a trial, map its parameters to a point, evaluate the point, tell the
result. Rules that make the budget go to measurements:

- A point already measured in this study is not measured again: the trial is told the
  earlier result and marked ``duplicate_of`` (no measurement, no store row). A point
  claimed by several processes at once is measured by the lowest-numbered claim only
  (:func:`~kernmux.tuning_db.tuning.recovery.earlier_claim`); the others back off.
- With a :class:`~kernmux.tuning_db.tuning.recovery.Recovery`, RUNNING trials of dead
  processes are settled at the top of every iteration (told their stored result, or
  failed so their point is measured again): they never count toward the budget.
- A parameter combination the kernel declares invalid is told PRUNED, marked ``invalid``.
- After ``explore_after`` such trials in a row (TPE has converged on known points), the
  next trial is a random unmeasured point (forced through :class:`ForcingSampler`).
- Failures (numerics_failed, crashed, timeout, error, unsupported) are told PRUNED: they
  are never the best trial, and TPE counts them with the bad points.
- ``budget`` counts measurements in the whole study (all processes, all runs): a re-run
  resumes up to the budget; the loop also stops when every valid point is measured.

Grid mode is the same loop with every trial forced: a random unmeasured point each
time, so several processes rarely collide and the grid is exhaustive over valid points.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import REGISTRY
from kernmux.tuning_db.tuning.samplers import SAMPLERS, ForcingSampler, make_sampler

__all__ = [
    "SAMPLERS", "Evaluation", "ForcingSampler", "LoopStats", "Point", "SearchSpace", "StudyState",
    "build_space", "make_sampler", "restrict", "run_search", "study_state", "suggest",
]

@dataclass(frozen=True)
class Point:
    """One candidate: a kernel and a full config ({} for kernels without a space)."""

    kernel: str
    config: tuple[tuple[str, Any], ...] = ()

    @classmethod
    def of(cls, kernel: str, config: Mapping[str, Any] | None = None) -> Point:
        return cls(kernel, tuple(sorted((config or {}).items())))

    @property
    def config_dict(self) -> dict[str, Any]:
        return dict(self.config)

    @property
    def key(self) -> str:
        """Canonical text of the point (stored as a trial attribute, compared across runs)."""
        return json.dumps([self.kernel, self.config_dict], sort_keys=True, separators=(",", ":"))

    def params(self) -> dict[str, Any]:
        """The optuna parameters that select this point."""
        return {"kernel": self.kernel, **{f"{self.kernel}.{k}": v for k, v in self.config}}

    def label(self) -> str:
        if not self.config:
            return self.kernel
        return self.kernel + "{" + ",".join(f"{k}={v}" for k, v in self.config) + "}"


@dataclass(frozen=True)
class SearchSpace:
    """Valid points per kernel, and why the other kernels are not searched."""

    points: tuple[Point, ...]
    # kernel -> parameter -> the values that occur in its valid points (declared order).
    choices: Mapping[str, Mapping[str, tuple[Any, ...]]]
    skipped: Mapping[str, str] = field(default_factory=dict)

    @property
    def kernels(self) -> tuple[str, ...]:
        return tuple(self.choices)

    def __len__(self) -> int:
        return len(self.points)

    def digest(self) -> str:
        text = json.dumps([p.key for p in self.points])
        return hashlib.sha256(text.encode()).hexdigest()[:10]

    @classmethod
    def from_points(cls, points: Sequence[Point], skipped: Mapping[str, str] | None = None) -> SearchSpace:
        choices: dict[str, dict[str, list[Any]]] = {}
        for point in points:
            params = choices.setdefault(point.kernel, {})
            for name, value in point.config:
                values = params.setdefault(name, [])
                if value not in values:
                    values.append(value)
        frozen = {k: {n: tuple(v) for n, v in params.items()} for k, params in choices.items()}
        return cls(tuple(points), frozen, dict(skipped or {}))


def build_space(
    op: str,
    features: Mapping[str, Any],
    platform: Platform,
    kernels: Sequence[str] | None = None,
) -> SearchSpace:
    """The searchable points of ``op`` for ``features`` on ``platform``.

    kernels: restrict to these names (unknown names raise ValueError naming the known
        ones). Test-only kernels are searched only when named, or when the op has no
        other kind."""
    from kernmux.tuning_db.measurement.trial import config_points

    registered = REGISTRY.kernels_of(op)
    if kernels:
        unknown = [k for k in kernels if k not in registered]
        if unknown:
            raise ValueError(f"op {op!r} has no kernel(s) {unknown}; known: {sorted(registered)}")
        chosen = [registered[k] for k in kernels]
    else:
        all_test = all(k.test_only for k in registered.values())
        chosen = [k for k in registered.values() if all_test or not k.test_only]
    points: list[Point] = []
    skipped: dict[str, str] = {}
    for kernel in chosen:
        support = kernel.availability(platform)
        if support.ok:
            support = kernel.check(features, platform)
        if not support.ok:
            skipped[kernel.name] = support.reason or "unsupported"
            continue
        configs = config_points(kernel, features)
        if not configs:
            skipped[kernel.name] = "no valid config for these features"
            continue
        points.extend(Point.of(kernel.name, c) for c in configs)
    return SearchSpace.from_points(points, skipped)


def restrict(space: SearchSpace, fixed: Mapping[str, Mapping[str, Any]]) -> SearchSpace:
    """The points of ``space`` whose config agrees with ``fixed[kernel]`` (kernel -> params)."""
    kept = [p for p in space.points
            if all(p.config_dict.get(k) == v for k, v in (fixed.get(p.kernel) or {}).items())]
    return SearchSpace.from_points(kept, space.skipped)


def suggest(trial: Any, space: SearchSpace) -> Point:
    """Ask ``trial`` for a kernel, then for that kernel's parameters only."""
    kernel = trial.suggest_categorical("kernel", list(space.kernels))
    config = {
        name: trial.suggest_categorical(f"{kernel}.{name}", list(values))
        for name, values in space.choices[kernel].items()
    }
    return Point.of(kernel, config)


# --------------------------------------------------------------------------- loop


@dataclass(frozen=True)
class Evaluation:
    """The outcome of measuring one point: ``value`` (p50 µs) is set only when ok."""

    status: str
    value: float | None = None
    detail: str = ""


@dataclass
class LoopStats:
    asked: int = 0
    measured: int = 0
    duplicates: int = 0
    invalid: int = 0
    explored: int = 0
    stop_reason: str = ""


@dataclass(frozen=True)
class StudyState:
    """What the study holds now (all processes, all runs)."""

    results: dict[str, Any]  # point key -> finished measured FrozenTrial
    in_flight: set[str]  # point keys being measured now
    measured: int  # finished + running measurements (the budget's count)
    running: list[Any] = field(default_factory=list)  # every RUNNING trial


def study_state(study: Any) -> StudyState:
    from optuna.trial import TrialState

    results: dict[str, Any] = {}
    in_flight: set[str] = set()
    running: list[Any] = []
    measured = 0
    for t in study.get_trials(deepcopy=False):
        if t.state == TrialState.RUNNING:
            running.append(t)
        key = t.user_attrs.get("point")
        if key is None or "duplicate_of" in t.user_attrs:
            continue
        if t.state == TrialState.RUNNING:
            in_flight.add(key)
            measured += 1
        elif t.state in (TrialState.COMPLETE, TrialState.PRUNED):
            measured += 1
            results.setdefault(key, t)
    return StudyState(results, in_flight, measured, running)


def run_search(
    study: Any,
    space: SearchSpace,
    evaluate: Callable[[Point, int], Evaluation],
    *,
    budget: int,
    grid: bool = False,
    seed: int | None = 0,
    explore_after: int = 3,
    max_asks: int | None = None,
    first: Sequence[Point] = (),
    on_trial: Callable[[Point, int, Evaluation, LoopStats], None] | None = None,
    recovery: Any = None,
) -> LoopStats:
    """Drive ``study`` until ``budget`` measurements exist in it or every point is measured.

    evaluate(point, trial_number) -> Evaluation: measures one point (and records it).
    first: points to measure before any sampled one (e.g. the reference kernel, so a
        speed-up is always known); skipped if already measured.
    max_asks: a safety stop on trials asked by this call (default 20 x budget).
    recovery: a :class:`~kernmux.tuning_db.tuning.recovery.Recovery` (ownership,
        heartbeat, reclaim of dead processes' trials); None for a study only this
        process uses."""
    from optuna.exceptions import UpdateFinishedTrialError
    from optuna.trial import TrialState

    from kernmux.tuning_db.tuning.recovery import abandon, earlier_claim

    stats = LoopStats()
    if not isinstance(study.sampler, ForcingSampler):
        study.sampler = ForcingSampler(study.sampler)
    sampler = study.sampler
    rng = random.Random(seed)
    by_key = {p.key: p for p in space.points}
    max_asks = max_asks if max_asks is not None else 20 * max(budget, 1) + len(space)
    pending_first = list(first)
    streak = 0
    while True:
        state = study_state(study)
        if recovery is not None and state.running and recovery.reclaim(study, state.running):
            state = study_state(study)
        if state.measured >= budget:
            stats.stop_reason = f"budget of {budget} measurements reached"
            break
        taken = set(state.results) | state.in_flight
        remaining = [p for p in space.points if p.key not in taken]
        if not remaining:
            stats.stop_reason = f"all {len(space)} valid points measured"
            break
        if stats.asked >= max_asks:
            stats.stop_reason = f"stopped after {stats.asked} asks ({stats.duplicates} duplicates)"
            break
        forced: Point | None = None
        while pending_first and forced is None:
            candidate = pending_first.pop(0)
            if candidate.key in by_key and candidate.key not in taken:
                forced = candidate
        if forced is None and (grid or streak >= explore_after):
            forced = rng.choice(remaining)
            if not grid:
                stats.explored += 1
        sampler.force(forced.params() if forced is not None else None)
        try:
            trial = study.ask()
            stats.asked += 1
            if recovery is not None:
                recovery.claim(trial)
            point = suggest(trial, space)
        except UpdateFinishedTrialError:  # reclaimed by another process while we waited on the database
            if recovery is not None:
                recovery.release()
            continue
        finally:
            sampler.force(None)
        if point.key not in by_key:
            trial.set_user_attr("invalid", True)
            study.tell(trial, state=TrialState.PRUNED)
            stats.invalid += 1
            streak += 1
            if recovery is not None:
                recovery.release()
            continue
        earlier = state.results.get(point.key)
        if earlier is not None:
            trial.set_user_attr("duplicate_of", earlier.number)
            if earlier.state == TrialState.COMPLETE:
                study.tell(trial, earlier.value)
            else:
                study.tell(trial, state=TrialState.PRUNED)
            stats.duplicates += 1
            streak += 1
            if recovery is not None:
                recovery.release()
            continue
        streak = 0
        try:
            trial.set_user_attr("point", point.key)
        except UpdateFinishedTrialError:
            if recovery is not None:
                recovery.release()
            continue
        rival = earlier_claim(study, trial.number, point.key)
        if rival is not None:  # another process claimed this point first: it measures it
            trial.set_user_attr("duplicate_of", rival.number)
            if rival.state == TrialState.COMPLETE:
                study.tell(trial, rival.value, skip_if_finished=True)
            else:
                study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
            stats.duplicates += 1
            if recovery is not None:
                recovery.release()
            continue
        try:
            result = evaluate(point, trial.number)
        except BaseException as e:
            abandon(study, trial, e, recovery)
            raise
        trial.set_user_attr("status", result.status)
        if result.status == "ok" and result.value is not None:
            study.tell(trial, float(result.value), skip_if_finished=True)
        else:
            study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)
        if recovery is not None:
            recovery.release()
        stats.measured += 1
        if on_trial is not None:
            on_trial(point, trial.number, result, stats)
    return stats
