"""``kernmux tune``: search kernels x configs per feature set and record every trial."""

from __future__ import annotations

import json
import sys
from typing import Any

from kernmux.cli.common import (
    UsageError,
    add_json_flag,
    fail,
    format_features,
    get_kernels,
    get_op,
    parse_feature_args,
    print_json,
    resolve_device,
    table,
    tuning_extra_problem,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "tune",
        help="search kernels x configs, record every trial in the tuning database",
        description=(
            "For every combination of the given features (feat=v1,v2 is a sweep), search the "
            "available kernels and their configs with optuna (seeded TPE, or an exhaustive grid). "
            "Each trial runs in a worker subprocess: fresh inputs, the numerics gate against "
            "the reference, then timing. Every trial, failures included, is a row in the "
            "database; the optuna study lives in the same database, so a re-run resumes it and "
            "several processes or hosts (one PostgreSQL URL) tune it together. Features not given "
            "take the op's defaults. CPU trials are timed on one intra-op thread; a dispersed "
            "timing (p80/p20 > 1.5) is taken again and, still dispersed, stored flagged and never "
            "chosen. --remeasure times stored points again."
        ),
    )
    parser.add_argument("op", nargs="?", default=None,
                        help="op name (see `kernmux ops`); with --from-stats: only this op's problems")
    parser.add_argument("features", nargs="*", metavar="FEATURE=V1[,V2...]")
    parser.add_argument("--from-stats", action="append", default=[], metavar="FILE",
                        help="tune exactly the problems an engine ran, most-called first, from statistics dumps "
                             "(KERNMUX_STATS_PATH files or directories of them; repeat to merge several)")
    parser.add_argument("--top", type=int, default=None, metavar="N",
                        help="with --from-stats: only the N most-called problems")
    parser.add_argument("--kernels", default=None, help="comma-separated kernels (default: all available)")
    parser.add_argument("--trials", type=int, default=30,
                        help="measurements per feature set, counted over the whole study (default 30)")
    parser.add_argument("--sampler", choices=("tpe", "grid"), default="tpe",
                        help="tpe (seeded, default) or grid (every valid point)")
    parser.add_argument("--seed", type=int, default=0, help="sampler and input seed (default 0)")
    parser.add_argument("--db", default=None, help="database URL (default: KERNMUX_DB or the user cache file)")
    parser.add_argument("--workers", type=int, default=1,
                        help="tuning processes on this host; with CUDA one GPU each (default 1)")
    parser.add_argument("--gpus", default=None, metavar="all|0,1,...",
                        help="one tuning process per GPU, each pinned to its own (CUDA_VISIBLE_DEVICES), all on "
                             "one study; the GPU index is recorded per row (replaces --workers)")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per trial (default 120)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="timing warm-up per trial (default 25)")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="timing repetitions per trial (default 100)")
    parser.add_argument(
        "--cuda-graph", choices=("auto", "on", "off"), default="auto",
        help="time CUDA-graph replays: auto (default) = when the op's roofline floor is under 10 us, i.e. launch-bound",
    )
    parser.add_argument("--baseline", default="torch", help="kernel measured first for the speed-up (default torch)")
    parser.add_argument("--in-process", action="store_true",
                        help="run trials in the tuning process (no crash isolation; debugging)")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first in every process (registers extra ops/kernels)")
    parser.add_argument("--remeasure", action="store_true",
                        help="time the stored ok points again instead of searching (each a new row; nothing is "
                             "overwritten): those of the given features, or every one of the op on this platform "
                             "when no feature is given")
    add_json_flag(parser)
    parser.set_defaults(handler=run)


class _ProgressPrinter:
    """One line per trial on stderr; a redrawn status line when stderr is a terminal."""

    def __init__(self, stream: Any = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.budget: dict[str, int] = {}
        self.done: dict[str, int] = {}
        self.best: dict[str, float] = {}
        self.labels: dict[str, str] = {}

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        study = event.get("study", "")
        if kind == "plan":
            self.budget[study] = event["budget"]
            self.labels[study] = format_features({k: v for k, v in event["features"].items() if k != "device"})
            skipped = event.get("skipped") or {}
            for kernel, reason in skipped.items():
                self._line(f"  {self.labels[study]}: {kernel} not searched: {reason}")
            if not event["points"]:
                self._line(f"  {self.labels[study]}: nothing to tune (no kernel supports it)")
        elif kind == "trial":
            self.done[study] = self.done.get(study, 0) + 1
            p50 = event.get("p50_us")
            if event["status"] == "ok" and p50 is not None:
                self.best[study] = min(self.best.get(study, float("inf")), p50)
            cfg = ",".join(f"{k}={v}" for k, v in (event.get("config") or {}).items())
            point = event["kernel"] + (f"{{{cfg}}}" if cfg else "")
            result = f"{p50:.2f} us" if p50 is not None else (event.get("error") or "")[:80]
            best = self.best.get(study)
            n, total = self.done[study], self.budget.get(study, 0)
            text = (f"[{n}/{total}] {self.labels.get(study, '')}  #{event['trial']} {point}  "
                    f"{event['status']} {result}" + (f"  (best {best:.2f} us)" if best is not None else ""))
            if self.tty:
                width = 24
                filled = int(width * min(n, total) / max(total, 1))
                bar = "#" * filled + "." * (width - filled)
                self.stream.write(f"\r\033[K[{bar}] {text}"[:200])
                self.stream.flush()
            else:
                self._line(text)
        elif kind == "study_done" and self.tty:
            self.stream.write("\n")

    def _line(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\033[K")
        self.stream.write(text + "\n")
        self.stream.flush()


def _fmt(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def run(args) -> int:
    problem = tuning_extra_problem()
    if problem:
        return fail(problem, 1)
    from kernmux.tuning_db.storage.errors import TuningDBError
    from kernmux.tuning_db.tuning.tuner import TuneError, tune

    if args.from_stats:
        from kernmux.cli.tune_from_stats import run_from_stats

        return run_from_stats(args, _ProgressPrinter(), settings_from_args, _shown_url)
    if args.op is None:
        return fail("name an op to tune, or give --from-stats FILE")
    if args.top is not None:
        return fail("--top only applies with --from-stats")
    try:
        import importlib

        for module in args.imports:
            importlib.import_module(module)
        op = get_op(args.op)
        device = resolve_device(args.device)
        feature_sets = parse_feature_args(op, args.features, device=device)
        kernels = get_kernels(op, args.kernels)
        if args.trials < 1 or args.workers < 1 or args.timeout <= 0:
            raise UsageError("--trials and --workers must be >= 1 and --timeout > 0")
        settings = settings_from_args(args, op.name, kernels)
    except (UsageError, ModuleNotFoundError) as e:
        return fail(str(e))
    if args.remeasure:
        return _run_remeasure(args, settings, feature_sets if args.features else None)
    try:
        results = tune(settings, feature_sets, progress=_ProgressPrinter())
    except ValueError as e:  # unknown kernel names and the like
        return fail(str(e))
    except (TuneError, TuningDBError) as e:
        return fail(f"tuning failed: {e}", 1)
    if args.json:
        print_json({"op": op.name, "db": _shown_url(args.db), "results": [r.as_dict() for r in results]})
    else:
        rows = []
        for r in results:
            cfg = json.dumps(r.best_config, sort_keys=True) if r.best_config else "-"
            failed = sum(n for s, n in r.statuses.items() if s != "ok")
            rows.append([
                format_features({k: v for k, v in r.features.items() if k != "device"}),
                r.best_kernel or "(none)", cfg, _fmt(r.best_p50_us), _fmt(r.baseline_p50_us),
                "-" if r.speedup is None else f"{r.speedup:.2f}x", f"{r.rows - failed}/{failed}",
            ])
        print(table(rows, ["features", "best", "config", "p50 us", f"{settings.baseline or 'baseline'} us",
                           "speed-up", "ok/failed"]))
        print(f"database: {_shown_url(args.db)}")
    return 0 if all(r.best_kernel for r in results) else 1


def settings_from_args(args, op_name: str, kernels: tuple[str, ...] | None):
    """The tuner's settings for ``op_name`` from the command line (shared by --from-stats)."""
    from kernmux.tuning_db.tuning.tuner import TuneSettings

    return TuneSettings(
        op=op_name, kernels=kernels, trials=args.trials, sampler=args.sampler, seed=args.seed,
        url=args.db, workers=args.workers, timeout_s=args.timeout, warmup_ms=args.warmup_ms, gpus=_gpus(args),
        rep_ms=args.rep_ms, cuda_graph={"auto": None, "on": True, "off": False}[args.cuda_graph], isolate=not args.in_process,
        imports=tuple(args.imports), baseline=args.baseline or None,
    )


def _gpus(args) -> tuple[str, ...]:
    """``--gpus``: the GPU ids, checked against the visible ones (UsageError otherwise)."""
    if not getattr(args, "gpus", None):
        return ()
    from kernmux.tuning_db.tuning.gpus import parse_gpus, visible_gpus

    if args.workers != 1:
        raise UsageError("--gpus starts one tuning process per GPU: leave out --workers")
    try:
        return parse_gpus(args.gpus, visible_gpus())
    except ValueError as e:
        raise UsageError(str(e)) from None


def _run_remeasure(args, settings, feature_sets) -> int:
    """``--remeasure``: every stored ok point (of ``feature_sets``) timed again."""
    from kernmux.tuning_db.storage.errors import TuningDBError
    from kernmux.tuning_db.tuning.remeasure import remeasure

    def progress(event: dict[str, Any]) -> None:
        if event["event"] == "remeasure_plan":
            sys.stderr.write(f"remeasuring {event['points']} stored ok point(s)\n")
        elif event["event"] == "remeasured":
            was = _fmt(event["previous_p50_us"])
            now = _fmt(event["p50_us"]) if event["status"] == "ok" else f"{event['status']} {event['error'] or ''}"[:80]
            noisy = "  (still dispersed: flagged noisy)" if event["noisy"] else ""
            sys.stderr.write(f"[{event['index']}/{event['total']}] {format_features({k: v for k, v in event['features'].items() if k != 'device'})} "
                             f"{event['kernel']}: row {event['previous_row']} {was} us -> row {event['row_id']} {now} us{noisy}\n")

    try:
        results = remeasure(
            settings.op, url=settings.url, feature_sets=feature_sets, kernels=settings.kernels,
            timeout_s=settings.timeout_s, warmup_ms=settings.warmup_ms, rep_ms=settings.rep_ms,
            cuda_graph=settings.cuda_graph, seed=settings.seed, isolate=settings.isolate,
            imports=settings.imports, progress=progress,
        )
    except TuningDBError as e:
        return fail(f"remeasure failed: {e}", 1)
    if args.json:
        print_json({"op": settings.op, "db": _shown_url(args.db), "remeasured": [r.as_dict() for r in results]})
    elif not results:
        print(f"no stored ok point of {settings.op} on this platform to remeasure (database: {_shown_url(args.db)})")
    else:
        print(f"remeasured {len(results)} point(s): {sum(r.status == 'ok' for r in results)} ok, "
              f"{sum(r.noisy for r in results)} still dispersed; database: {_shown_url(args.db)}")
    return 0 if results and all(r.status == "ok" for r in results) else 1


def _shown_url(url: str | None) -> str:
    from kernmux.tuning_db.storage.paths import default_url

    return url or default_url()
