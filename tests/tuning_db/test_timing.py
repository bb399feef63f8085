"""The shared timing routine's CPU clock path: CPU only by design (``device="cpu"`` in
every call, whatever the machine has). The CUDA-event, CUDA-graph and L2-flush paths are
tested in ``test_timing_gpu.py`` (``gpu`` marker)."""

import time

import pytest

from kernmux.tuning_db.measurement.timing import measure


def test_cpu_quantiles_are_ordered_and_plausible():
    t = measure(lambda: time.sleep(0.0005), device="cpu", warmup_ms=2, rep_ms=20, min_reps=10)
    assert t.method == "cpu-clock" and t.reps >= 10
    assert t.p20_us <= t.p50_us <= t.p80_us
    assert 400 <= t.p50_us <= 50_000  # a 0.5 ms sleep, whatever the machine's load


def test_rotation_calls_each_input_set_in_turn():
    calls = []
    measure([lambda: calls.append("a"), lambda: calls.append("b"), lambda: calls.append("c")], device="cpu", warmup_ms=0, rep_ms=1)
    assert calls[:6] == ["a", "b", "c", "a", "b", "c"]
    with pytest.raises(ValueError, match="at least one"):
        measure([], device="cpu")
