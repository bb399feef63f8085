"""``kernmux tune --from-stats FILE``: tune exactly the problems an engine ran.

Argument parsing lives in :mod:`kernmux.cli.tune`; the reading and merging of dumps in
:mod:`kernmux.tuning_db.tuning.from_stats`. Problems are tuned most-called first, each with
the features the engine recorded (``--device`` replaces the recorded device).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from kernmux.cli.common import UsageError, fail, format_features, get_op, print_json, table


def _plan(args) -> tuple[list[Any], list[dict[str, Any]]]:
    """(problems to tune, problems skipped with why) from the command line."""
    import torch

    from kernmux.tuning_db.tuning.from_stats import check_features, read_problems, select

    if args.features:
        raise UsageError("--from-stats tunes the recorded problems: give no FEATURE=... sweeps with it")
    if args.top is not None and args.top < 1:
        raise UsageError("--top must be >= 1")
    if args.op is not None:
        get_op(args.op)  # an unknown op is a usage error, not an empty plan
    problems = select(read_problems(args.from_stats), op=args.op, top=args.top)
    chosen, skipped = [], []
    for problem in problems:
        try:
            op = get_op(problem.op)
        except UsageError as e:
            skipped.append({**problem.as_dict(), "why": str(e)})
            continue
        why = check_features(problem, op)
        if why:
            skipped.append({**problem.as_dict(), "why": why})
            continue
        if args.device:
            problem.features["device"] = args.device
        if problem.features.get("device") == "cuda" and not torch.cuda.is_available():
            raise UsageError(f"{problem.op} {format_features(problem.features)} ran on cuda and this machine has no "
                             "CUDA device (tune on the engine's machine, or pass --device)")
        chosen.append(problem)
    return chosen, skipped


def run_from_stats(args, progress: Any, settings_from_args: Callable[..., Any], shown_url: Callable[[str | None], str]) -> int:
    """Tune the recorded problems; exit 0 when every one got a validated winner.

    progress: the tune command's progress printer; settings_from_args(args, op, kernels):
    its tuner settings; shown_url(url): the database as printed (handed in by
    :mod:`kernmux.cli.tune`, so that both paths share them)."""
    import importlib

    from kernmux.tuning_db.storage.errors import TuningDBError
    from kernmux.tuning_db.tuning.from_stats import StatsFileError, runs_in_order
    from kernmux.tuning_db.tuning.tuner import TuneError, tune

    try:
        for module in args.imports:
            importlib.import_module(module)
        if args.trials < 1 or args.workers < 1 or args.timeout <= 0:
            raise UsageError("--trials and --workers must be >= 1 and --timeout > 0")
        problems, skipped = _plan(args)
        kernels = tuple(k.strip() for k in args.kernels.split(",") if k.strip()) if args.kernels else None
    except (UsageError, StatsFileError, ModuleNotFoundError) as e:
        return fail(str(e))
    for item in skipped:
        sys.stderr.write(f"  skipped {item['op']} {format_features(item['features'])}: {item['why']}\n")
    if not problems:
        return fail("no problem to tune in " + ", ".join(args.from_stats) + (f" for op {args.op}" if args.op else ""), 1)

    results: list[tuple[Any, Any]] = []  # (problem, BucketResult)
    try:
        for op_name, group in runs_in_order(problems):
            settings = settings_from_args(args, op_name, kernels)
            for problem, result in zip(group, tune(settings, [p.features for p in group], progress=progress)):
                results.append((problem, result))
    except ValueError as e:  # unknown kernel names and the like
        return fail(str(e))
    except (TuneError, TuningDBError) as e:
        return fail(f"tuning failed: {e}", 1)

    if args.json:
        print_json({
            "from_stats": list(args.from_stats), "db": shown_url(args.db),
            "skipped": skipped,
            "results": [{"op": p.op, "calls": p.calls, **r.as_dict()} for p, r in results],
        })
    else:
        rows = []
        for problem, r in results:
            cfg = json.dumps(r.best_config, sort_keys=True) if r.best_config else "-"
            failed = sum(n for s, n in r.statuses.items() if s != "ok")
            rows.append([
                problem.op, format_features({k: v for k, v in r.features.items() if k != "device"}),
                "?" if problem.calls is None else problem.calls, r.best_kernel or "(none)", cfg,
                "-" if r.best_p50_us is None else f"{r.best_p50_us:.2f}", "-" if r.speedup is None else f"{r.speedup:.2f}x", f"{r.rows - failed}/{failed}",
            ])
        print(table(rows, ["op", "features", "calls", "best", "config", "p50 us", "speed-up", "ok/failed"]))
        print(f"database: {shown_url(args.db)}")
    return 0 if all(r.best_kernel for _, r in results) else 1
