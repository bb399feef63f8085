"""``kernmux db upgrade | show | export | import | merge | report | prune``: inspect and move
tuning data; ``prune`` is the one command that deletes rows.

Every subcommand takes ``--db URL`` (default: ``KERNMUX_DB`` or the default SQLite file)
and ``--json``. Heavy imports (SQLAlchemy, alembic) happen inside ``run_*``. Reading
subcommands (show, export, report) open the database read-only, so a database on a
read-only mount works; writing ones (upgrade, import, merge) refuse an in-memory one.
"""

from __future__ import annotations

import sys
from typing import Any

from kernmux.cli.common import (
    UsageError,
    add_json_flag,
    check_op_filter,
    fail,
    needs_subcommand,
    print_json,
    printable,
    stored_ops,
    tuning_extra_problem,
)


def _common(parser) -> None:
    parser.add_argument("--db", default=None, metavar="URL", help="tuning database URL or SQLite file (default: KERNMUX_DB or the default database)")
    add_json_flag(parser)


def register(subparsers) -> None:
    parser = subparsers.add_parser("db", help="inspect and move tuning data between machines")
    sub = parser.add_subparsers(dest="db_command", metavar="SUBCOMMAND")

    p = sub.add_parser("upgrade", help="create the database or migrate it to this kernmux's schema")
    _common(p)
    p.set_defaults(handler=run_upgrade)

    p = sub.add_parser("show", help="schema status, row counts per op/kernel/status, platforms, studies")
    p.add_argument("--op", default=None, help="only rows of this op (with --rows)")
    p.add_argument("--rows", type=int, default=0, metavar="N", help="also list the newest N rows")
    _common(p)
    p.set_defaults(handler=run_show)

    p = sub.add_parser("export", help="write every row as versioned JSON (kernmux-tuning v1)")
    p.add_argument("-o", "--output", default=None, metavar="FILE", help="file to write (default: stdout)")
    p.add_argument("--op", default=None, help="only rows of this op")
    _common(p)
    p.set_defaults(handler=run_export)

    p = sub.add_parser("import", help="validate and add rows from an export file (bad rows are reported, good ones kept)")
    p.add_argument("file", metavar="FILE")
    _common(p)
    p.set_defaults(handler=run_import)

    p = sub.add_parser("merge", help="add rows from another database (URL or SQLite file) or export file; idempotent")
    p.add_argument("source", metavar="URL_OR_FILE")
    _common(p)
    p.set_defaults(handler=run_merge)

    p = sub.add_parser("report", help="write an HTML heatmap: winning kernel and speed-up over torch per bucket")
    p.add_argument("-o", "--output", default="kernmux-report.html", metavar="FILE", help="HTML file to write (default: %(default)s)")
    p.add_argument("--op", default=None, help="only this op")
    _common(p)
    p.set_defaults(handler=run_report)

    p = sub.add_parser(
        "prune", help="delete rows by op, kernel, status, age or dispersed timing (the only deletion; --dry-run first)",
        description=(
            "Delete the rows every given condition matches: --op, --kernel, --status, --older-than, --noisy "
            "(ok rows whose p80/p20 is over the dispersion bound). This is the one place rows are deleted. "
            "--dry-run lists what would go; without it, --yes is required. An optuna study left without rows "
            "is deleted too (a later `kernmux tune` searches it again)."
        ),
    )
    p.add_argument("--op", default=None, help="only rows of this op")
    p.add_argument("--kernel", default=None, help="only rows of this kernel")
    p.add_argument("--status", default=None, metavar="S[,S]", help="only rows with one of these statuses")
    p.add_argument("--older-than", default=None, metavar="AGE", help="only rows created more than AGE ago (e.g. 12h, 7d, 2w)")
    p.add_argument("--noisy", action="store_true", help="only ok rows whose timing is dispersed")
    p.add_argument("--dry-run", action="store_true", help="list what would be deleted, delete nothing")
    p.add_argument("--yes", action="store_true", help="delete without --dry-run (required: deleting is final)")
    _common(p)
    p.set_defaults(handler=run_prune)

    parser.set_defaults(handler=needs_subcommand(parser))


def _open(args, *, create: bool = False, check: bool = True):
    """Writing subcommands: a writable store (created when ``create``)."""
    from kernmux.tuning_db.storage.store import TuningStore

    store = TuningStore(args.db, create=create, check=check)
    try:
        store.check_writable()
    except BaseException:
        store.close()
        raise
    return store


def _open_read_only(args, *, check: bool = True):
    """Reading subcommands: never writes, works on a read-only file or mount."""
    from kernmux.tuning_db.storage.store import TuningStore

    return TuningStore(args.db, create=False, check=check, read_only=True)


def _not_persistent(args) -> str:
    """Why ``--db`` cannot keep what a writing subcommand writes ("" when it can)."""
    from kernmux.tuning_db.storage.paths import default_url, normalize_url, persistence_problem

    return persistence_problem(normalize_url(args.db) if args.db else default_url())


_WRITING = {"run_upgrade", "run_import", "run_merge", "run_prune"}


def _guard(fn):
    """Turn database and format errors into a message and exit code 1."""

    def run(args) -> int:
        problem = tuning_extra_problem()
        if problem:
            return fail(problem, 1)
        from kernmux.tuning_db.storage.errors import TuningDBError
        from kernmux.tuning_db.tuning.export import ExportFormatError

        if fn.__name__ in _WRITING:
            problem = _not_persistent(args)
            if problem:
                return fail(problem, 2)
        try:
            return fn(args)
        except UsageError as e:
            return fail(str(e))
        except (TuningDBError, ExportFormatError, OSError) as e:
            return fail(str(e), 1)

    run.__name__ = fn.__name__
    return run


@_guard
def run_upgrade(args) -> int:
    with _open(args, create=True, check=False) as store:
        before = None if store.created else store.revision()
        if store.schema_status() != "current":
            store.upgrade()
        after = store.revision()
        result = {"ok": True, "db": store.display_url, "from": before, "to": after, "changed": before != after}
    if args.json:
        print_json(result)
    elif before == after:
        print(f"{result['db']}: already at schema revision {after}")
    else:
        print(f"{result['db']}: upgraded schema {before or '(new database)'} -> {after}")
    return 0


@_guard
def run_show(args) -> int:
    with _open_read_only(args, check=False) as store:
        status = store.schema_status()
        info: dict[str, Any] = {
            "db": store.display_url,
            "access": store.access_note(),
            "schema": {"status": status, "revision": store.revision(), "code_head": store.head_revision()},
        }
        if status == "current":
            info.update(store.summary())
            check_op_filter(args.op, {e["op"] for e in info["by_kernel"]})
        if status == "current" and args.rows:
            from kernmux.tuning_db.tuning.export import row_to_dict

            info["latest"] = [{"id": r.id, **row_to_dict(r)} for r in store.rows(op=args.op, limit=args.rows)]
    if args.json:
        print_json(info)
        return 0 if status == "current" else 1
    schema = info["schema"]
    print(f"database: {info['db']}")
    print(f"access:   {info['access']}")
    print(f"schema:   {schema['status']} (database {schema['revision'] or '-'}, code {schema['code_head']})")
    if status == "older":
        print(f"          run `kernmux db upgrade --db {info['db']}`")
    elif status == "newer":
        print("          written by a newer kernmux: upgrade kernmux to read it")
    if status != "current":
        return 1
    print(f"rows:     {info['rows']}")
    if info["by_kernel"]:
        print("\nop / kernel / status counts:")
        width = max(len(f"{e['op']}/{e['kernel']}") for e in info["by_kernel"])
        for e in info["by_kernel"]:
            print(f"  {e['op'] + '/' + e['kernel']:<{width}}  {e['status']:<16} {e['rows']}")
    if info["by_fingerprint"]:
        print("\nplatforms:")
        for e in info["by_fingerprint"]:
            print(f"  {e['fingerprint']}  {e['rows']} rows, latest {e['latest']}")
    if info["studies"]:
        print("\nstudies:")
        for e in info["studies"]:
            print(f"  {e['study']}  {e['rows']} rows")
    if info.get("latest"):
        print("\nlatest rows:")
    for r in info.get("latest", []):
        timing = f"p50 {r['p50_us']:.2f} us" if r["p50_us"] is not None else (r["error"] or "")[:60]
        print(printable(f"  #{r['id']} {r['created_at'][:19]} {r['op']}/{r['kernel']} {r['status']} {r['bucket']} {r['config']} {timing}"))
    return 0


@_guard
def run_export(args) -> int:
    from kernmux.tuning_db.tuning.export import write_export

    with _open_read_only(args) as store:
        check_op_filter(args.op, stored_ops(store) if args.op else ())
        if args.output:
            n = write_export(store, args.output, op=args.op)
        else:
            n = write_export(store, sys.stdout, op=args.op)
    if args.output:
        if args.json:
            print_json({"ok": True, "rows": n, "output": args.output})
        else:
            print(f"wrote {n} rows to {args.output}")
    return 0


def _report_import(args, report, verb: str) -> int:
    """What was stored, every bad row and, when the database failed midway, what was
    not: exit 1 unless every row was stored or already present."""
    if args.json:
        print_json({"ok": report.ok, **report.as_dict()})
    else:
        print(printable(f"{verb}: {report.summary()}"))
    if report.error is not None:
        # The report (JSON: its "error" field) already says it; one document on stdout.
        sys.stderr.write(printable(f"kernmux: error: {verb} stopped {report.error}\n", sys.stderr))
        return 1
    return 0 if report.ok else 1


@_guard
def run_import(args) -> int:
    from kernmux.tuning_db.tuning.export import import_file

    with _open(args, create=True) as store:
        report = import_file(store, args.file)
    return _report_import(args, report, f"import {args.file}")


@_guard
def run_merge(args) -> int:
    from kernmux.tuning_db.tuning.export import merge

    with _open(args, create=True) as store:
        report = merge(store, args.source)
    return _report_import(args, report, f"merge {args.source}")


@_guard
def run_report(args) -> int:
    from kernmux.tuning_db.tuning.report import write_report

    with _open_read_only(args) as store:
        check_op_filter(args.op, stored_ops(store) if args.op else ())
        sections = write_report(store, args.output, op=args.op)
        dashboard = f"optuna-dashboard {store.display_url}"
    if args.json:
        print_json({"ok": True, "output": args.output, "sections": sections, "dashboard": dashboard})
    else:
        print(f"wrote {args.output} ({sections} section(s)); every trial of the studies: {dashboard}")
    return 0


@_guard
def run_prune(args) -> int:
    from kernmux.tuning_db.storage.prune import PruneFilter, parse_age, prune, summary_lines

    try:
        statuses = tuple(x.strip() for x in args.status.split(",") if x.strip()) if args.status else None
        flt = PruneFilter(op=args.op, kernel=args.kernel, statuses=statuses,
                          older_than=parse_age(args.older_than) if args.older_than else None, noisy=args.noisy)
    except ValueError as e:
        raise UsageError(str(e)) from None
    if flt.empty():
        raise UsageError("name the rows to delete: --op, --kernel, --status, --older-than and/or --noisy")
    with _open(args) as store:
        check_op_filter(args.op, stored_ops(store) if args.op else ())
        if not args.dry_run and not args.yes:
            preview = prune(store, flt, dry_run=True)
            raise UsageError(f"this would delete {len(preview.ids)} row(s) matching {preview.filter}; "
                             "rerun with --dry-run to list them or --yes to delete them")
        report = prune(store, flt, dry_run=args.dry_run)
    if args.json:
        print_json({"ok": True, "db": store.display_url, **report.as_dict()})
    else:
        print("\n".join(summary_lines(report)))
    return 0
