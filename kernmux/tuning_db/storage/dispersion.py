"""When a stored timing is too spread out to trust.

A trial's timing is the median of many repetitions with its 20th and 80th percentiles.
On a quiet machine p80/p20 stays close to 1 (a few percent on a GPU with CUDA events, a
few tens of percent for a short CPU call). Much wider means the repetitions did not
measure one thing: another process took the core, a frequency change, intra-op threads
waiting for busy cores (20 us calls seen taking 12-20 ms). Such a row is kept (nothing is
overwritten) but never chosen as "best".

The trial re-measures a dispersed timing a few times before it records one
(:mod:`kernmux.tuning_db.measurement.trial`); a row still dispersed carries
``metrics["noisy"] = True``. Rows written before that flag existed are judged from their
p20/p80 alone, by the same bound.
"""

from __future__ import annotations

from typing import Any

# p80 / p20 above this: the timing is dispersed.
DISPERSION_BOUND = 1.5


def dispersion(p20_us: float | None, p80_us: float | None) -> float | None:
    """p80 / p20, or None when either is missing or p20 is not positive."""
    if p20_us is None or p80_us is None or p20_us <= 0:
        return None
    return p80_us / p20_us


def is_dispersed(row: Any) -> bool:
    """True when ``row`` (a stored trial or anything with p20_us/p80_us/metrics) is
    flagged noisy or its p80/p20 exceeds :data:`DISPERSION_BOUND`."""
    metrics = getattr(row, "metrics", None) or {}
    if metrics.get("noisy") is True:
        return True
    spread = dispersion(getattr(row, "p20_us", None), getattr(row, "p80_us", None))
    return spread is not None and spread > DISPERSION_BOUND
