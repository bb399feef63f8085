"""``kernmux verify``: run kernels available here against the reference on fresh inputs."""

from __future__ import annotations

import sys

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
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="check kernels against the op's reference on fresh random inputs",
        description=(
            "For every combination of the given features (feat=v1,v2 is a sweep) and every "
            "kernel available here, draw fresh random inputs, poison the kernel's outputs, run "
            "it and the reference, and compare with the op's tolerance. Unlike explain, bench "
            "and tune (which take the op's default for a feature not given), verify sweeps the "
            "features not given over the op's parity grid where it declares one (SWEEP_DEFAULTS, "
            "listed by `kernmux ops`), else takes the default. Exit 1 if any fails."
        ),
    )
    parser.add_argument("op", help="op name (see `kernmux ops`)")
    parser.add_argument("features", nargs="*", metavar="FEATURE=V1[,V2...]")
    parser.add_argument("--kernels", default=None, help="comma-separated kernels (default: all available)")
    parser.add_argument("--seed", type=int, default=None, help="base seed (default: fresh each run)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if present)")
    add_import_flag(parser)
    parser.add_argument(
        "--nonfinite", action="store_true",
        help="draw inputs with NaN/inf where the op declares them (make_nonfinite_inputs); ops without it are skipped",
    )
    parser.add_argument(
        "--interpret", action="store_true",
        help="run Triton kernels in Triton's interpreter (sets TRITON_INTERPRET=1; for CPU-only machines, small shapes)",
    )
    add_json_flag(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    import os
    import secrets

    if args.interpret:
        os.environ["TRITON_INTERPRET"] = "1"  # before triton is first imported

    from kernmux.dispatch.registry import REGISTRY
    from kernmux.dispatch.verify import verify_kernel

    try:
        device = resolve_device(args.device)
        op = get_op(args.op)
        items = list(args.features)
        # With no features given, sweep the op's declared default grid (e.g. the
        # sparse MLA parity table); features given on the command line replace it.
        given = {item.partition("=")[0].strip() for item in items}
        for name, values in op.sweep_defaults.items():
            if name not in given:
                items.append(f"{name}={','.join(str(v) for v in values)}")
        combos = parse_feature_args(op, items, device=device)
        kernels = REGISTRY.kernels_of(op.name)
        names = list(get_kernels(op, args.kernels) or [k for k in sorted(kernels) if not kernels[k].test_only])
    except UsageError as e:
        return fail(str(e))
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    results = []
    for index, feats in enumerate(combos):
        for name in names:
            result = verify_kernel(op.name, name, feats, seed=seed + index, nonfinite=args.nonfinite)
            results.append(result)
            if not args.json:
                mark = {"pass": "PASS", "fail": "FAIL", "error": "ERROR"}.get(result.status, "skip")
                metrics = " ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.metrics.items())
                print(f"{mark:5} {name:14} {format_features(feats)}  {metrics}  {result.detail}".rstrip())
                sys.stdout.flush()
    ran = [r for r in results if r.status in ("pass", "fail", "error")]
    failed = [r for r in ran if not r.passed]
    nothing_ran = "no kernel could run here for these features"
    if args.json:
        print_json({"op": op.name, "seed": seed, "results": [r.as_dict() for r in results], "failed": len(failed),
                    "ran": len(ran), **({"error": nothing_ran, "code": 1} if not ran else {})})
        return 1 if failed or not ran else 0
    skipped = len(results) - len(ran)
    print(f"{len(ran) - len(failed)} passed, {len(failed)} failed, {skipped} skipped (seed {seed})")
    if not ran:
        return fail(nothing_ran, 1)
    return 1 if failed else 0
