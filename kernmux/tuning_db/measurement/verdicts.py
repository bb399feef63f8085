"""Self-check verdicts kept in the tuning database (:class:`kernmux.dispatch.selfcheck.VerdictStore`).

A verdict is a trial row without timing: ``verified`` when the kernel matched the
reference, ``numerics_failed`` (with its error metrics) when it did not. Tuning trials
count as evidence too: an ``ok`` row passed the same numerics gate, a ``numerics_failed``
row failed it. Rows of another platform fingerprint or other library versions say
nothing about this machine and are ignored.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Any

from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import REGISTRY, Registry
from kernmux.dispatch.selfcheck import Verdict
from kernmux.tuning_db.measurement.trial import json_safe, platform_fields
from kernmux.tuning_db.storage.records import TrialRecord, config_key
from kernmux.tuning_db.storage.selection import lib_mismatches

log = logging.getLogger("kernmux")

PASSING = ("ok", "verified")


class DatabaseVerdicts:
    """Reads verdicts from the dispatcher's loaded tuning rows; writes them to ``url``.

    source: returns the tuning source loaded for decisions (or None when there is no
        database yet); url: where verdicts are written (None: ``KERNMUX_DB`` or the
        default database, created on the first verdict)."""

    def __init__(self, source: Callable[[], Any], url: str | None = None, registry: Registry = REGISTRY):
        self._source = source
        self.url = url
        self.registry = registry
        self._store: Any = None
        self._lock = threading.Lock()

    def verdict(
        self, op: str, bucket: Mapping[str, Any], platform: Platform, kernel: str, config: Mapping[str, Any]
    ) -> Verdict | None:
        source = self._source()
        if source is None or not hasattr(source, "rows_of"):
            return None
        fingerprint, key = platform.fingerprint(), config_key(config)
        relevant = [
            row for row in source.rows_of(op, bucket)
            if row.fingerprint == fingerprint and row.kernel == kernel and config_key(row.config) == key
            and row.status in (*PASSING, "numerics_failed") and not lib_mismatches(row.libs, platform)
        ]
        failed = [row for row in relevant if row.status == "numerics_failed"]
        if failed:
            row = max(failed, key=lambda r: r.id)
            detail = (row.error or "numerics failed").removeprefix("numerics: ")
            return Verdict(False, detail, dict(row.metrics or {}), f"row {row.id}")
        if relevant:
            row = max(relevant, key=lambda r: r.id)
            return Verdict(True, "", dict(row.metrics or {}), f"row {row.id} ({row.status})")
        return None

    def record_verdict(
        self, op: str, features: Mapping[str, Any], bucket: Mapping[str, Any], platform: Platform,
        kernel: str, config: Mapping[str, Any], verdict: Verdict,
    ) -> str:
        requires = tuple(self.registry.kernels_of(op)[kernel].requires)
        record = TrialRecord(
            op=op, kernel=kernel, config=dict(config), features=dict(features), bucket=dict(bucket),
            status="verified" if verdict.passed else "numerics_failed",
            p50_us=None, p20_us=None, p80_us=None, reps=None,
            metrics=json_safe(verdict.metrics),
            error=None if verdict.passed else f"numerics: self-check: {verdict.detail}"[:2000],
            **platform_fields(platform, requires),
        )
        source = self._source()
        reason = getattr(getattr(source, "store", None), "read_only_reason", "")
        if reason:  # a database shipped read-only: the verdict lives in this process
            return f"this process only (tuning database read-only: {reason})"
        with self._lock:
            if self._store is None:
                from kernmux.tuning_db.storage.store import TuningStore

                self._store = TuningStore(self.url, create=True)
            row_id = self._store.record(record)
        if source is not None and hasattr(source, "refresh"):
            source.refresh(force=True)
        return f"row {row_id}"
