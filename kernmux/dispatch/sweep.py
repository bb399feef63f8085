"""The problems an op is checked on: its declared sweep, in full or as a covering subset.

``Op.sweep_defaults`` maps features to the values an op's acceptance grid sweeps. The
full cartesian product is what a GPU can afford; a CPU running Triton in its interpreter
takes a covering subset in which every value of every swept feature appears at least once
(row i takes value ``i mod len`` of each feature), so a new op or kernel is exercised on
every declared value without the product's cost.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from typing import Any

from kernmux.dispatch.registry import Op


def sweep_problems(op: Op, device: str, *, full: bool) -> list[dict[str, Any]]:
    """Feature dicts for ``op`` on ``device``: the declared sweep (full product or a
    covering subset) over the op's defaults; just the defaults when it declares none."""
    base = op.default_features(device)
    axes: Mapping[str, tuple[Any, ...]] = {k: tuple(v) for k, v in op.sweep_defaults.items() if v}
    if not axes:
        return [base]
    names = sorted(axes)
    if full:
        combos = list(itertools.product(*(axes[n] for n in names)))
    else:
        rows = max(len(axes[n]) for n in names)
        combos = [tuple(axes[n][i % len(axes[n])] for n in names) for i in range(rows)]
    return [{**base, **dict(zip(names, combo))} for combo in combos]
