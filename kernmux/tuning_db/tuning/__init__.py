"""Tuning: what to measure, and what the measurements say.

* ``search`` -- the space of kernel x config points and the optuna ask/tell loop.
* ``samplers`` -- seeded TPE, grid mode's filler, and forcing a trial's parameters.
* ``tuner`` -- ``kernmux tune``: plans, studies in the tuning database, tuning processes.
* ``study_storage`` -- optuna's storage: created once under a lock, surviving a restart.
* ``recovery`` -- trials of dead tuning processes settled from the store; claims.
* ``results`` -- what a tune found per feature set.
* ``derive`` -- deny rules (YAML with evidence) from recorded failures.
* ``report`` -- an HTML heatmap of winners and speed-ups per bucket.
* ``export`` -- versioned JSON export, validated import, idempotent merge.

Built on :mod:`~kernmux.tuning_db.measurement` and :mod:`~kernmux.tuning_db.storage`.
"""
