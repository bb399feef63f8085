"""``kernmux db prune``: the one place tuning rows are deleted, on request.

Rows are only ever inserted by tuning, benchmarks and the self-check; "best" is a query
that already skips failed configs, other platforms, other library versions and dispersed
timings. Pruning is for the database's owner: rows measured under load, from an old
driver, of a kernel that no longer exists. A :class:`PruneFilter` names the rows (op,
kernel, status, age, dispersed timing; every given condition must hold), a dry run lists
them, and :func:`prune` deletes them with :meth:`TuningStore.delete_rows`.

An optuna study whose every row is deleted is deleted too, so that ``kernmux tune``
searches it again from scratch; a study that keeps some rows keeps its optuna trials
(its points count as measured: ``kernmux tune --remeasure`` times them again).
"""

from __future__ import annotations

import datetime as dt
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from kernmux.tuning_db.storage.dispersion import is_dispersed
from kernmux.tuning_db.storage.records import STATUSES, as_utc
from kernmux.tuning_db.storage.store import TuningStore

_AGE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_age(text: str) -> dt.timedelta:
    """``"90m"``, ``"12h"``, ``"7d"``, ``"2w"`` (s, m, h, d, w) -> timedelta; ValueError otherwise."""
    match = _AGE.match(text)
    if not match:
        raise ValueError(f"age {text!r} is not a number with a unit s, m, h, d or w (e.g. 7d)")
    return dt.timedelta(seconds=float(match.group(1)) * _UNIT_S[match.group(2)])


@dataclass(frozen=True)
class PruneFilter:
    """Which rows to delete: every given condition must hold.

    statuses: any of these statuses. older_than: created longer ago than this.
    noisy: only rows whose timing is dispersed (flagged, or p80/p20 over the bound)."""

    op: str | None = None
    kernel: str | None = None
    statuses: tuple[str, ...] | None = None
    older_than: dt.timedelta | None = None
    noisy: bool = False

    def __post_init__(self) -> None:
        unknown = [s for s in self.statuses or () if s not in STATUSES]
        if unknown:
            raise ValueError(f"unknown status(es) {unknown}; statuses: {', '.join(STATUSES)}")

    def empty(self) -> bool:
        return (self.op is None and self.kernel is None and not self.statuses and self.older_than is None
                and not self.noisy)

    def describe(self) -> str:
        parts = []
        if self.op:
            parts.append(f"op {self.op}")
        if self.kernel:
            parts.append(f"kernel {self.kernel}")
        if self.statuses:
            parts.append("status " + "|".join(self.statuses))
        if self.older_than is not None:
            parts.append(f"older than {self.older_than}")
        if self.noisy:
            parts.append("dispersed timing")
        return ", ".join(parts) or "every row"


@dataclass
class PruneReport:
    """What a prune matched (and deleted, unless it was a dry run)."""

    dry_run: bool
    filter: str
    ids: list[int] = field(default_factory=list)
    counts: list[dict[str, Any]] = field(default_factory=list)  # per op/kernel/status
    deleted: int = 0
    studies_deleted: list[str] = field(default_factory=list)
    studies_kept: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": self.dry_run, "filter": self.filter, "matched": len(self.ids), "deleted": self.deleted,
            "counts": self.counts, "studies_deleted": self.studies_deleted, "studies_kept": self.studies_kept,
            "ids": self.ids,
        }


def matching_rows(store: TuningStore, flt: PruneFilter, now: dt.datetime | None = None) -> list[Any]:
    """The stored rows ``flt`` names, oldest first."""
    now = now or dt.datetime.now(dt.timezone.utc)
    rows = store.rows(op=flt.op, kernel=flt.kernel, status=list(flt.statuses) if flt.statuses else None)
    out = []
    for row in rows:
        if flt.older_than is not None and (row.created_at is None or now - as_utc(row.created_at) <= flt.older_than):
            continue
        if flt.noisy and not (row.status == "ok" and is_dispersed(row)):
            continue
        out.append(row)
    return out


def prune(store: TuningStore, flt: PruneFilter, *, dry_run: bool, now: dt.datetime | None = None) -> PruneReport:
    """Delete the rows ``flt`` names (nothing when ``dry_run``); optuna studies left
    without rows are deleted with them."""
    rows = matching_rows(store, flt, now)
    counts = Counter((r.op, r.kernel, r.status) for r in rows)
    report = PruneReport(
        dry_run=dry_run, filter=flt.describe(), ids=[r.id for r in rows],
        counts=[{"op": o, "kernel": k, "status": s, "rows": n} for (o, k, s), n in sorted(counts.items())],
    )
    touched = sorted({r.study for r in rows if r.study})
    gone = set(report.ids)
    for study in touched:
        left = [r for r in store.rows(study=study) if r.id not in gone]
        (report.studies_kept if left else report.studies_deleted).append(study)
    if dry_run or not rows:
        return report
    report.deleted = store.delete_rows(report.ids)
    for study in report.studies_deleted:
        _delete_study(store.url, study)
    return report


def _delete_study(url: str, name: str) -> None:
    """Delete an optuna study (stored in the same database) if it exists."""
    try:
        import optuna
    except ImportError:  # without optuna there are no studies to delete
        return
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        optuna.delete_study(study_name=name, storage=url)
    except KeyError:  # no such study: rows may carry a name from an imported database
        pass


def summary_lines(report: PruneReport) -> Sequence[str]:
    """Human-readable lines for the CLI."""
    verb = "would delete" if report.dry_run else "deleted"
    n = len(report.ids) if report.dry_run else report.deleted
    lines = [f"{verb} {n} row(s) matching {report.filter}"]
    lines += [f"  {c['op']}/{c['kernel']} {c['status']}: {c['rows']}" for c in report.counts]
    if report.studies_deleted:
        lines.append(f"{'would delete' if report.dry_run else 'deleted'} {len(report.studies_deleted)} optuna "
                     "study(ies) left without rows (a later `kernmux tune` searches them again)")
    if report.studies_kept:
        lines.append(f"{len(report.studies_kept)} study(ies) keep other rows and their optuna trials "
                     "(`kernmux tune --remeasure` times their points again)")
    return lines
