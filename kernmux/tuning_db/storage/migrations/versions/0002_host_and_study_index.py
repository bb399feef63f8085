"""Record the measuring host; index trials by (study, trial_number).

Several hosts may tune one study against a shared PostgreSQL: ``host`` says which
machine measured a row, and the study index serves the tuner's resume query.

Revision ID: 0002_host_and_study_index
Revises: 0001_initial
Create Date: 2026-05-20
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002_host_and_study_index"
down_revision = "0001_initial"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("kernmux_trials") as batch:
        batch.add_column(sa.Column("host", sa.String(255), nullable=True))
        batch.create_index("ix_kernmux_trials_study", ["study", "trial_number"])


def downgrade() -> None:
    with op.batch_alter_table("kernmux_trials") as batch:
        batch.drop_index("ix_kernmux_trials_study")
        batch.drop_column("host")
