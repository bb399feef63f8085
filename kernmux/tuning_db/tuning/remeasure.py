"""``kernmux tune --remeasure``: time the stored ``ok`` points of an op again.

A study that has met its trial budget measures nothing more, so a row timed under load
(or before the one-thread CPU protocol) would stand forever. Re-measuring runs each
distinct (features, kernel, config) of the stored ``ok`` rows on this platform again as
a fresh trial — numerics gate, then timing — in a worker subprocess, and records the
result as a new row (same study, no optuna trial number, ``metrics["remeasure_of"]`` the
row it repeats). Nothing is overwritten: "best" is still a query over all rows, which
skips dispersed timings (:mod:`kernmux.tuning_db.storage.dispersion`); ``kernmux db prune``
removes rows for good.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kernmux.dispatch.platform import Platform, current_platform
from kernmux.tuning_db.measurement.trial import TrialSpec
from kernmux.tuning_db.measurement.worker import InProcessRunner, TrialWorker
from kernmux.tuning_db.storage.records import config_key
from kernmux.tuning_db.storage.store import TuningStore


@dataclass
class Remeasured:
    """One point timed again: the row it repeats and the new row."""

    features: dict[str, Any]
    kernel: str
    config: dict[str, Any]
    previous_row: int
    previous_p50_us: float | None
    row_id: int
    status: str
    p50_us: float | None
    p20_us: float | None
    p80_us: float | None
    noisy: bool
    error: str | None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _features_key(features: Mapping[str, Any]) -> str:
    return json.dumps(dict(features), sort_keys=True, default=str)


def points_to_remeasure(
    store: TuningStore,
    op: str,
    platform: Platform,
    feature_sets: Sequence[Mapping[str, Any]] | None = None,
    kernels: Sequence[str] | None = None,
) -> list[Any]:
    """The newest ``ok`` row of each distinct (features, kernel, config) of ``op`` on this
    platform fingerprint, restricted to ``feature_sets`` and ``kernels`` when given."""
    wanted = None if feature_sets is None else {_features_key(f) for f in feature_sets}
    newest: dict[tuple[str, str, str], Any] = {}
    for row in store.rows(op=op, status="ok", fingerprint=platform.fingerprint()):
        if kernels is not None and row.kernel not in kernels:
            continue
        key = (_features_key(row.features), row.kernel, config_key(row.config))
        if wanted is not None and key[0] not in wanted:
            continue
        newest[key] = row  # rows come oldest first
    return [newest[k] for k in sorted(newest)]


def remeasure(
    op: str,
    *,
    url: str | None = None,
    feature_sets: Sequence[Mapping[str, Any]] | None = None,
    kernels: Sequence[str] | None = None,
    timeout_s: float = 120.0,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    cuda_graph: bool | None = None,
    seed: int = 0,
    isolate: bool = True,
    imports: Sequence[str] = (),
    platform: Platform | None = None,
    progress: Callable[[dict[str, Any]], None] | None = None,
) -> list[Remeasured]:
    """Time every point :func:`points_to_remeasure` finds again; one new row each."""
    platform = platform or current_platform()
    results = []
    with TuningStore(url) as store:
        points = points_to_remeasure(store, op, platform, feature_sets, kernels)
        if progress is not None:
            progress({"event": "remeasure_plan", "points": len(points)})
        runner_cls = TrialWorker if isolate else InProcessRunner
        with runner_cls(imports=imports) as runner:
            for index, row in enumerate(points):
                features = dict(row.features)
                spec = TrialSpec(
                    op=op, kernel=row.kernel, features=features, config=dict(row.config),
                    device="cuda" if features.get("device") == "cuda" else "cpu", seed=seed * 1_000_003 + index,
                    warmup_ms=warmup_ms, rep_ms=rep_ms, cuda_graph=cuda_graph, study=row.study, trial_number=None,
                )
                record = runner.run(spec, timeout_s)
                record.metrics = {**record.metrics, "remeasure_of": row.id}
                row_id = store.record(record)
                done = Remeasured(
                    features=features, kernel=row.kernel, config=dict(row.config), previous_row=row.id,
                    previous_p50_us=row.p50_us, row_id=row_id, status=record.status, p50_us=record.p50_us,
                    p20_us=record.p20_us, p80_us=record.p80_us, noisy=bool(record.metrics.get("noisy")),
                    error=(record.error or "").splitlines()[0][:200] if record.error else None,
                )
                results.append(done)
                if progress is not None:
                    progress({"event": "remeasured", "index": index + 1, "total": len(points), **done.as_dict()})
    return results
