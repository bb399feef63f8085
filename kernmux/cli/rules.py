"""``kernmux rules lint | derive``."""

from __future__ import annotations

import sys

from kernmux.cli.common import (
    UsageError,
    add_import_flag,
    add_json_flag,
    check_op_filter,
    fail,
    needs_subcommand,
    print_json,
    printable,
    stored_ops,
    tuning_extra_problem,
)


def register(subparsers) -> None:
    parser = subparsers.add_parser("rules", help="validate rule files, or derive deny rules from tuning failures")
    sub = parser.add_subparsers(dest="rules_command", metavar="SUBCOMMAND")
    lint = sub.add_parser(
        "lint",
        help="validate rule files (the shipped ones when none are given)",
        description="Report malformed rules (with file:line), rules that can never match and use rules shadowed by an earlier one. Exit 1 on any problem.",
    )
    lint.add_argument("files", nargs="*", default=[], metavar="FILE")
    add_import_flag(lint)
    add_json_flag(lint)
    lint.set_defaults(handler=run_lint)
    derive = sub.add_parser(
        "derive",
        help="emit deny rules (YAML, with evidence) from failures recorded in the tuning database",
    )
    derive.add_argument("--db", default=None, metavar="URL", help="tuning database URL (default: KERNMUX_DB or the default database)")
    derive.add_argument("--op", default=None, help="only this op")
    derive.add_argument("-o", "--output", default=None, metavar="FILE", help="write the YAML here instead of stdout")
    add_import_flag(derive)
    add_json_flag(derive)
    derive.set_defaults(handler=run_derive)
    parser.set_defaults(handler=needs_subcommand(parser))


def run_lint(args) -> int:
    from kernmux.rules.lint import lint_files

    report = lint_files(args.files or None)
    if args.json:
        print_json(report.as_dict())
    else:
        for problem in report.problems:
            print(printable(problem.text()))
        status = "ok" if report.ok else f"{len(report.problems)} problem(s)"
        print(f"{len(report.files)} file(s), {report.rules} rule(s): {status}", file=sys.stderr if not report.ok else sys.stdout)
    return 0 if report.ok else 1


def run_derive(args) -> int:
    problem = tuning_extra_problem()
    if problem:
        return fail(problem, 1)
    from kernmux.tuning_db.storage.errors import TuningDBError
    from kernmux.tuning_db.storage.store import TuningStore
    from kernmux.tuning_db.tuning.derive import derive_rules

    try:
        with TuningStore(args.db, create=False, read_only=True) as store:
            check_op_filter(args.op, stored_ops(store) if args.op else ())
            text, count = derive_rules(store, op=args.op)
    except UsageError as e:
        return fail(str(e))
    except TuningDBError as e:
        return fail(str(e), 1)
    if args.output:
        try:
            with open(args.output, "w", encoding="utf-8") as fh:
                fh.write(text)
        except OSError as e:
            return fail(f"cannot write {args.output}: {e.strerror or e}", 1)
    if args.json:
        print_json({"rules": count, "output": args.output, "yaml": None if args.output else text})
    elif not args.output:
        sys.stdout.write(text)
    if args.output and not args.json:
        print(f"wrote {count} rule(s) to {args.output}", file=sys.stderr)
    return 0
