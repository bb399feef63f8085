"""``kernmux`` console script: a thin argparse front over the library.

Subcommand modules are imported here but keep heavy imports (torch, sqlalchemy, optuna)
inside their ``run`` functions, so ``kernmux --help`` stays instant."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

# Fixed table of subcommands: kernmux/cli/<name>.py exposing register(subparsers).
COMMANDS: tuple[str, ...] = ("ops", "explain", "rules", "verify", "bench", "ceilings", "tune", "db")

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors exit 2 with a short message
        from kernmux.cli.common import _JSON_ERRORS, fail

        if not _JSON_ERRORS:
            self.print_usage(sys.stderr)
        fail(message, EXIT_USAGE)
        raise SystemExit(EXIT_USAGE)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="kernmux",
        description=(
            "Declarative kernel dispatch and autotuning for LLM inference kernels. "
            "Rules (YAML) and a tuning database decide which kernel runs for each op, "
            "problem and platform; these commands inspect, verify, benchmark and tune them."
        ),
        epilog="Every command takes --json and exits 0 (ok), 1 (a check failed) or 2 (usage error).",
    )
    parser.add_argument("--version", action="version", version="kernmux 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"kernmux.cli.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"kernmux.cli.{name}":
                raise
            continue  # a subcommand not built in this checkout
        module.register(sub)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Parse ``argv``; FEATURE=VALUE words after an option (``explain OP --json tokens=8``)
    join the command's features instead of being "unrecognized"."""
    args, extra = parser.parse_known_args(argv)
    features = getattr(args, "features", None)
    stray = [word for word in extra if word.startswith("-") or "=" not in word or features is None]
    if stray:
        parser.error(f"unrecognized arguments: {' '.join(stray)}")
    if extra:
        args.features = list(features) + extra
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from kernmux.cli.common import UsageError, fail, import_modules, set_json_errors

    argv = list(sys.argv[1:] if argv is None else argv)
    set_json_errors("--json" in argv)
    try:
        parser = build_parser()
        args = _parse(parser, argv)
    except SystemExit as e:
        return int(e.code or 0)
    set_json_errors(bool(getattr(args, "json", False)) or "--json" in argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        if "--json" in argv:
            return fail("a command is needed; see `kernmux --help`", EXIT_USAGE)
        parser.print_help()
        return EXIT_USAGE
    try:
        import_modules(getattr(args, "imports", ()))
        return int(handler(args) or 0)
    except UsageError as e:
        return fail(str(e), EXIT_USAGE)
    except KeyboardInterrupt:
        sys.stderr.write("kernmux: interrupted\n")
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as e:  # a bug or an unforeseen environment: one clear line, traceback on request
        if os.environ.get("KERNMUX_TRACEBACK"):
            raise
        return fail(f"{type(e).__name__}: {e} (unexpected; set KERNMUX_TRACEBACK=1 for the traceback)", EXIT_CHECK_FAILED)
    finally:
        set_json_errors(False)


if __name__ == "__main__":
    sys.exit(main())
