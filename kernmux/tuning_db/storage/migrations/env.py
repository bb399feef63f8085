"""Alembic environment for kernmux's tables only.

optuna's RDB storage may live in the same database (its own tables and its own
``alembic_version``): kernmux keeps its revision in ``kernmux_alembic_version`` and
``include_object``/``include_name`` hide every table it does not own, so neither
``upgrade`` nor ``autogenerate`` ever touches optuna's tables.

Run programmatically by :mod:`kernmux.tuning_db.storage.migrations` (a connection is passed in
``config.attributes["connection"]``), or from a checkout with
``alembic -c kernmux/tuning_db/storage/migrations/alembic.ini <command>`` (URL from KERNMUX_DB).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context

from kernmux.tuning_db.storage.models import VERSION_TABLE, Base, is_kernmux_table

config = context.config
target_metadata = Base.metadata

# Any constant works: it only has to be the same for every kernmux process.
_PG_MIGRATION_LOCK = 0x6B6D7578  # "kmux"


def include_name(name, type_, parent_names) -> bool:
    if type_ == "table":
        return is_kernmux_table(name)
    return True


def include_object(obj, name, type_, reflected, compare_to) -> bool:
    if type_ == "table":
        return is_kernmux_table(name)
    table = getattr(obj, "table", None)
    if table is not None:
        return is_kernmux_table(table.name)
    return True


def _configure(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        include_name=include_name,
        include_object=include_object,
        # SQLite cannot ALTER most things: batch mode recreates the table instead.
        render_as_batch=True,
        compare_type=True,
    )


def _run(connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        if connection.dialect.name == "postgresql":
            # Several workers may open a fresh shared database at once: serialize them.
            connection.execute(sa.text(f"SELECT pg_advisory_xact_lock({_PG_MIGRATION_LOCK})"))
        context.run_migrations()


def run_migrations_offline() -> None:
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        include_name=include_name,
        include_object=include_object,
        render_as_batch=True,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    from kernmux.tuning_db.storage.paths import default_url

    url = config.get_main_option("sqlalchemy.url") or default_url()
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            _run(conn)
            conn.commit()
    finally:
        engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
