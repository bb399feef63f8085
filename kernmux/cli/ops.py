"""``kernmux ops``: ops, their features and kernels, and availability here with reasons."""

from __future__ import annotations

from kernmux.cli.common import add_import_flag, add_json_flag, print_json, table


def register(subparsers) -> None:
    parser = subparsers.add_parser("ops", help="list ops, their features and kernels, and availability here")
    add_json_flag(parser)
    parser.add_argument("--all", action="store_true", help="include test-only kernels")
    add_import_flag(parser)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from kernmux.dispatch.platform import current_platform
    from kernmux.dispatch.registry import REGISTRY

    platform = current_platform()
    data = []
    for op in REGISTRY.all_ops():
        kernels = []
        for name, kernel in sorted(REGISTRY.kernels_of(op.name).items()):
            if kernel.test_only and not args.all:
                continue
            available = kernel.availability(platform)
            kernels.append(
                {
                    "kernel": name,
                    "available": available.ok,
                    "reason": available.reason,
                    "requires": dict(kernel.requires),
                    "vendors": list(kernel.vendors),
                    "priority": kernel.priority,
                    "config_space": {k: list(v) for k, v in kernel.config_space.items()},
                    "doc": kernel.doc,
                }
            )
        if not kernels:
            continue
        data.append(
            {
                "op": op.name,
                "doc": (op.doc or "").strip().splitlines()[0] if op.doc else "",
                "features": [
                    {"name": s.name, "kind": s.kind, "default": s.default, "choices": list(s.choices) if s.choices else None, "doc": s.doc}
                    for s in op.feature_specs
                ],
                "head_axis": op.head_axes.feature if op.head_axes else None,
                "kernels": kernels,
            }
        )
    if args.json:
        print_json({"platform": platform.as_dict(), "ops": data, "plugin_errors": REGISTRY.plugin_errors})
        return 0
    print(f"platform: {platform.vendor} {platform.arch} ({platform.device})")
    for entry in data:
        print(f"\n{entry['op']}: {entry['doc']}")
        print("  features: " + ", ".join(f"{f['name']} ({f['kind']}, default {f['default']})" for f in entry["features"]))
        rows = [
            (k["kernel"], "yes" if k["available"] else "no", k["priority"], k["reason"] or ", ".join(f"{d}{s}" for d, s in k["requires"].items()))
            for k in entry["kernels"]
        ]
        print("  " + table(rows, ["kernel", "available", "priority", "why / requires"]).replace("\n", "\n  "))
    for name, error in REGISTRY.plugin_errors.items():
        print(f"\nplugin {name}: failed to load: {error}")
    return 0
