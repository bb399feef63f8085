"""Search efficiency: does optuna find the grid's best config with a fraction of the evaluations?

Goal (issue 6): on a Triton config space of at least 48 points, optuna's best is within
5% of the exhaustive-grid best after at most 30% of the grid's evaluations (median over
seeds), with the curve.

Steps (each a subcommand; ``device`` runs the two that need the GPU in one call):

1. ``grid``   measure every valid point of the kernel's space once: numerics gate (poisoned
              outputs, ``op.compare``) and compilation in several processes in parallel (one
              Triton disk cache), then one timing per point with ``timing.measure`` on one
              input set. Results are written as they come (a cut-off run keeps its rows).
2. ``live``   one real ``tune`` run on the GPU (TPE, the 30% budget, trial workers, a SQLite
              database holding the store and the optuna study), to confirm the replay.
3. ``replay`` optuna TPE driven by the tuner's own search loop over the *measured* grid table,
              for many seeds (the objective of a point is its measured time): cheap and honest.
              Random search in the same loop is replayed too, as the baseline to beat.
4. ``report`` markdown summary + an HTML plot (inline SVG, no dependencies) of best-so-far
              vs evaluations.

Usage (device):  PYTHONPATH=. python3 benchmarks/search_efficiency.py device --out $OUT
Usage (here):    python benchmarks/search_efficiency.py replay --grid G.json --out DIR
                 python benchmarks/search_efficiency.py report --dir DIR
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import pathlib
import statistics
import sys
import time
from typing import Any

DEFAULT_OP = "indexer_logits"
# DSA indexer at the size of notes/performance.md's anchor (B=64, L=4096, H=64, D=128).
DEFAULT_FEATURES = {"batch": 64, "next_n": 1, "heads": 64, "head_dim": 128, "context": 4096, "block_size": 64}
BUDGET_FRACTION = 0.30
TOLERANCE = 0.05
MIN_POINTS = 48


# --------------------------------------------------------------------------- helpers


def _features(op_name: str, items: list[str], device: str) -> dict[str, Any]:
    from kernmux.dispatch.registry import REGISTRY

    op = REGISTRY.op(op_name)
    feats = op.default_features(device)
    if op_name == DEFAULT_OP:
        feats.update(DEFAULT_FEATURES)
    for item in items:
        key, _, value = item.partition("=")
        feats[key] = op.spec(key).parse(value)
    return feats


def _fixed(op: str, kernel: str, items: list[str]) -> dict[str, Any]:
    """``["dot=bf16"]`` -> {"dot": "bf16"}, values typed like the kernel's config space."""
    from kernmux.dispatch.registry import REGISTRY

    space = REGISTRY.kernels_of(op)[kernel].config_space
    fixed = {}
    for item in items:
        key, _, text = item.partition("=")
        if key not in space:
            raise SystemExit(f"--fix {item}: {key!r} is not a parameter of {kernel} ({sorted(space)})")
        matches = [v for v in space[key] if str(v) == text]
        if not matches:
            raise SystemExit(f"--fix {item}: {text!r} is not among {list(space[key])}")
        fixed[key] = matches[0]
    return fixed


def _gate_shard(args: tuple) -> list[dict[str, Any]]:
    """Child of the compile pool: one input set, then each point once (compiles it) and
    through the numerics gate (poisoned outputs, ``op.compare`` against the reference)."""
    op_name, points, features, device, seed = args
    from kernmux.dispatch.numerics import check_call, cloned
    from kernmux.dispatch.registry import REGISTRY

    op = REGISTRY.op(op_name)
    kernels = REGISTRY.kernels_of(op_name)
    inputs = op.positional(*op.make_inputs(features, device, seed))
    reference = op.reference(*cloned(inputs))
    out = []
    for point in points:
        t0 = time.perf_counter()
        try:
            fn = kernels[point.kernel].bind(point.config_dict)
            check = check_call(op, fn, inputs, features, device=device, expected=reference)
            status = {"pass": "ok", "fail": "numerics_failed"}.get(check.status, "error")
            error = None if check.passed else (check.detail if check.status == "fail" else check.detail[:300])
        except Exception as e:  # a failing config is a result
            status, error = "error", f"{type(e).__name__}: {e}"[:300]
        out.append({"point": point.key, "status": status, "error": error, "seconds": time.perf_counter() - t0})
    return out


def _us(value: float | None) -> str:
    return "" if value is None else f"{value:.2f} us"


def _point_from_key(key: str) -> Any:
    from kernmux.tuning_db.tuning.search import Point

    kernel, config = json.loads(key)
    return Point.of(kernel, config)


# --------------------------------------------------------------------------- grid


def run_grid(op: str, kernel: str, features: dict, *, warmup_ms: float, rep_ms: float, procs: int,
             cuda_graph: bool = False,
             limit: int | None, fixed: dict[str, Any], out_path: pathlib.Path, started: float) -> dict[str, Any]:
    """Every valid point: numerics gate + compile in ``procs`` processes, then one timing
    each with ``timing.measure`` on one input set (written to ``out_path`` as it goes)."""
    from concurrent.futures import ProcessPoolExecutor

    from kernmux.dispatch.platform import current_platform
    from kernmux.dispatch.registry import REGISTRY
    from kernmux.tuning_db.measurement.timing import environment_row, measure
    from kernmux.tuning_db.tuning.search import build_space

    platform = current_platform()
    device = "cuda" if features["device"] == "cuda" else "cpu"
    space = build_space(op, features, platform, [kernel])
    points = [p for p in space.points if all(p.config_dict.get(k) == v for k, v in fixed.items())][: limit or None]
    if not points:
        raise SystemExit(f"no valid point: {dict(space.skipped)}")
    grid: dict[str, Any] = {
        "environment": environment_row(), "op": op, "kernel": kernel, "features": features, "fixed": fixed,
        "points": len(points), "space_points": len(space), "warmup_ms": warmup_ms, "rep_ms": rep_ms,
        "cuda_graph": cuda_graph,
        "compile_procs": procs, "compile_seconds": None, "timing_seconds": None, "complete": False, "rows": [],
    }
    t0 = time.perf_counter()
    gate: dict[str, dict] = {}
    shards = [(op, points[i::procs], features, device, 1000 + i) for i in range(procs)]
    with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("spawn")) as pool:
        for part in pool.map(_gate_shard, [s for s in shards if s[1]]):
            for row in part:
                gate[row["point"]] = row
    grid["compile_seconds"] = time.perf_counter() - t0
    print(f"[{time.perf_counter() - started:6.1f}s] gate+compile pass: {len(gate)} points in "
          f"{grid['compile_seconds']:.1f} s, {sum(r['status'] == 'ok' for r in gate.values())} ok", flush=True)
    the_op, impl = REGISTRY.op(op), REGISTRY.kernels_of(op)[kernel]
    inputs, kwargs = the_op.make_inputs(features, device, 0)
    t1 = time.perf_counter()
    for i, point in enumerate(points):
        checked = gate[point.key]
        row = {"point": point.key, "config": point.config_dict, "status": checked["status"], "p50_us": None,
               "p20_us": None, "p80_us": None, "reps": None, "error": checked["error"],
               "gate_seconds": checked["seconds"]}
        if checked["status"] == "ok":
            fn = impl.bind(point.config_dict)
            try:
                timing = measure(lambda: fn(*inputs, **kwargs), device=device, warmup_ms=warmup_ms, rep_ms=rep_ms,
                                 cuda_graph=cuda_graph)
                row.update(p50_us=timing.p50_us, p20_us=timing.p20_us, p80_us=timing.p80_us, reps=timing.reps)
            except Exception as e:
                row.update(status="error", error=f"{type(e).__name__}: {e}"[:300])
        grid["rows"].append(row)
        grid["timing_seconds"] = time.perf_counter() - t1
        if i % 16 == 15 or i == len(points) - 1:
            grid["complete"] = i == len(points) - 1
            out_path.write_text(json.dumps(grid, indent=1))
        print(f"[{time.perf_counter() - started:6.1f}s] grid {i + 1}/{len(points)} {point.label()} {row['status']} "
              f"{_us(row['p50_us'])}",
              flush=True)
    return grid


# --------------------------------------------------------------------------- live


def run_live(grid: dict[str, Any], *, seed: int, url: str, timeout_s: float) -> dict[str, Any]:
    from kernmux.tuning_db.tuning.tuner import TuneSettings, tune

    budget = max(1, int(math.floor(BUDGET_FRACTION * grid["points"])))
    settings = TuneSettings(op=grid["op"], kernels=(grid["kernel"],), trials=budget, sampler="tpe", seed=seed,
                            url=url, timeout_s=timeout_s, warmup_ms=grid["warmup_ms"], rep_ms=grid["rep_ms"],
                            cuda_graph=bool(grid.get("cuda_graph")),
                            baseline=None, fixed={grid["kernel"]: grid.get("fixed") or {}})
    trials: list[dict[str, Any]] = []

    def progress(event: dict[str, Any]) -> None:
        if event["event"] == "trial":
            trials.append({k: event[k] for k in ("trial", "config", "status", "p50_us")})
            print(f"live {len(trials)}/{budget} #{event['trial']} {event['config']} {event['status']} "
                  f"{event['p50_us']}", flush=True)

    t0 = time.perf_counter()
    (result,) = tune(settings, [grid["features"]], progress=progress)
    return {"seed": seed, "budget": budget, "seconds": time.perf_counter() - t0, "trials": trials,
            "best_config": result.best_config, "best_p50_us": result.best_p50_us, "study": result.study}


# --------------------------------------------------------------------------- replay


def _table(grid: dict[str, Any]) -> dict[str, tuple[str, float | None]]:
    return {r["point"]: (r["status"], r["p50_us"]) for r in grid["rows"]}


def replay(grid: dict[str, Any], seeds: list[int], sampler: str) -> dict[str, Any]:
    """Drive the tuner's search loop over the measured table; curves of best-so-far."""
    import optuna

    from kernmux.tuning_db.tuning.search import Evaluation, SearchSpace, make_sampler, run_search

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    table = _table(grid)
    space = SearchSpace.from_points([_point_from_key(r["point"]) for r in grid["rows"]])
    n = len(space)
    budget = max(1, int(math.floor(BUDGET_FRACTION * n)))
    best = min(v for s, v in table.values() if s == "ok")
    runs = []
    for seed in seeds:
        values: list[float | None] = []

        def evaluate(point: Any, number: int) -> Evaluation:
            status, value = table[point.key]
            values.append(value if status == "ok" else None)
            return Evaluation(status, value)

        study = optuna.create_study(sampler=make_sampler("grid" if sampler == "random" else "tpe", seed, n))
        # Twice the budget: the curve shows what more evaluations would have bought.
        stats = run_search(study, space, evaluate, budget=min(n, 2 * budget), grid=sampler == "random", seed=seed)
        curve, running = [], math.inf
        for v in values:
            running = min(running, v if v is not None else math.inf)
            curve.append(running / best if math.isfinite(running) else None)
        within = next((i + 1 for i, r in enumerate(curve) if r is not None and r <= 1 + TOLERANCE), None)
        runs.append({"seed": seed, "curve": curve, "evals_to_5pct": within,
                     "ratio_at_budget": curve[budget - 1], "asked": stats.asked,
                     "duplicates": stats.duplicates})
    return {"sampler": sampler, "points": n, "budget": budget, "grid_best_us": best, "runs": runs}


def summarize(rep: dict[str, Any]) -> dict[str, Any]:
    ratios = [r["ratio_at_budget"] for r in rep["runs"] if r["ratio_at_budget"] is not None]
    # A seed that never came within 5% in the replayed evaluations counts as infinitely many.
    evals = [r["evals_to_5pct"] if r["evals_to_5pct"] is not None else math.inf for r in rep["runs"]]
    hits = sum(1 for r in rep["runs"] if r["ratio_at_budget"] is not None and r["ratio_at_budget"] <= 1 + TOLERANCE)
    return {"sampler": rep["sampler"], "seeds": len(rep["runs"]), "budget": rep["budget"], "points": rep["points"],
            "median_ratio_at_budget": statistics.median(ratios) if ratios else None,
            "worst_ratio_at_budget": max(ratios) if ratios else None,
            "median_evals_to_5pct": statistics.median(evals),
            "replayed_evals": max(len(r["curve"]) for r in rep["runs"]),
            "seeds_within_5pct_at_budget": hits}


# --------------------------------------------------------------------------- report


def _svg(curves: dict[str, list[list[float | None]]], live: list[float | None] | None, n: int, budget: int) -> str:
    width, height, pad = 760, 420, 55
    ymax = 2.0

    def x(i: float) -> float:
        return pad + (width - 2 * pad) * (i / max(n, 1))

    def y(r: float) -> float:
        return height - pad - (height - 2 * pad) * ((min(r, ymax) - 1.0) / (ymax - 1.0))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12">',
             f'<rect width="{width}" height="{height}" fill="white"/>']
    for r in (1.0, 1.05, 1.25, 1.5, 2.0):
        parts.append(f'<line x1="{pad}" x2="{width - pad}" y1="{y(r):.1f}" y2="{y(r):.1f}" stroke="#ddd"/>')
        parts.append(f'<text x="{pad - 8}" y="{y(r) + 4:.1f}" text-anchor="end">{r:.2f}</text>')
    parts.append(f'<line x1="{pad}" x2="{width - pad}" y1="{y(1.05):.1f}" y2="{y(1.05):.1f}" stroke="#c33" stroke-dasharray="4 3"/>')
    parts.append(f'<line x1="{x(budget):.1f}" x2="{x(budget):.1f}" y1="{pad}" y2="{height - pad}" stroke="#c33" stroke-dasharray="4 3"/>')
    parts.append(f'<text x="{x(budget) + 4:.1f}" y="{pad + 12}" fill="#c33">30% of grid ({budget})</text>')
    for i in range(0, n + 1, max(1, n // 8)):
        parts.append(f'<text x="{x(i):.1f}" y="{height - pad + 16}" text-anchor="middle">{i}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">evaluations (measured configs)</text>')
    parts.append(f'<text x="14" y="{height / 2}" transform="rotate(-90 14 {height / 2})" text-anchor="middle">'
                 'best so far / grid best (median, band = p25..p75 over seeds)</text>')
    colors = {"tpe": "#1f5fbf", "random": "#888"}
    for name, runs in curves.items():
        length = max(len(c) for c in runs)
        med, lo, hi = [], [], []
        for i in range(length):
            vals = sorted(c[i] if i < len(c) and c[i] is not None else ymax for c in runs)
            q = statistics.quantiles(vals, n=4, method="inclusive") if len(vals) > 1 else [vals[0]] * 3
            lo.append(q[0]); med.append(statistics.median(vals)); hi.append(q[2])
        band = " ".join(f"{x(i + 1):.1f},{y(v):.1f}" for i, v in enumerate(hi))
        band += " " + " ".join(f"{x(i + 1):.1f},{y(v):.1f}" for i, v in reversed(list(enumerate(lo))))
        parts.append(f'<polygon points="{band}" fill="{colors[name]}" opacity="0.15"/>')
        line = " ".join(f"{x(i + 1):.1f},{y(v):.1f}" for i, v in enumerate(med))
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colors[name]}" stroke-width="2"/>')
    if live:
        line = " ".join(f"{x(i + 1):.1f},{y(v if v is not None else ymax):.1f}" for i, v in enumerate(live))
        parts.append(f'<polyline points="{line}" fill="none" stroke="#d98b00" stroke-width="2" stroke-dasharray="6 2"/>')
    legend = [("tpe", "optuna TPE (replay, median)"), ("random", "random order (replay, median)")]
    for k, (name, text) in enumerate(legend):
        parts.append(f'<line x1="{width - 260}" x2="{width - 235}" y1="{pad + 30 + 16 * k}" y2="{pad + 30 + 16 * k}" '
                     f'stroke="{colors[name]}" stroke-width="2"/><text x="{width - 230}" y="{pad + 34 + 16 * k}">{text}</text>')
    if live:
        parts.append(f'<line x1="{width - 260}" x2="{width - 235}" y1="{pad + 62}" y2="{pad + 62}" stroke="#d98b00" '
                     f'stroke-width="2" stroke-dasharray="6 2"/><text x="{width - 230}" y="{pad + 66}">live tune on the GPU</text>')
    parts.append("</svg>")
    return "\n".join(parts)


def _evals(summary: dict[str, Any]) -> str:
    value = summary["median_evals_to_5pct"]
    return f"not within {summary['replayed_evals']}" if math.isinf(value) else f"{value:g}"


def report(directory: pathlib.Path, prefix: str) -> None:
    grid = json.loads((directory / f"{prefix}_grid.json").read_text())
    replays = json.loads((directory / f"{prefix}_replay.json").read_text())
    live_path = directory / f"{prefix}_live.json"
    live = json.loads(live_path.read_text()) if live_path.exists() else None
    table = _table(grid)
    ok = sorted(v for s, v in table.values() if s == "ok")
    best = ok[0]
    live_curve = None
    if live:
        running, live_curve = math.inf, []
        for t in live["trials"]:
            if t["status"] == "ok" and t["p50_us"] is not None:
                running = min(running, t["p50_us"])
            live_curve.append(running / best if math.isfinite(running) else None)
    curves = {r["sampler"]: [run["curve"] for run in r["runs"]] for r in replays["replays"]}
    svg = _svg(curves, live_curve, grid["points"], replays["replays"][0]["budget"])
    env = grid["environment"]
    title = f"Search efficiency: {grid['op']} / {grid['kernel']} on {env['gpu']}"
    (directory / f"{prefix}_curve.html").write_text(
        f"<!doctype html><meta charset='utf-8'><title>{title}</title><h3>{title}</h3>\n{svg}\n")
    summaries = [summarize(r) for r in replays["replays"]]
    statuses: dict[str, int] = {}
    for s, _ in table.values():
        statuses[s] = statuses.get(s, 0) + 1
    tpe = next(s for s in summaries if s["sampler"] == "tpe")
    met = (tpe["median_ratio_at_budget"] is not None and tpe["median_ratio_at_budget"] <= 1 + TOLERANCE
           and grid["points"] >= MIN_POINTS and grid.get("complete", True))
    lines = [
        f"# {title}", "",
        f"Environment: {env['gpu']}, torch {env['torch']}, triton {env['triton']}, CUDA {env.get('cuda')}, "
        f"measured {env['date']}.",
        f"Features: `{json.dumps({k: v for k, v in grid['features'].items()})}`.", "",
        "## Goal and result", "",
        f"Goal: optuna's best within {TOLERANCE:.0%} of the exhaustive-grid best after at most "
        f"{BUDGET_FRACTION:.0%} of the grid's evaluations (median over seeds).",
        f"**{'Met' if met else 'Missed'}**: TPE's median best after {tpe['budget']} of {tpe['points']} evaluations is "
        f"{tpe['median_ratio_at_budget']:.3f}x the grid best ({tpe['seeds_within_5pct_at_budget']}/{tpe['seeds']} seeds "
        f"within 5%; worst seed {tpe['worst_ratio_at_budget']:.3f}x); median evaluations to reach 5%: "
        f"{_evals(tpe)}."
        + (f" The grid has {grid['points']} points, fewer than the {MIN_POINTS} the goal asks for."
           if grid["points"] < MIN_POINTS else "")
        + ("" if grid.get("complete", True) else " The grid run was cut off before its last point."), "",
        "## The grid (every valid point measured once)", "",
        f"{grid['points']} points ({grid['space_points']} valid for these features"
        + (f"; sub-space with {grid['fixed']} fixed" if grid.get("fixed") else "") + f"), statuses: {statuses}. "
        f"Each point first went through the numerics gate (poisoned outputs, the op's tolerance against the "
        f"reference; compiled in {grid['compile_procs']} processes), then was timed with `timing.measure`: warm-up "
        f"{grid['warmup_ms']} ms, {grid['rep_ms']} ms of repetitions, "
        + ("CUDA-graph replays (the op is launch-bound), median." if grid.get("cuda_graph") else "L2 flushed, CUDA events, median."),
        f"Grid best {best:.2f} us, median of ok points {statistics.median(ok):.2f} us, worst {ok[-1]:.2f} us "
        f"(spread {ok[-1] / best:.1f}x). Points within 5% of the best: "
        f"{sum(1 for v in ok if v <= best * (1 + TOLERANCE))}.",
        f"Wall time: compile pass {grid['compile_seconds']:.0f} s ({grid['compile_procs']} processes), "
        f"timing pass {grid['timing_seconds']:.0f} s.", "",
        "## Replay over the measured table (the tuner's own search loop)", "",
        "| sampler | seeds | budget | median best/grid best at budget | worst seed | seeds within 5% | median evals to 5% |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        lines.append(f"| {s['sampler']} | {s['seeds']} | {s['budget']} | {s['median_ratio_at_budget']:.3f} | "
                     f"{s['worst_ratio_at_budget']:.3f} | {s['seeds_within_5pct_at_budget']} | {_evals(s)} |")
    lines += ["", "Replays count measurements: a point TPE proposes again is answered from the study "
              "(no measurement), as the tuner does; `random` is the same loop visiting unmeasured points "
              "in random order.", ""]
    if live:
        trials_ok = [t for t in live["trials"] if t["status"] == "ok" and t["p50_us"] is not None]
        best_trial = min(trials_ok, key=lambda t: t["p50_us"]) if trials_ok else None
        live_best = best_trial["p50_us"] if best_trial else None
        # The trial's point (its searched parameters), as the grid keyed it.
        key = json.dumps([grid["kernel"], best_trial["config"]] if best_trial else None, sort_keys=True,
                         separators=(",", ":"))
        grid_of_live = table.get(key, (None, None))[1]
        lines += [
            "## Live run on the GPU (kernmux tune, same budget)", "",
            f"`tune` with TPE seed {live['seed']}, {live['budget']} measurements in isolated trial workers, "
            f"store and study in one SQLite database: {len(live['trials'])} trials in {live['seconds']:.0f} s.",
            f"Live best {live_best:.2f} us ({live_best / best:.3f}x the grid best measured earlier) with config "
            f"`{json.dumps(best_trial['config'], sort_keys=True) if best_trial else None}`, which the grid had measured at "
            f"{'-' if grid_of_live is None else f'{grid_of_live:.2f} us ({grid_of_live / best:.3f}x)'}." if live_best else
            "Live run found no ok point.", "",
        ]
    lines += ["## Files", "",
              f"- `{prefix}_grid.json`: every point with status, p50/p20/p80, metrics, environment.",
              f"- `{prefix}_replay.json`: per seed, best-so-far / grid best after each evaluation.",
              f"- `{prefix}_live.json`: the live run's trials." if live else "",
              f"- `{prefix}_curve.html`: the plot.", "",
              "Reproduce: `PYTHONPATH=. python3 benchmarks/search_efficiency.py device --out DIR` on the GPU, then "
              f"`python benchmarks/search_efficiency.py replay --grid DIR/{prefix}_grid.json --out DIR` and "
              "`... report --dir DIR`."]
    (directory / f"{prefix}_summary.md").write_text("\n".join(line for line in lines) + "\n")
    print("\n".join(lines))


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    for name in ("grid", "device"):
        p = sub.add_parser(name)
        p.add_argument("--op", default=DEFAULT_OP)
        p.add_argument("--kernel", default="triton")
        p.add_argument("features", nargs="*", help="feat=value overrides")
        p.add_argument("--device", default="cuda")
        p.add_argument("--warmup-ms", type=float, default=5.0)
        p.add_argument("--rep-ms", type=float, default=20.0)
        p.add_argument("--procs", type=int, default=max(1, min(14, (os.cpu_count() or 2) - 2)))
        p.add_argument("--limit", type=int, default=None, help="first N points only (smoke tests)")
        p.add_argument("--fix", action="append", default=[], metavar="PARAM=VALUE",
                       help="search the sub-space with PARAM fixed (repeatable; recorded in the results)")
        p.add_argument("--timeout", type=float, default=120.0)
        p.add_argument("--cuda-graph", action="store_true",
                       help="time CUDA-graph replays (launch-bound kernels: events would time the host launch)")
        p.add_argument("--out", required=True)
        p.add_argument("--prefix", default="search_efficiency")
        p.add_argument("--seed", type=int, default=0, help="live run seed")
        p.add_argument("--live-after-s", type=float, default=math.inf,
                       help="skip the live run if the grid took longer than this (device time limits)")
    p = sub.add_parser("replay")
    p.add_argument("--grid", required=True)
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--out", required=True)
    p.add_argument("--prefix", default="search_efficiency")
    p = sub.add_parser("report")
    p.add_argument("--dir", required=True)
    p.add_argument("--prefix", default="search_efficiency")
    args = parser.parse_args(argv)

    if args.cmd in ("grid", "device"):
        started = time.perf_counter()
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        features = _features(args.op, args.features, args.device)
        fixed = _fixed(args.op, args.kernel, args.fix)
        grid = run_grid(args.op, args.kernel, features, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
                        procs=args.procs, limit=args.limit, fixed=fixed, cuda_graph=args.cuda_graph,
                        out_path=out / f"{args.prefix}_grid.json", started=started)
        if args.cmd == "device":
            db = pathlib.Path("/tmp") / f"kernmux_search_{os.getpid()}.sqlite"
            if time.perf_counter() - started > args.live_after_s:
                print(f"skipping the live run: the grid took {time.perf_counter() - started:.0f} s", flush=True)
                return 0
            live = run_live(grid, seed=args.seed, url=f"sqlite:///{db}", timeout_s=args.timeout)
            (out / f"{args.prefix}_live.json").write_text(json.dumps(live, indent=1))
            ok = sorted(r["p50_us"] for r in grid["rows"] if r["status"] == "ok")
            print(f"grid: {len(grid['rows'])} points, {len(ok)} ok, best {ok[0]:.2f} us, compile "
                  f"{grid['compile_seconds']:.0f} s, timing {grid['timing_seconds']:.0f} s; live: "
                  f"{len(live['trials'])} trials in {live['seconds']:.0f} s, best {live['best_p50_us']} us "
                  f"{live['best_config']}", flush=True)
    elif args.cmd == "replay":
        grid = json.loads(pathlib.Path(args.grid).read_text())
        seeds = list(range(args.seeds))
        data = {"replays": [replay(grid, seeds, "tpe"), replay(grid, seeds, "random")]}
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{args.prefix}_replay.json").write_text(json.dumps(data))
        for r in data["replays"]:
            print(json.dumps(summarize(r), default=str))
    else:
        report(pathlib.Path(args.dir), args.prefix)
    return 0


if __name__ == "__main__":
    sys.exit(main())
