"""The tuning database: measured knowledge about which kernel is fastest, and how it is made.

Three sub-packages by responsibility; each may import the ones below it, never the one
above (an import-linter ``layers`` contract in pyproject.toml checks it):

* :mod:`~kernmux.tuning_db.tuning` -- deciding what to measure and using the results:
  the optuna search over kernel x config, the tuner (processes, studies), deny rules
  derived from failures, the HTML report, export/import/merge between machines.
* :mod:`~kernmux.tuning_db.measurement` -- measuring one thing well: the timing
  routine, the numerics-gated trial, worker-subprocess isolation, the measured device
  ceilings (roofline denominators) and ``bench``.
* :mod:`~kernmux.tuning_db.storage` -- keeping results: trial records and their
  validation, SQLAlchemy models and alembic migrations, engine set-up and the one retry
  helper, the store, the selection of "best", and the resolver's in-memory source.
"""
