"""``kernmux ceilings``: show (or re-measure) this GPU's roofline ceilings."""

from __future__ import annotations

from kernmux.cli.common import add_json_flag, fail, print_json


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "ceilings",
        help="this GPU's measured copy bandwidth and bf16 matmul rate (roofline denominators)",
        description=(
            "Show the ceilings `kernmux bench` divides by: a 2 GiB device-to-device copy "
            "(bytes read + written / time) and a bf16 8192^3 matmul on random data, medians "
            "of 20 CUDA-event timings each. They are measured on first need and kept per "
            "device fingerprint in the tuning database; --remeasure measures again and adds a "
            "row. On CPU there is no GPU ceiling (exit 1)."
        ),
    )
    parser.add_argument("--remeasure", action="store_true", help="measure again (and store the new row)")
    parser.add_argument("--all", action="store_true", help="also list every stored measurement, of every device")
    parser.add_argument("--db", default=None, metavar="URL",
                        help="tuning database URL or SQLite file (default: KERNMUX_DB or the default database)")
    add_json_flag(parser)
    parser.set_defaults(handler=run)


def _stored(db_url: str | None) -> tuple[list, str]:
    try:
        from kernmux.tuning_db.storage.ceiling_store import ceiling_rows
        from kernmux.tuning_db.storage.store import TuningStore

        with TuningStore(db_url, create=False) as store:
            return ceiling_rows(store), ""
    except Exception as e:  # absent database or extra: say so, the current device still shows
        return [], f"{type(e).__name__}: {e}"


def run(args) -> int:
    from kernmux.dispatch.platform import current_platform
    from kernmux.tuning_db.measurement.ceilings import device_ceilings

    platform = current_platform()
    ceilings, why_none = device_ceilings(platform, db_url=args.db, remeasure=args.remeasure)
    stored, stored_problem = _stored(args.db) if args.all else ([], "")
    if args.json:
        print_json({
            "device": platform.device,
            "fingerprint": platform.fingerprint(),
            "ceilings": None if ceilings is None else ceilings.as_dict(),
            "note": why_none,
            **({"stored": [{**r.__dict__, "measured_at": r.measured_at.isoformat()} for r in stored],
                "stored_note": stored_problem} if args.all else {}),
        })
    else:
        if ceilings is not None:
            print(f"{platform.device} ({platform.fingerprint()}): {ceilings.describe()}")
        if args.all:
            print("stored measurements:" if stored else f"no stored measurements{': ' + stored_problem if stored_problem else ''}")
            for r in stored:
                when = r.measured_at.strftime("%Y-%m-%d %H:%M UTC")
                print(f"  #{r.id} {when} {r.device} ({r.fingerprint}) copy {r.bandwidth_tbs:.3g} TB/s, "
                      f"bf16 {r.tflops:.4g} TFLOP/s, host {r.host}")
    if ceilings is None:
        return 1 if args.json else fail(why_none, 1)  # the JSON above carries the note
    return 0
