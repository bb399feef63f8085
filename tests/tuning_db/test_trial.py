"""One trial: the numerics gate, failure statuses, and isolation in a worker subprocess."""

from __future__ import annotations

import math

import pytest

from kernmux.dispatch.platform import current_platform
from kernmux.tuning_db.measurement.trial import TrialSpec, config_points, json_safe, run_trial
from kernmux.tuning_db.measurement.worker import TrialWorker
from tests.tuning_db import fault_kernels

OP = fault_kernels.OP
FAST = {"warmup_ms": 1.0, "rep_ms": 2.0}


def _spec(kernel: str, n: int = 257, **kw) -> TrialSpec:
    fault_kernels.register()
    return TrialSpec(op=OP, kernel=kernel, features={"n": n, "device": "cpu"}, **{**FAST, **kw})


# Valid (size, config) pairs only: chunk > n is invalid (covered by the unsupported test).
@pytest.mark.parametrize(
    "n, config",
    [(n, c) for n in (1, 7, 1000) for c in ({"chunk": 1, "order": "fwd"}, {"chunk": 3, "order": "rev"}) if c["chunk"] <= n],
)
def test_good_kernel_passes_the_gate_and_is_timed(n, config):
    record = run_trial(_spec("good", n, config=config, seed=n))
    assert record.status == "ok", record.error
    assert record.p50_us > 0 and record.p20_us <= record.p50_us <= record.p80_us and record.reps >= 1
    assert record.metrics["max_abs_err"] <= 1e-5 and record.metrics["nan_count"] == 0
    assert record.config == config and record.bucket == {"n": 1 << max(0, (n - 1).bit_length()), "device": "cpu"}
    platform = current_platform()
    assert record.fingerprint == platform.fingerprint() and record.libs.get("torch") == platform.libs["torch"]


@pytest.mark.parametrize("n", [1, 64, 1001])
@pytest.mark.parametrize(
    "kernel, expected_nan",
    [("nan", lambda n: n), ("wrong", lambda n: 0), ("partial", lambda n: n - n // 2)],
)
def test_wrong_outputs_are_numerics_failed_with_metrics(kernel, expected_nan, n):
    record = run_trial(_spec(kernel, n, seed=n))
    assert record.status == "numerics_failed"
    assert record.p50_us is None, "a kernel that fails the gate is never timed"
    # ``partial`` leaves half its output unwritten: poisoning turns it into NaN.
    assert record.metrics["nan_count"] == expected_nan(n)
    if kernel == "wrong":
        assert record.metrics["max_abs_err"] == pytest.approx(0.5, rel=1e-5)
    else:
        assert record.metrics["max_abs_err"] == "nan"
    assert record.error.startswith("numerics:")


def test_raising_kernel_is_an_error_with_its_class_and_message():
    record = run_trial(_spec("raises"))
    assert record.status == "error"
    assert record.error.startswith("RuntimeError: deliberate failure of a test kernel")


def test_invalid_config_and_unknown_kernel():
    record = run_trial(_spec("good", n=2, config={"chunk": 8}))
    assert record.status == "unsupported" and "invalid" in record.error
    record = run_trial(_spec("good", config={"tile": 8}))
    assert record.status == "unsupported" and "tile" in record.error
    record = run_trial(_spec("no_such_kernel"))
    assert record.status == "error" and "no kernel" in record.error


def test_config_points_respect_config_valid():
    fault_kernels.register()
    from kernmux.dispatch.registry import REGISTRY

    good = REGISTRY.kernels_of(OP)["good"]
    assert len(config_points(good, {"n": 2, "device": "cpu"})) == 4
    assert len(config_points(good, {"n": 100, "device": "cpu"})) == 16
    assert config_points(REGISTRY.kernels_of(OP)["torch"], {"n": 2}) == [{}]


def test_json_safe_spells_non_finite_numbers():
    assert json_safe({"a": float("nan"), "b": math.inf, "c": 1.5, "d": 3, "e": True}) == {
        "a": "nan", "b": "inf", "c": 1.5, "d": 3, "e": True}


def test_worker_survives_abort_segfault_hang_and_raise():
    """Each fault costs one trial; the worker is replaced only when it died."""
    sequence = [
        ("good", "ok"), ("abort", "crashed"), ("good", "ok"), ("segv", "crashed"),
        ("hang", "timeout"), ("good", "ok"), ("raises", "error"), ("nan", "numerics_failed"),
        ("good", "ok"),
    ]
    with TrialWorker(imports=[fault_kernels.__name__]) as worker:
        pids, errors = [], []
        for i, (kernel, expected) in enumerate(sequence):
            record = worker.run(_spec(kernel, seed=i, study="s", trial_number=i), timeout_s=4.0)
            assert record.status == expected, (kernel, record.error)
            assert record.trial_number == i and record.study == "s" and record.kernel == kernel
            pids.append(worker.pid)
            errors.append(record.error or "")
        # abort -> SIGABRT, segv -> SIGSEGV, hang -> killed after the timeout: 3 replacements.
        assert worker.starts == 4
    assert "SIGABRT" in errors[1] and "SIGSEGV" in errors[3] and "no result within 4" in errors[4]
    assert pids[0] is not None and pids[1] is None and pids[4] is None
    # A kernel that raised or failed the gate does not cost the worker.
    assert pids[5] == pids[6] == pids[7] == pids[8] is not None


def test_worker_that_cannot_import_its_modules_is_an_error():
    with TrialWorker(imports=["kernmux_no_such_module_for_test"], start_timeout_s=60) as worker:
        record = worker.run(_spec("good"), timeout_s=10.0)
    assert record.status == "error" and "ModuleNotFoundError" in record.error


def test_launch_bound_problems_prefer_graph_timing():
    """Tiny rooflines are timed by graph replay; large ones by events; CPU never by graphs."""
    from kernmux.dispatch.platform import Platform
    from kernmux.dispatch.registry import REGISTRY
    from kernmux.tuning_db.measurement.timing import prefers_cuda_graph

    h100 = Platform(vendor="cuda", arch="sm_90", device="NVIDIA H100 80GB HBM3", units=132)
    op = REGISTRY.op("toy_attention")
    small = {**op.default_features("cuda")}
    assert op.roofline(small, h100).bytes < 1e6
    assert prefers_cuda_graph(op, small, h100)
    big = {**small, "batch": 4096, "keys": 8192, "dim": 128}
    assert op.roofline(big, h100).floor_us(2.96, 699.0) > 10
    assert not prefers_cuda_graph(op, big, h100)
    assert not prefers_cuda_graph(op, {**small, "device": "cpu"}, h100)
