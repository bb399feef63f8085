"""The one numerics check (``kernmux.dispatch.numerics``) and its two users, ``verify``
and the tuner's trial, which must judge a kernel the same way."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import pytest
import torch

from kernmux.dispatch.numerics import check_call, check_numerics
from kernmux.dispatch.outputs import empty_output
from kernmux.dispatch.registry import REGISTRY, Comparison, FeatureSpec, HeadAxes, Kernel, Op, Roofline
from kernmux.dispatch.rule_model import TransformSpec
from kernmux.dispatch.verify import verify_kernel
from tests.tuning_db import fault_kernels


def scaled_sum(x: torch.Tensor, w: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
    """x [rows, heads] fp32, w [heads] fp32 -> [rows] = scale * sum_h x[:, h] * w[h]."""
    return scale * (x.double() * w.double()).sum(dim=1).float()


def _make_inputs(features, device, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(features["rows"], features["heads"], generator=gen).to(device)
    w = torch.randn(features["heads"], generator=gen).to(device)
    return (x,), {"w": w}  # w by keyword, scale left to its default


def _compare(out, ref, features):
    same_nan = bool(torch.equal(torch.isnan(out), torch.isnan(ref)))
    finite = ~torch.isnan(ref)
    err = float((out[finite] - ref[finite]).abs().max()) if bool(finite.any()) else 0.0
    metrics = {"max_abs_err": err}
    if not same_nan:
        return Comparison(False, metrics, "NaN positions differ from the reference")
    return Comparison(err <= 1e-4, metrics, "" if err <= 1e-4 else f"max abs error {err:.3g} > 1e-4")


@dataclasses.dataclass(frozen=True)
class _OpWithNonfinite(Op):
    """An Op carrying the optional non-finite input hook (read with getattr by the check)."""

    make_nonfinite_inputs: Callable[..., Any] | None = None


def _nonfinite_inputs(features, device, seed):
    (x,), kwargs = _make_inputs(features, device, seed)
    x[0, 0] = float("nan")
    return (x,), kwargs


OP = Op(
    name="numerics_test_sum",
    doc="TEST ONLY: weighted head sum",
    reference=scaled_sum,
    feature_specs=(FeatureSpec("rows", "int", "rows", 5), FeatureSpec("heads", "int", "heads", 8)),
    features=lambda x, w, scale=2.0: {"rows": x.shape[0], "heads": x.shape[1], "device": x.device.type},
    validate=lambda *a, **k: None,
    make_inputs=_make_inputs,
    compare=_compare,
    fake=lambda x, w, scale=2.0: torch.empty(x.shape[0]),
    bucket=lambda f: dict(f),
    roofline=lambda f, p: Roofline(0.0, 0.0),
    head_axes=HeadAxes(inputs={"x": (1, "zero"), "w": (0, "zero")}, outputs={0: "sum"}),
)
FEATS = {"rows": 5, "heads": 8, "device": "cpu"}


def positional_only(x, w, scale, /):
    """Takes no keywords: only a check that calls kernels as the hot path does can pass it."""
    return scaled_sum(x, w, scale)


def at_most_four_heads(x, w, scale, /):
    if x.shape[1] > 4:
        raise ValueError(f"at most 4 heads, got {x.shape[1]}")
    return scaled_sum(x, w, scale)


def half_written(x, w, scale, /):
    out = empty_output((x.shape[0],), torch.float32, x.device)
    out[: x.shape[0] // 2] = scaled_sum(x, w, scale)[: x.shape[0] // 2]
    return out


def overwrites_its_input(x, w, scale, /):
    result = scaled_sum(x, w, scale)
    x.zero_()
    return result


def _kernel(fn, name=None) -> Kernel:
    return Kernel(op=OP.name, name=name or fn.__name__, impl=fn)


def test_a_correct_kernel_passes_on_the_call_the_hot_path_makes():
    result = check_numerics(OP, _kernel(positional_only), FEATS, seed=3)
    assert result.passed and result.metrics["max_abs_err"] <= 1e-4 and result.error is None
    x, w, scale = result.inputs
    assert scale == 2.0, "keyword inputs and defaults are bound into the positional call"
    assert torch.allclose(result.call(), scaled_sum(x, w, scale)), "call() repeats the checked call"


def test_an_unwritten_output_element_fails_because_outputs_are_poisoned():
    result = check_numerics(OP, _kernel(half_written), FEATS, seed=0)
    assert result.status == "fail" and "NaN" in result.detail


def test_a_raising_kernel_is_an_error_result_with_its_exception():
    result = check_numerics(OP, _kernel(at_most_four_heads), FEATS, seed=0)
    assert result.status == "error" and isinstance(result.error, ValueError) and "at most 4 heads" in result.detail
    assert len(result.inputs) == 3


def test_a_transform_is_applied_before_the_call():
    split = TransformSpec(split_heads=4)
    result = check_numerics(OP, _kernel(at_most_four_heads), FEATS, seed=0, transform=split)
    assert result.passed, result.detail


def test_the_reference_runs_on_copies_of_the_inputs():
    result = check_numerics(OP, _kernel(overwrites_its_input), FEATS, seed=1)
    assert result.passed, "the kernel zeroed x after computing; the reference must not have seen that"
    assert bool((result.inputs[0] == 0).all()), "inputs are the ones the kernel was called with"


def test_reference_failures_propagate():
    broken = dataclasses.replace(OP, reference=lambda x, w, scale=2.0: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        check_numerics(broken, _kernel(positional_only), FEATS)


def test_check_call_reuses_given_reference_outputs():
    x = torch.ones(3, 8)
    w = torch.ones(8)
    expected = torch.full((3,), 16.0)
    assert check_call(OP, positional_only, (x, w, 2.0), FEATS, expected=expected).passed
    assert check_call(OP, positional_only, (x, w, 2.0), FEATS, expected=expected + 1).status == "fail"


def test_nonfinite_inputs_come_from_the_op_hook_when_it_has_one():
    assert check_numerics(OP, _kernel(positional_only), FEATS, nonfinite=True).status == "unsupported"
    fields = {f.name: getattr(OP, f.name) for f in dataclasses.fields(Op)}
    op = _OpWithNonfinite(**{**fields, "make_nonfinite_inputs": _nonfinite_inputs})
    result = check_numerics(op, _kernel(positional_only), FEATS, nonfinite=True)
    assert result.passed and bool(torch.isnan(result.inputs[0]).any())

    def hides_nan(x, w, scale, /):
        return torch.nan_to_num(scaled_sum(x, w, scale), nan=0.0)

    assert check_numerics(op, _kernel(hides_nan), FEATS, nonfinite=True).status == "fail"
    assert check_numerics(op, _kernel(hides_nan), FEATS).passed, "finite inputs: the same kernel is right"


@pytest.mark.parametrize("kernel, verify_status, trial_status", [
    ("good", "pass", "ok"), ("partial", "fail", "numerics_failed"), ("nan", "fail", "numerics_failed"),
    ("wrong", "fail", "numerics_failed"), ("raises", "error", "error"),
])
def test_verify_and_the_trial_judge_a_kernel_alike(kernel, verify_status, trial_status):
    from kernmux.tuning_db.measurement.trial import TrialSpec, run_trial

    fault_kernels.register()
    feats = {"n": 64, "device": "cpu"}
    assert verify_kernel(fault_kernels.OP, kernel, feats, seed=5).status == verify_status
    spec = TrialSpec(op=fault_kernels.OP, kernel=kernel, features=feats, seed=5, warmup_ms=0.1, rep_ms=0.2)
    record = run_trial(spec)
    assert record.status == trial_status
    if kernel == "raises":
        assert "deliberate failure" in record.error and "fault_kernels.py" in record.error, "the trial names where"


def test_verify_passes_the_nonfinite_flag_through():
    fault_kernels.register()
    assert getattr(REGISTRY.op(fault_kernels.OP), "make_nonfinite_inputs", None) is None
    result = verify_kernel(fault_kernels.OP, "good", {"n": 8, "device": "cpu"}, nonfinite=True)
    assert result.status == "unsupported" and "make_nonfinite_inputs" in result.detail
