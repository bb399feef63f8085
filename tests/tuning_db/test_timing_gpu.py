"""The timing routine and the ceilings on a real CUDA device (``gpu`` marker: skipped
without one; the GPU machine runs them).

These check the measuring instruments, not kernels, with bounds wide enough for any
idle GPU: CUDA events must time a kernel of known duration (``torch.cuda._sleep``, whose
duration the host clock establishes over a long batch) about as long as it runs; graph
replay must never report more per call than eager events do (it removes the launch);
the L2 flush must cover the whole L2; the measured ceilings must be positive, finite,
physically plausible and stored.
"""

from __future__ import annotations

import math
import time

import pytest

torch = pytest.importorskip("torch")

from kernmux.tuning_db.measurement import ceilings as ceilings_module  # noqa: E402
from kernmux.tuning_db.measurement.timing import _l2_flush_buffer, measure  # noqa: E402

pytestmark = pytest.mark.gpu

FAST = {"warmup_ms": 5.0, "rep_ms": 50.0}


def _cycles_per_ms() -> float:
    """GPU sleep cycles per millisecond, from the host clock over a long batch of sleeps."""
    cycles = 2_000_000
    torch.cuda._sleep(cycles)  # first launch pays the set-up
    torch.cuda.synchronize()
    batch = 20
    start = time.perf_counter()
    for _ in range(batch):
        torch.cuda._sleep(cycles)
    torch.cuda.synchronize()
    per_sleep_ms = (time.perf_counter() - start) * 1e3 / batch
    return cycles / per_sleep_ms


def test_events_time_a_sleep_kernel_about_as_long_as_it_sleeps():
    cycles = int(_cycles_per_ms())  # ~1 ms of sleep
    t = measure(lambda: torch.cuda._sleep(cycles), device="cuda", flush_l2=False, **FAST)
    assert t.method == "cuda-events" and math.isfinite(t.p50_us)
    assert 800 <= t.p50_us <= 1250, f"a ~1000 us sleep timed as {t.p50_us:.1f} us"
    assert t.p20_us <= t.p50_us <= t.p80_us
    double = measure(lambda: torch.cuda._sleep(2 * cycles), device="cuda", flush_l2=False, **FAST)
    assert 1.7 <= double.p50_us / t.p50_us <= 2.3, "twice the sleep, twice the time"


def test_graph_replay_times_the_kernel_and_not_the_launch():
    cycles = int(_cycles_per_ms() / 10)  # ~100 us
    events = measure(lambda: torch.cuda._sleep(cycles), device="cuda", flush_l2=False, **FAST)
    graph = measure(lambda: torch.cuda._sleep(cycles), device="cuda", cuda_graph=True, **FAST)
    assert graph.method == "cuda-graph" and math.isfinite(graph.p50_us) and graph.p50_us > 0
    assert 0.8 <= graph.p50_us / events.p50_us <= 1.2, (graph.p50_us, events.p50_us)

    x = torch.zeros(1024, device="cuda")
    tiny_events = measure(lambda: x.add_(1), device="cuda", flush_l2=False, **FAST)
    tiny_graph = measure(lambda: x.add_(1), device="cuda", cuda_graph=True, **FAST)
    assert 0 < tiny_graph.p50_us <= tiny_events.p50_us * 1.2, (tiny_graph.p50_us, tiny_events.p50_us)
    assert tiny_graph.p50_us < 50, "a 1024-element add replayed from a graph takes microseconds"


def test_the_l2_flush_buffer_covers_the_whole_l2():
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    l2 = getattr(props, "L2_cache_size", 0)
    assert l2 > 0, "torch reports the L2 size of this GPU"
    buf = _l2_flush_buffer(device)
    assert buf.is_cuda and buf.numel() * buf.element_size() >= 2 * l2
    assert _l2_flush_buffer(device) is buf, "allocated once per device"


def test_ceilings_are_measured_here_positive_plausible_and_stored(sqlite_url):
    from kernmux.tuning_db.storage.ceiling_store import latest_ceilings
    from kernmux.tuning_db.storage.store import TuningStore

    ceilings_module.forget_cached()
    try:
        measured, why = ceilings_module.device_ceilings(db_url=sqlite_url, remeasure=True)
        assert measured is not None, why
        assert math.isfinite(measured.bandwidth_tbs) and 0.05 < measured.bandwidth_tbs < 50
        assert math.isfinite(measured.tflops) and 1 < measured.tflops < 20000
        assert measured.source.startswith("measured now, stored in")
        assert measured.method["copy"]["bytes"] == 2 << 30 and measured.method["matmul"]["n"] == 8192
        with TuningStore(sqlite_url) as store:
            row = latest_ceilings(store, measured.fingerprint)
        assert (row.bandwidth_tbs, row.tflops) == (measured.bandwidth_tbs, measured.tflops)
        ceilings_module.forget_cached()
        again, _ = ceilings_module.device_ceilings(db_url=sqlite_url)
        assert again.source.startswith("tuning database") and again.tflops == measured.tflops
    finally:
        ceilings_module.forget_cached()


def test_bench_on_cuda_reports_a_fraction_of_the_measured_roofline(sqlite_url):
    from kernmux.tuning_db.measurement.bench import bench
    from tests.tuning_db import fault_kernels

    fault_kernels.register()
    ceilings_module.forget_cached()
    try:
        feats = [{"n": 1 << 24, "device": "cuda"}]  # 128 MB moved: past any L2
        rows, ceilings = bench(fault_kernels.OP, feats, ["torch", "good"], db_url=sqlite_url, **FAST)
        assert ceilings is not None and ceilings.device == torch.cuda.get_device_name()
        for row in rows:
            assert row.status == "ok", row.error
            assert row.floor_us == pytest.approx(ceilings.floor_us(fault_kernels._roofline(row.features, None)))
            assert 0 < row.fraction <= 1.2, f"{row.kernel}: {row.fraction:.2f} of the measured roofline"
    finally:
        ceilings_module.forget_cached()
