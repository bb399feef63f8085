"""``kernmux explain``: the decision for one problem and the full trace behind it."""

from __future__ import annotations

import sys

from kernmux.cli.common import UsageError, add_json_flag, fail, format_features, get_op, parse_feature_args, parse_platform_args, print_json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="show which kernel runs for a problem, and why",
        description=(
            "Resolve OP for the given features and print the decision with its trace: every "
            "candidate kernel and its status, every matching rule, and the level that decided. "
            "--platform/--lib turn it into a what-if (libraries named with --lib count as installed)."
        ),
    )
    parser.add_argument("op", help="op name (see `kernmux ops`)")
    parser.add_argument("features", nargs="*", metavar="FEATURE=VALUE", help="problem features; unspecified ones take the op's defaults")
    parser.add_argument("--platform", action="append", default=[], metavar="KEY=VALUE", help="override vendor, arch, device or units")
    parser.add_argument("--lib", action="append", default=[], metavar="NAME=VERSION", help="pretend a library version is installed (NAME=none: absent)")
    parser.add_argument("--rules", action="append", default=[], metavar="FILE", help="extra rule file, more binding than KERNMUX_RULES and shipped rules")
    parser.add_argument("--db", default=None, metavar="URL", help="tuning database URL (default: KERNMUX_DB or the default database)")
    add_json_flag(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from kernmux.dispatch.resolver import NoKernelError
    from kernmux.rules.loader import RuleError
    from kernmux.runtime import make_dispatcher

    try:
        op = get_op(args.op)
        platform = parse_platform_args(args.platform, args.lib)
        device = "cpu" if platform.vendor == "cpu" else "cuda"
        combos = parse_feature_args(op, args.features, device=device, sweep=False)
    except UsageError as e:
        return fail(str(e))
    features = combos[0]
    try:
        dispatcher = make_dispatcher(platform=platform, rule_files=args.rules, db_url=args.db, run_self_checks=False)
        decision = dispatcher.decide(op.name, features)
    except RuleError as e:
        return fail(f"invalid rules: {e}", 1)
    except NoKernelError as e:
        if args.json:
            print_json({"op": op.name, "kernel": None, "error": str(e), "candidates": [c.as_dict() for c in e.candidates], "features": features})
        else:
            sys.stderr.write(f"kernmux: {e}\n")
        return 1
    if args.json:
        print_json(decision.as_dict())
        return 0
    print(render(decision))
    return 0


def _precision_text(decision) -> str:
    """The chosen kernel's precision class, and how it relates to the op's reference."""
    if decision.precision == decision.reference_precision:
        return f"{decision.precision} (the op's reference class)"
    allowed = f"; allowed by rule {decision.precision_rule}" if decision.precision_rule else ""
    return f"{decision.precision} (coarser than the op's reference class {decision.reference_precision}{allowed})"


def render(decision) -> str:
    lines = [f"op:        {decision.op}", f"features:  {format_features(decision.features)}"]
    plat = decision.platform
    libs = ", ".join(f"{k} {v}" for k, v in sorted(plat.libs.items())) or "none"
    lines.append(f"platform:  {plat.vendor} {plat.arch} ({plat.device}){' [what-if]' if plat.what_if else ''}; libs: {libs}")
    extra = []
    if decision.transform:
        extra.append(decision.transform.text())
    if decision.config:
        extra.append(f"config {dict(decision.config)}")
    lines.append(f"kernel:    {decision.kernel}" + (f"  ({'; '.join(extra)})" if extra else ""))
    lines.append(f"precision: {_precision_text(decision)}")
    lines.append(f"source:    {decision.source}: {decision.detail}")
    if getattr(decision, "borrowed_from", None) is not None:
        lines.append(f"borrowed:  nearest tuned bucket {format_features(decision.borrowed_from)} "
                     f"(distance {decision.distance:.2f} in log2 units; limit: KERNMUX_NEAREST_MAX)")
    if decision.rules:
        lines.append("rules matching:")
        lines += [f"  - {summary}" for _, summary in decision.rules]
    else:
        lines.append("rules matching: none")
    lines.append("candidates:")
    width = max(len(c.kernel) for c in decision.candidates)
    pwidth = max(len(c.precision) for c in decision.candidates)
    for c in decision.candidates:
        lines.append(f"  {c.kernel.ljust(width)}  {c.status:<11}  {c.precision.ljust(pwidth)}  {c.reason}".rstrip())
    if decision.fallbacks:
        lines.append(f"fallbacks: {', '.join(decision.fallbacks)}")
    for note in decision.notes:
        lines.append(f"note:      {note}")
    return "\n".join(lines)
