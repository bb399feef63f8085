"""The one timing routine shared by ``bench``, ``tune`` and ``benchmarks/``.

Protocol (after Triton's ``do_bench``): warm-up for ``warmup_ms``, then repetitions for
``rep_ms``; on CUDA each repetition is bracketed by CUDA events and preceded by an L2
flush (a write over a buffer larger than L2), or — for launch-bound ops — the call is
captured in a CUDA graph and the graph replays are timed. Results: median with p20/p80
in microseconds. On CPU, a monotonic clock around each call.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Timing:
    """Per-call time in microseconds: median, 20th and 80th percentiles."""

    p50_us: float
    p20_us: float
    p80_us: float
    reps: int
    method: str  # "cuda-events", "cuda-graph", "cpu-clock"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _quantiles(samples_us: list[float]) -> tuple[float, float, float]:
    samples = sorted(samples_us)
    if len(samples) == 1:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=10, method="inclusive")
    return statistics.median(samples), q[1], q[7]


_FLUSH: dict[int, torch.Tensor] = {}


def _l2_flush_buffer(device: torch.device) -> torch.Tensor:
    index = device.index if device.index is not None else torch.cuda.current_device()
    buf = _FLUSH.get(index)
    if buf is None:
        l2 = getattr(torch.cuda.get_device_properties(index), "L2_cache_size", 64 << 20)
        # Twice the L2 so that no line of the previous repetition survives.
        buf = torch.empty(max(2 * l2, 64 << 20) // 4, dtype=torch.int32, device=device)
        _FLUSH[index] = buf
    return buf


def measure(
    fn: Callable[[], Any] | Sequence[Callable[[], Any]],
    *,
    device: torch.device | str = "cuda",
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    min_reps: int = 10,
    max_reps: int = 1000,
    flush_l2: bool = True,
    cuda_graph: bool = False,
    graph_batch: int = 20,
) -> Timing:
    """Time ``fn()`` (a closure over prepared inputs) and return per-call quantiles.

    fn: one closure, or several closures over different input sets that are called in
        rotation, so that graph replays (which cannot flush L2 between calls) still read
        inputs that are not L2-resident from the previous call.
    device: where ``fn`` runs; "cpu" times with a monotonic clock.
    flush_l2: flush L2 before each timed repetition (CUDA events path only).
    cuda_graph: capture ``graph_batch`` calls in one CUDA graph and time replays; the
        per-call time is replay time / graph_batch. For launch-bound ops this measures
        what an engine running under CUDA graphs sees. L2 is not flushed between calls
        inside one replay (the inputs of a launch-bound op are tiny).
    """
    device = torch.device(device)
    if not callable(fn):
        fns = list(fn)
        if not fns:
            raise ValueError("measure() needs at least one callable")
        fn = _rotation(fns)
    if device.type == "cpu":
        return _measure_cpu(fn, warmup_ms, rep_ms, min_reps, max_reps)
    if cuda_graph:
        return _measure_graph(fn, warmup_ms, rep_ms, min_reps, max_reps, graph_batch)
    return _measure_events(fn, device, warmup_ms, rep_ms, min_reps, max_reps, flush_l2)


def _rotation(fns: list[Callable[[], Any]]) -> Callable[[], Any]:
    """A closure calling ``fns`` in turn (one per call; captured graphs record each)."""
    if len(fns) == 1:
        return fns[0]
    state = {"i": 0}

    def call() -> Any:
        i = state["i"]
        state["i"] = (i + 1) % len(fns)
        return fns[i]()

    return call


def _measure_cpu(fn, warmup_ms, rep_ms, min_reps, max_reps) -> Timing:
    start = time.perf_counter()
    fn()
    first = time.perf_counter() - start
    deadline = time.perf_counter() + warmup_ms / 1e3
    while time.perf_counter() < deadline:
        fn()
    reps = int(min(max_reps, max(min_reps, (rep_ms / 1e3) / max(first, 1e-7))))
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e6)
    p50, p20, p80 = _quantiles(samples)
    return Timing(p50, p20, p80, reps, "cpu-clock")


def _estimate_ms(fn) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        fn()
    end.record()
    torch.cuda.synchronize()
    return max(start.elapsed_time(end) / 5, 1e-4)


def _measure_events(fn, device, warmup_ms, rep_ms, min_reps, max_reps, flush_l2) -> Timing:
    fn()
    torch.cuda.synchronize()
    est = _estimate_ms(fn)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    reps = int(min(max_reps, max(min_reps, rep_ms / est)))
    flush = _l2_flush_buffer(device) if flush_l2 else None
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        if flush is not None:
            flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    samples = [s.elapsed_time(e) * 1e3 for s, e in zip(starts, ends)]
    p50, p20, p80 = _quantiles(samples)
    return Timing(p50, p20, p80, reps, "cuda-events")


def _measure_graph(fn, warmup_ms, rep_ms, min_reps, max_reps, graph_batch) -> Timing:
    # Warm up on a side stream first (lazy init, autotuning, allocator) as capture requires.
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(graph_batch):
            fn()
    torch.cuda.synchronize()
    est = _estimate_ms(graph.replay)
    for _ in range(max(1, int(warmup_ms / est))):
        graph.replay()
    reps = int(min(max_reps, max(min_reps, rep_ms / est)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        graph.replay()
        ends[i].record()
    torch.cuda.synchronize()
    samples = [s.elapsed_time(e) * 1e3 / graph_batch for s, e in zip(starts, ends)]
    p50, p20, p80 = _quantiles(samples)
    return Timing(p50, p20, p80, reps, "cuda-graph")


def environment_row() -> dict[str, Any]:
    """Who measured: gpu name, versions, timestamp (every benchmark row carries it)."""
    import datetime
    import platform as pyplatform

    from kernmux.dispatch.platform import current_platform

    plat = current_platform()
    return {
        "gpu": plat.device,
        "arch": plat.arch,
        "vendor": plat.vendor,
        "torch": plat.libs.get("torch"),
        "triton": plat.libs.get("triton"),
        "cuda": getattr(torch.version, "cuda", None),
        "python": pyplatform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


# Below this roofline floor an op is launch-bound: one eager launch costs more host time
# than the kernel runs, so CUDA events around a single launch time the host, not the
# kernel. Such problems are timed by CUDA-graph replay (what an engine under graphs sees).
LAUNCH_BOUND_FLOOR_US = 10.0
# The yardstick of that classification: fixed figures (an H100 SXM measurement of
# 2026-11-22: copy 2.96 TB/s, bf16 matmul 699 TFLOP/s), so that one problem is timed by
# the same method on every machine and in every run, and a study never mixes methods.
# A classification threshold only: never a roofline denominator (those are measured on
# the device at hand, :mod:`kernmux.tuning_db.measurement.ceilings`).
LAUNCH_BOUND_YARDSTICK_TBS = 2.96
LAUNCH_BOUND_YARDSTICK_TFLOPS = 699.0


def prefers_cuda_graph(op, features, platform) -> bool:
    """True when ``op`` on ``features`` is launch-bound (see above); never on CPU."""
    if features.get("device", "cpu") == "cpu":
        return False
    floor = op.roofline(features, platform).floor_us(LAUNCH_BOUND_YARDSTICK_TBS, LAUNCH_BOUND_YARDSTICK_TFLOPS)
    return floor < LAUNCH_BOUND_FLOOR_US
