"""SQLAlchemy 2.x ORM models of the tuning database.

Every table is prefixed ``kernmux_``: optuna's RDB storage shares the same database URL
(its own ``trials``, ``studies``, ``alembic_version`` ...), and the alembic environment
of kernmux manages only the tables declared here.

The schema is owned by the migrations in ``migrations/versions``; this module must
describe the head revision exactly (a test compares them).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from kernmux.tuning_db.storage.records import STATUSES

TABLE_PREFIX = "kernmux_"
VERSION_TABLE = "kernmux_alembic_version"

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "pk": "pk_%(table_name)s",
}


class UTCDateTime(sa.TypeDecorator):
    """Timestamps stored as naive UTC on every backend, returned timezone-aware (UTC).

    SQLite has no time zones and PostgreSQL ``timestamp`` drops them; storing UTC
    everywhere keeps a row's content hash identical after export/import/merge."""

    impl = sa.DateTime
    cache_ok = True

    def process_bind_param(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        if value.tzinfo is not None:
            value = value.astimezone(dt.timezone.utc).replace(tzinfo=None)
        return value

    def process_result_value(self, value: dt.datetime | None, dialect: Any) -> dt.datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=dt.timezone.utc)


# SQLite only aliases the rowid (autoincrement) for a column typed exactly INTEGER.
BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


class Base(DeclarativeBase):
    metadata = sa.MetaData(naming_convention=NAMING)


class Trial(Base):
    """One measured (or failed) trial of (op, kernel, config) on exact features.

    Rows are only ever inserted: re-measuring adds a row, "best" is a query.
    ``bucket_key`` is the canonical JSON of ``bucket`` (sorted keys, no spaces) so that
    lookups compare one indexed string. ``content_hash`` identifies the row's content
    (see :func:`kernmux.tuning_db.storage.records.content_hash`) and makes merges idempotent.
    """

    __tablename__ = "kernmux_trials"
    __table_args__ = (
        sa.CheckConstraint(
            "status IN (" + ", ".join(f"'{s}'" for s in STATUSES) + ")", name="status"
        ),
        sa.CheckConstraint("status != 'ok' OR p50_us IS NOT NULL", name="ok_has_p50"),
        sa.Index("ix_kernmux_trials_lookup", "op", "fingerprint", "bucket_key"),
        sa.Index("ix_kernmux_trials_study", "study", "trial_number"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    content_hash: Mapped[str] = mapped_column(sa.String(64), unique=True)
    fingerprint: Mapped[str] = mapped_column(sa.String(128))
    platform: Mapped[dict] = mapped_column(sa.JSON)
    op: Mapped[str] = mapped_column(sa.String(128))
    bucket: Mapped[dict] = mapped_column(sa.JSON)
    bucket_key: Mapped[str] = mapped_column(sa.String(1024))
    features: Mapped[dict] = mapped_column(sa.JSON)
    kernel: Mapped[str] = mapped_column(sa.String(128))
    config: Mapped[dict] = mapped_column(sa.JSON)
    status: Mapped[str] = mapped_column(sa.String(32))
    p50_us: Mapped[float | None] = mapped_column(sa.Float)
    p20_us: Mapped[float | None] = mapped_column(sa.Float)
    p80_us: Mapped[float | None] = mapped_column(sa.Float)
    reps: Mapped[int | None] = mapped_column(sa.Integer)
    metrics: Mapped[dict] = mapped_column(sa.JSON)
    error: Mapped[str | None] = mapped_column(sa.Text)
    libs: Mapped[dict] = mapped_column(sa.JSON)
    study: Mapped[str | None] = mapped_column(sa.String(256))
    trial_number: Mapped[int | None] = mapped_column(sa.Integer)
    created_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)
    # Revision 0002: the machine that measured (several hosts may share one PostgreSQL).
    host: Mapped[str | None] = mapped_column(sa.String(255))

    def __repr__(self) -> str:
        return (
            f"<Trial {self.id} {self.op}/{self.kernel} {self.status} "
            f"p50={self.p50_us} bucket={self.bucket_key}>"
        )


class CeilingMeasurement(Base):
    """One measurement of a device's roofline ceilings (revision 0003).

    bandwidth_tbs: device-to-device copy, (bytes read + written) / time, TB/s.
    tflops: dense bf16 matmul, 2 n^3 / time, TFLOP/s. method: sizes, repetitions and
    medians behind the two numbers. Rows are only inserted; the newest row of a
    fingerprint is the one in use (re-measuring adds a row).
    """

    __tablename__ = "kernmux_ceilings"
    __table_args__ = (
        sa.CheckConstraint("bandwidth_tbs > 0 AND tflops > 0", name="positive"),
        sa.Index("ix_kernmux_ceilings_fingerprint", "fingerprint", "id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    fingerprint: Mapped[str] = mapped_column(sa.String(128))
    device: Mapped[str] = mapped_column(sa.String(256))
    platform: Mapped[dict] = mapped_column(sa.JSON)
    bandwidth_tbs: Mapped[float] = mapped_column(sa.Float)
    tflops: Mapped[float] = mapped_column(sa.Float)
    method: Mapped[dict] = mapped_column(sa.JSON)
    libs: Mapped[dict] = mapped_column(sa.JSON)
    host: Mapped[str | None] = mapped_column(sa.String(255))
    measured_at: Mapped[dt.datetime] = mapped_column(UTCDateTime)

    def __repr__(self) -> str:
        return f"<CeilingMeasurement {self.id} {self.device} {self.bandwidth_tbs} TB/s {self.tflops} TFLOP/s>"


def is_kernmux_table(name: str | None) -> bool:
    """True for tables this package owns (alembic's include filter)."""
    return bool(name) and name.startswith(TABLE_PREFIX) and name != VERSION_TABLE
