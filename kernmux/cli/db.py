"""``kernmux db upgrade | show | export | import | merge | report``: inspect and move tuning data.

Every subcommand takes ``--db URL`` (default: ``KERNMUX_DB`` or the default SQLite file)
and ``--json``. Heavy imports (SQLAlchemy, alembic) happen inside ``run_*``. Reading
subcommands (show, export, report) open the database read-only, so a database on a
read-only mount works; writing ones (upgrade, import, merge) refuse an in-memory one.
"""

from __future__ import annotations

import sys
from typing import Any

from kernmux.cli.common import add_json_flag, fail, print_json, printable


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

    parser.set_defaults(handler=lambda args: (parser.print_help(), 2)[1])


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


_WRITING = {"run_upgrade", "run_import", "run_merge"}


def _guard(fn):
    """Turn database and format errors into a message and exit code 1."""

    def run(args) -> int:
        try:
            from kernmux.tuning_db.storage.errors import TuningDBError
            from kernmux.tuning_db.tuning.export import ExportFormatError
        except ImportError as e:
            return fail(f"tuning database support is not installed ({e.name}); pip install 'kernmux[tuning]'", 1)
        if fn.__name__ in _WRITING:
            problem = _not_persistent(args)
            if problem:
                return fail(problem, 2)
        try:
            return fn(args)
        except (TuningDBError, ExportFormatError, OSError) as e:
            if args.json:
                print_json({"ok": False, "error": f"{type(e).__name__}: {e}"})
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
        fail(f"{verb} stopped {report.error}", 1)
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
        sections = write_report(store, args.output, op=args.op)
    if args.json:
        print_json({"ok": True, "output": args.output, "sections": sections})
    else:
        print(f"wrote {args.output} ({sections} section(s))")
    return 0
