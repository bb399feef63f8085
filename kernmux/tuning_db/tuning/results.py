"""What a tune found, per feature set, read back from the store (``kernmux tune`` prints it).

:func:`summarize` applies the dispatcher's own rule
(:func:`kernmux.tuning_db.storage.selection.choose_best`) to each study's rows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from kernmux.dispatch.platform import Platform


@dataclass
class BucketResult:
    """The outcome of tuning one feature set (read back from the store)."""

    features: dict[str, Any]
    bucket: dict[str, Any]
    study: str
    points: int
    skipped: dict[str, str]
    rows: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    best_kernel: str | None = None
    best_config: dict[str, Any] | None = None
    best_p50_us: float | None = None
    best_row_id: int | None = None
    baseline: str | None = None
    baseline_p50_us: float | None = None
    speedup: float | None = None
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def summarize(settings: Any, plans: Sequence[Any], platform: Platform) -> list[BucketResult]:
    """Per feature set: rows and statuses of its study, the pick the dispatcher's rule
    (:func:`kernmux.tuning_db.storage.selection.choose_best`) makes from them, and the speed-up over
    the baseline kernel's best ok row."""
    from kernmux.tuning_db.storage.selection import choose_best
    from kernmux.tuning_db.storage.store import TuningStore

    results = []
    with TuningStore(settings.url) as store:
        for plan in plans:
            rows = store.rows(op=settings.op, study=plan.study)
            result = BucketResult(
                features=plan.features, bucket=plan.bucket, study=plan.study, points=len(plan.space),
                skipped=dict(plan.space.skipped), rows=len(rows),
                statuses=dict(Counter(r.status for r in rows)), baseline=settings.baseline,
            )
            best, notes = choose_best(rows, platform)
            result.notes = list(notes)
            if best is not None:
                result.best_kernel, result.best_config = best.kernel, dict(best.config)
                result.best_p50_us, result.best_row_id = best.p50_us, best.id
            if settings.baseline:
                base, _ = choose_best(rows, platform, [settings.baseline])
                if base is not None:
                    result.baseline_p50_us = base.p50_us
                    if best is not None and best.p50_us:
                        result.speedup = base.p50_us / best.p50_us
            results.append(result)
    return results
