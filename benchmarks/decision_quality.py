"""Decision quality: how good are kernmux's choices on shapes it was never tuned on?

Per op (training sweeps and held-out ranges: ``decision_quality_shapes.py``):

1. tune the training sweep with the project's tuner (``kernmux.tuning_db.tuning.tuner.tune``,
   TPE, a budget per shape, trials in worker subprocesses) into a fresh database; the wall
   time is reported;
2. draw held-out shapes from ``--seed`` (never a training shape);
3. the candidates: every available kernel without a config; for each configurable kernel
   its default config (what runs untuned), every config that won a training bucket, and a
   seeded sample of ``--sample`` valid configs from its space. The spaces hold thousands
   of points, so "every candidate" is this set, the same for every held-out shape;
4. on each held-out shape, every candidate valid there is checked against the reference
   (a wrong answer is never the oracle) and timed with the project's one timing routine
   (CUDA-graph replay where the op is launch-bound, as the tuner does), all on one input
   set. The pick, the oracle's three best, the static and the default choice are then
   timed ``--confirm`` more times and their median kept;
5. kernmux's pick is the decision of a dispatcher over that database (a tuned bucket, the
   nearest tuned bucket, or priority when none is within reach), timed as the cached
   callable ``kernmux.ops`` would call; "default" is the decision without a database
   (priority); "static" is the one candidate with the best geomean over all held-out
   shapes (chosen after the fact: the strongest fixed choice).

Reported per op: regret = pick / oracle - 1 (geomean, p90, max), gain over static and over
default (geomean of their time / pick time - 1), tuning wall time, every shape's decision
(tuned bucket or borrowed, with distance). Goals (H200, reported, not asserted): geomean
regret <= 3% and max <= 15%; >= 10% gain over static where kernels cross over; tuning the
full training sweep of an op <= 10 minutes.

Modes: ``--smoke`` (CPU, Triton interpreter, tiny shapes, < 2 minutes; exercised by the
test suite), ``--quick`` (GPU, three ops, about four minutes), default: the full sweeps.

Usage: python benchmarks/decision_quality.py [--smoke | --quick] [--seed N] [--ops A,B]
       [--held-out N] [--trials N] [--sample N] [--out DIR]
"""

from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from decision_quality_report import markdown, summarize  # noqa: E402
from decision_quality_shapes import MODES, default_ops, draw_held_out, plan_for  # noqa: E402

MODE_TIMING = {"smoke": (1.0, 3.0), "quick": (5.0, 20.0), "full": (10.0, 50.0)}  # warmup, rep ms
MODE_SAMPLE = {"smoke": 2, "quick": 4, "full": 12}


def _key(kernel: str, config: dict[str, Any]) -> str:
    return json.dumps([kernel, config], sort_keys=True, default=str)


# --------------------------------------------------------------------------- candidates


def sample_configs(kernel: Any, shapes: list[dict[str, Any]], count: int, rng: random.Random) -> list[dict[str, Any]]:
    """``count`` distinct configs of ``kernel``'s space, each valid for at least one shape."""
    from kernmux.dispatch.tuning import config_problem

    names = sorted(kernel.config_space)
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _ in range(200 * max(count, 1)):
        if len(out) >= count:
            break
        config = {n: rng.choice(kernel.config_space[n]) for n in names}
        key = json.dumps(config, sort_keys=True, default=str)
        if key in seen:
            continue
        seen.add(key)
        if any(not config_problem(kernel, config, f) for f in shapes):
            out.append(config)
    return out


def candidates(op: Any, kernels: dict[str, Any], winners: list[tuple[str, dict]], shapes: list[dict[str, Any]],
               sample: int, rng: random.Random) -> list[dict[str, Any]]:
    """The candidate points: {kernel, config, origin} (origin: default, winner, sample)."""
    points: dict[str, dict[str, Any]] = {}

    def add(kernel: str, config: dict[str, Any], origin: str) -> None:
        key = _key(kernel, config)
        if key not in points:
            points[key] = {"kernel": kernel, "config": dict(config), "origin": origin}

    for name, kernel in sorted(kernels.items()):
        add(name, kernel.full_config(None), "default")
    for name, config in winners:
        add(name, dict(config), "winner")
    for name, kernel in sorted(kernels.items()):
        if kernel.config_space:
            for config in sample_configs(kernel, shapes, sample, rng):
                add(name, config, "sample")
    return list(points.values())


def usable(kernel: Any, point: dict[str, Any], features: dict[str, Any], platform: Any) -> str:
    """Why ``point`` cannot run on ``features`` ("" when it can)."""
    from kernmux.dispatch.tuning import config_problem

    support = kernel.check(features, platform)
    if not support.ok:
        return f"unsupported: {support.reason}"
    if point["origin"] != "default" and kernel.config_space:
        return config_problem(kernel, point["config"], features)
    return ""


# --------------------------------------------------------------------------- timing


class ShapeTimer:
    """One held-out shape: one input set, the reference once, each point checked then timed."""

    def __init__(self, op: Any, features: dict[str, Any], platform: Any, seed: int, warmup_ms: float, rep_ms: float):
        from kernmux.dispatch.numerics import cloned
        from kernmux.tuning_db.measurement.timing import prefers_cuda_graph

        self.op, self.features, self.platform = op, features, platform
        self.device = features["device"]
        self.inputs = op.positional(*op.make_inputs(features, self.device, seed))
        self._expected: dict[Any, Any] = {}
        self._cloned = cloned
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms
        self.cuda_graph = prefers_cuda_graph(op, features, platform)

    def expected(self, precision: Any) -> Any:
        if precision not in self._expected:
            self._expected[precision] = self.op.reference_for(precision)(*self._cloned(self.inputs))
        return self._expected[precision]

    def time(self, kernel: Any, config: dict[str, Any], transform: Any = None) -> dict[str, Any]:
        """{status, p50_us, p20_us, p80_us, error}: the numerics gate, then the timing."""
        from kernmux.dispatch.numerics import check_call
        from kernmux.dispatch.transforms import apply_transform
        from kernmux.tuning_db.measurement.timing import measure

        try:
            fn = kernel.bind(config)
            if transform:
                fn = apply_transform(fn, self.op, transform)
            check = check_call(self.op, fn, self.inputs, self.features, device=self.device,
                               expected=self.expected(kernel.precision), precision=kernel.precision)
            if check.status == "error":
                return {"status": "error", "error": check.detail[:300]}
            if not check.passed:
                return {"status": "numerics_failed", "error": check.detail[:300]}
            t = measure(check.call, device=self.device, warmup_ms=self.warmup_ms, rep_ms=self.rep_ms,
                        cuda_graph=self.cuda_graph)
        except Exception as e:  # a failure is a result, never the end of the benchmark
            return {"status": "error", "error": f"{type(e).__name__}: {e}"[:300]}
        return {"status": "ok", "p50_us": t.p50_us, "p20_us": t.p20_us, "p80_us": t.p80_us, "method": t.method}


# --------------------------------------------------------------------------- one op


def decision_row(decision: Any) -> dict[str, Any]:
    return {
        "kernel": decision.kernel, "config": dict(decision.config), "source": decision.source,
        "transform": decision.transform.text() if decision.transform else "",
        "borrowed_from": dict(decision.borrowed_from) if decision.borrowed_from is not None else None,
        "distance": decision.distance, "tuning_row": decision.row_id,
    }


def run_op(name: str, mode: str, args: argparse.Namespace, device: str, db_url: str, deadline: float) -> dict[str, Any]:
    from kernmux.dispatch.platform import current_platform
    from kernmux.dispatch.registry import REGISTRY
    from kernmux.runtime import make_dispatcher
    from kernmux.tuning_db.tuning.tuner import TuneSettings, tune

    platform = current_platform()
    op = REGISTRY.op(name)
    plan = plan_for(name, mode)
    warmup_ms, rep_ms = MODE_TIMING[mode]
    train = [{**f, "device": device} for f in plan.train]
    held = [{**f, "device": device} for f in draw_held_out(plan, args.seed, args.held_out or plan.held_out)]
    kernels = {
        k: kernel for k, kernel in REGISTRY.kernels_of(name).items()
        if not kernel.test_only and (plan.kernels is None or k in plan.kernels) and kernel.availability(platform).ok
    }
    print(f"== {name}: {len(train)} training shapes, {len(held)} held-out, kernels {', '.join(sorted(kernels))}", flush=True)

    settings = TuneSettings(op=name, kernels=tuple(sorted(kernels)), trials=args.trials or plan.trials, seed=0,
                            url=db_url, timeout_s=300.0, warmup_ms=warmup_ms, rep_ms=rep_ms, isolate=mode != "smoke",
                            baseline="torch" if "torch" in kernels else None)
    started = time.perf_counter()
    results = tune(settings, train)
    tune_s = time.perf_counter() - started
    winners = [(r.best_kernel, dict(r.best_config or {})) for r in results if r.best_kernel]
    print(f"   tuned in {tune_s:.1f} s: winners {sorted({_key(k, c) for k, c in winners})}", flush=True)

    tuned = make_dispatcher(db_url=db_url, run_self_checks=False)
    untuned = make_dispatcher(use_tuning_db=False, run_self_checks=False)
    points = candidates(op, kernels, winners, held, args.sample if args.sample is not None else MODE_SAMPLE[mode],
                        random.Random(f"{args.seed}:{name}:configs"))
    shapes = []
    for index, feats in enumerate(held):
        if time.perf_counter() > deadline:
            print(f"   time budget reached: {len(held) - index} held-out shapes not measured", flush=True)
            break
        shapes.append(measure_shape(op, kernels, points, feats, platform, tuned, untuned, args, warmup_ms, rep_ms, index))
    return {
        "op": name, "mode": mode, "train": train, "held_out": held, "kernels": sorted(kernels),
        "trials_per_shape": settings.trials, "tune_wall_s": round(tune_s, 2),
        "tuned": [{"features": r.features, "kernel": r.best_kernel, "config": r.best_config, "p50_us": r.best_p50_us,
                   "rows": r.rows, "statuses": r.statuses} for r in results],
        "candidates": points, "shapes": shapes, "notes": list(plan.notes),
    }


def measure_shape(op, kernels, points, feats, platform, tuned, untuned, args, warmup_ms, rep_ms, index) -> dict[str, Any]:
    pick, default = tuned.decide(op.name, feats), untuned.decide(op.name, feats)
    timer = ShapeTimer(op, feats, platform, args.seed * 7919 + index, warmup_ms, rep_ms)
    timings: dict[str, dict[str, Any]] = {}
    transforms: dict[str, Any] = {}  # key -> the transform a decision wraps its kernel in
    for point in points:
        why = usable(kernels[point["kernel"]], point, feats, platform) if point["kernel"] in kernels else "not available"
        key = _key(point["kernel"], point["config"])
        timings[key] = {**point, **({"status": "skipped", "error": why} if why else timer.time(kernels[point["kernel"]], point["config"]))}
    keys = {}
    for label, decision in (("pick", pick), ("default", default)):
        key = keys[label] = decision_key(decision)
        if key not in timings:  # e.g. a rule's transform or adapted config: time exactly what runs
            transforms[key] = decision.transform
            timings[key] = {"kernel": decision.kernel, "config": dict(decision.config), "origin": label,
                            "transform": decision.transform.text(),
                            **timer.time(op_kernel(op.name, decision.kernel), dict(decision.config), decision.transform)}
    pick_key, default_key = keys["pick"], keys["default"]
    # Confirm: the oracle's best three, the pick and the default, timed again.
    ok = sorted((k for k, t in timings.items() if t["status"] == "ok"), key=lambda k: timings[k]["p50_us"])
    for key in dict.fromkeys(ok[:3] + [pick_key, default_key]):
        row = timings[key]
        if row["status"] != "ok":
            continue
        samples = [row["p50_us"]]
        for _ in range(args.confirm):
            again = timer.time(op_kernel(op.name, row["kernel"]), row["config"], transforms.get(key))
            if again["status"] == "ok":
                samples.append(again["p50_us"])
        row["p50_first_us"], row["p50_us"], row["confirmations"] = samples[0], statistics.median(samples), len(samples) - 1
    best = min((timings[k] for k in ok), key=lambda t: t["p50_us"], default=None)
    print(f"   {index}: {_varying(feats)} pick {pick.kernel} ({pick.source}"
          f"{', borrowed d=%.2f' % pick.distance if pick.distance is not None else ''}) "
          f"{_us(timings[pick_key])} | oracle {best['kernel'] if best else '-'} {_us(best)}", flush=True)
    return {
        "features": feats, "pick": {**decision_row(pick), "key": pick_key}, "default": {**decision_row(default), "key": default_key},
        "timings": [{"key": k, **v} for k, v in timings.items()],
    }


def decision_key(decision: Any) -> str:
    """The candidate key of what a decision runs (kernel, full config, transform if any)."""
    key = _key(decision.kernel, dict(decision.config))
    return key + f"+{decision.transform.text()}" if decision.transform else key


def op_kernel(op: str, name: str) -> Any:
    from kernmux.dispatch.registry import REGISTRY

    return REGISTRY.kernels_of(op)[name]


def _us(row: dict[str, Any] | None) -> str:
    return f"{row['p50_us']:.2f} us" if row and row.get("status") == "ok" else (row or {}).get("status", "-")


def _varying(feats: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in feats.items() if k != "device")


# --------------------------------------------------------------------------- main


def _command_line() -> str:
    """argv with the output and database locations replaced by placeholders."""
    out, skip = ["python", "benchmarks/decision_quality.py"], None
    for arg in sys.argv[1:]:
        if skip:
            out.append(skip)
            skip = None
        elif arg in ("--out", "--db"):
            out.append(arg)
            skip = arg[2:].upper()
        elif arg.startswith(("--out=", "--db=")):
            out.append(arg.split("=")[0] + "=" + arg[2:].split("=")[0].upper())
        else:
            out.append(arg)
    return " ".join(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="CPU, Triton interpreter, tiny shapes (< 2 minutes)")
    mode.add_argument("--quick", action="store_true", help="GPU, three ops, about four minutes")
    parser.add_argument("--seed", type=int, default=0, help="draws the held-out shapes and the sampled configs")
    parser.add_argument("--ops", default=None, help="comma-separated ops (default: the mode's)")
    parser.add_argument("--held-out", type=int, default=None, help="held-out shapes per op (default: the plan's)")
    parser.add_argument("--trials", type=int, default=None, help="tuning budget per training shape (default: the plan's)")
    parser.add_argument("--sample", type=int, default=None, help="sampled configs per configurable kernel")
    parser.add_argument("--confirm", type=int, default=2, help="extra timings of the decisive points (default 2)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help="stop starting held-out shapes after this many seconds (default: smoke 100, quick 230)")
    parser.add_argument("--db", default=None, help="tuning database URL (default: a fresh temporary SQLite file)")
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results/decision_quality"))
    args = parser.parse_args()
    run_mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    assert run_mode in MODES
    if os.environ.get("KERNMUX_FORCE"):
        raise SystemExit("KERNMUX_FORCE is set: it would override every decision this benchmark measures")

    import torch

    from kernmux.tuning_db.measurement.timing import environment_row

    device = "cpu" if run_mode == "smoke" else "cuda"
    if run_mode == "smoke":
        torch.set_num_threads(1)  # CPU timings on a shared small machine: one thread is steadier
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--quick and the full run need a CUDA GPU; --smoke runs on CPU")
    budget = args.budget_s if args.budget_s is not None else {"smoke": 100.0, "quick": 230.0, "full": float("inf")}[run_mode]
    deadline = time.perf_counter() + budget
    ops = [o for o in (args.ops.split(",") if args.ops else default_ops(run_mode)) if o]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = None if args.db else tempfile.TemporaryDirectory(prefix="kernmux-dq-")
    db_url = args.db or f"sqlite:///{tmp.name}/decision_quality.sqlite"
    env = environment_row()
    meta = {"command": _command_line(), "mode": run_mode, "seed": args.seed, "device": device, "environment": env,
            "kernmux": _version(), "budget_s": budget if math.isfinite(budget) else None,
            "db": "given with --db" if args.db else "fresh temporary SQLite"}
    report: dict[str, Any] = {**meta, "ops": []}
    try:
        for name in ops:
            result = run_op(name, run_mode, args, device, db_url, deadline)
            result["summary"] = summarize(result)
            report["ops"].append(result)
            _write(out, report)  # a cut-off run keeps the ops already done
    finally:
        if tmp is not None:
            tmp.cleanup()
    _write(out, report)
    print((out / "decision_quality.md").read_text())
    return 0


def _version() -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version("kernmux")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _write(out: Path, report: dict[str, Any]) -> None:
    (out / "decision_quality.json").write_text(json.dumps(report, indent=1, default=str))
    (out / "decision_quality.md").write_text(markdown(report))


if __name__ == "__main__":
    sys.exit(main())
