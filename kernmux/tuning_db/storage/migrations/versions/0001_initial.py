"""First schema: the trials table.

Revision ID: 0001_initial
Revises:
Create Date: 2026-05-20
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None

STATUSES = ("ok", "numerics_failed", "crashed", "timeout", "error", "unsupported")


def upgrade() -> None:
    # Written out (not imported from models.py): a migration is frozen history.
    # op.f(): these names are final, not templates for the naming convention.
    op.create_table(
        "kernmux_trials",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
        sa.Column("content_hash", sa.String(64), nullable=False),
        sa.Column("fingerprint", sa.String(128), nullable=False),
        sa.Column("platform", sa.JSON(), nullable=False),
        sa.Column("op", sa.String(128), nullable=False),
        sa.Column("bucket", sa.JSON(), nullable=False),
        sa.Column("bucket_key", sa.String(1024), nullable=False),
        sa.Column("features", sa.JSON(), nullable=False),
        sa.Column("kernel", sa.String(128), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(32), nullable=False),
        sa.Column("p50_us", sa.Float(), nullable=True),
        sa.Column("p20_us", sa.Float(), nullable=True),
        sa.Column("p80_us", sa.Float(), nullable=True),
        sa.Column("reps", sa.Integer(), nullable=True),
        sa.Column("metrics", sa.JSON(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("libs", sa.JSON(), nullable=False),
        sa.Column("study", sa.String(256), nullable=True),
        sa.Column("trial_number", sa.Integer(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_kernmux_trials")),
        sa.UniqueConstraint("content_hash", name=op.f("uq_kernmux_trials_content_hash")),
        sa.CheckConstraint(
            "status IN (" + ", ".join(f"'{s}'" for s in STATUSES) + ")",
            name=op.f("ck_kernmux_trials_status"),
        ),
        sa.CheckConstraint("status != 'ok' OR p50_us IS NOT NULL", name=op.f("ck_kernmux_trials_ok_has_p50")),
    )
    op.create_index("ix_kernmux_trials_lookup", "kernmux_trials", ["op", "fingerprint", "bucket_key"])


def downgrade() -> None:
    op.drop_index("ix_kernmux_trials_lookup", table_name="kernmux_trials")
    op.drop_table("kernmux_trials")
