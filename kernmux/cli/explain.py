"""``kernmux explain``: the decision for one problem and the full trace behind it.

Every matching rule is shown with its action, reason, link and where it was loaded from,
the rule that decided first; features left at the op's defaults are named.
"""

from __future__ import annotations

from typing import Any

from kernmux.cli.common import (
    UNSPECIFIED_DEVICE,
    UsageError,
    add_import_flag,
    add_json_flag,
    check_force,
    check_lib_names,
    defaulted_features,
    fail,
    format_features,
    get_op,
    parse_feature_args,
    parse_platform_args,
    print_json,
    printable,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "explain",
        help="show which kernel runs for a problem, and why",
        description=(
            "Resolve OP for the given features and print the decision with its trace: every "
            "candidate kernel and its status, every matching rule (action, reason, link; the "
            "deciding rule first), and the level that decided. Features not given take the op's "
            "defaults (see `kernmux ops`), and explain says which. --platform/--lib turn it into "
            "a what-if (libraries named with --lib count as installed; --platform arch=gfx950 "
            "alone implies vendor=rocm, sm_* vendor=cuda)."
        ),
    )
    parser.add_argument("op", help="op name (see `kernmux ops`)")
    parser.add_argument("features", nargs="*", default=[], metavar="FEATURE=VALUE",
                        help="problem features (optional; unspecified ones take the op's defaults)")
    parser.add_argument("--platform", action="append", default=[], metavar="KEY=VALUE", help="override vendor, arch, device or units")
    parser.add_argument("--lib", action="append", default=[], metavar="NAME=VERSION", help="pretend a library version is installed (NAME=none: absent)")
    parser.add_argument("--rules", action="append", default=[], metavar="FILE", help="extra rule file, more binding than KERNMUX_RULES and shipped rules")
    parser.add_argument("--db", default=None, metavar="URL", help="tuning database URL (default: KERNMUX_DB or the default database)")
    add_import_flag(parser)
    add_json_flag(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from kernmux.dispatch.resolver import NoKernelError
    from kernmux.rules.loader import RuleError
    from kernmux.runtime import make_dispatcher

    notes: list[str] = []
    try:
        op = get_op(args.op)
        check_force()
        platform = parse_platform_args(args.platform, args.lib, notes)
        device = "cpu" if platform.vendor == "cpu" else "cuda"
        features = parse_feature_args(op, args.features, device=device, sweep=False)[0]
    except UsageError as e:
        return fail(str(e))
    defaults = defaulted_features(op, args.features)
    try:
        dispatcher = make_dispatcher(platform=platform, rule_files=args.rules, db_url=args.db, run_self_checks=False)
        rules = dispatcher.rules
        check_lib_names([item.partition("=")[0].strip() for item in args.lib], rules)
        decision = dispatcher.decide(op.name, features)
    except UsageError as e:
        return fail(str(e))
    except RuleError as e:
        return fail(f"invalid rules: {e}", 1)
    except NoKernelError as e:
        if args.json:
            print_json({"op": op.name, "kernel": None, "error": str(e), "code": 1,
                        "candidates": [c.as_dict() for c in e.candidates], "features": features,
                        "defaulted_features": defaults, "notes": notes})
            return 1
        return fail(str(e), 1)
    evidence = rule_evidence(decision, rules)
    if args.json:
        data = decision.as_dict()
        data["rules"] = evidence
        data["defaulted_features"] = defaults
        data["notes"] = notes + data["notes"]
        print_json(data)
        return 0
    print(printable(render(decision, evidence, defaults, notes)))
    return 0


# --------------------------------------------------------------------------- evidence


def _action_text(rule: Any) -> str:
    action = rule.action
    if action.kind in ("use", "adapt"):
        what = action.kernels[0]
        extras = [action.transform.text()] if action.transform else []
        if action.config:
            extras.append(f"config={dict(action.config)}")
        return f"{action.kind} {what}" + (f" ({'; '.join(extras)})" if extras else "")
    if action.kind == "allow_precision":
        return f"allow_precision [{', '.join(action.precisions)}]"
    return f"{action.kind} [{', '.join(action.kernels)}]"


def _role(rule: Any, decision: Any) -> str:
    """What a matching rule did to this decision, in words."""
    kind, kernels = rule.action.kind, rule.action.kernels
    if rule.id == decision.rule:
        return f"decided ({decision.source} level)"
    if kind == "adapt":
        return "adapted the chosen kernel" if kernels[0] == decision.kernel else f"would adapt {kernels[0]} (not chosen)"
    if kind == "deny":
        return "filtered " + ", ".join(kernels)
    if kind == "allow_precision":
        used = rule.id == decision.precision_rule
        return "admitted the chosen kernel's precision" if used else "allowed a precision class (not the chosen kernel's)"
    if kind == "use":
        return f"not applied: {kernels[0]} did not survive the filters or a more binding level decided"
    if kind == "prefer":
        return "prefer list (order of fallbacks)" if decision.source != "prefer" else "prefer list"
    return ""


def rule_evidence(decision: Any, rules: Any) -> list[dict[str, Any]]:
    """Every matching rule of ``decision`` with action, reason, link, origin and role;
    the deciding rule first, then adapt rules on the chosen kernel, then the rest in
    precedence order."""
    by_id = {rule.id: rule for rule in getattr(rules, "rules", ())}
    out = []
    for rule_id, summary in decision.rules:
        rule = by_id.get(rule_id)
        if rule is None:  # a dispatcher built from other rules: keep what the decision has
            out.append({"id": rule_id, "summary": summary})
            continue
        out.append({
            "id": rule.id,
            "summary": summary,
            "action": rule.action.kind,
            "what": _action_text(rule),
            "kernels": list(rule.action.kernels),
            "reason": rule.reason,
            "link": rule.link,
            "source": rule.source,
            "layer": rule.layer,
            "role": _role(rule, decision),
        })

    def rank(entry: dict[str, Any]) -> int:
        if entry["id"] == decision.rule:
            return 0
        if entry.get("action") == "adapt" and entry["kernels"][:1] == [decision.kernel]:
            return 1
        if entry["id"] == decision.precision_rule:
            return 2
        return 3

    return sorted(out, key=rank)  # stable: precedence order within a rank


# --------------------------------------------------------------------------- text


def _precision_text(decision) -> str:
    """The chosen kernel's precision class, and how it relates to the op's reference."""
    if decision.precision == decision.reference_precision:
        return f"{decision.precision} (the op's reference class)"
    allowed = f"; allowed by rule {decision.precision_rule}" if decision.precision_rule else ""
    return f"{decision.precision} (coarser than the op's reference class {decision.reference_precision}{allowed})"


def _decided_text(decision) -> str:
    """The level that decided and why, without repeating the rule id."""
    detail = decision.detail
    if decision.rule:
        return f"{decision.source} level: rule {decision.rule} (its reason and link below)"
    return f"{decision.source} level: {detail}"


def _platform_text(plat) -> str:
    shown = f"{plat.vendor} {plat.arch}"
    if plat.device and plat.device not in (UNSPECIFIED_DEVICE, plat.vendor, shown):
        shown += f" ({plat.device})"
    if plat.what_if:
        shown += " [what-if]"
    libs = ", ".join(f"{k} {v}" for k, v in sorted(plat.libs.items())) or "none"
    return f"{shown}; libs: {libs}"


def render(decision, evidence: list[dict[str, Any]] | None = None, defaults: list[str] | None = None,
           notes: list[str] | None = None) -> str:
    evidence = evidence if evidence is not None else [{"id": i, "summary": s} for i, s in decision.rules]
    features = f"features:  {format_features(decision.features)}"
    lines = [f"op:        {decision.op}", features]
    if defaults:
        lines.append(f"           (defaults of {decision.op}: {', '.join(defaults)}; give FEATURE=VALUE to change)")
    lines.append(f"platform:  {_platform_text(decision.platform)}")
    extra = []
    if decision.transform:
        extra.append(decision.transform.text())
    if decision.config:
        extra.append(f"config {dict(decision.config)}")
    lines.append(f"kernel:    {decision.kernel}" + (f"  ({'; '.join(extra)})" if extra else ""))
    lines.append(f"precision: {_precision_text(decision)}")
    lines.append(f"source:    {_decided_text(decision)}")
    if getattr(decision, "borrowed_from", None) is not None:
        lines.append(f"borrowed:  nearest tuned bucket {format_features(decision.borrowed_from)} "
                     f"(distance {decision.distance:.2f} in log2 units; limit: KERNMUX_NEAREST_MAX)")
    if evidence:
        lines.append("rules matching (deciding rule first):")
        for entry in evidence:
            if "what" not in entry:
                lines.append(f"  - {entry['summary']}")
                continue
            lines.append(f"  - {entry['id']}: {entry['what']}  [{entry['role']}]")
            lines.append(f"      reason: {entry['reason']}")
            lines.append(f"      link:   {entry['link']}")
            lines.append(f"      from:   {entry['source']} ({entry['layer']})")
    else:
        lines.append("rules matching: none")
    lines.append("candidates:")
    width = max(len(c.kernel) for c in decision.candidates)
    pwidth = max(len(c.precision) for c in decision.candidates)
    for c in decision.candidates:
        lines.append(f"  {c.kernel.ljust(width)}  {c.status:<11}  {c.precision.ljust(pwidth)}  {c.reason}".rstrip())
    if decision.fallbacks:
        lines.append(f"fallbacks: {', '.join(decision.fallbacks)}")
    for note in [*(notes or ()), *decision.notes]:
        lines.append(f"note:      {note}")
    return "\n".join(lines)
