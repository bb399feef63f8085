"""What the resolver needs from a tuning database: a source it is handed, never one it opens.

Implemented by :class:`kernmux.tuning_db.storage.source.TuningSource`; wired in by
:mod:`kernmux.runtime`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from kernmux.dispatch.platform import Platform


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
