"""Opt-in value checks: ``KERNMUX_CHECK_VALUES=1``.

Shapes, dtypes, devices and strides are validated at every op's boundary for free.
Values (an index within the cache, a context length within the block table) cost a
pass over a device tensor and a host synchronisation, so kernels check them only when
this variable is set (debugging, or an engine that prefers a clear ValueError to a
wrong or crashing kernel). Each op's README says what its check covers.
"""

from __future__ import annotations

import os

ENV = "KERNMUX_CHECK_VALUES"


def enabled() -> bool:
    """True when ``KERNMUX_CHECK_VALUES`` is 1/true/yes (read on every call: cheap next
    to the kernels that use it, and settable by tests)."""
    return os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes")
