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

``KERNMUX_DISPERSION_BOUND`` replaces the bound (a number >= 1): a shared machine whose
timings cannot be tight may accept wider ones knowingly, and the test suite, whose
assertions are never about how fast anything is, accepts any so that no test depends on
how busy the machine is (the tests of this gate restore the default).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

log = logging.getLogger("kernmux")

# p80 / p20 above this: the timing is dispersed.
DISPERSION_BOUND = 1.5
DISPERSION_ENV = "KERNMUX_DISPERSION_BOUND"


def dispersion_bound() -> float:
    """The bound in force: ``KERNMUX_DISPERSION_BOUND`` when it is a number >= 1, else
    :data:`DISPERSION_BOUND` (a bad value is logged, never fatal)."""
    text = os.environ.get(DISPERSION_ENV, "").strip()
    if not text:
        return DISPERSION_BOUND
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 1.0:  # also NaN
        log.warning("%s=%r is not a number >= 1; using %g", DISPERSION_ENV, text, DISPERSION_BOUND)
        return DISPERSION_BOUND
    return value


def dispersion(p20_us: float | None, p80_us: float | None) -> float | None:
    """p80 / p20, or None when either is missing or p20 is not positive."""
    if p20_us is None or p80_us is None or p20_us <= 0:
        return None
    return p80_us / p20_us


def is_dispersed(row: Any) -> bool:
    """True when ``row`` (a stored trial or anything with p20_us/p80_us/metrics) is
    flagged noisy or its p80/p20 exceeds :func:`dispersion_bound`."""
    metrics = getattr(row, "metrics", None) or {}
    if metrics.get("noisy") is True:
        return True
    spread = dispersion(getattr(row, "p20_us", None), getattr(row, "p80_us", None))
    return spread is not None and spread > dispersion_bound()
