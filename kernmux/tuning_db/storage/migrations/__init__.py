"""Alembic helpers: the script directory shipped with kernmux, head and current revisions.

Migrations run on a connection the caller owns (so SQLite pragmas and PostgreSQL
advisory locks apply), never through an ``alembic.ini``.

Checking a database's revision must stay cheap (the resolver does it when an inference
process first opens the store, and importing alembic takes most of a second), so the
revision ids are the file names in ``versions/`` (``0001_initial.py`` holds revision
``0001_initial``; numbered, so sorted names are the chain's order; a test holds alembic
to it) and the stamp is read with one SELECT. Alembic is imported only to migrate.
"""

from __future__ import annotations

import pathlib
from typing import TYPE_CHECKING

from kernmux.tuning_db.storage.models import VERSION_TABLE

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
    """All revision ids shipped with this kernmux, oldest first (from file names)."""
    return sorted(p.stem for p in (MIGRATIONS_DIR / "versions").glob("[0-9][0-9][0-9][0-9]_*.py"))


def alembic_revisions() -> list[str]:
    """The same list as alembic walks it (slow: imports alembic; for tests)."""
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config())
    heads = script.get_heads()
    if len(heads) != 1:  # a branched history is a packaging bug
        raise RuntimeError(f"kernmux migrations have {len(heads)} heads: {heads}")
    return [rev.revision for rev in reversed(list(script.walk_revisions()))]


def head_revision() -> str:
    return known_revisions()[-1]


def current_revision(connection: sa.Connection) -> str | None:
    """The revision stamped in ``kernmux_alembic_version`` (None when absent)."""
    import sqlalchemy as sa

    if not sa.inspect(connection).has_table(VERSION_TABLE):
        return None
    stamps = connection.execute(sa.text(f"SELECT version_num FROM {VERSION_TABLE}")).scalars().all()
    if len(stamps) > 1:  # kernmux's history is linear: several stamps mean damage
        raise RuntimeError(f"{VERSION_TABLE} holds several revisions: {stamps}")
    return stamps[0] if stamps else None


def upgrade(connection: sa.Connection, revision: str = "head") -> None:
    """Run migrations up to ``revision`` on ``connection`` (the caller commits)."""
    from alembic import command

    command.upgrade(alembic_config(connection), revision)
