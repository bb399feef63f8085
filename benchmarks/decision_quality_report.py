"""Summary statistics and the markdown report of ``benchmarks/decision_quality.py``.

Per op, from the measured shapes: regret of the pick against the oracle (the fastest
candidate that passed the numerics gate on that shape), the best static choice (the one
candidate with the lowest geomean time over every held-out shape it ran on, required to
run on all of them), the default choice (priority, no database) and the gains over both.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from typing import Any

from kernmux.tuning_db.storage.records import config_key

GOAL_GEOMEAN_REGRET = 0.03
GOAL_MAX_REGRET = 0.15
GOAL_GAIN_OVER_STATIC = 0.10
GOAL_TUNE_S = 600.0


def geomean_ratio(ratios: list[float]) -> float | None:
    """exp(mean(log r)) - 1 over ``ratios`` (None when empty)."""
    if not ratios:
        return None
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios)) - 1


def quantile(values: list[float], q: float) -> float | None:
    """The nearest-rank ``q`` quantile (None when empty)."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _ok(shape: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {t["key"]: t for t in shape["timings"] if t.get("status") == "ok"}


def decision_kind(decision: dict[str, Any]) -> str:
    if decision["source"] == "tuning_db":
        return "borrowed" if decision.get("borrowed_from") is not None else "tuned bucket"
    return decision["source"]


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Regret, gains and decision kinds of one op's measured shapes."""
    shapes = result["shapes"]
    per_shape, regrets, vs_default = [], [], []
    oracle_kernels: Counter[str] = Counter()
    # Static: a candidate that ran (and passed) on every shape.
    ok_sets = [_ok(s) for s in shapes]
    common = set.intersection(*(set(o) for o in ok_sets)) if ok_sets else set()
    static_key = min(common, key=lambda k: sum(math.log(o[k]["p50_us"]) for o in ok_sets), default=None)
    vs_static = []
    for shape, ok in zip(shapes, ok_sets):
        oracle = min(ok.values(), key=lambda t: t["p50_us"], default=None)
        pick = ok.get(shape["pick"]["key"])
        default = ok.get(shape["default"]["key"])
        static = ok.get(static_key) if static_key else None
        row = {
            "features": shape["features"], "decision": decision_kind(shape["pick"]),
            "distance": shape["pick"].get("distance"),
            "pick": _label(shape["pick"]), "pick_us": pick["p50_us"] if pick else None,
            "oracle": _label(oracle) if oracle else None, "oracle_us": oracle["p50_us"] if oracle else None,
            "default": _label(shape["default"]), "default_us": default["p50_us"] if default else None,
            "static_us": static["p50_us"] if static else None, "regret": None,
        }
        if oracle:
            oracle_kernels[oracle["kernel"]] += 1
        if pick and oracle:
            row["regret"] = pick["p50_us"] / oracle["p50_us"] - 1
            regrets.append(pick["p50_us"] / oracle["p50_us"])
        if pick and default:
            vs_default.append(default["p50_us"] / pick["p50_us"])
        if pick and static:
            vs_static.append(static["p50_us"] / pick["p50_us"])
        per_shape.append(row)
    regret_values = [r - 1 for r in regrets]
    static = next((t for t in shapes[0]["timings"] if t["key"] == static_key), None) if static_key and shapes else None
    crossover = len(oracle_kernels) > 1
    summary = {
        "shapes_measured": len(shapes),
        "shapes_with_regret": len(regrets),
        "regret_geomean": geomean_ratio(regrets),
        "regret_p90": quantile(regret_values, 0.9),
        "regret_max": max(regret_values) if regret_values else None,
        "gain_over_static": geomean_ratio(vs_static),
        "gain_over_default": geomean_ratio(vs_default),
        "static": _label(static) if static else None,
        "oracle_kernels": dict(oracle_kernels),
        "kernels_cross_over": crossover,
        "decisions": dict(Counter(r["decision"] for r in per_shape)),
        "tune_wall_s": result["tune_wall_s"],
        "per_shape": per_shape,
    }
    summary["goals"] = {
        "regret_geomean_le_3pct": _goal(summary["regret_geomean"], GOAL_GEOMEAN_REGRET, below=True),
        "regret_max_le_15pct": _goal(summary["regret_max"], GOAL_MAX_REGRET, below=True),
        "gain_over_static_ge_10pct": (_goal(summary["gain_over_static"], GOAL_GAIN_OVER_STATIC, below=False)
                                      if crossover else "n/a: one kernel wins every shape"),
        "tune_le_10min": (_goal(result["tune_wall_s"], GOAL_TUNE_S, below=True) if result["mode"] == "full"
                          else f"n/a: {result['mode']} sweep, not the full one"),
    }
    return summary


def _goal(value: float | None, limit: float, *, below: bool) -> str:
    if value is None:
        return "not measured"
    return "met" if (value <= limit if below else value >= limit) else "not met"


def _label(point: dict[str, Any] | None) -> str:
    if not point:
        return "-"
    config = point.get("config") or {}
    text = point["kernel"] + (f" {config_key(config)}" if config else "")
    return text + (f" +{point['transform']}" if point.get("transform") else "")


# --------------------------------------------------------------------------- markdown


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:+.1f}%"


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        "# Decision quality: kernmux's pick vs the fastest measured candidate on held-out shapes",
        "",
        f"`{report['command']}` (mode {report['mode']}, seed {report['seed']})",
        f"on {env.get('gpu')} ({env.get('arch')}), torch {env.get('torch')}, triton {env.get('triton')}, "
        f"cuda {env.get('cuda')}, kernmux {report['kernmux']}, {env.get('date')}.",
        "",
        "Regret = pick / oracle - 1 (oracle: the fastest candidate that passed the numerics gate on that shape; "
        "candidates: every kernel's default, every training winner, sampled configs). Gains: geomean of "
        "(static or default time) / pick time - 1. Goals (H200, reported not asserted): geomean regret <= 3%, "
        "max <= 15%, >= 10% over static where kernels cross over, tuning the full sweep <= 10 min.",
        "",
        "| op | shapes | decisions | regret geomean | p90 | max | gain vs static | gain vs default | oracle kernels | tune s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for op in report["ops"]:
        s = op["summary"]
        decisions = ", ".join(f"{k} {n}" for k, n in sorted(s["decisions"].items()))
        kernels = ", ".join(f"{k} {n}" for k, n in sorted(s["oracle_kernels"].items()))
        lines.append(f"| {op['op']} | {s['shapes_measured']} | {decisions} | {_pct(s['regret_geomean'])} | "
                     f"{_pct(s['regret_p90'])} | {_pct(s['regret_max'])} | {_pct(s['gain_over_static'])} | "
                     f"{_pct(s['gain_over_default'])} | {kernels} | {s['tune_wall_s']:.0f} |")
    for op in report["ops"]:
        s = op["summary"]
        lines += ["", f"## {op['op']}", "",
                  f"Training sweep: {len(op['train'])} shapes, {op['trials_per_shape']} trials each, kernels "
                  f"{', '.join(op['kernels'])}; {len(op['candidates'])} candidates; static choice: {s['static'] or 'none ran on every shape'}.",
                  "Goals: " + "; ".join(f"{k} {v}" for k, v in s["goals"].items()) + "."]
        lines += [f"Note: {n}" for n in op.get("notes", [])]
        varying = _varying_keys([r["features"] for r in s["per_shape"]])
        lines += ["", "| " + " | ".join(varying) + " | decision | pick | pick us | oracle | oracle us | regret | default us | static us |",
                  "|" + "---:|" * len(varying) + "---|---|---:|---|---:|---:|---:|---:|"]
        for r in s["per_shape"]:
            decision = r["decision"] + (f" (d={r['distance']:.2f})" if r["distance"] is not None else "")
            lines.append("| " + " | ".join(str(r["features"][k]) for k in varying) +
                         f" | {decision} | {r['pick']} | {_us(r['pick_us'])} | {r['oracle'] or '-'} | {_us(r['oracle_us'])} | "
                         f"{_pct(r['regret'])} | {_us(r['default_us'])} | {_us(r['static_us'])} |")
    lines += ["", "Held-out shapes (drawn from the seed; JSON has every timing):", ""]
    for op in report["ops"]:
        lines.append(f"- {op['op']}: " + json.dumps([{k: v for k, v in f.items() if k != 'device'} for f in op["held_out"]]))
    return "\n".join(lines) + "\n"


def _varying_keys(features: list[dict[str, Any]]) -> list[str]:
    if not features:
        return []
    keys = [k for k in features[0] if k != "device"]
    varying = [k for k in keys if len({json.dumps(f.get(k)) for f in features}) > 1]
    return varying or keys[:1]
