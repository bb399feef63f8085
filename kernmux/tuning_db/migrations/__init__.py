"""Alembic helpers: the script directory shipped with kernmux, head and current revisions.

Migrations run on a connection the caller owns (so SQLite pragmas and PostgreSQL
advisory locks apply), never through an ``alembic.ini``.
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING

from kernmux.tuning_db.models import VERSION_TABLE

if TYPE_CHECKING:
    import sqlalchemy as sa
    from alembic.config import Config

MIGRATIONS_DIR = pathlib.Path(__file__).resolve().parent


def alembic_config(connection: sa.Connection | None = None) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("path_separator", "os")
    if connection is not None:
        cfg.attributes["connection"] = connection
    return cfg


def known_revisions() -> list[str]:
    """All revision ids shipped with this kernmux, oldest first."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


def head_revision() -> str:
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory.from_config(alembic_config()).get_heads()
    if len(heads) != 1:  # a branched history is a packaging bug
        raise RuntimeError(f"kernmux migrations have {len(heads)} heads: {heads}")
    return heads[0]


def current_revision(connection: sa.Connection) -> str | None:
    """The revision stamped in ``kernmux_alembic_version`` (None when absent)."""
    from alembic.runtime.migration import MigrationContext

    ctx = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    heads = ctx.get_current_heads()
    return heads[0] if heads else None


def upgrade(connection: sa.Connection, revision: str = "head") -> None:
    """Run migrations up to ``revision`` on ``connection`` (the caller commits)."""
    from alembic import command

    command.upgrade(alembic_config(connection), revision)
