"""Status ``verified``: a kernel checked against the reference and not timed.

The self-check before first use (kernmux.dispatch.selfcheck) records its outcome as a
trial row: ``verified`` when the kernel matched the reference, ``numerics_failed`` when
it did not, so a machine checks each (kernel, config, bucket) once.

Revision ID: 0004_verified_status
Revises: 0003_ceilings
Create Date: 2026-11-29
"""

from __future__ import annotations

from alembic import op

revision = "0004_verified_status"
down_revision = "0003_ceilings"
branch_labels = None
depends_on = None

# Frozen history: the status lists before and after this revision.
BEFORE = ("ok", "numerics_failed", "crashed", "timeout", "error", "unsupported")
AFTER = (*BEFORE, "verified")


def _check(statuses: tuple[str, ...]) -> str:
    return "status IN (" + ", ".join(f"'{s}'" for s in statuses) + ")"


def upgrade() -> None:
    with op.batch_alter_table("kernmux_trials") as batch:
        batch.drop_constraint(op.f("ck_kernmux_trials_status"), type_="check")
        batch.create_check_constraint(op.f("ck_kernmux_trials_status"), _check(AFTER))


def downgrade() -> None:
    op.execute("DELETE FROM kernmux_trials WHERE status = 'verified'")
    with op.batch_alter_table("kernmux_trials") as batch:
        batch.drop_constraint(op.f("ck_kernmux_trials_status"), type_="check")
        batch.create_check_constraint(op.f("ck_kernmux_trials_status"), _check(BEFORE))
