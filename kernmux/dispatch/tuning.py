"""What the resolver needs from a tuning database: a source it is handed, never one it opens.

Implemented by :class:`kernmux.tuning_db.storage.source.TuningSource`; wired in by
:mod:`kernmux.runtime`.

A source answers ``lookup`` for the asked problem's own bucket. A source that also has
``nearest`` (see :class:`NearestSource`) lets a problem whose bucket was never tuned
borrow the winner of the nearest tuned bucket with the same categorical features, within
``KERNMUX_NEAREST_MAX`` (log2 units, default 2.0; 0 disables). :func:`borrow_nearest`
is how the resolver asks: it names the numeric features and checks that the borrowed
config is valid for the asked problem.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import Kernel, Op

log = logging.getLogger("kernmux")

NEAREST_ENV = "KERNMUX_NEAREST_MAX"
DEFAULT_NEAREST_MAX = 2.0


@dataclass(frozen=True)
class TuningPick:
    """The measured winner for one (platform, op, bucket).

    borrowed_from: set when the winner is that of another, nearest tuned bucket (its
    bucket dict); distance: how far it is from the asked problem (log2 units)."""

    kernel: str
    config: Mapping[str, Any] = field(default_factory=dict)
    row_id: int | str | None = None
    p50_us: float | None = None
    detail: str = ""
    borrowed_from: Mapping[str, Any] | None = None
    distance: float | None = None


class TuningSource(Protocol):
    def lookup(
        self, op: str, bucket: Mapping[str, Any], platform: Platform, allowed: Sequence[str]
    ) -> tuple[TuningPick | None, list[str]]:
        """Fastest validated row among ``allowed`` kernels, plus notes on ignored rows."""


# (kernel name, config) -> "" when the config is valid for the asked problem, else why not.
ConfigCheck = Callable[[str, Mapping[str, Any]], str]


class NearestSource(Protocol):
    def nearest(
        self,
        op: str,
        features: Mapping[str, Any],
        bucket: Mapping[str, Any],
        platform: Platform,
        allowed: Sequence[str],
        *,
        numeric: Collection[str],
        config_ok: ConfigCheck,
        max_distance: float,
    ) -> tuple[TuningPick | None, list[str]]:
        """The winner of the nearest tuned bucket (same categorical features, log2
        distance over ``numeric`` at most ``max_distance``) among ``allowed`` kernels whose
        config passes ``config_ok``; nearer buckets first, ties to the larger."""


def nearest_max_from_env() -> tuple[float, str]:
    """``KERNMUX_NEAREST_MAX`` as a distance (0 = never borrow), and a note when the
    value was unusable and the default was taken instead."""
    raw = os.environ.get(NEAREST_ENV, "").strip()
    if not raw:
        return DEFAULT_NEAREST_MAX, ""
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0 or value == float("inf"):
        note = f"{NEAREST_ENV}={raw!r} is not a finite distance >= 0; using {DEFAULT_NEAREST_MAX}"
        log.warning("kernmux: %s", note)
        return DEFAULT_NEAREST_MAX, note
    return value, ""


def numeric_features(op: Op) -> frozenset[str]:
    """The features a distance is measured over: ints without an enumerated set of choices
    (strings, booleans and enumerated ints are categorical: they must match)."""
    return frozenset(spec.name for spec in op.feature_specs if spec.kind == "int" and spec.choices is None)


def config_problem(kernel: Kernel, config: Mapping[str, Any], features: Mapping[str, Any]) -> str:
    """Why ``config`` is not a valid point of ``kernel``'s space for ``features`` ("" if it is)."""
    if not kernel.config_space:
        return f"{kernel.name} takes no config, row has {dict(config)}" if config else ""
    unknown = sorted(set(config) - set(kernel.config_space))
    if unknown:
        return f"config keys {unknown} not in {kernel.name}'s space"
    for key, value in config.items():
        if value not in kernel.config_space[key]:
            return f"config {key}={value!r} not among {list(kernel.config_space[key])}"
    if kernel.config_valid is not None:
        try:
            if not kernel.config_valid(kernel.full_config(config), features):
                return f"config {dict(config)} not valid for the asked features"
        except Exception as e:  # an incomplete config, a feature the check did not expect
            return f"config_valid raised {type(e).__name__}: {e}"
    return ""


def borrow_nearest(
    source: Any,
    op: Op,
    features: Mapping[str, Any],
    bucket: Mapping[str, Any],
    platform: Platform,
    kernels: Mapping[str, Kernel],
    allowed: Sequence[str],
) -> tuple[TuningPick | None, list[str]]:
    """The nearest tuned bucket's winner for an untuned problem, or (None, notes).

    ``allowed``: the survivors for the asked problem (their supports() already held
    for ``features``); a borrowed config must also pass :func:`config_problem` for
    ``features``. Sources without ``nearest`` never borrow."""
    nearest = getattr(source, "nearest", None)
    if nearest is None:
        return None, []
    max_distance, note = nearest_max_from_env()
    notes = [note] if note else []
    if max_distance <= 0:
        return None, notes + [f"nearest-bucket borrowing disabled ({NEAREST_ENV}=0)"]

    def config_ok(kernel: str, config: Mapping[str, Any]) -> str:
        return config_problem(kernels[kernel], config, features) if kernel in kernels else f"unknown kernel {kernel!r}"

    pick, more = nearest(op.name, features, bucket, platform, allowed, numeric=numeric_features(op),
                         config_ok=config_ok, max_distance=max_distance)
    notes += list(more)
    if pick is not None and pick.kernel in kernels:
        pick, note = _heuristic_at_this_shape(pick, kernels[pick.kernel], features)
        notes += [note] if note else []
    return pick, notes


def _heuristic_at_this_shape(pick: TuningPick, kernel: Kernel, features: Mapping[str, Any]) -> tuple[TuningPick, str]:
    """A borrowed winner that is the kernel's shape heuristic at the neighbour's bucket
    (``Kernel.default_for``) is that heuristic again at the asked shape: what won there
    was "let the launcher choose", not one fixed tile (on the H200 a fixed tile borrowed
    across 2-4x in tokens ran 18-62% slower than the heuristic)."""
    if kernel.default_for is None or pick.borrowed_from is None:
        return pick, ""
    try:
        at_neighbour = kernel.resolved_default({**features, **pick.borrowed_from})
        here = kernel.resolved_default(features)
    except Exception as e:  # a heuristic that cannot read these features keeps the borrowed config
        return pick, f"shape heuristic of {kernel.name} not evaluated: {type(e).__name__}: {e}"
    if dict(pick.config) != at_neighbour or here == at_neighbour or config_problem(kernel, here, features):
        return pick, ""
    note = (f"borrowed winner {kernel.name} {dict(pick.config)} is its shape heuristic at the neighbour; "
            f"the heuristic at this shape: {here}")
    return replace(pick, config=here), note
