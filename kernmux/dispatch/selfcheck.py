"""Self-check before first use: a kernel chosen for a bucket is compared with the op's
reference once, on inputs made from the call's features, before its first real call.

``KERNMUX_SELF_CHECK`` = ``auto`` (default: check unless a passing or failing numerics
record for this platform fingerprint, op, bucket, kernel and config exists), ``always``
(check once per process whatever the records say) or ``off``. The result is written to
the verdict store it is handed (the tuning database, by :mod:`kernmux.runtime`), so a
machine checks each (kernel, config, bucket) once, not every process. A failing kernel is
dropped for that bucket and the next survivor is checked in turn.

Never during CUDA-graph capture or torch.compile tracing: the check is skipped there and
the decision says so. The op's reference itself is never checked (it is the semantics).
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import Registry
from kernmux.dispatch.rule_model import TransformSpec

log = logging.getLogger("kernmux")

ENV = "KERNMUX_SELF_CHECK"
MODES = ("auto", "always", "off")


@dataclass(frozen=True)
class Verdict:
    """passed: the kernel matched the reference; detail and metrics say how far it was
    off when it did not; source: where the verdict came from ("checked now", "row 12")."""

    passed: bool
    detail: str = ""
    metrics: Mapping[str, Any] = field(default_factory=dict)
    source: str = ""

    def text(self) -> str:
        if self.passed:
            return f"self-check passed ({self.source})"
        metrics = ", ".join(f"{k}={_short(v)}" for k, v in sorted(self.metrics.items()))
        return f"self-check failed ({self.source}): {self.detail}" + (f" [{metrics}]" if metrics else "")


class VerdictStore(Protocol):
    """Where numerics verdicts persist (the tuning database)."""

    def verdict(
        self, op: str, bucket: Mapping[str, Any], platform: Platform, kernel: str, config: Mapping[str, Any]
    ) -> Verdict | None:
        """The recorded verdict for this (fingerprint, op, bucket, kernel, config), if any."""

    def record_verdict(
        self, op: str, features: Mapping[str, Any], bucket: Mapping[str, Any], platform: Platform,
        kernel: str, config: Mapping[str, Any], verdict: Verdict,
    ) -> str:
        """Persist a verdict; returns where it went (e.g. "row 12")."""


def mode_from_env() -> str:
    mode = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"{ENV}={mode!r}: expected one of {', '.join(MODES)}")
    return mode


def _short(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _config_key(config: Mapping[str, Any]) -> str:
    return json.dumps(dict(config), sort_keys=True, default=str)


def check_blocked() -> str:
    """Why a check cannot run right now ("" when it can)."""
    import torch

    if torch.compiler.is_compiling():
        return "torch.compile is tracing"
    if torch.cuda.is_available() and torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing():
        return "a CUDA graph is being captured"
    return ""


class SelfCheck:
    """Verdicts for decisions: read from the store, or checked now and recorded.

    run: False for what-if dispatchers (explain): they read recorded verdicts only."""

    def __init__(self, mode: str = "auto", store: VerdictStore | None = None, *, run: bool = True,
                 registry: Registry | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"self-check mode {mode!r}: expected one of {', '.join(MODES)}")
        self.mode = mode
        self.store = store
        self.run = run
        self.registry = registry
        self._seen: dict[tuple, Verdict] = {}
        self._lock = threading.Lock()

    def verdict(self, decision: Any, registry: Registry, platform: Platform) -> tuple[Verdict | None, str]:
        """(verdict or None, a note for the decision). None: nothing to hold against the
        kernel (passed, not needed, or skipped; the note says which)."""
        if self.mode == "off":
            return None, ""
        op = registry.op(decision.op)
        kernel = registry.kernels_of(decision.op)[decision.kernel]
        if kernel.impl is op.reference and not decision.transform:
            return None, ""
        bucket = op.bucket(decision.features)
        key = (decision.op, json.dumps(bucket, sort_keys=True, default=str), decision.kernel,
               _config_key(decision.config), decision.transform.text())
        seen = self._seen.get(key)
        if seen is not None:
            return seen, seen.text()
        if self.mode == "auto" and self.store is not None and not decision.transform:
            try:
                recorded = self.store.verdict(decision.op, bucket, platform, decision.kernel, decision.config)
            except Exception as e:  # a broken store must not break dispatch
                log.warning("kernmux: self-check records unreadable: %s", e)
                recorded = None
            if recorded is not None:
                self._seen[key] = recorded
                return recorded, recorded.text()
        if not self.run:
            return None, "not self-checked here (explain reads recorded checks only)"
        blocked = check_blocked()
        if blocked:
            return None, f"self-check skipped: {blocked}"
        with self._lock:
            seen = self._seen.get(key)
            if seen is not None:
                return seen, seen.text()
            verdict = self._check(decision, platform, registry)
            if self.store is not None and not decision.transform:
                try:
                    where = self.store.record_verdict(decision.op, decision.features, bucket, platform,
                                                      decision.kernel, decision.config, verdict)
                    verdict = Verdict(verdict.passed, verdict.detail, verdict.metrics, f"{verdict.source}, recorded as {where}")
                except Exception as e:
                    log.warning("kernmux: self-check result not recorded: %s", e)
            self._seen[key] = verdict
        if not verdict.passed:
            log.warning("kernmux: %s kernel %r failed its self-check for %s: %s; using another kernel",
                        decision.op, decision.kernel, bucket, verdict.detail)
        return verdict, verdict.text()

    def _check(self, decision: Any, platform: Platform, registry: Registry) -> Verdict:
        from kernmux.dispatch.verify import verify_kernel

        seed = random.randrange(2**31)
        result = verify_kernel(
            decision.op, decision.kernel, decision.features, seed=seed, config=decision.config,
            transform=decision.transform or TransformSpec(), platform=platform, registry=registry,
            check_support=False,
        )
        source = f"checked in this process, seed {seed}"
        if result.passed:
            return Verdict(True, "", dict(result.metrics), source)
        return Verdict(False, f"{result.status}: {result.detail}", dict(result.metrics), source)
