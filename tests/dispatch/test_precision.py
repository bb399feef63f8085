"""Precision classes: a kernel computing something coarser than the op's reference is a
candidate only where a rule allows its class, is checked against its class's own
semantics, and explain shows the class (toy op ``toy_precision``).

The toy op doubles a float32 vector. Its reference class is "exact"; the class "BF16IN"
rounds the input to bfloat16 first (like a kernel that quantizes activations). Kernel
``rounded`` computes that class and has the highest priority, so whenever it is a
candidate it wins.
"""

from __future__ import annotations

import json
import types

import pytest
import torch

from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import (
    REGISTRY,
    Comparison,
    FeatureSpec,
    Op,
    PrecisionClass,
    Roofline,
    register_kernel,
    register_op,
)
from kernmux.dispatch.resolver import NoKernelError, resolve
from kernmux.dispatch.rule_model import RuleSet
from kernmux.dispatch.tuning import TuningPick
from kernmux.dispatch.verify import verify_kernel
from kernmux.rules.loader import RuleError, parse_rules_text

OP = "toy_precision"
FEATS = {"n": 64, "device": "cpu"}
PLATFORM = Platform(vendor="cpu", arch="cpu", device="cpu", units=2, libs={"torch": "2.13.0"})


def double(x: torch.Tensor) -> torch.Tensor:
    """x [n] float32 -> 2 * x [n] float32."""
    return x * 2


def double_bf16_input(x: torch.Tensor) -> torch.Tensor:
    """The BF16IN class: the input rounded to bfloat16, then doubled in float32."""
    return x.to(torch.bfloat16).float() * 2


def _exact_compare(out, ref, features):
    err = (out - ref).abs().max().item()
    return Comparison(err == 0.0, {"max_abs_err": err}, "" if err == 0.0 else f"max abs error {err:.3g} != 0")


def _rounded_compare(out, ref, features):
    err = (out - ref).abs().max().item()
    return Comparison(err <= 1e-6, {"max_abs_err": err}, "" if err <= 1e-6 else f"max abs error {err:.3g} > 1e-6")


def _make_inputs(features, device, seed):
    gen = torch.Generator().manual_seed(seed)
    # Values with more mantissa bits than bfloat16 keeps: the two classes differ.
    return (torch.randn(features["n"], generator=gen).to(device) * 3.0 + 1e-3,), {}


SPEC = types.SimpleNamespace(
    OP_NAME=OP,
    DOC="Test-only op with a coarser precision class.",
    reference=double,
    FEATURE_SPECS=(FeatureSpec("n", "int", "length", 64, minimum=1),),
    features=lambda x: {"n": int(x.shape[0]), "device": x.device.type},
    validate=lambda x: None,
    make_inputs=_make_inputs,
    compare=_exact_compare,
    fake=lambda x: torch.empty_like(x),
    bucket=lambda f: dict(f),
    roofline=lambda f, p: Roofline(bytes=8.0 * f["n"], flops=float(f["n"])),
    PRECISION="exact",
    PRECISION_CLASSES=(PrecisionClass("BF16IN", "input rounded to bfloat16", reference=double_bf16_input, compare=_rounded_compare),),
)


@pytest.fixture(scope="module", autouse=True)
def toy_op():
    register_op(SPEC)
    register_kernel(op=OP, name="torch", impl=double, priority=0, test_only=True)
    register_kernel(op=OP, name="rounded", impl=double_bf16_input, priority=50, precision="BF16IN", test_only=True)
    yield REGISTRY.ops[OP]
    REGISTRY.remove_op(OP)


def rules(text: str) -> RuleSet:
    return RuleSet(tuple(parse_rules_text("version: 1\nrules:\n" + text, "test.yaml")))


ALLOW = """
  - id: allow-bf16-input
    op: toy_precision
    when: {n: ">=32"}
    allow_precision: [BF16IN]
    reason: the engine accepts bf16-rounded inputs here
    link: https://example.org/precision
"""


def candidate(decision, kernel):
    return next(c for c in decision.candidates if c.kernel == kernel)


# --------------------------------------------------------------------------- op and registration


def test_spec_declares_classes(toy_op):
    assert toy_op.precision == "exact" and toy_op.precisions == ("exact", "BF16IN")
    assert toy_op.reference_for("exact") is double and toy_op.reference_for(None) is double
    assert toy_op.reference_for("BF16IN") is double_bf16_input
    assert toy_op.compare_for("BF16IN") is _rounded_compare and toy_op.compare_for("exact") is _exact_compare
    with pytest.raises(ValueError, match="no precision class 'W4A4'.*exact, BF16IN"):
        toy_op.reference_for("W4A4")


def test_kernels_get_the_reference_class_by_default_and_unknown_classes_are_refused(toy_op):
    kernels = REGISTRY.kernels_of(OP)
    assert kernels["torch"].precision == "exact" and kernels["rounded"].precision == "BF16IN"
    with pytest.raises(ValueError, match="declares precision 'FP8'.*exact, BF16IN"):
        register_kernel(op=OP, name="fp8", impl=double, precision="FP8", test_only=True)
    assert "fp8" not in kernels


def test_op_without_declared_classes_is_exact():
    op = Op.from_spec(types.SimpleNamespace(**{k: v for k, v in vars(SPEC).items() if not k.startswith("PRECISION")}))
    assert op.precision == "exact" and op.precisions == ("exact",)


# --------------------------------------------------------------------------- resolution


def test_coarser_class_is_filtered_without_a_rule():
    d = resolve(OP, FEATS, PLATFORM, RuleSet(), force={})
    assert d.kernel == "torch" and d.precision == "exact" and d.reference_precision == "exact"
    rounded = candidate(d, "rounded")
    assert rounded.status == "denied" and rounded.precision == "BF16IN"
    assert "precision BF16IN not allowed for toy_precision" in rounded.reason
    assert "add a rule with allow_precision" in rounded.reason
    assert d.precision_rule is None and "rounded" not in d.fallbacks


def test_allow_rule_admits_the_class_and_explain_names_it():
    d = resolve(OP, FEATS, PLATFORM, rules(ALLOW), force={})
    assert (d.kernel, d.precision, d.precision_rule) == ("rounded", "BF16IN", "allow-bf16-input")
    assert candidate(d, "rounded").status == "chosen"
    assert "allowed by rule allow-bf16-input" in candidate(d, "rounded").reason
    assert candidate(d, "torch").precision == "exact" and d.fallbacks == ("torch",)
    assert ("allow-bf16-input", "allow-bf16-input: allow_precision [BF16IN]") in d.rules
    data = json.loads(json.dumps(d.as_dict()))
    assert data["precision"] == "BF16IN" and data["reference_precision"] == "exact"
    assert data["precision_rule"] == "allow-bf16-input"
    assert {c["kernel"]: c["precision"] for c in data["candidates"]} == {"rounded": "BF16IN", "torch": "exact"}


def test_allow_rule_applies_only_where_it_matches():
    d = resolve(OP, {**FEATS, "n": 16}, PLATFORM, rules(ALLOW), force={})
    assert d.kernel == "torch" and candidate(d, "rounded").status == "denied"


def test_force_and_use_rule_cannot_bypass_the_precision_filter():
    d = resolve(OP, FEATS, PLATFORM, RuleSet(), force={OP: "rounded"})
    assert d.kernel == "torch" and any("KERNMUX_FORCE" in note for note in d.notes)
    use = rules("""
  - id: use-rounded
    op: toy_precision
    use: rounded
    reason: r
    link: https://example.org/x
""")
    d = resolve(OP, FEATS, PLATFORM, use, force={})
    assert d.kernel == "torch" and any("use-rounded" in note for note in d.notes)


class _AlwaysRounded:
    """A tuning source whose fastest row is the coarser kernel."""

    def lookup(self, op, bucket, platform, survivors):
        return TuningPick(kernel="rounded", config={}, detail="fastest measured", row_id=7), []


def test_tuning_row_cannot_pick_a_disallowed_class():
    d = resolve(OP, FEATS, PLATFORM, RuleSet(), tuning=_AlwaysRounded(), force={})
    assert d.kernel == "torch" and any("row 7" in note for note in d.notes)
    d = resolve(OP, FEATS, PLATFORM, rules(ALLOW), tuning=_AlwaysRounded(), force={})
    assert (d.kernel, d.source) == ("rounded", "tuning_db")


def test_no_survivor_error_names_the_precision_filter():
    deny_torch = rules("""
  - id: deny-torch
    op: toy_precision
    deny: [torch]
    reason: r
    link: https://example.org/x
""")
    with pytest.raises(NoKernelError, match="rounded denied: precision BF16IN not allowed"):
        resolve(OP, FEATS, PLATFORM, deny_torch, force={})


# --------------------------------------------------------------------------- numerics by class


def test_verify_checks_each_kernel_against_its_class():
    rounded = verify_kernel(OP, "rounded", FEATS, seed=3, platform=PLATFORM)
    exact = verify_kernel(OP, "torch", FEATS, seed=3, platform=PLATFORM)
    assert rounded.passed and exact.passed
    # The same output judged as the reference class fails: the classes really differ.
    (x,), _ = _make_inputs(FEATS, "cpu", 3)
    assert not _exact_compare(double_bf16_input(x), double(x), FEATS).passed


# --------------------------------------------------------------------------- rule files


@pytest.mark.parametrize(
    "action, message",
    [
        ("allow_precision: [W4A4]", "unknown precision class 'W4A4' for op 'toy_precision'; declared classes: BF16IN"),
        ("allow_precision: exact", "'exact' is the reference class of 'toy_precision', always allowed"),
        ("allow_precision: []", "expects a precision class name or a non-empty list"),
        ("allow_precision: [BF16IN]\n    config: {block: 4}", "'config' is only allowed with 'use' or 'adapt'"),
        ("allow_precision: [BF16IN]\n    deny: [torch]", "has 2 actions"),
    ],
)
def test_allow_precision_errors_name_file_and_line(action, message):
    text = f"version: 1\nrules:\n  - id: r\n    op: toy_precision\n    {action}\n    reason: r\n    link: https://example.org/x\n"
    with pytest.raises(RuleError) as info:
        parse_rules_text(text, "bad.yaml")
    assert message in str(info.value) and str(info.value).startswith("bad.yaml:")


def test_allow_precision_accepts_a_scalar():
    (rule,) = parse_rules_text(
        "version: 1\nrules:\n  - id: r\n    op: toy_precision\n    allow_precision: BF16IN\n    reason: r\n    link: https://example.org/x\n",
        "ok.yaml",
    )
    assert rule.action.kind == "allow_precision" and rule.action.precisions == ("BF16IN",) and rule.action.kernels == ()


def test_explain_text_shows_classes():
    from kernmux.cli.explain import render

    text = render(resolve(OP, FEATS, PLATFORM, rules(ALLOW), force={}))
    assert "precision: BF16IN (coarser than the op's reference class exact; allowed by rule allow-bf16-input)" in text
    assert any(line.split()[:3] == ["rounded", "chosen", "BF16IN"] for line in text.splitlines())
    assert any(line.split()[:3] == ["torch", "allowed", "exact"] for line in text.splitlines())
    plain = render(resolve(OP, FEATS, PLATFORM, RuleSet(), force={}))
    assert "precision: exact (the op's reference class)" in plain
