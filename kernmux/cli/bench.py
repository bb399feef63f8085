"""``kernmux bench``: side-by-side kernel timings with the fraction of roofline."""

from __future__ import annotations

from kernmux.cli.common import (
    UsageError,
    add_import_flag,
    add_json_flag,
    fail,
    format_features,
    get_kernels,
    get_op,
    parse_feature_args,
    print_json,
    resolve_device,
    table,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="time kernels side by side, with fraction of roofline",
        description=(
            "For every combination of the given features (feat=v1,v2 is a sweep), run each "
            "kernel through the numerics gate and then time it (warm-up, L2 flush, median with "
            "p20/p80). The roofline floor uses the op's bytes/FLOPs over this GPU's ceilings, "
            "measured on first need (2 GiB copy, bf16 8192^3 matmul) and kept in the tuning "
            "database (see `kernmux ceilings`); on CPU no fraction is shown, and kernels are "
            "timed on one intra-op thread. Features not given take the op's defaults."
        ),
    )
    parser.add_argument("op", help="op name (see `kernmux ops`)")
    parser.add_argument("features", nargs="*", metavar="FEATURE=V1[,V2...]")
    parser.add_argument("--kernels", default=None, help="comma-separated kernels (default: all)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    parser.add_argument("--seed", type=int, default=0, help="input seed (default 0)")
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="warm-up per kernel (default 25)")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="repetitions per kernel (default 100)")
    parser.add_argument("--cuda-graph", action="store_true", help="time CUDA-graph replays (launch-bound ops)")
    parser.add_argument("--isolate", action="store_true", help="run each kernel in a worker subprocess")
    add_import_flag(parser)
    parser.add_argument("--db", default=None, metavar="URL",
                        help="tuning database holding the measured ceilings (default: KERNMUX_DB or the default database)")
    add_json_flag(parser)
    parser.set_defaults(handler=run)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def run(args) -> int:
    from kernmux.tuning_db.measurement.bench import bench
    from kernmux.tuning_db.measurement.ceilings import device_ceilings
    from kernmux.tuning_db.measurement.timing import environment_row
    from kernmux.tuning_db.measurement.trial import CPU_TIMING_THREADS

    try:
        op = get_op(args.op)
        device = resolve_device(args.device)
        feature_sets = parse_feature_args(op, args.features, device=device)
        kernels = get_kernels(op, args.kernels)
        if device == "cuda":
            ceilings, why_none = device_ceilings(db_url=args.db)
        else:
            ceilings, why_none = None, f"inputs on {device}: there is no GPU ceiling"
        rows, ceilings = bench(
            op.name, feature_sets, kernels, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
            cuda_graph=args.cuda_graph, seed=args.seed, isolate=args.isolate, ceilings=ceilings, find_ceilings=False,
            imports=tuple(args.imports),
        )
    except (UsageError, ValueError) as e:
        return fail(str(e))
    ran = [r for r in rows if r.status != "unsupported"]
    nothing_ran = "no kernel could run here for these features"
    if args.json:
        print_json({
            "op": op.name,
            "environment": environment_row(),
            "ceilings": None if ceilings is None else ceilings.as_dict(),
            "ceilings_note": why_none,
            "cpu_timing_threads": CPU_TIMING_THREADS if device == "cpu" else None,
            "rows": [r.as_dict() for r in rows],
            **({"error": nothing_ran, "code": 1} if not ran else {}),
        })
        return 1 if not ran or any(r.status != "ok" for r in ran) else 0
    else:
        table_rows = []
        for r in rows:
            p50 = r.p50_us
            result = f"{p50:.2f}" if p50 is not None else r.status
            best = min((x.p50_us for x in rows if x.features == r.features and x.p50_us), default=None)
            table_rows.append([
                format_features({k: v for k, v in r.features.items() if k != "device"}), r.kernel, result,
                _fmt(r.p20_us if p50 is not None else None, ".2f"), _fmt(r.p80_us if p50 is not None else None, ".2f"),
                "-" if p50 is None or best is None else f"{p50 / best:.2f}x",
                _fmt(r.floor_us, ".2f"), "-" if r.fraction is None else f"{100 * r.fraction:.1f}%",
                _fmt(r.achieved_tbs, ".3f"),
            ])
        print(table(table_rows, ["features", "kernel", "p50 us", "p20", "p80", "vs best", "floor us",
                                 "roofline", "TB/s"]))
        if device == "cpu":
            print(f"timed on CPU with {CPU_TIMING_THREADS} intra-op thread(s)")
        if ceilings is None:
            print(f"no measured ceilings ({why_none}): roofline fraction not shown")
        else:
            print(f"roofline ceilings: {ceilings.describe()}")
        failed = [r for r in rows if r.status not in ("ok", "unsupported")]
        for r in failed:
            print(f"{r.kernel} {format_features(r.features)}: {r.status}: {(r.error or '').splitlines()[0][:160]}")
    if not ran:
        return fail(nothing_ran, 1)
    return 1 if any(r.status != "ok" for r in ran) else 0
