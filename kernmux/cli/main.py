"""``kernmux`` console script: a thin argparse front over the library.

Subcommand modules are imported here but keep heavy imports (torch, sqlalchemy, optuna)
inside their ``run`` functions, so ``kernmux --help`` stays instant."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Fixed table of subcommands: kernmux/cli/<name>.py exposing register(subparsers).
COMMANDS: tuple[str, ...] = ("ops", "explain", "rules", "verify", "bench", "ceilings", "tune", "db")

EXIT_OK, EXIT_CHECK_FAILED, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # usage errors exit 2 with a short message
        self.print_usage(sys.stderr)
        sys.stderr.write(f"kernmux: error: {message}\n")
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return int(handler(args) or 0)
    except KeyboardInterrupt:
        sys.stderr.write("kernmux: interrupted\n")
        return 130
    except BrokenPipeError:
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
