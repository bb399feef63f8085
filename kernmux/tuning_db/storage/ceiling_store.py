"""Measured device ceilings in the tuning database (table ``kernmux_ceilings``, revision 0003).

One row per measurement, never updated: :func:`record_ceilings` inserts,
:func:`latest_ceilings` returns the newest row of a platform fingerprint (the one in
use), :func:`ceiling_rows` lists them for ``kernmux ceilings --all``. What a ceiling
is and how it is measured lives in :mod:`kernmux.tuning_db.measurement.ceilings`.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from kernmux.tuning_db.storage.models import CeilingMeasurement
from kernmux.tuning_db.storage.records import as_utc
from kernmux.tuning_db.storage.store import TuningStore


@dataclass(frozen=True)
class CeilingRecord:
    """One stored measurement. Rates: copy TB/s (read + written), bf16 matmul TFLOP/s.

    platform: ``Platform.as_dict()`` without libs; libs: versions the numbers depend on
    (torch, its CUDA/HIP). id/measured_at/host are filled by :func:`record_ceilings`."""

    fingerprint: str
    device: str
    bandwidth_tbs: float
    tflops: float
    method: Mapping[str, Any] = field(default_factory=dict)
    platform: Mapping[str, Any] = field(default_factory=dict)
    libs: Mapping[str, Any] = field(default_factory=dict)
    measured_at: dt.datetime | None = None
    host: str | None = None
    id: int | None = None


def _positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: expected a finite positive number, got {value!r}")
    return float(value)


def _record_from_orm(row: CeilingMeasurement) -> CeilingRecord:
    return CeilingRecord(
        fingerprint=row.fingerprint, device=row.device, bandwidth_tbs=row.bandwidth_tbs, tflops=row.tflops,
        method=dict(row.method), platform=dict(row.platform), libs=dict(row.libs),
        measured_at=row.measured_at, host=row.host, id=row.id,
    )


def record_ceilings(store: TuningStore, record: CeilingRecord) -> CeilingRecord:
    """Validate and insert ``record``; returns it with id, measured_at (UTC) and host."""
    if not isinstance(record.fingerprint, str) or not record.fingerprint:
        raise ValueError(f"fingerprint: expected a non-empty string, got {record.fingerprint!r}")
    stamped = dataclasses.replace(
        record,
        bandwidth_tbs=_positive("bandwidth_tbs", record.bandwidth_tbs),
        tflops=_positive("tflops", record.tflops),
        measured_at=as_utc(record.measured_at or dt.datetime.now(dt.timezone.utc)),
        host=record.host or (socket.gethostname()[:255] or None),
    )
    values = {f.name: getattr(stamped, f.name) for f in dataclasses.fields(stamped) if f.name != "id"}
    values.update(method=dict(stamped.method), platform=dict(stamped.platform), libs=dict(stamped.libs))

    def write() -> int:
        with store.session_scope(write=True) as session:
            row = CeilingMeasurement(**values)
            session.add(row)
            session.flush()
            return int(row.id)

    return dataclasses.replace(stamped, id=store._retry(write))


def latest_ceilings(store: TuningStore, fingerprint: str) -> CeilingRecord | None:
    """The newest stored measurement of ``fingerprint`` (None when there is none)."""
    query = (
        sa.select(CeilingMeasurement)
        .where(CeilingMeasurement.fingerprint == fingerprint)
        .order_by(CeilingMeasurement.id.desc())
        .limit(1)
    )
    with store.session_scope() as session:
        row = session.scalars(query).first()
        return _record_from_orm(row) if row is not None else None


def ceiling_rows(store: TuningStore) -> list[CeilingRecord]:
    """Every stored measurement, oldest first."""
    with store.session_scope() as session:
        return [_record_from_orm(r) for r in session.scalars(sa.select(CeilingMeasurement).order_by(CeilingMeasurement.id))]
