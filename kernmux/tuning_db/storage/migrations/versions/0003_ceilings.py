"""Measured device ceilings: copy bandwidth and bf16 matmul rate per platform fingerprint.

The roofline denominators of ``kernmux bench`` and the benchmarks are measured on the
device at hand (not typed from a table) and kept here, one row per measurement, so a
machine measures once and every later process reads them.

Revision ID: 0003_ceilings
Revises: 0002_host_and_study_index
Create Date: 2026-11-29
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_ceilings"
down_revision = "0002_host_and_study_index"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Written out (not imported from models.py): a migration is frozen history.
    op.create_table(
        "kernmux_ceilings",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("fingerprint", sa.String(128), nullable=False),
        sa.Column("device", sa.String(256), nullable=False),
        sa.Column("platform", sa.JSON(), nullable=False),
        sa.Column("bandwidth_tbs", sa.Float(), nullable=False),
        sa.Column("tflops", sa.Float(), nullable=False),
        sa.Column("method", sa.JSON(), nullable=False),
        sa.Column("libs", sa.JSON(), nullable=False),
        sa.Column("host", sa.String(255), nullable=True),
        sa.Column("measured_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_kernmux_ceilings")),
        sa.CheckConstraint("bandwidth_tbs > 0 AND tflops > 0", name=op.f("ck_kernmux_ceilings_positive")),
    )
    op.create_index("ix_kernmux_ceilings_fingerprint", "kernmux_ceilings", ["fingerprint", "id"])


def downgrade() -> None:
    op.drop_index("ix_kernmux_ceilings_fingerprint", table_name="kernmux_ceilings")
    op.drop_table("kernmux_ceilings")
