"""Trustworthy CPU timing: one intra-op thread, dispersed timings re-measured and flagged,
dispersed rows never "best". No assertion here is about how fast anything is."""

from __future__ import annotations

import pytest
import torch

from kernmux.dispatch.platform import current_platform
from kernmux.tuning_db.measurement.timing import Timing
from kernmux.tuning_db.measurement.trial import CPU_TIMING_THREADS, TIMING_ATTEMPTS, TrialSpec, run_trial, timed
from kernmux.tuning_db.storage.dispersion import DISPERSION_BOUND, dispersion, is_dispersed
from kernmux.tuning_db.storage.selection import choose_best


pytestmark = pytest.mark.dispersion_gate  # the shipped bound, not the suite's


TIGHT = Timing(10.0, 9.8, 10.4, 100, "cpu-clock")
WIDE = Timing(20.0, 9.0, 400.0, 100, "cpu-clock")
WIDER = Timing(20.0, 9.0, 900.0, 100, "cpu-clock")


def _takes(*timings):
    it = iter(timings)
    seen = []

    def take():
        seen.append(torch.get_num_threads())
        return next(it)

    return take, seen


def test_cpu_timing_runs_on_one_thread_and_restores_the_callers():
    original = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        take, seen = _takes(TIGHT)
        timing, metrics = timed(take, "cpu")
        assert seen == [CPU_TIMING_THREADS] == [1]
        assert torch.get_num_threads() == 2
        assert metrics == {"dispersion": pytest.approx(10.4 / 9.8), "timing_attempts": 1, "noisy": False, "threads": 1}
    finally:
        torch.set_num_threads(original)


def test_a_dispersed_timing_is_taken_again_and_the_tight_one_kept():
    take, seen = _takes(WIDE, WIDER, TIGHT)
    timing, metrics = timed(take, "cpu")
    assert timing is TIGHT and len(seen) == 3
    assert metrics["timing_attempts"] == 3 and metrics["noisy"] is False


def test_still_dispersed_after_the_attempts_is_flagged_noisy():
    take, seen = _takes(*([WIDER, WIDE] + [WIDER] * TIMING_ATTEMPTS))
    timing, metrics = timed(take, "cpu")
    assert len(seen) == TIMING_ATTEMPTS and timing is WIDE  # the least dispersed of the attempts
    assert metrics["noisy"] is True and metrics["dispersion"] > DISPERSION_BOUND


def test_gpu_timings_leave_threads_alone():
    take, seen = _takes(TIGHT)
    before = torch.get_num_threads()
    _, metrics = timed(take, "cuda")
    assert seen == [before] and "threads" not in metrics


def test_a_cpu_trial_row_says_how_it_was_timed():
    spec = TrialSpec(op="moe_topk_softmax", kernel="torch_topk",
                     features={"tokens": 4, "experts": 16, "topk": 2, "shared": 0, "dtype": "fp32",
                               "renormalize": False, "padding": False, "device": "cpu"},
                     warmup_ms=1, rep_ms=5)
    record = run_trial(spec)
    assert record.status == "ok", record.error
    assert record.metrics["threads"] == 1 and record.metrics["timing_attempts"] >= 1
    assert isinstance(record.metrics["noisy"], bool)
    assert record.metrics["dispersion"] == pytest.approx(record.p80_us / record.p20_us)


def test_dispersion_rule():
    assert dispersion(10.0, 15.0) == 1.5 and dispersion(None, 3.0) is None and dispersion(0.0, 3.0) is None

    class Row:
        def __init__(self, p20, p80, metrics=None):
            self.p20_us, self.p80_us, self.metrics = p20, p80, metrics or {}

    assert not is_dispersed(Row(10.0, 15.0))
    assert is_dispersed(Row(64.0, 16052.0))  # the row the issue found accepted
    assert is_dispersed(Row(10.0, 11.0, {"noisy": True}))
    assert not is_dispersed(Row(None, None))


def test_dispersed_rows_are_never_best(make_trial, platform):
    from kernmux.tuning_db.storage.records import TrialRow

    def row(i, kernel, p50, p20, p80, metrics=None):
        rec = make_trial(kernel=kernel, config={}, p50_us=p50, p20_us=p20, p80_us=p80, metrics=metrics or {})
        return TrialRow(id=i, content_hash=str(i), **rec.__dict__)

    rows = [
        row(1, "torch_compile", 0.1, 0.05, 50.0),  # p80/p20 = 1000: the "359x" row
        row(2, "torch", 30.0, 29.0, 31.0),
        row(3, "torch_topk", 5.0, 4.9, 5.2, {"noisy": True}),
    ]
    best, notes = choose_best(rows, platform)
    assert best.id == 2
    assert any("2 rows ignored, timing dispersed" in n and "torch_compile (1)" in n and "torch_topk (1)" in n for n in notes), notes


def test_current_platform_trials_record_threads_through_the_worker(tmp_path):
    """The same fields come back from an isolated worker (the tuner's path)."""
    from kernmux.tuning_db.measurement.worker import TrialWorker

    spec = TrialSpec(op="moe_topk_softmax", kernel="torch",
                     features={"tokens": 2, "experts": 8, "topk": 2, "shared": 0, "dtype": "fp32",
                               "renormalize": False, "padding": False, "device": "cpu"},
                     warmup_ms=1, rep_ms=5)
    with TrialWorker() as worker:
        record = worker.run(spec, timeout_s=240)
    assert record.status == "ok", record.error
    assert record.metrics["threads"] == 1 and record.fingerprint == current_platform().fingerprint()


@pytest.mark.parametrize("text, bound", [("", 1.5), ("3", 3.0), ("1", 1.0), ("0.5", 1.5), ("nan", 1.5),
                                         ("wide", 1.5), ("inf", float("inf"))])
def test_the_bound_can_be_set_knowingly(monkeypatch, text, bound):
    from kernmux.tuning_db.storage.dispersion import DISPERSION_ENV, dispersion_bound

    monkeypatch.setenv(DISPERSION_ENV, text)
    assert dispersion_bound() == bound

    class Row:
        p20_us, p80_us, metrics = 10.0, 20.0, {}

    assert is_dispersed(Row()) == (2.0 > bound)
