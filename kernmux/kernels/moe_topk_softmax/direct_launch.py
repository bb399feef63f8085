"""Direct launch of the compiled top-k kernel: Triton's Python launcher skipped after
the first call of a specialisation.

At decode sizes the kernel runs in ~2 us, so an eager call is bound by host work. The
generic ``kernel[grid](...)`` path re-binds all arguments, re-derives Triton's
specialisation key and looks the kernel up on every call. After the first generic
launch of a key, :class:`DirectLauncher` calls the compiled kernel's launcher directly
(the call ``JITFunction.run`` ends in on Triton 3.6 and 3.9).

This is the only module that touches Triton internals: ``CompiledKernel.run``,
``.function``, ``.packed_metadata``, ``.launch_metadata``, the driver's
``get_current_device`` / ``get_current_stream`` and ``triton.knobs.runtime`` launch hooks.
They are checked once; when any is missing (another Triton release) the launcher
disables itself, says why in ``disabled_reason``, and every call takes the public path.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

log = logging.getLogger("kernmux")

_INT32_MAX = 2**31 - 1
_COMPILED_ATTRS = ("run", "function", "packed_metadata", "launch_metadata")


def direct_key(
    stride_t: int, stride_e: int, tokens: int, experts: int, topk: int, num_shared: int,
    renormalize: bool, config: Mapping[str, Any] | None, dtype: Any, pointers: tuple[int, ...],
    device_index: int, has_padding: bool = False,
) -> tuple | None:
    """A key at least as fine as Triton's own specialisation of the top-k kernel.

    It holds the logits dtype, 16-byte alignment of each pointer (logits, weights, ids,
    padding mask), whether a padding mask is read,
    each specialised int (the two strides) as == 1 and divisible by 16 (token and expert
    counts are ``do_not_specialize``), every constexpr through the inputs of the launch
    parameters (the heuristic's token class, experts, k, S, renormalise, config) and the
    current device. None (use the generic path): ints past int32, which Triton passes
    as i64, or no tokens."""
    if tokens < 1 or tokens > _INT32_MAX or not 0 <= stride_t <= _INT32_MAX or not 0 <= stride_e <= _INT32_MAX:
        return None
    return (
        min((tokens - 1).bit_length(), 11),  # triton_config.heuristic_tokens_class, inlined
        experts, topk, num_shared, bool(renormalize),
        tuple(config.items()) if config else (), dtype,
        stride_t == 1, stride_t % 16 == 0, stride_e == 1, stride_e % 16 == 0,
        tuple(p % 16 == 0 for p in pointers), bool(has_padding),
        device_index,
    )


class DirectLauncher:
    """Compiled launches keyed by :func:`direct_key`; see the module docstring."""

    def __init__(self) -> None:
        # key -> (rows per program, launcher, function handle, packed metadata, compiled kernel, constexprs)
        self.entries: dict[tuple, tuple[int, Callable[..., Any], Any, Any, Any, tuple]] = {}
        self.disabled_reason = ""
        self._driver: tuple[Any, Any, Any] | None = None

    def driver(self) -> tuple[Any, Any, Any] | None:
        """(current-device getter, current-stream getter, runtime knobs), or None when
        this Triton lacks them (the launcher is then disabled)."""
        if self._driver is None and not self.disabled_reason:
            try:
                import triton

                active = triton.runtime.driver.active
                self._driver = (active.get_current_device, active.get_current_stream, triton.knobs.runtime)
            except Exception as e:  # another Triton: the public launch path still works
                self.disable(f"driver getters unavailable: {type(e).__name__}: {e}")
        return self._driver

    def disable(self, reason: str) -> None:
        if not self.disabled_reason:
            self.disabled_reason = reason
            log.info("kernmux: moe_topk_softmax direct launch off (%s); using Triton's launcher", reason)
        self.entries.clear()

    def launch(self, key: tuple, tokens: int, stream: Any, runtime_args: tuple) -> bool:
        """Launch the compiled kernel for ``key`` on ``stream``; False when not cached.

        runtime_args: the kernel's non-constexpr arguments (tensors, ints), in order."""
        entry = self.entries.get(key)
        if entry is None:
            return False
        rows, run, function, packed, compiled, consts = entry
        args = (*runtime_args, *consts)
        grid_x = (tokens + rows - 1) // rows
        knobs = self._driver[2]  # type: ignore[index]
        enter, leave = knobs.launch_enter_hook, knobs.launch_exit_hook
        # Hooks are None (older Triton) or a HookChain, empty unless a profiler listens.
        if getattr(enter, "calls", enter) or getattr(leave, "calls", leave):
            meta = compiled.launch_metadata((grid_x, 1, 1), stream, *args)  # what the JIT path hands them
            run(grid_x, 1, 1, stream, function, packed, meta, enter, leave, *args)
        else:
            run(grid_x, 1, 1, stream, function, packed, None, None, None, *args)
        return True

    def remember(self, key: tuple | None, compiled: Any, rows: int, consts: tuple) -> None:
        """Cache what a generic launch returned, if it exposes the internals used here."""
        if key is None or self.disabled_reason:
            return
        missing = [a for a in _COMPILED_ATTRS if not hasattr(compiled, a)]
        if missing:
            self.disable(f"compiled kernel lacks {', '.join(missing)}")
            return
        self.entries[key] = (rows, compiled.run, compiled.function, compiled.packed_metadata, compiled, consts)
