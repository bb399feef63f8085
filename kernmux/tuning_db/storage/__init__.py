"""Storage of the tuning database: what is kept, how, and what counts as "best".

Modules (lightest first; only ``engine``, ``models``, ``store``, ``ceiling_store`` and
``source`` import SQLAlchemy):

* ``paths`` -- where the database lives (``KERNMUX_DB``, the default SQLite file).
* ``errors`` -- :class:`TuningDBError`, :class:`SchemaMismatchError`, :class:`InvalidTrialError`.
* ``records`` -- :class:`TrialRecord` (one trial) and its validation, canonical keys,
  content hashes, the library versions a measurement depends on.
* ``selection`` -- :func:`choose_best`: the fastest usable row, with notes on what was
  ignored (the one rule shared by the store, the resolver and the tuner).
* ``retry`` -- the one retry-with-backoff helper (locked SQLite, dropped connections).
* ``access`` -- read-write, read-only or immutable, and why (a database on a read-only
  mount is read, never written).
* ``engine`` -- SQLAlchemy engine set-up (SQLite WAL, busy timeout, BEGIN IMMEDIATE).
* ``models`` and ``migrations/`` -- the ORM tables and the alembic history that owns them.
* ``store`` -- :class:`TuningStore`: insert-only rows, queries, schema status/upgrade.
* ``ceiling_store`` -- measured device ceilings (roofline denominators), one row per
  measurement.
* ``source`` -- the resolver's in-memory view (``open_tuning_source``, used by
  :mod:`kernmux.runtime`).

This package's ``__init__`` imports nothing, so importing a light module stays light.
"""
