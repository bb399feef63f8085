"""One trial: is this (kernel, config) right on fresh inputs, and how fast is it?

The numerics gate is the one numerics check (:func:`kernmux.dispatch.numerics.check_numerics`,
shared with ``kernmux verify`` and the benchmarks): fresh seeded inputs from
``op.make_inputs``, the reference on clones, the kernel called as the hot path calls it
with poisoned outputs (an element it forgets to write is NaN / int-min), ``op.compare``.
Only a kernel that passes is timed, on the very call that was checked, with the one
timing routine (:func:`kernmux.tuning_db.measurement.timing.measure`): on CPU with one
intra-op thread (:data:`CPU_TIMING_THREADS`), and a timing whose p80/p20 exceeds
:func:`~kernmux.tuning_db.storage.dispersion.dispersion_bound` is taken again, up to
:data:`TIMING_ATTEMPTS` times; the least dispersed one is recorded, flagged
``metrics["noisy"]`` when even that one is dispersed (kept, never chosen as best).
The row's metrics say how it was timed: ``threads`` (CPU), ``dispersion`` (p80/p20),
``timing_attempts``, ``noisy``.
Every outcome is a :class:`~kernmux.tuning_db.storage.records.TrialRecord`; an exception is a
result (status ``error``), never the end of a sweep.

This module runs a trial in the calling process; :mod:`kernmux.tuning_db.measurement.worker` runs
it in a subprocess so that a kernel that aborts, hangs or poisons the CUDA context
costs one trial.
"""

from __future__ import annotations

import itertools
import os
import math
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kernmux.dispatch.platform import Platform, current_platform
from kernmux.dispatch.registry import REGISTRY, Kernel
from kernmux.tuning_db.storage.dispersion import dispersion, is_dispersed
from kernmux.tuning_db.storage.records import TrialRecord, relevant_libs, storable_text

# Errors are stored as text; a traceback tail is enough to find the line.
_MAX_ERROR_CHARS = 2000
# Intra-op threads while timing on CPU: with several, a short call's time depends on
# whether the other cores are busy (a 20 us call measured at 12-20 ms under load).
CPU_TIMING_THREADS = 1
# Timings of one trial at most when they come out dispersed (the first included).
TIMING_ATTEMPTS = 3


@dataclass(frozen=True)
class TrialSpec:
    """What to run: everything is plain data so it pickles into a worker.

    features: the op's full feature dict, including "device" ("cpu" / "cuda").
    device: the torch device the inputs are made on ("cpu", "cuda", "cuda:1").
    seed: seeds ``make_inputs`` (the tuner passes a fresh seed per trial).
    warmup_ms / rep_ms: the timing budget handed to ``measure``.
    cuda_graph: time CUDA-graph replays instead of single launches; None = decide per
        problem (graph replay when the roofline floor says the op is launch-bound).
    """

    op: str
    kernel: str
    features: Mapping[str, Any]
    config: Mapping[str, Any] = field(default_factory=dict)
    device: str = "cpu"
    seed: int = 0
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    flush_l2: bool = True
    cuda_graph: bool | None = None
    study: str | None = None
    trial_number: int | None = None


def json_safe(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Metrics with NaN/inf spelled as strings: JSON (and PostgreSQL) have no NaN."""
    safe: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or value is None or isinstance(value, str):
            safe[str(key)] = value
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            safe[str(key)] = str(value)
            continue
        if math.isfinite(number):
            safe[str(key)] = int(value) if isinstance(value, int) else number
        else:
            safe[str(key)] = str(number)  # "nan", "inf", "-inf"
    return safe


# Set in a tuning process pinned to one GPU (``kernmux tune --gpus``): that GPU's index as
# the host numbers it, recorded in each row's platform (not in the fingerprint: GPUs of
# one model share their measurements).
GPU_INDEX_ENV = "KERNMUX_GPU_INDEX"


def platform_fields(platform: Platform, requires: Any = ()) -> dict[str, Any]:
    """The fingerprint/platform/libs fields of a record.

    libs: torch, triton and the kernel's provider libraries only (``relevant_libs``), so
    that an unrelated upgrade does not invalidate the measurement. platform: the
    platform's hardware fields, plus ``gpu_index`` in a process pinned by ``--gpus``."""
    info = platform.as_dict()
    info.pop("libs")
    gpu_index = os.environ.get(GPU_INDEX_ENV)
    if gpu_index:
        info["gpu_index"] = gpu_index
    return {
        "fingerprint": platform.fingerprint(),
        "platform": info,
        "libs": relevant_libs(platform, requires),
    }


def base_record(spec: TrialSpec, platform: Platform | None = None, **fields: Any) -> TrialRecord:
    """A record of ``spec`` with the given outcome fields (status, error, ...).

    Used by the worker's parent too, for trials whose process never answered."""
    platform = platform or current_platform()
    try:
        bucket = dict(REGISTRY.op(spec.op).bucket(spec.features))
    except Exception as e:  # a broken bucket() must not lose the trial
        bucket = {"error": f"{type(e).__name__}: {e}"}
    try:
        kernel = REGISTRY.kernels_of(spec.op)[spec.kernel]
        config, requires = full_config(kernel, spec.config), tuple(kernel.requires)
    except Exception:
        config, requires = dict(spec.config), ()
    values: dict[str, Any] = dict(
        op=spec.op,
        kernel=spec.kernel,
        config=config,
        features=dict(spec.features),
        bucket=bucket,
        status="error",
        p50_us=None,
        p20_us=None,
        p80_us=None,
        reps=None,
        metrics={},
        error=None,
        study=spec.study,
        trial_number=spec.trial_number,
        **platform_fields(platform, requires),
    )
    values.update(fields)
    if isinstance(values["error"], str):  # a kernel's message may hold anything; the row must store
        values["error"] = storable_text(values["error"])
    return TrialRecord(**values)


def full_config(kernel: Kernel, config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The kernel's default config overlaid with ``config`` ({} for kernels without a space)."""
    return kernel.full_config(config)


def config_problem(kernel: Kernel, config: Mapping[str, Any], features: Mapping[str, Any]) -> str:
    """Why ``config`` is not a point of the kernel's space for ``features`` ("" if it is)."""
    unknown = sorted(set(config) - set(kernel.config_space))
    if unknown:
        return f"config keys {unknown} not in {kernel.name}'s space {sorted(kernel.config_space)}"
    for key, value in config.items():
        if value not in kernel.config_space[key]:
            return f"config {key}={value!r} not among {list(kernel.config_space[key])}"
    if kernel.config_valid is not None:
        try:
            if not kernel.config_valid(config, features):
                return f"config {dict(config)} invalid for these features"
        except Exception as e:
            return f"config_valid raised {type(e).__name__}: {e}"
    return ""


def config_points(kernel: Kernel, features: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every valid config of ``kernel`` for ``features`` (``[{}]`` when it has no space)."""
    if not kernel.config_space:
        return [{}]
    names = sorted(kernel.config_space)
    points = []
    for values in itertools.product(*(kernel.config_space[n] for n in names)):
        config = dict(zip(names, values))
        if not config_problem(kernel, config, features):
            points.append(config)
    return points


def _error_text(e: BaseException) -> str:
    """"Class: message (at file:line in function)" of the innermost frame."""
    text = f"{type(e).__name__}: {e}"
    frames = traceback.extract_tb(e.__traceback__)
    if frames:
        last = frames[-1]
        text += f" (at {last.filename}:{last.lineno} in {last.name})"
    return text[:_MAX_ERROR_CHARS]


def run_trial(spec: TrialSpec, platform: Platform | None = None) -> TrialRecord:
    """Run one trial in this process and return its record (never raises for kernel faults)."""
    platform = platform or current_platform()
    try:
        op = REGISTRY.op(spec.op)
        kernels = REGISTRY.kernels_of(spec.op)
        if spec.kernel not in kernels:
            return base_record(
                spec, platform, status="error",
                error=f"KeyError: op {spec.op!r} has no kernel {spec.kernel!r}; known: {sorted(kernels)}",
            )
        kernel = kernels[spec.kernel]
        for support in (kernel.availability(platform), kernel.check(spec.features, platform)):
            if not support.ok:
                return base_record(spec, platform, status="unsupported", error=support.reason)
        config = full_config(kernel, spec.config)
        problem = config_problem(kernel, config, spec.features) if kernel.config_space else ""
        if problem:
            return base_record(spec, platform, status="unsupported", error=problem)
        return _gate_and_time(spec, op, kernel, config, platform)
    except Exception as e:
        return base_record(spec, platform, status="error", error=_error_text(e))


def _gate_and_time(spec: TrialSpec, op: Any, kernel: Kernel, config: dict, platform: Platform) -> TrialRecord:
    from kernmux.dispatch.numerics import check_numerics
    from kernmux.tuning_db.measurement.timing import measure, prefers_cuda_graph

    check = check_numerics(op, kernel, spec.features, device=spec.device, seed=spec.seed, config=config)
    if check.status == "error":  # the kernel raised: the record says where
        return base_record(spec, platform, status="error", error=_error_text(check.error))
    metrics = json_safe(check.metrics)
    if not check.passed:
        return base_record(
            spec, platform, status="numerics_failed", metrics=metrics,
            error=f"numerics: {check.detail}"[:_MAX_ERROR_CHARS],
        )
    cuda_graph = spec.cuda_graph if spec.cuda_graph is not None else prefers_cuda_graph(op, spec.features, platform)
    timing, timing_metrics = timed(
        lambda: measure(check.call, device=spec.device, warmup_ms=spec.warmup_ms, rep_ms=spec.rep_ms,
                        flush_l2=spec.flush_l2, cuda_graph=cuda_graph),
        spec.device,
    )
    return base_record(
        spec, platform, status="ok", metrics={**metrics, **timing_metrics}, error=None,
        p50_us=timing.p50_us, p20_us=timing.p20_us, p80_us=timing.p80_us, reps=timing.reps,
    )


def timed(take: Callable[[], Any], device: str, attempts: int = TIMING_ATTEMPTS) -> tuple[Any, dict[str, Any]]:
    """Run the timing ``take()`` (returns a :class:`~kernmux.tuning_db.measurement.timing.Timing`)
    on :data:`CPU_TIMING_THREADS` intra-op threads when ``device`` is a CPU, again while it
    comes out dispersed (at most ``attempts`` times); the least dispersed timing and the
    metrics saying how it was taken."""
    import torch

    on_cpu = torch.device(device).type == "cpu"
    previous = torch.get_num_threads()
    if on_cpu:
        torch.set_num_threads(CPU_TIMING_THREADS)
    try:
        best, tries = take(), 1
        while is_dispersed(best) and tries < attempts:
            again = take()
            tries += 1
            if (dispersion(again.p20_us, again.p80_us) or 0.0) < (dispersion(best.p20_us, best.p80_us) or 0.0):
                best = again
    finally:
        if on_cpu:
            torch.set_num_threads(previous)
    metrics: dict[str, Any] = {
        "dispersion": dispersion(best.p20_us, best.p80_us),
        "timing_attempts": tries,
        "noisy": is_dispersed(best),
    }
    if on_cpu:
        metrics["threads"] = CPU_TIMING_THREADS
    return best, metrics


def cuda_context_broken(device: str) -> str:
    """"" if the CUDA context of ``device`` still works, else the error it now raises.

    Errors such as an illegal memory access are sticky: every later CUDA call in this
    process fails, so the worker must be replaced."""
    import torch

    if torch.device(device).type != "cuda" or not torch.cuda.is_initialized():
        return ""
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device=device).add_(1).item()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return ""
