"""Measurement: one routine for timing, one numerics-gated trial, isolation, ceilings.

* ``timing`` -- :func:`measure`: warm-up, L2 flush, CUDA events or CUDA-graph replay,
  median with p20/p80 (shared by ``bench``, ``tune`` and ``benchmarks/``).
* ``trial`` -- one trial: the numerics gate on fresh inputs, then timing; every
  outcome is a ``TrialRecord``.
* ``worker`` -- trials in a subprocess, so a crash or hang costs one trial.
* ``ceilings`` -- the roofline denominators of a device.
* ``bench`` -- side-by-side kernel timings with the fraction of roofline.

Imports :mod:`~kernmux.tuning_db.storage` (records), never
:mod:`~kernmux.tuning_db.tuning`.
"""
