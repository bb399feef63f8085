"""The resolver's view of the tuning database: rows in memory, reloaded when it changes.

``open_tuning_source(url)`` is what :mod:`kernmux.runtime` hands the dispatcher. The
source loads every ok and failed row once (the resolver asks on each dispatch-cache
miss, so a query per lookup would be too slow), and on a lookup at most once every
``check_interval_s`` it asks the database for (row count, max id): rows are only ever
inserted, so that pair changes exactly when the data does. ``generation`` counts the
reloads so a caller caching decisions can tell that they may be stale.

``nearest`` answers for a problem whose own bucket has no usable row: the winner of the
nearest tuned bucket (see :func:`~kernmux.tuning_db.storage.selection.nearest_buckets`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from kernmux.dispatch.platform import Platform
from kernmux.dispatch.tuning import ConfigCheck, TuningPick
from kernmux.tuning_db.storage.errors import TuningDBError
from kernmux.tuning_db.storage.models import Trial
from kernmux.tuning_db.storage.paths import default_db_path, default_url, normalize_url, sqlite_path
from kernmux.tuning_db.storage.records import FAILURE_STATUSES, bucket_key
from kernmux.tuning_db.storage.selection import borrowed_text, choose_best, describe_row, nearest_buckets
from kernmux.tuning_db.storage.store import TuningStore

log = logging.getLogger("kernmux")

CHECK_INTERVAL_S = 1.0


@dataclass(frozen=True)
class _Row:
    """The columns a decision needs (metrics and error: explain shows why a kernel's
    numerics failed)."""

    id: int
    fingerprint: str
    kernel: str
    config: Mapping[str, Any]
    status: str
    p50_us: float | None
    p20_us: float | None
    p80_us: float | None
    reps: int | None
    libs: Mapping[str, str]
    created_at: Any
    study: str | None
    trial_number: int | None
    metrics: Mapping[str, Any]
    error: str | None


_COLUMNS = (
    Trial.op, Trial.bucket_key, Trial.id, Trial.fingerprint, Trial.kernel, Trial.config,
    Trial.status, Trial.p50_us, Trial.p20_us, Trial.p80_us, Trial.reps, Trial.libs,
    Trial.created_at, Trial.study, Trial.trial_number, Trial.metrics, Trial.error,
)
# Loaded: rows that decide (ok), rows that exclude (failures) and self-check passes.
LOADED_STATUSES = ("ok", "verified", *FAILURE_STATUSES)


class TuningSource:
    """In-memory index of a tuning store for :class:`kernmux.dispatch.tuning.TuningSource`.

    Thread-safe. If the database becomes unreachable after the first load, lookups
    keep answering from the rows already loaded and say so in their notes."""

    def __init__(self, store: TuningStore, *, check_interval_s: float = CHECK_INTERVAL_S):
        self.store = store
        self.check_interval_s = check_interval_s
        self.generation = 0
        self._lock = threading.Lock()
        self._index: dict[tuple[str, str], list[_Row]] = {}
        self._buckets: dict[str, list[tuple[str, dict[str, Any]]]] = {}  # op -> (key, bucket)
        self._stamp: tuple[int, int] | None = None
        self._checked_at = float("-inf")
        self._stale_note = ""

    @property
    def url(self) -> str:
        return self.store.display_url

    def _load(self) -> None:
        # Stamp first: a row inserted during the load shows up at the next check.
        stamp = self.store.change_stamp()
        query = sa.select(*_COLUMNS).where(Trial.status.in_(LOADED_STATUSES))
        index: dict[tuple[str, str], list[_Row]] = defaultdict(list)
        with self.store.session_scope() as session:
            for op, key, *rest in session.execute(query):
                index[(op, key)].append(_Row(*rest))
        buckets: dict[str, list[tuple[str, dict[str, Any]]]] = defaultdict(list)
        for op, key in index:
            try:
                bucket = json.loads(key)
            except ValueError:  # not written by this code; it can still be looked up exactly
                continue
            if isinstance(bucket, dict):
                buckets[op].append((key, bucket))
        self._index = dict(index)
        self._buckets = dict(buckets)
        self._stamp = stamp
        self.generation += 1

    def refresh(self, *, force: bool = False) -> bool:
        """Reload if the database changed (checked at most once per interval unless
        ``force``). Returns True when rows were (re)loaded."""
        now = time.monotonic()
        with self._lock:
            if not force and self._stamp is not None and now - self._checked_at < self.check_interval_s:
                return False
            self._checked_at = now
            try:
                if self._stamp is not None and not force and self.store.change_stamp() == self._stamp:
                    self._stale_note = ""
                    return False
                self._load()
                self._stale_note = ""
                return True
            except TuningDBError as e:
                if self._stamp is None:
                    raise
                log.warning("kernmux: tuning database check failed, using loaded rows: %s", e)
                self._stale_note = f"tuning database unreachable ({type(e.__cause__ or e).__name__}); using rows loaded earlier"
                return False

    def lookup(
        self, op: str, bucket: Mapping[str, Any], platform: Platform, allowed: Sequence[str]
    ) -> tuple[TuningPick | None, list[str]]:
        """Fastest usable ok row among ``allowed`` kernels, plus notes on ignored rows
        (other fingerprint, other library versions, kernels not allowed, failed configs)."""
        self.refresh()
        rows = self._index.get((op, bucket_key(bucket)), [])
        row, notes = choose_best(rows, platform, allowed)
        if self._stale_note:
            notes.append(self._stale_note)
        if row is None:
            if not rows:
                notes.append(f"no rows for {op} bucket {bucket_key(bucket)}")
            return None, notes
        pick = TuningPick(
            kernel=row.kernel,
            config=dict(row.config),
            row_id=row.id,
            p50_us=row.p50_us,
            detail=f"{describe_row(row)} [{self.url}]",
        )
        return pick, notes

    def nearest(
        self,
        op: str,
        features: Mapping[str, Any],
        bucket: Mapping[str, Any],
        platform: Platform,
        allowed: Sequence[str],
        *,
        numeric: Collection[str],
        config_ok: ConfigCheck,
        max_distance: float,
    ) -> tuple[TuningPick | None, list[str]]:
        """The winner of the nearest tuned bucket for a problem whose bucket has no usable
        row (:class:`kernmux.dispatch.tuning.NearestSource`).

        features: the asked problem (numeric features at their exact values, so the
        distance is measured from what was asked, not from its bucket's edge). A bucket's
        winner is its fastest usable row among ``allowed``; when ``config_ok`` rejects
        that config for the asked problem, the next nearest bucket is tried."""
        self.refresh()
        asked = {k: (features[k] if k in numeric and k in features else v) for k, v in bucket.items()}
        index, buckets = self._index, self._buckets  # one load's view, even if another lands meanwhile
        within, beyond = nearest_buckets(asked, buckets.get(op, ()), numeric, max_distance, exclude=bucket_key(bucket))
        notes: list[str] = []
        skipped = 0
        for neighbour in within:
            row, _ = choose_best(index.get((op, neighbour.key), []), platform, allowed)
            if row is None:
                continue
            problem = config_ok(row.kernel, row.config)
            if problem:
                skipped += 1
                if skipped <= 3:
                    notes.append(f"nearest bucket {neighbour.key} (distance {neighbour.distance:.2f}) skipped: "
                                 f"its winner {row.kernel} {dict(row.config)}: {problem}")
                continue
            text = borrowed_text(asked, neighbour, numeric)
            pick = TuningPick(
                kernel=row.kernel,
                config=dict(row.config),
                row_id=row.id,
                p50_us=row.p50_us,
                detail=f"{text}: {describe_row(row)} [{self.url}]",
                borrowed_from={k: neighbour.bucket[k] for k in bucket},  # the op's feature order
                distance=round(neighbour.distance, 4),
            )
            return pick, _with_more(notes, skipped)
        notes = _with_more(notes, skipped)
        if within:
            notes.append(f"no usable row in the {len(within)} tuned bucket(s) within distance {max_distance:g}")
        elif beyond is not None:
            notes.append(f"nearest tuned bucket {beyond.key} is at distance {beyond.distance:.2f}, "
                         f"beyond the limit {max_distance:g} (KERNMUX_NEAREST_MAX)")
        return None, notes

    def rows_of(self, op: str, bucket: Mapping[str, Any]) -> list[_Row]:
        """Every loaded row of (op, bucket), any platform (callers filter)."""
        self.refresh()
        return list(self._index.get((op, bucket_key(bucket)), []))

    def close(self) -> None:
        self.store.close()


def _with_more(notes: list[str], skipped: int) -> list[str]:
    if skipped > 3:
        notes.append(f"{skipped - 3} more nearer bucket(s) skipped for configs not valid here")
    return notes


def open_source(url: str | None = None, *, check_interval_s: float = CHECK_INTERVAL_S) -> TuningSource | None:
    """The tuning source at ``url`` (None: ``KERNMUX_DB`` or the default SQLite file).

    Returns None when there is no database yet (a missing SQLite file is not created)
    or it has no kernmux tables. Raises :class:`SchemaMismatchError` when its schema is
    older or newer than this code, :class:`TuningDBError` when it cannot be read."""
    resolved = normalize_url(url) if url else default_url()
    path = sqlite_path(resolved)
    if path is not None and not path.exists():
        return None
    store = TuningStore(resolved, create=False, read_only=True)  # never writes; works on a read-only mount
    if store.opened_status == "empty":
        store.close()
        return None
    source = TuningSource(store, check_interval_s=check_interval_s)
    try:
        source.refresh(force=True)
    except BaseException:
        store.close()
        raise
    return source


def open_tuning_source(url: str | None) -> tuple[TuningSource | None, str]:
    """The tuning source for ``url`` (or ``KERNMUX_DB``/the default database if it exists).

    Returns (source or None, a note saying why there is none). Never raises: a missing
    or broken database means decisions fall through to the next level."""
    if url is None and not os.environ.get("KERNMUX_DB") and not default_db_path().exists():
        return None, "no tuning database (set KERNMUX_DB or pass --db)"
    try:
        source = open_source(url)
    except Exception as e:
        log.warning("kernmux: tuning database unusable: %s", e)
        return None, f"tuning database unusable: {type(e).__name__}: {e}"
    if source is None:
        return None, "tuning database is empty or absent"
    return source, ""
