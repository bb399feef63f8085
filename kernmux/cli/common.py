"""Helpers shared by subcommands: feature/platform argument parsing, JSON output, errors."""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Mapping, Sequence
from typing import Any


class UsageError(Exception):
    """Bad command-line input: printed without a traceback, exit code 2."""


def add_json_flag(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


def print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def printable(text: str, stream: Any = None) -> str:
    """``text`` as ``stream`` (default stdout) can encode it: what it cannot (a lone
    surrogate from a file, a character outside the locale) becomes a backslash escape."""
    encoding = getattr(stream or sys.stdout, "encoding", None) or "utf-8"
    try:
        return text.encode(encoding, "backslashreplace").decode(encoding)
    except LookupError:  # an unknown encoding name
        return text.encode("ascii", "backslashreplace").decode("ascii")


def fail(message: str, code: int = 2) -> int:
    sys.stderr.write(printable(f"kernmux: error: {message}\n", sys.stderr))
    return code


def split_assignment(text: str, what: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"{what} {text!r} is not KEY=VALUE")
    return key.strip(), value.strip()


def get_op(name: str):
    """The op, or UsageError listing the known ops."""
    from kernmux.dispatch.registry import REGISTRY, UnknownOpError

    try:
        return REGISTRY.op(name)
    except UnknownOpError as e:
        raise UsageError(str(e)) from None


def parse_feature_args(op, items: Sequence[str], *, device: str | None = None, sweep: bool = True) -> list[dict[str, Any]]:
    """``["tokens=1,16", "dtype=bf16"]`` -> the cartesian product of feature dicts,
    filled with the op's defaults. Unknown features raise UsageError listing the op's."""
    values: dict[str, list[Any]] = {}
    for item in items:
        key, text = split_assignment(item, "feature")
        try:
            spec = op.spec(key)
        except KeyError:
            raise UsageError(f"unknown feature {key!r} for op {op.name}; features: {', '.join(op.feature_names)}") from None
        parts = [p for p in text.split(",") if p.strip()] if sweep else [text]
        if not parts:
            raise UsageError(f"feature {key!r} has no value")
        try:
            values[key] = [spec.parse(p.strip()) for p in parts]
        except ValueError as e:
            raise UsageError(str(e)) from None
    base = op.default_features(device or "cpu")
    if "device" in values:
        base["device"] = values.pop("device")[0]
    elif device is not None:
        base["device"] = device
    keys = list(values)
    combos = []
    for combo in itertools.product(*(values[k] for k in keys)):
        feats = dict(base)
        feats.update(zip(keys, combo))
        combos.append(feats)
    return combos


def parse_platform_args(platform_items: Sequence[str], lib_items: Sequence[str]):
    """``--platform k=v`` and ``--lib name=version`` (``name=none`` = not installed)."""
    from kernmux.dispatch.platform import PLATFORM_KEYS, VENDORS, current_platform

    fields: dict[str, str] = {}
    for item in platform_items:
        key, value = split_assignment(item, "--platform")
        if key not in PLATFORM_KEYS:
            raise UsageError(f"unknown platform key {key!r}; expected one of {', '.join(PLATFORM_KEYS)}")
        if key == "vendor" and value not in VENDORS:
            raise UsageError(f"vendor must be one of {', '.join(VENDORS)}, got {value!r}")
        if key == "units" and not value.isdigit():
            raise UsageError(f"units must be an integer, got {value!r}")
        fields[key] = value
    libs: dict[str, str | None] = {}
    for item in lib_items:
        key, value = split_assignment(item, "--lib")
        libs[key] = None if value.lower() in ("none", "null", "") else value
        if libs[key] is not None:
            from packaging.version import InvalidVersion, Version

            try:
                Version(value)
            except InvalidVersion:
                raise UsageError(f"--lib {key}: {value!r} is not a PEP 440 version") from None
    base = current_platform()
    if fields.get("vendor") and fields["vendor"] != base.vendor and "arch" not in fields:
        raise UsageError("--platform vendor=... also needs --platform arch=... (e.g. arch=gfx950)")
    if fields.get("vendor") and fields["vendor"] != base.vendor and "device" not in fields:
        fields["device"] = f"what-if {fields['vendor']} {fields.get('arch', '')}".strip()
    return base.with_overrides(fields, libs)


def format_features(features: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in features.items())


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
