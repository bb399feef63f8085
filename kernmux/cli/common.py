"""Helpers shared by subcommands: feature/platform argument parsing, JSON output, errors.

Errors: :func:`fail` prints ``kernmux: error: ...`` on stderr, or — once
:func:`set_json_errors` was called for a ``--json`` run — ``{"error": ..., "code": ...}``
on stdout, so a script reading JSON always gets JSON. Names the user typed (ops, kernels,
``--lib`` distributions, ``KERNMUX_FORCE`` entries) are checked here and a miss suggests
the close names (:func:`suggest`).
"""

from __future__ import annotations

import difflib
import itertools
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

_JSON_ERRORS = False


class UsageError(Exception):
    """Bad command-line input: printed without a traceback, exit code 2."""


def set_json_errors(enabled: bool) -> None:
    """Make :func:`fail` print its error as JSON on stdout (a ``--json`` run)."""
    global _JSON_ERRORS
    _JSON_ERRORS = bool(enabled)


def add_json_flag(parser) -> None:
    parser.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout (errors too)")


def needs_subcommand(parser):
    """Handler of a command group run without its subcommand: help, or a JSON error."""

    def handler(args) -> int:
        if _JSON_ERRORS:
            return fail(f"{parser.prog} needs a subcommand; see `{parser.prog} --help`")
        parser.print_help()
        return 2

    return handler


def add_import_flag(parser) -> None:
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (a module registering extra ops or kernels); repeatable")


def import_modules(names: Sequence[str]) -> None:
    """Import each ``--import`` module; UsageError naming the one that fails."""
    import importlib
    import traceback

    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise UsageError(f"--import {name}: {e}") from None
        except Exception as e:  # the module itself raised: say where
            where = traceback.extract_tb(e.__traceback__)[-1]
            raise UsageError(f"--import {name}: {type(e).__name__}: {e} (at {where.filename}:{where.lineno})") from None


# The optional distributions the tuning database needs (the ``tuning`` extra).
TUNING_EXTRA = ("sqlalchemy", "alembic", "optuna")
INSTALL_TUNING = "pip install -e '.[tuning]' in the kernmux clone ('.[tuning,postgres]' for PostgreSQL)"


def tuning_extra_problem() -> str:
    """"" when the tuning database's libraries are importable, else what to install."""
    import importlib.util

    missing = [name for name in TUNING_EXTRA if importlib.util.find_spec(name) is None]
    if not missing:
        return ""
    return f"the tuning database needs the 'tuning' extra ({', '.join(missing)} not installed): {INSTALL_TUNING}"


def suggest(name: str, known: Iterable[str]) -> str:
    """" (did you mean 'x'?)" for the close names among ``known``, else ""."""
    close = difflib.get_close_matches(name, sorted(set(known)), n=3, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


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
    """Report an error (stderr, or JSON on stdout in a ``--json`` run); returns ``code``."""
    if _JSON_ERRORS:
        print_json({"error": message, "code": code})
    else:
        sys.stderr.write(printable(f"kernmux: error: {message}\n", sys.stderr))
    return code


def split_assignment(text: str, what: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"{what} {text!r} is not KEY=VALUE")
    return key.strip(), value.strip()


def get_op(name: str):
    """The op, or UsageError listing the known ops (and the close ones)."""
    from kernmux.dispatch.registry import REGISTRY, UnknownOpError

    try:
        return REGISTRY.op(name)
    except UnknownOpError as e:
        raise UsageError(f"{e}{suggest(name, e.known)}") from None


def check_op_filter(name: str | None, stored: Iterable[str] = ()) -> None:
    """``--op NAME`` of a command that filters stored rows: NAME must be a registered op
    or one the database holds rows of (an op of a plugin not imported here)."""
    if name is None:
        return
    from kernmux.dispatch.registry import REGISTRY

    REGISTRY.ensure_loaded()
    known = set(REGISTRY.ops) | set(stored)
    if name not in known:
        raise UsageError(f"unknown op {name!r}{suggest(name, known)}; known ops: {', '.join(sorted(known)) or '(none)'}")


def stored_ops(store: Any) -> set[str]:
    """The ops a tuning store holds rows of."""
    return {entry["op"] for entry in store.summary()["by_kernel"]}


def get_kernels(op, text: str | None) -> tuple[str, ...] | None:
    """``--kernels a,b`` checked against the op's kernels (None when not given)."""
    if not text:
        return None
    from kernmux.dispatch.registry import REGISTRY

    names = tuple(k.strip() for k in text.split(",") if k.strip())
    known = REGISTRY.kernels_of(op.name)
    for name in names:
        if name not in known:
            raise UsageError(f"op {op.name} has no kernel {name!r}{suggest(name, known)}; kernels: {', '.join(sorted(known))}")
    return names


def check_force(text: str | None = None) -> dict[str, str]:
    """``KERNMUX_FORCE`` parsed and checked: every entry ``op=kernel`` names a registered
    op and one of its kernels (UsageError with suggestions otherwise)."""
    import os

    from kernmux.dispatch.registry import REGISTRY
    from kernmux.dispatch.resolver import parse_force

    text = os.environ.get("KERNMUX_FORCE", "") if text is None else text
    try:
        force = parse_force(text)
    except ValueError as e:
        raise UsageError(f"{e} (expected KERNMUX_FORCE=\"op=kernel[,op=kernel]\")") from None
    REGISTRY.ensure_loaded()
    for op_name, kernel in force.items():
        if op_name not in REGISTRY.ops:
            raise UsageError(f"KERNMUX_FORCE names unknown op {op_name!r}{suggest(op_name, REGISTRY.ops)}; "
                             f"known ops: {', '.join(sorted(REGISTRY.ops))}")
        kernels = REGISTRY.kernels_of(op_name)
        if kernel not in kernels:
            raise UsageError(f"KERNMUX_FORCE: op {op_name} has no kernel {kernel!r}{suggest(kernel, kernels)}; "
                             f"kernels: {', '.join(sorted(kernels))}")
    return force


def resolve_device(requested: str | None) -> str:
    """``--device``: "cpu" or "cuda" (default: cuda when a GPU is present). Asking for
    cuda where torch sees no GPU is a usage error, not a traceback."""
    import torch

    if requested is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = requested.strip().lower()
    if device.split(":")[0] not in ("cpu", "cuda"):
        raise UsageError(f"--device must be cpu or cuda, got {requested!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        why = "this torch build has no CUDA support" if torch.version.cuda is None and torch.version.hip is None else "torch sees no GPU"
        raise UsageError(f"--device {requested}: {why} (torch {torch.__version__}); use --device cpu")
    return device.split(":")[0]


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
        try:
            op.validate_features(feats)
        except ValueError as e:
            given = format_features({k: feats[k] for k in keys})
            raise UsageError(f"{op.name} {given}: {e}" if given else f"{op.name}: {e}") from None
        combos.append(feats)
    return combos


def defaulted_features(op, items: Sequence[str]) -> list[str]:
    """The op's features that ``items`` (``feat=value`` arguments) leave at their default."""
    given = {item.partition("=")[0].strip() for item in items}
    return [spec.name for spec in op.feature_specs if spec.name not in given]


# What a what-if platform's device is called when only vendor/arch were given.
UNSPECIFIED_DEVICE = "unspecified"


def vendor_of_arch(arch: str) -> str | None:
    """The vendor an arch name belongs to: gfx* -> rocm, sm_* -> cuda, cpu -> cpu."""
    lowered = arch.lower()
    if lowered.startswith("gfx"):
        return "rocm"
    if lowered.startswith("sm_"):
        return "cuda"
    if lowered == "cpu":
        return "cpu"
    return None


def parse_platform_args(platform_items: Sequence[str], lib_items: Sequence[str], notes: list[str] | None = None):
    """``--platform k=v`` and ``--lib name=version`` (``name=none`` = not installed).

    An arch without a vendor implies the vendor (gfx* rocm, sm_* cuda); what was implied
    is appended to ``notes``. ``--lib`` names are checked by :func:`check_lib_names`."""
    from kernmux.dispatch.platform import PLATFORM_KEYS, VENDORS, current_platform

    notes = [] if notes is None else notes
    fields: dict[str, str] = {}
    for item in platform_items:
        key, value = split_assignment(item, "--platform")
        if key not in PLATFORM_KEYS:
            raise UsageError(f"unknown platform key {key!r}{suggest(key, PLATFORM_KEYS)}; expected one of {', '.join(PLATFORM_KEYS)}")
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
    if "arch" in fields:
        implied = vendor_of_arch(fields["arch"])
        if "vendor" not in fields:
            if implied is None:
                raise UsageError(f"cannot tell the vendor of arch {fields['arch']!r}; add --platform vendor=cuda|rocm|cpu")
            fields["vendor"] = implied
            if implied != base.vendor:
                notes.append(f"--platform arch={fields['arch']} implies vendor={implied}")
        elif implied is not None and implied != fields["vendor"]:
            raise UsageError(f"arch {fields['arch']!r} is a {implied} arch, but --platform vendor={fields['vendor']}")
    if fields.get("vendor") and fields["vendor"] != base.vendor:
        if "arch" not in fields:
            raise UsageError("--platform vendor=... also needs --platform arch=... (e.g. arch=gfx950)")
        fields.setdefault("device", UNSPECIFIED_DEVICE)
    return base.with_overrides(fields, libs)


def _canonical_dist(name: str) -> str:
    import re

    return re.sub(r"[-_.]+", "-", name).lower()


def check_lib_names(names: Iterable[str], rules: Any = None) -> None:
    """``--lib`` names must be distributions kernmux knows of: installed here, required
    by a registered kernel, or named in a rule's ``libs`` condition. UsageError with
    close names otherwise (``aiter`` -> ``amd-aiter``)."""
    import importlib.metadata

    from kernmux.dispatch.platform import ALIASES, BASE_LIBS, installed_version
    from kernmux.dispatch.registry import REGISTRY

    known = set(BASE_LIBS) | set(ALIASES) | set(REGISTRY.tracked_libs())
    for rule in getattr(rules, "rules", ()) or ():
        known.update(cond.key for cond in rule.when if cond.kind == "lib")
    canonical = {_canonical_dist(k) for k in known}
    for name in names:
        if _canonical_dist(name) in canonical or installed_version(name) is not None:
            continue
        installed = {dist.metadata["Name"] for dist in importlib.metadata.distributions() if dist.metadata["Name"]}
        hint = suggest(name, known) or suggest(name, installed)
        raise UsageError(f"--lib {name}: not a distribution kernmux knows of (not installed here, not required by a "
                         f"kernel, not named in a rule){hint}; distributions kernels require: {', '.join(sorted(REGISTRY.tracked_libs()))}")


def format_features(features: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in features.items())


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
