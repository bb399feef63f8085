"""From engine to tuner: the problems an engine really ran, read from statistics dumps.

An engine process with ``KERNMUX_STATS_PATH`` set writes a JSON dump (:mod:`kernmux.stats`)
listing every problem it ran through ``kernmux.ops``: op, full features, calls. Here
several dumps (files, or directories of ``kernmux-stats-*.json``) are merged — calls of
the same (op, features) summed — and ordered most-called first; ``kernmux tune
--from-stats`` tunes exactly those problems.

Dumps of format version 1 had no per-problem counts: their problems are taken from the
decisions (each decision is one problem the process ran) with unknown call counts, and
come after every problem whose count is known.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DUMP_GLOB = "kernmux-stats-*.json"


class StatsFileError(ValueError):
    """A statistics dump that cannot be read; the message names the file and what is wrong."""


@dataclass
class StatsProblem:
    """One problem an engine ran: ``op`` with these exact ``features``.

    calls: calls summed over the dumps (None when only version-1 dumps named it);
    sources: the dump files it came from."""

    op: str
    features: dict[str, Any]
    calls: int | None
    sources: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"op": self.op, "features": dict(self.features), "calls": self.calls, "sources": list(self.sources)}


def dump_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    """The dump files named by ``paths``: a file as given, a directory's
    ``kernmux-stats-*.json`` (sorted). Raises StatsFileError for a missing path or a
    directory without dumps."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(path.glob(DUMP_GLOB))
            if not found:
                raise StatsFileError(f"{path}: directory holds no {DUMP_GLOB} statistics dumps")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise StatsFileError(f"{path}: no such file or directory")
    return files


def _problems_of(data: Mapping[str, Any], where: str) -> list[tuple[str, dict[str, Any], int | None]]:
    if not isinstance(data, dict) or not isinstance(data.get("version"), int):
        raise StatsFileError(f"{where}: not a kernmux statistics dump (no integer 'version')")
    out = []
    if "problems" in data:
        problems = data["problems"]
        if not isinstance(problems, list):
            raise StatsFileError(f"{where}: 'problems' must be a list, got {type(problems).__name__}")
        for i, item in enumerate(problems):
            ok = (isinstance(item, dict) and isinstance(item.get("op"), str) and isinstance(item.get("features"), dict)
                  and isinstance(item.get("calls"), int) and not isinstance(item.get("calls"), bool) and item["calls"] >= 0)
            if not ok:
                raise StatsFileError(f"{where}: problems[{i}] must be {{op: str, features: object, calls: int >= 0}}, got {item!r}"[:400])
            out.append((item["op"], dict(item["features"]), item["calls"]))
        return out
    # Version 1: problems only as decisions (key = [[feature, value], ...]).
    for i, item in enumerate(data.get("decisions") or []):
        key = item.get("key") if isinstance(item, dict) else None
        if not (isinstance(item, dict) and isinstance(item.get("op"), str) and isinstance(key, list)
                and all(isinstance(p, list) and len(p) == 2 and isinstance(p[0], str) for p in key)):
            raise StatsFileError(f"{where}: decisions[{i}] must be {{op: str, key: [[feature, value], ...]}}, got {item!r}"[:400])
        out.append((item["op"], {k: v for k, v in key}, None))
    return out


def read_problems(paths: Sequence[str | os.PathLike]) -> list[StatsProblem]:
    """Every problem in the dumps at ``paths``, merged and ordered most-called first
    (ties: op name, then features; unknown counts last)."""
    merged: dict[tuple[str, str], StatsProblem] = {}
    for path in dump_files(paths):
        where = str(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise StatsFileError(f"{where}: cannot read JSON: {e}") from None
        for op, features, calls in _problems_of(data, where):
            key = (op, json.dumps(features, sort_keys=True, default=str))
            problem = merged.get(key)
            if problem is None:
                problem = merged[key] = StatsProblem(op, features, calls)
            elif calls is not None:
                problem.calls = calls + (problem.calls or 0)
            if where not in problem.sources:
                problem.sources.append(where)
    return sorted(merged.values(), key=lambda p: (p.calls is None, -(p.calls or 0), p.op,
                                                  json.dumps(p.features, sort_keys=True, default=str)))


def select(problems: Sequence[StatsProblem], *, op: str | None = None, top: int | None = None) -> list[StatsProblem]:
    """The problems of ``op`` (None: every op), the ``top`` most-called (None: all)."""
    chosen = [p for p in problems if op is None or p.op == op]
    return chosen if top is None else chosen[:top]


def check_features(problem: StatsProblem, op: Any) -> str:
    """Why ``problem``'s features do not fit ``op`` (a :class:`kernmux.dispatch.registry.Op`):
    a feature missing or unknown, a value of the wrong kind or not among the choices
    ("" when they fit)."""
    names = set(op.feature_names)
    missing = sorted(names - set(problem.features))
    extra = sorted(set(problem.features) - names)
    if missing or extra:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(extra)}"] if extra else [])
        return f"features do not match op {problem.op} ({'; '.join(parts)})"
    kinds = {"int": int, "bool": bool, "str": str}
    for name, value in problem.features.items():
        spec = op.spec(name)
        expected = kinds.get(spec.kind, object)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            return f"feature {name}={value!r} is not a {spec.kind}"
        if spec.choices is not None and value not in spec.choices:
            return f"feature {name}={value!r} not among {list(spec.choices)}"
    return ""


def runs_in_order(problems: Sequence[StatsProblem]) -> list[tuple[str, list[StatsProblem]]]:
    """Consecutive problems of one op grouped, in the given (most-called first) order:
    each group is one ``tune`` call, so the order of measurements is the order of calls."""
    groups: list[tuple[str, list[StatsProblem]]] = []
    for problem in problems:
        if groups and groups[-1][0] == problem.op:
            groups[-1][1].append(problem)
        else:
            groups.append((problem.op, [problem]))
    return groups
