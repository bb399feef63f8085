"""The one numerics check: is this kernel right on fresh inputs?

Used by ``kernmux verify`` (:mod:`kernmux.dispatch.verify`), the tuner's and ``bench``'s
trials (:mod:`kernmux.tuning_db.measurement.trial`) and the benchmarks' parity checks:

1. draw inputs with ``op.make_inputs(features, device, seed)`` (or, with
   ``nonfinite=True``, the op's ``make_nonfinite_inputs``: NaN/inf placed where the op
   says they must propagate);
2. run the reference on clones (a kernel or reference writing into its inputs must not
   make the other look right);
3. run the bound kernel (config baked in, optional transform) positionally, as the hot
   path calls it, with its outputs poisoned (:func:`kernmux.dispatch.outputs.poisoned_outputs`:
   an element it forgets to write is NaN / int-min), then synchronize the device so an
   asynchronous fault belongs to this call;
4. judge with ``op.compare``.

The result keeps the inputs and the callable (not the outputs) so a trial can time
exactly the call that was checked.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kernmux.dispatch.outputs import poisoned_outputs
from kernmux.dispatch.transforms import apply_transform

if TYPE_CHECKING:
    from kernmux.dispatch.registry import Kernel, Op
    from kernmux.dispatch.rule_model import TransformSpec

# Outcomes: "pass", "fail" (outputs differ from the reference beyond the op's
# tolerance), "error" (the kernel raised; ``error`` holds the exception),
# "unsupported" (non-finite inputs asked of an op that cannot make them).
STATUSES = ("pass", "fail", "error", "unsupported")


@dataclass(frozen=True)
class NumericsResult:
    """The outcome of one check.

    metrics: ``Comparison.metrics`` (op-specific error measures; empty unless compared).
    detail: what failed, in words ("" on a pass).
    error: the exception the kernel (or its binding/transform) raised, status "error".
    inputs: the positional arguments the kernel was called with (after the check they
        still hold the inputs: the reference ran on clones).
    fn: the callable that was checked (bound config, transform applied); None when it
        could not be built. ``call()`` repeats the checked call.
    seconds: wall time of the whole check, inputs included.
    """

    status: str
    metrics: Mapping[str, Any] = field(default_factory=dict)
    detail: str = ""
    error: BaseException | None = None
    inputs: tuple[Any, ...] = ()
    fn: Callable[..., Any] | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.status == "pass"

    def call(self) -> Any:
        """Call the checked callable on the checked inputs again (for timing)."""
        if self.fn is None:
            raise RuntimeError(f"no callable to repeat: the check ended with status {self.status!r}")
        return self.fn(*self.inputs)


def cloned(value: Any) -> Any:
    """A deep copy of the tensors in ``value`` (tuples, lists and dicts walked); other
    values are returned as they are."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (tuple, list)):
        return type(value)(cloned(v) for v in value)
    if isinstance(value, dict):
        return {k: cloned(v) for k, v in value.items()}
    return value


def synchronize(device: Any) -> None:
    """Wait for the device's queued work (CUDA); a no-op on CPU."""
    if str(device).startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def check_call(
    op: Op,
    fn: Callable[..., Any],
    inputs: tuple[Any, ...],
    features: Mapping[str, Any],
    *,
    device: Any = None,
    expected: Any = None,
    precision: str | None = None,
) -> NumericsResult:
    """Check ``fn(*inputs)`` against the reference (steps 2-4 above).

    inputs: the op's arguments in the reference's parameter order (``op.positional``).
    device: where the inputs live (default: ``features["device"]``); synchronized after
        the call.
    expected: the reference's outputs when the caller already has them (several
        kernels checked on one input set); otherwise the reference runs on clones.
    precision: the kernel's precision class; a coarser class is judged against its own
        reference and tolerance (``op.reference_for`` / ``op.compare_for``).
    Exceptions from the reference propagate (they are not the kernel's fault);
    exceptions from ``fn`` are the result (status "error")."""
    start = time.perf_counter()
    device = features.get("device", "cpu") if device is None else device
    if expected is None:
        expected = op.reference_for(precision)(*cloned(inputs))
    try:
        with poisoned_outputs():
            got = fn(*inputs)
        synchronize(device)
    except Exception as e:  # a kernel failure is a result
        return NumericsResult("error", detail=f"{type(e).__name__}: {e}", error=e, inputs=inputs, fn=fn,
                              seconds=time.perf_counter() - start)
    comparison = op.compare_for(precision)(got, expected, features)
    return NumericsResult(
        "pass" if comparison.passed else "fail",
        metrics=dict(comparison.metrics),
        detail=comparison.detail,
        inputs=inputs,
        fn=fn,
        seconds=time.perf_counter() - start,
    )


def check_numerics(
    op: Op,
    kernel: Kernel,
    features: Mapping[str, Any],
    *,
    device: Any = None,
    seed: int = 0,
    config: Mapping[str, Any] | None = None,
    transform: TransformSpec | None = None,
    nonfinite: bool = False,
) -> NumericsResult:
    """Check ``kernel`` (with ``config`` and ``transform``) on fresh inputs of ``features``.

    device: the torch device of the inputs ("cpu", "cuda", "cuda:1"; default
        ``features["device"]``). seed: seeds the input draw.
    nonfinite: draw inputs with the op's ``make_nonfinite_inputs(features, device, seed)``
        (an optional Op attribute; status "unsupported" when the op has none).
    Exceptions from drawing inputs or from the reference propagate; the kernel's are the
    result (status "error"). Support is not checked here: callers decide what to skip."""
    start = time.perf_counter()
    device = features.get("device", "cpu") if device is None else device
    make = op.make_inputs
    if nonfinite:
        make = getattr(op, "make_nonfinite_inputs", None)
        if make is None:
            return NumericsResult("unsupported", detail=f"op {op.name} declares no make_nonfinite_inputs")
    args, kwargs = make(features, device, seed)
    inputs = op.positional(args, kwargs)
    try:
        fn = kernel.bind(config)
        if transform:
            fn = apply_transform(fn, op, transform)
    except Exception as e:
        return NumericsResult("error", detail=f"{type(e).__name__}: {e}", error=e, inputs=inputs,
                              seconds=time.perf_counter() - start)
    result = check_call(op, fn, inputs, features, device=device, precision=kernel.precision)
    return _with_seconds(result, time.perf_counter() - start)


def _with_seconds(result: NumericsResult, seconds: float) -> NumericsResult:
    import dataclasses

    return dataclasses.replace(result, seconds=seconds)
