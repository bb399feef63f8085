"""The search loop: conditional space, budget, duplicates, failures, grid, resume (in-memory optuna)."""

from __future__ import annotations

import itertools
import random

import pytest

optuna = pytest.importorskip("optuna")

from optuna.trial import TrialState  # noqa: E402

from kernmux.dispatch.platform import current_platform  # noqa: E402
from kernmux.tuning_db.tuning.search import (  # noqa: E402
    Evaluation,
    Point,
    SearchSpace,
    build_space,
    make_sampler,
    run_search,
)
from tests.tuning_db import fault_kernels  # noqa: E402

optuna.logging.set_verbosity(optuna.logging.WARNING)


def _space(n_block: int = 4, n_warps: int = 3) -> SearchSpace:
    """Two kernels with different parameter names, plus one without a space."""
    points = [Point.of("torch")]
    points += [Point.of("a", {"BLOCK": b, "warps": w})
               for b, w in itertools.product([16 << i for i in range(n_block)], range(1, n_warps + 1))]
    points += [Point.of("b", {"SPLIT": s}) for s in (1, 2, 3)]
    return SearchSpace.from_points(points)


def _table(space: SearchSpace, seed: int) -> dict[str, float]:
    rng = random.Random(seed)
    return {p.key: 10.0 + rng.random() * 10 for p in space.points}


def _study(kind: str = "tpe", seed: int = 0, n: int = 16):
    return optuna.create_study(sampler=make_sampler(kind, seed, n), direction="minimize")


class Recorder:
    """An evaluator that reads a table and records what was measured."""

    def __init__(self, table: dict[str, float], fail: set[str] = frozenset()):
        self.table, self.fail, self.calls = table, set(fail), []

    def __call__(self, point: Point, number: int) -> Evaluation:
        self.calls.append(point)
        if point.key in self.fail:
            return Evaluation("crashed", None, "worker died")
        return Evaluation("ok", self.table[point.key])


def test_build_space_is_conditional_and_filters_invalid_configs():
    fault_kernels.register()
    space = build_space("tuning_fault_test", {"n": 3, "device": "cpu"}, current_platform(), ["torch", "good"])
    good = [p for p in space.points if p.kernel == "good"]
    # config_valid keeps chunk <= n: 3 chunks x 2 orders.
    assert sorted((p.config_dict["chunk"], p.config_dict["order"]) for p in good) == sorted(
        itertools.product((1, 2, 3), ("fwd", "rev")))
    assert [p for p in space.points if p.kernel == "torch"] == [Point.of("torch")]
    assert dict(space.choices["good"]) == {"chunk": (1, 2, 3), "order": ("fwd", "rev")}
    assert dict(space.choices["torch"]) == {}


def test_build_space_rejects_unknown_kernel_names():
    fault_kernels.register()
    with pytest.raises(ValueError, match="no kernel"):
        build_space("tuning_fault_test", {"n": 8, "device": "cpu"}, current_platform(), ["good", "nope"])


@pytest.mark.parametrize("seed", [0, 3])
def test_trials_only_carry_parameters_of_their_kernel(seed):
    space = _space()
    study = _study(seed=seed, n=len(space))
    run_search(study, space, Recorder(_table(space, seed)), budget=10, seed=seed)
    for t in study.trials:
        kernel = t.params["kernel"]
        assert all(name == "kernel" or name.startswith(kernel + ".") for name in t.params)
        assert len(t.params) == 1 + len(space.choices[kernel])


@pytest.mark.parametrize("budget", [1, 7, 12])
def test_budget_counts_measurements_and_no_point_is_measured_twice(budget):
    space = _space()
    rec = Recorder(_table(space, 1))
    study = _study(n=len(space))
    stats = run_search(study, space, rec, budget=budget, seed=1)
    assert len(rec.calls) == budget == stats.measured
    assert len({p.key for p in rec.calls}) == budget
    measured = [t for t in study.trials if "point" in t.user_attrs]
    assert len(measured) == budget
    # Duplicates were answered from the study, never measured.
    for t in study.trials:
        if "duplicate_of" in t.user_attrs:
            earlier = study.trials[t.user_attrs["duplicate_of"]]
            assert earlier.user_attrs["point"] == Point.of(
                t.params["kernel"], {k.split(".", 1)[1]: v for k, v in t.params.items() if k != "kernel"}).key


def test_loop_stops_when_every_point_is_measured():
    space = _space(n_block=2, n_warps=2)  # 1 + 4 + 3 = 8 points
    rec = Recorder(_table(space, 2))
    stats = run_search(_study(n=len(space)), space, rec, budget=100, seed=2)
    assert sorted(p.key for p in rec.calls) == sorted(p.key for p in space.points)
    assert "all 8 valid points measured" in stats.stop_reason


def test_grid_mode_is_exhaustive_in_one_pass():
    space = _space()
    rec = Recorder(_table(space, 3))
    stats = run_search(_study("grid", n=len(space)), space, rec, budget=10_000, grid=True, seed=3)
    assert sorted(p.key for p in rec.calls) == sorted(p.key for p in space.points)
    assert stats.duplicates == 0 and stats.asked == len(space)


def test_failures_are_pruned_and_never_best():
    space = _space()
    table = _table(space, 4)
    fastest = min(table, key=table.get)
    rec = Recorder(table, fail={fastest})
    study = _study("grid", n=len(space))
    run_search(study, space, rec, budget=10_000, grid=True, seed=4)
    crashed = [t for t in study.trials if t.user_attrs.get("status") == "crashed"]
    assert len(crashed) == 1 and crashed[0].state == TrialState.PRUNED
    assert study.best_trial.user_attrs["point"] != fastest
    assert study.best_value == min(v for k, v in table.items() if k != fastest)


def test_invalid_combinations_are_pruned_not_measured():
    # Parameter values exist in the space but not every combination is valid.
    points = [Point.of("a", {"x": 1, "y": 1}), Point.of("a", {"x": 2, "y": 2})]
    space = SearchSpace.from_points(points)
    rec = Recorder({p.key: float(i) for i, p in enumerate(points)})
    study = _study(n=2)
    run_search(study, space, rec, budget=2, seed=5)
    assert sorted(p.key for p in rec.calls) == sorted(p.key for p in points)
    for t in study.trials:
        if t.user_attrs.get("invalid"):
            assert t.state == TrialState.PRUNED and "point" not in t.user_attrs


def test_first_points_are_measured_first_and_a_rerun_resumes():
    space = _space()
    rec = Recorder(_table(space, 6))
    study = _study(n=len(space))
    run_search(study, space, rec, budget=4, seed=6, first=[Point.of("torch")])
    assert rec.calls[0] == Point.of("torch") and len(rec.calls) == 4
    # A second run with a larger budget continues the same study.
    run_search(study, space, rec, budget=9, seed=6, first=[Point.of("torch")])
    assert len(rec.calls) == 9 and len({p.key for p in rec.calls}) == 9
    assert rec.calls.count(Point.of("torch")) == 1


def test_seeded_tpe_is_reproducible():
    space = _space()
    runs = []
    for _ in range(2):
        rec = Recorder(_table(space, 7))
        run_search(_study(seed=11, n=len(space)), space, rec, budget=10, seed=11)
        runs.append([p.key for p in rec.calls])
    assert runs[0] == runs[1]


def test_unknown_sampler_is_refused():
    with pytest.raises(ValueError, match="sampler"):
        make_sampler("random-walk", 0, 10)
