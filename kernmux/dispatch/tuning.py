"""What the resolver needs from a tuning database (implemented in kernmux.tuning_db.source)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kernmux.dispatch.platform import Platform

log = logging.getLogger("kernmux")


@dataclass(frozen=True)
class TuningPick:
    """The measured winner for one (platform, op, bucket)."""

    kernel: str
    config: Mapping[str, Any] = field(default_factory=dict)
    row_id: int | str | None = None
    p50_us: float | None = None
    detail: str = ""


class TuningSource(Protocol):
    def lookup(
        self, op: str, bucket: Mapping[str, Any], platform: Platform, allowed: Sequence[str]
    ) -> tuple[TuningPick | None, list[str]]:
        """Fastest validated row among ``allowed`` kernels, plus notes on ignored rows."""


def open_tuning_source(url: str | None) -> tuple[TuningSource | None, str]:
    """The tuning source for ``url`` (or ``KERNMUX_DB``/the default database if it exists).

    Returns (source or None, a note saying why there is none). Never raises: a missing
    or broken database means decisions fall through to the next level."""
    if url is None and not os.environ.get("KERNMUX_DB") and not _default_db_exists():
        return None, "no tuning database (set KERNMUX_DB or pass --db)"
    try:
        from kernmux.tuning_db.source import open_source
    except ImportError as e:
        return None, f"tuning database support not installed ({e.name}); pip install 'kernmux[tuning]'"
    try:
        source = open_source(url)
    except Exception as e:
        log.warning("kernmux: tuning database unusable: %s", e)
        return None, f"tuning database unusable: {type(e).__name__}: {e}"
    if source is None:
        return None, "tuning database is empty or absent"
    return source, ""


def _default_db_exists() -> bool:
    try:
        from kernmux.tuning_db.paths import default_db_path

        return default_db_path().exists()
    except Exception:  # e.g. platformdirs missing: then there is no default database
        return False
