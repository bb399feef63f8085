"""optuna samplers for the search: seeded TPE, a random filler for grid mode, and a
wrapper through which a tuning process dictates its next trial's parameters."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

SAMPLERS = ("tpe", "grid")


def make_sampler(kind: str, seed: int | None, n_points: int, startup_trials: int | None = None) -> Any:
    """A seeded optuna sampler: TPE (default) or, for grid mode, a random filler.

    startup_trials: TPE's random start; default ``clamp(n_points // 10, 3, 10)`` so small
    spaces start modelling early."""
    import optuna

    if kind not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {kind!r}")
    if kind == "grid":
        return optuna.samplers.RandomSampler(seed=seed)
    if startup_trials is None:
        startup_trials = max(3, min(10, n_points // 10))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(
            seed=seed,
            n_startup_trials=startup_trials,
            multivariate=True,
            group=True,  # conditional space: each kernel's parameters form a group
            constant_liar=True,  # several processes: running trials count as bad guesses
        )


class ForcingSampler:
    """Wraps a sampler so this process can dictate the next trial's parameters.

    optuna's ``enqueue_trial`` puts a WAITING trial in the shared storage, which
    another process may pop (on SQLite two processes can even claim the same one).
    Forcing through the sampler keeps a forced point local to the process asking."""

    def __init__(self, base: Any) -> None:
        self.base = base
        self._forced: dict[str, Any] | None = None

    def force(self, params: Mapping[str, Any] | None) -> None:
        self._forced = dict(params) if params is not None else None

    def infer_relative_search_space(self, study: Any, trial: Any) -> dict[str, Any]:
        if self._forced is not None:
            return {}
        return self.base.infer_relative_search_space(study, trial)

    def sample_relative(self, study: Any, trial: Any, search_space: Mapping[str, Any]) -> dict[str, Any]:
        if self._forced is not None:
            return {}
        return self.base.sample_relative(study, trial, search_space)

    def sample_independent(self, study: Any, trial: Any, param_name: str, distribution: Any) -> Any:
        if self._forced is not None and param_name in self._forced:
            return self._forced[param_name]
        return self.base.sample_independent(study, trial, param_name, distribution)

    def before_trial(self, study: Any, trial: Any) -> None:
        self.base.before_trial(study, trial)

    def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
        self.base.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self.base.reseed_rng()
