"""The resolver's view of the tuning database: rows in memory, reloaded when it changes.

``open_tuning_source(url)`` is what :mod:`kernmux.runtime` hands the dispatcher. The
source loads every ok and failed row once (the resolver asks on each dispatch-cache
miss, so a query per lookup would be too slow), and on a lookup at most once every
``check_interval_s`` it asks the database for (row count, max id): rows are only ever
inserted, so that pair changes exactly when the data does. ``generation`` counts the
reloads so a caller caching decisions can tell that they may be stale.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa

from kernmux.dispatch.platform import Platform
from kernmux.dispatch.tuning import TuningPick
from kernmux.tuning_db.storage.errors import TuningDBError
from kernmux.tuning_db.storage.models import Trial
from kernmux.tuning_db.storage.paths import default_db_path, default_url, normalize_url, sqlite_path
from kernmux.tuning_db.storage.records import FAILURE_STATUSES, bucket_key
from kernmux.tuning_db.storage.selection import choose_best, describe_row
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
        self._index = dict(index)
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

    def rows_of(self, op: str, bucket: Mapping[str, Any]) -> list[_Row]:
        """Every loaded row of (op, bucket), any platform (callers filter)."""
        self.refresh()
        return list(self._index.get((op, bucket_key(bucket)), []))

    def close(self) -> None:
        self.store.close()


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
