"""What a vLLM hook is, and the runtime guard every replacement function uses.

A replacement calls ``kernmux.ops.<op>`` and, if that raises, logs once, disables the
hook for the rest of the process and answers the call with vLLM's original function:
vLLM then runs as if kernmux were absent. (Failures of a single *kernel* never get
here: kernmux's dispatcher already retries the next kernel; an exception reaching the
hook means kernmux as a whole cannot serve the call.)
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kernmux import stats

log = logging.getLogger("kernmux")


@dataclass(frozen=True)
class HookSpec:
    """One vLLM function that kernmux replaces.

    name: the hook's name in logs, stats and ``KERNMUX_VLLM_HOOKS`` (e.g. "moe_topk.fused").
    op: the kernmux op the replacement calls.
    module, attr: where vLLM defines the function (every imported copy is replaced too).
    params: the leading parameter names the original must have; anything else means
        this vLLM changed the function and the hook is skipped with a log line.
    make(runtime, original) -> replacement.
    replaces: the vLLM code path that stops running, in words (documentation).
    skip_if: optional (module) -> reason string when the hook must not be installed
        (checked once the vLLM module is imported).
    aliases: other names under which modules import the function (``as`` imports).
    """

    name: str
    op: str
    module: str
    attr: str
    params: tuple[str, ...]
    make: Callable[["HookRuntime", Callable[..., Any]], Callable[..., Any]]
    replaces: str
    skip_if: Callable[[Any], str | None] | None = None
    aliases: tuple[str, ...] = ()

    def signature_problem(self, original: Any) -> str | None:
        """None when ``original`` looks like what this hook was written for."""
        if not callable(original):
            return f"{self.module}.{self.attr} is not callable ({type(original).__name__})"
        try:
            names = tuple(inspect.signature(original).parameters)
        except (TypeError, ValueError) as e:
            return f"cannot read the signature of {self.module}.{self.attr}: {e}"
        if names[: len(self.params)] != self.params:
            return (
                f"{self.module}.{self.attr}{inspect.signature(original)} does not start with "
                f"parameters {self.params}"
            )
        return None


class HookRuntime:
    """State shared by one installed hook's replacement calls."""

    __slots__ = ("name", "op", "disabled", "error")

    def __init__(self, name: str, op: str) -> None:
        self.name = name
        self.op = op
        self.disabled = False
        self.error: str | None = None

    def hit(self) -> None:
        stats.record_hook(self.name, "kernmux")

    def passthrough(self) -> None:
        """The call was outside what the kernmux op expresses: vLLM's function ran."""
        stats.record_hook(self.name, "vllm")

    def fail(self, error: BaseException) -> None:
        """kernmux could not serve a call: log once, fall back to vLLM from now on."""
        stats.record_hook(self.name, "fallback")
        if not self.disabled:
            self.disabled = True
            self.error = f"{type(error).__name__}: {error}"
            log.error(
                "kernmux: vLLM hook %s disabled for this process: kernmux.ops.%s raised %s; "
                "vLLM's own implementation runs instead",
                self.name, self.op, self.error, exc_info=error,
            )


def ops_module() -> Any:
    """``kernmux.ops`` (imported on first use: it imports torch)."""
    import kernmux.ops

    return kernmux.ops


def compiling() -> bool:
    """True while torch.compile traces (no try/except fallback possible there)."""
    import torch

    return bool(torch.compiler.is_compiling())
