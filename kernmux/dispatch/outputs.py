"""Output allocation that verification can poison.

Kernels allocate their outputs with :func:`empty_output`. Normally that is
``torch.empty``; inside :func:`poisoned_outputs` it fills floats with NaN and integers
with the most negative value, so an element a kernel forgot to write fails the
comparison with the reference instead of passing by luck.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch

_state = threading.local()


def _poisoning() -> bool:
    return getattr(_state, "poison", False)


def empty_output(
    shape: Sequence[int], dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """``torch.empty`` that is poisoned (NaN / int min) while verification runs.

    On every kernel call, so the common case costs one ``torch.empty`` and one
    thread-local attribute read (no helper call, no tuple copy of a tuple shape).
    """
    out = torch.empty(shape if type(shape) is tuple else tuple(shape), dtype=dtype, device=device)
    if getattr(_state, "poison", False):
        if dtype.is_floating_point:
            out.fill_(float("nan"))
        elif dtype == torch.bool:
            out.fill_(True)
        else:
            out.fill_(torch.iinfo(dtype).min)
    return out


@contextlib.contextmanager
def poisoned_outputs() -> Iterator[None]:
    """Within this block, :func:`empty_output` returns poisoned tensors."""
    previous = _poisoning()
    _state.poison = True
    try:
        yield
    finally:
        _state.poison = previous
