"""Which stored row is "best": one rule for the store, the resolver and the tuner.

:func:`choose_best` picks the fastest usable ``ok`` row of one (op, bucket) among rows
in memory (the resolver's index, a study's rows, a query's result) and says in notes
what it ignored and why; :func:`describe_row` names a row for explain.
:func:`nearest_buckets` orders the tuned buckets an untuned problem may borrow from.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kernmux.dispatch.platform import Platform
from kernmux.tuning_db.storage.dispersion import dispersion_bound, is_dispersed
from kernmux.tuning_db.storage.records import FAILURE_STATUSES, IGNORED_LIBS, as_utc, config_key


class RowLike(Protocol):
    id: int
    fingerprint: str
    kernel: str
    config: Mapping[str, Any]
    status: str
    p50_us: float | None
    libs: Mapping[str, str]


def lib_mismatches(row_libs: Mapping[str, str], platform: Platform) -> list[tuple[str, str, str | None]]:
    """(lib, recorded version, current version or None) for each recorded library whose
    version differs on ``platform``. Libraries the row did not record are not compared."""
    out = []
    for name, version in sorted(row_libs.items()):
        if name in IGNORED_LIBS:
            continue
        now = platform.libs.get(name)
        if now != version:
            out.append((name, version, now))
    return out


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def choose_best(
    rows: Iterable[RowLike], platform: Platform, allowed: Sequence[str] | None = None
) -> tuple[RowLike | None, list[str]]:
    """The fastest usable ``ok`` row among ``rows`` (all of one op and bucket), and notes.

    Usable: same fingerprint as ``platform``; every recorded library version equal to
    the platform's; kernel in ``allowed`` (None = any); its timing not dispersed
    (:func:`~kernmux.tuning_db.storage.dispersion.is_dispersed`); and its (kernel, config)
    never failed (numerics_failed, crashed, timeout, error) in a usable-platform trial of
    this bucket. Ties go to the lower row id."""
    fingerprint = platform.fingerprint()
    other_fp = 0
    lib_notes: Counter[tuple[str, str, str | None]] = Counter()
    failed: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    not_allowed: Counter[str] = Counter()
    dispersed: Counter[str] = Counter()
    candidates: list[RowLike] = []
    for row in rows:
        if row.fingerprint != fingerprint:
            other_fp += row.status == "ok"
            continue
        mismatches = lib_mismatches(row.libs, platform)
        if mismatches:
            if row.status == "ok":
                lib_notes.update(mismatches)
            continue
        if row.status in FAILURE_STATUSES:
            failed[(row.kernel, config_key(row.config))][row.status] += 1
            continue
        if row.status != "ok":
            continue
        if allowed is not None and row.kernel not in allowed:
            not_allowed[row.kernel] += 1
            continue
        if is_dispersed(row):
            dispersed[row.kernel] += 1
            continue
        candidates.append(row)
    notes: list[str] = []
    if other_fp:
        notes.append(f"{_rows(other_fp)} from another platform fingerprint (not {fingerprint})")
    for (name, then, now), n in sorted(lib_notes.items()):
        notes.append(f"{_rows(n)} measured with {name} {then}, now {now or 'not installed'}")
    if not_allowed:
        listed = ", ".join(f"{k} ({n})" for k, n in sorted(not_allowed.items()))
        notes.append(f"{_rows(sum(not_allowed.values()))} for kernels not allowed here: {listed}")
    if dispersed:
        listed = ", ".join(f"{k} ({n})" for k, n in sorted(dispersed.items()))
        notes.append(f"{_rows(sum(dispersed.values()))} ignored, timing dispersed (p80/p20 > {dispersion_bound():g}): "
                     f"{listed}; `kernmux tune --remeasure` times them again")
    usable = []
    excluded: Counter[str] = Counter()
    excluded_why: dict[str, Counter[str]] = defaultdict(Counter)
    for row in candidates:
        why = failed.get((row.kernel, config_key(row.config)))
        if why:
            excluded[row.kernel] += 1
            excluded_why[row.kernel].update(why)
        else:
            usable.append(row)
    for kernel, n in sorted(excluded.items()):
        statuses = ", ".join(f"{s} x{c}" for s, c in sorted(excluded_why[kernel].items()))
        notes.append(f"{_rows(n)} of {kernel} ignored: the same config failed in this bucket ({statuses})")
    if not usable:
        return None, notes
    return min(usable, key=lambda r: (r.p50_us, r.id)), notes


def describe_row(row: Any) -> str:
    """One line naming a row: id, kernel, config, timing, when (for explain)."""
    created = getattr(row, "created_at", None)
    when = as_utc(created).strftime("%Y-%m-%d %H:%M UTC") if created else "unknown time"
    timing = f"p50 {row.p50_us:.2f} us" if row.p50_us is not None else "no timing"
    if getattr(row, "p20_us", None) is not None and getattr(row, "p80_us", None) is not None:
        timing += f" (p20 {row.p20_us:.2f}, p80 {row.p80_us:.2f}"
        timing += f", {row.reps} reps)" if getattr(row, "reps", None) else ")"
    config = f" {config_key(row.config)}" if row.config else ""
    study = getattr(row, "study", None)
    origin = f", study {study!r} trial {row.trial_number}" if study else ""
    return f"tuning row {row.id}: {row.kernel}{config} {timing}, measured {when}{origin}"


# --------------------------------------------------------------------------- nearest bucket
#
# A problem whose bucket was never tuned may borrow the decision of the nearest tuned
# bucket. Categorical features (strings, booleans, enumerated ints) must be equal; the
# distance is the Euclidean norm over the numeric features of (log2 asked - log2 bucket),
# so one doubling of one feature is 1.0 and doubling two features is 1.41. A numeric
# value <= 0 has no logarithm: it matches only the same value (``shared=0`` never
# borrows from ``shared=2``). Ties go to the larger bucket (larger sum of log2 values):
# a config tuned for more work usually keeps its occupancy on a bit less, while one tuned
# for less work may leave the device idle.


@dataclass(frozen=True)
class Neighbour:
    """A tuned bucket within reach of an asked problem."""

    distance: float
    bucket: Mapping[str, Any]
    key: str  # the bucket's canonical key (``records.bucket_key``)


def _log2(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        return None
    return math.log2(value)


def log2_distance(asked: Mapping[str, Any], bucket: Mapping[str, Any], numeric: Collection[str]) -> float | None:
    """Euclidean distance over log2 of the ``numeric`` features; None when the two are
    not comparable (different keys, a categorical value differs, or a numeric value <= 0
    differs)."""
    if set(asked) != set(bucket):
        return None
    total = 0.0
    for name, value in asked.items():
        other = bucket[name]
        if name not in numeric or value == other:
            if value != other:
                return None
            continue
        a, b = _log2(value), _log2(other)
        if a is None or b is None:
            return None
        total += (a - b) ** 2
    return math.sqrt(total)


def _size(bucket: Mapping[str, Any], numeric: Collection[str]) -> float:
    return sum(_log2(bucket[n]) or 0.0 for n in numeric if n in bucket)


def nearest_buckets(
    asked: Mapping[str, Any],
    buckets: Iterable[tuple[str, Mapping[str, Any]]],
    numeric: Collection[str],
    max_distance: float,
    *,
    exclude: str | None = None,
) -> tuple[list[Neighbour], Neighbour | None]:
    """Buckets comparable with ``asked`` within ``max_distance``, nearest first (ties: the
    larger bucket first, then the key), and the nearest one beyond reach (for a note).

    asked: the asked problem in bucket form, numeric features at their exact values.
    buckets: (key, bucket) pairs, e.g. every tuned bucket of one op; ``exclude``: the
    asked problem's own bucket key."""
    within: list[Neighbour] = []
    beyond: Neighbour | None = None
    for key, bucket in buckets:
        if key == exclude:
            continue
        distance = log2_distance(asked, bucket, numeric)
        if distance is None:
            continue
        neighbour = Neighbour(distance, bucket, key)
        if distance <= max_distance + 1e-9:
            within.append(neighbour)
        elif beyond is None or distance < beyond.distance:
            beyond = neighbour
    within.sort(key=lambda n: (round(n.distance, 9), -_size(n.bucket, numeric), n.key))
    return within, beyond


def borrowed_text(asked: Mapping[str, Any], neighbour: Neighbour, numeric: Collection[str]) -> str:
    """"borrowed from tokens=128, asked 100 (distance 0.36)"; with several differing
    features "borrowed from batch=64 context=4096, asked batch=50 context=3000 (...)"."""
    differ = [n for n in sorted(numeric) if n in asked and asked[n] != neighbour.bucket.get(n)]
    distance = f"(distance {neighbour.distance:.2f})"
    if len(differ) == 1:
        name = differ[0]
        return f"borrowed from {name}={neighbour.bucket[name]}, asked {asked[name]} {distance}"
    if not differ:
        return f"borrowed from bucket {neighbour.key} {distance}"
    theirs = " ".join(f"{n}={neighbour.bucket[n]}" for n in differ)
    ours = " ".join(f"{n}={asked[n]}" for n in differ)
    return f"borrowed from {theirs}, asked {ours} {distance}"
