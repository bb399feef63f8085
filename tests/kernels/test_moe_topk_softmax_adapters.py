"""AITER and vLLM adapters of moe_topk_softmax, without ROCm or vLLM.

AITER: a stand-in ``aiter`` module (tests/kernels/stand_ins/aiter_topk_softmax.py) is put
in ``sys.modules``; the installed amd-aiter version the adapter reads is patched. Checked:
which call form each version and shared count gets, the arguments built for it, and that
the adapter's outputs equal the reference's.

vLLM: ops with the schemas of successive vLLM releases are defined in a test namespace;
the adapter's call plan is read from each schema and the adapter runs against them.

The rules' fused/unfused choice is resolved as a what-if for a gfx950 platform.
CPU-only by nature (stand-ins for libraries this machine cannot run).
"""

from __future__ import annotations

import importlib.util
import pathlib
import sys
import zlib

import pytest
import torch

from kernmux.dispatch.platform import Platform
from kernmux.dispatch.resolver import resolve
from kernmux.dispatch.verify import verify_kernel
from kernmux.kernels.moe_topk_softmax import aiter as aiter_adapter
from kernmux.kernels.moe_topk_softmax import spec
from kernmux.kernels.moe_topk_softmax import vllm as vllm_adapter
from kernmux.kernels.moe_topk_softmax.reference import moe_topk_softmax as reference
from kernmux.rules.loader import load_rules

OP = "moe_topk_softmax"
_STAND_IN = pathlib.Path(__file__).parent / "stand_ins" / "aiter_topk_softmax.py"


def _load_stand_in():
    loader_spec = importlib.util.spec_from_file_location("aiter_topk_softmax_stand_in", _STAND_IN)
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    return module


def _features(tokens, experts, topk, shared, dtype="bf16", renormalize=False, padding=False):
    return {
        "tokens": tokens, "experts": experts, "topk": topk, "shared": shared,
        "dtype": dtype, "renormalize": renormalize, "padding": padding, "device": "cpu",
    }


def _inputs(feats, tag, maker=spec.make_inputs):
    seed = zlib.crc32(repr((tag, sorted(feats.items()))).encode())
    (logits, topk), kwargs = maker(feats, "cpu", seed)
    return logits, topk, kwargs["renormalize"], kwargs["num_shared"]


def _inputs_with_mask(feats, tag, maker=spec.make_inputs):
    seed = zlib.crc32(repr((tag, sorted(feats.items()))).encode())
    (logits, topk), kwargs = maker(feats, "cpu", seed)
    return (logits, topk, kwargs["renormalize"], kwargs["num_shared"], kwargs.get("is_padding"))


@pytest.fixture
def fake_aiter(monkeypatch):
    """Install a stand-in ``aiter``; returns install(version, max_args, **stand-in options)."""
    stand_in = _load_stand_in()

    def install(version: str | None, max_args: int, **options):
        module = stand_in.make_module(max_args, **options)
        monkeypatch.setitem(sys.modules, "aiter", module)
        monkeypatch.setattr(aiter_adapter, "aiter_version", lambda: version)
        return module

    return install


# ------------------------------------------------------------------ version gating


@pytest.mark.parametrize(
    "version,shared,fused",
    [
        ("0.1.12", 1, True), ("0.1.12", 2, True), ("0.1.13", 4, True), ("0.1.20.post1", 8, True),
        ("0.1.12", 3, False), ("0.1.12", 5, False), ("0.1.12", 0, False),
        ("0.1.11", 2, False), ("0.1.7.post2.dev18", 1, False), ("0.1.12.dev3", 2, False),
        (None, 2, False), ("not-a-version", 2, False),
    ],
)
def test_fused_form_needs_0_1_12_and_a_supported_count(version, shared, fused):
    assert aiter_adapter.fused_shared_supported(version, shared) is fused


# ------------------------------------------------------------- argument construction


@pytest.mark.parametrize(
    "version,experts,workspace,honoured",
    [
        ("0.1.12", 256, False, True), ("0.1.12", 512, False, True), ("0.1.3", 512, True, False),
        ("0.1.12", 160, True, False), ("0.1.14", 160, True, False), ("0.1.19", 288, True, False),
        ("0.1.19.post1", 160, True, True), ("0.1.20", 1024, True, True), ("0.1.19", 1024, True, False),
        (None, 160, True, False), (None, 128, False, True),
    ],
)
def test_workspace_path_and_strides_by_version(version, experts, workspace, honoured):
    """moeSoftmax/moeTopK ignore row strides up to v0.1.19 (fixed by 0cad1d3a95, first in
    v0.1.19.post1); single-kernel instances exist for powers of two up to 512 (256
    before v0.1.4)."""
    assert aiter_adapter.workspace_path(experts, version) is workspace
    assert aiter_adapter.strides_honoured(version, experts) is honoured
    assert aiter_adapter.fused_shared_supported(version, 1, experts) is (honoured and version not in ("0.1.3", None))


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("shared", [1, 2, 4, 8])
def test_fused_call_on_0_1_12(fake_aiter, shared, renormalize):
    module = fake_aiter("0.1.12", max_args=7, strided_workspace=False)
    feats = _features(5, 128, 6, shared, renormalize=renormalize)
    logits, topk, renorm, num_shared = _inputs(feats, "fused")
    got = aiter_adapter.moe_topk_softmax(logits, topk, renorm, num_shared, config={"fuse_shared": True})
    [call] = module.calls
    assert call["nargs"] == 7 and call["num_shared"] == shared and call["scoring"] == "sigmoid"
    assert call["need_renorm"] is renormalize and not call["workspace"]
    assert call["gating_shape"] == (5, 128 + shared)  # the whole fused-gate output
    assert call["weights_shape"] == (5, 6 + shared)
    # Routed ids go into the first k columns of the [T, k + S] ids buffer.
    assert call["indices_shape"] == (5, 6) and call["indices_stride"] == (6 + shared, 1)
    result = spec.compare(got, reference(logits, topk, renorm, num_shared), feats)
    assert result.passed, result.detail


@pytest.mark.parametrize(
    "version,max_args,shared,config",
    [
        ("0.1.10", 5, 2, {"fuse_shared": True}),   # 5-argument release
        ("0.1.12", 7, 3, {"fuse_shared": True}),   # count without a fused instantiation
        ("0.1.12", 7, 2, {"fuse_shared": False}),  # a rule asked for the unfused path
        ("0.1.12", 7, 6, {}),
    ],
)
def test_unfused_call(fake_aiter, version, max_args, shared, config):
    module = fake_aiter(version, max_args=max_args)
    feats = _features(7, 288, 8, shared, dtype="fp16", renormalize=True)
    logits, topk, renorm, num_shared = _inputs(feats, "unfused")
    got = aiter_adapter.moe_topk_softmax(logits, topk, renorm, num_shared, config=config)
    [call] = module.calls
    assert call["nargs"] == 5 and call["num_shared"] == 0
    assert call["gating_shape"] == (7, 288) and call["gating_contiguous"]  # routed columns only
    assert call["weights_shape"] == (7, 8) and call["indices_shape"] == (7, 8)
    result = spec.compare(got, reference(logits, topk, renorm, num_shared), feats)
    assert result.passed, result.detail


@pytest.mark.parametrize("version", ["0.1.10", "0.1.12"])
def test_no_shared_experts_is_always_the_5_argument_form(fake_aiter, version):
    module = fake_aiter(version, max_args=5)
    feats = _features(3, 64, 8, 0, dtype="fp32")
    logits, topk, renorm, num_shared = _inputs(feats, "plain")
    got = aiter_adapter.moe_topk_softmax(logits, topk, renorm, num_shared, config={"fuse_shared": True})
    assert [c["nargs"] for c in module.calls] == [5]
    assert spec.compare(got, reference(logits, topk, renorm, num_shared), feats).passed


@pytest.mark.parametrize("version", ["0.1.12", "0.1.14", "0.1.19"])
def test_workspace_path_before_0_1_19_post1_gets_contiguous_buffers(fake_aiter, version):
    """160 experts, S = 1 (Qwen3-Next-like) with the stand-in reproducing the stride bug:
    the fused form would misroute; the adapter takes the unfused form on dense buffers."""
    module = fake_aiter(version, max_args=7, strided_workspace=False)
    feats = _features(9, 160, 8, 1, renormalize=True)
    logits, topk, renorm, num_shared = _inputs(feats, ("strides", version))
    got = aiter_adapter.moe_topk_softmax(logits, topk, renorm, num_shared, config={"fuse_shared": True})
    [call] = module.calls
    assert call["workspace"] and call["nargs"] == 5
    assert call["gating_shape"] == (9, 160) and call["gating_contiguous"]
    assert call["indices_stride"] == (8, 1) and call["weights_shape"] == (9, 8)
    result = spec.compare(got, reference(logits, topk, renorm, num_shared), feats)
    assert result.passed, result.detail

    # The control: the fused call the adapter avoided does route wrongly on this stand-in.
    weights = torch.empty(9, 9)
    ids = torch.empty(9, 9, dtype=torch.int32)
    ids[:, 8:] = 160
    module.topk_softmax(weights, ids[:, :8], torch.empty(9, 8, dtype=torch.int32), logits, True, 1, "sigmoid")
    assert not spec.compare((weights, ids), reference(logits, topk, renorm, num_shared), feats).passed


def test_workspace_path_from_0_1_19_post1_is_fused(fake_aiter):
    module = fake_aiter("0.1.19.post1", max_args=7, strided_workspace=True)
    feats = _features(9, 160, 8, 1, renormalize=True)
    logits, topk, renorm, num_shared = _inputs(feats, "fixed")
    got = aiter_adapter.moe_topk_softmax(logits, topk, renorm, num_shared, config={"fuse_shared": True})
    [call] = module.calls
    assert call["workspace"] and call["nargs"] == 7 and call["indices_stride"] == (9, 1)
    assert spec.compare(got, reference(logits, topk, renorm, num_shared), feats).passed


def test_strided_logits_on_the_workspace_path_without_shared_experts(fake_aiter):
    """No shared experts, a column slice of a wider buffer (row stride > E): dense copy."""
    module = fake_aiter("0.1.14", max_args=7, strided_workspace=False)
    base = torch.randn(6, 170).to(torch.bfloat16)
    logits = base[:, 5:165]
    got = aiter_adapter.moe_topk_softmax(logits, 6, False, 0)
    assert module.calls[0]["gating_contiguous"]
    feats = _features(6, 160, 6, 0)
    assert spec.compare(got, reference(logits, 6, False, 0), feats).passed


@pytest.mark.parametrize("version,experts,strided", [("0.1.14", 160, False), ("0.1.20", 128, True)])
@pytest.mark.parametrize("shared", [0, 2])
def test_aiter_nan_rows_and_padding_follow_the_reference(fake_aiter, version, experts, strided, shared):
    """The stand-in clamps NaN probabilities to 0 and knows no padding mask; the adapter
    restores the reference's rules (NaN weights, ids 0..k-1; id -1 on padded rows)."""
    fake_aiter(version, max_args=7, strided_workspace=strided, nan_to_zero=True)
    feats = _features(7, experts, 6, shared, dtype="fp16", renormalize=True, padding=True)
    args = _inputs_with_mask(feats, "nan", spec.make_nonfinite_inputs)
    got = aiter_adapter.moe_topk_softmax(*args)
    result = spec.compare(got, reference(*args), feats)
    assert result.passed, result.detail
    assert result.metrics["nan_weights"] > 0 and (got[1][-1] == -1).all()


def test_a_7_argument_call_on_an_old_release_is_what_fails(fake_aiter):
    """The stand-in reproduces vLLM #43873, so the unfused path is what avoids it."""
    module = fake_aiter("0.1.10", max_args=5)
    with pytest.raises(TypeError, match="at most 5"):
        module.topk_softmax(*([torch.empty(1, 1)] * 4), False, 1, "sigmoid")


def test_non_contiguous_logits_reach_aiter_with_unit_stride(fake_aiter):
    module = fake_aiter("0.1.12", max_args=7)
    logits = torch.randn(130, 4).to(torch.bfloat16).t()  # [4, 130], stride(1) != 1
    got = aiter_adapter.moe_topk_softmax(logits, 4, False, 2, config={"fuse_shared": True})
    assert module.calls[0]["nargs"] == 7
    torch.testing.assert_close(got[0], reference(logits, 4, False, 2)[0], rtol=1e-5, atol=0)


def test_registered_aiter_kernel_under_verify(fake_aiter):
    """The registry path: config binding, poisoned outputs, op.compare."""
    fake_aiter("0.1.12", max_args=7)
    for shared, config in [(2, {"fuse_shared": True}), (2, {"fuse_shared": False}), (0, None)]:
        result = verify_kernel(
            OP, "aiter", _features(7, 160, 6, shared), seed=shared, config=config, check_support=False
        )
        assert result.passed, f"{result.status}: {result.detail}"


# -------------------------------------------------------------- rules (what-if)


def _gfx950(aiter_version: str | None) -> Platform:
    return Platform(libs={"torch": "2.9.0", "triton": "3.4.0"}).with_overrides(
        {"vendor": "rocm", "arch": "gfx950", "device": "MI355X"}, {"amd-aiter": aiter_version}
    )


@pytest.mark.parametrize(
    "version,shared,fuse,rule",
    [
        ("0.1.10", 1, False, "aiter-topk-shared-unfused-before-0-1-12"),
        ("0.1.12", 1, True, None),
        ("0.1.12", 8, True, None),
        ("0.1.12", 3, False, "aiter-topk-shared-count-not-instantiated"),
    ],
)
def test_rules_choose_fused_or_unfused(version, shared, fuse, rule):
    feats = {**_features(16, 128, 8, shared), "device": "cuda"}
    decision = resolve(OP, feats, _gfx950(version), load_rules(), tuning=None, force={OP: "aiter"})
    assert decision.kernel == "aiter"
    assert decision.config == {"fuse_shared": fuse}
    if rule:
        assert rule in dict(decision.rules)


@pytest.mark.parametrize(
    "version,experts,fuse",
    [("0.1.14", 160, False), ("0.1.19", 160, False), ("0.1.14", 640, False), ("0.1.19.post1", 160, True), ("0.1.14", 256, True)],
)
def test_explain_keeps_aiter_off_strided_views_on_the_workspace_path(version, experts, fuse):
    """160 experts, shared = 1 on gfx950 with amd-aiter 0.1.14: even when AITER is chosen
    (here forced), its config is the unfused form, and a tuning row cannot change it
    (adapt rules override the tuning level). Without forcing, triton is chosen."""
    feats = {**_features(16, experts, 8, 1), "device": "cuda"}
    default = resolve(OP, feats, _gfx950(version), load_rules(), tuning=None, force={})
    assert default.kernel == "triton"
    forced = resolve(OP, feats, _gfx950(version), load_rules(), tuning=None, force={OP: "aiter"})
    assert forced.config == {"fuse_shared": fuse}
    if not fuse:
        assert {"aiter-topk-workspace-path-ignores-strides", "aiter-topk-over-512-experts-ignores-strides"} & set(dict(forced.rules))


def test_never_run_adapters_do_not_outrank_triton_by_default():
    """The vllm and aiter adapters have not run on this project's machines: with no rule
    and no measurement, the GPU-verified Triton kernel is chosen."""
    from kernmux.dispatch.registry import REGISTRY

    kernels = REGISTRY.kernels_of(OP)
    assert kernels["triton"].priority > max(kernels["aiter"].priority, kernels["vllm"].priority)
    cuda = Platform(vendor="cuda", arch="sm_90", device="H100", units=132,
                    libs={"torch": "2.9.0", "triton": "3.4.0", "vllm": "0.33.0"}, what_if=True)
    decision = resolve(OP, {**_features(16, 128, 8, 0), "device": "cuda"}, cuda, load_rules(), tuning=None, force={})
    assert decision.kernel == "triton" and decision.source == "priority"
    rocm = resolve(OP, {**_features(16, 128, 8, 0), "device": "cuda"}, _gfx950("0.1.20"), load_rules(), tuning=None, force={})
    assert rocm.kernel == "triton"


# ------------------------------------------------------------------------- vLLM

# Schemas of _moe_C::topk_softmax over vLLM releases (csrc/moe/torch_bindings.cpp,
# csrc/libtorch_stable/moe/torch_bindings.cpp).
_SCHEMAS = {
    "v4": "(Tensor(a!) topk_weights, Tensor(b!) topk_indices, Tensor(c!) token_expert_indices, "
          "Tensor gating_output) -> ()",
    "v5": "(Tensor(a!) topk_weights, Tensor(b!) topk_indices, Tensor(c!) token_expert_indices, "
          "Tensor gating_output, bool renormalize) -> ()",
    "v6": "(Tensor(a!) topk_weights, Tensor(b!) topk_indices, Tensor(c!) token_expert_indices, "
          "Tensor gating_output, bool renormalize, Tensor? bias) -> ()",
    "v7": "(Tensor(a!) topk_weights, Tensor(b!) topk_ids, Tensor(c!) token_expert_indices, "
          "Tensor gating_output, bool renormalize=False, Tensor? e_score_correction_bias=None, "
          "Tensor? is_padding=None) -> ()",
}
_LIB = torch.library.Library("kernmux_test_vllm", "FRAGMENT")
_SEEN: dict[str, list] = {name: [] for name in _SCHEMAS}


def _vllm_like_impl(name):
    """vLLM's kernel as read at v0.32.0/v0.33.0: NaN/inf probabilities clamped to 0, and
    with ``is_padding`` every routed id of a padded row set to -1 (PR #48979)."""

    def impl(*args, **kwargs):
        weights, ids, token_expert_indices, gating = args[:4]
        renormalize = args[4] if len(args) > 4 else kwargs.pop("renormalize", False)
        is_padding = kwargs.pop("is_padding", None)
        rest = tuple(args[5:]) + tuple(kwargs.values())
        if "is_padding" in _SCHEMAS[name] and len(args) > 6:  # the dispatcher passes it positionally
            is_padding, rest = args[6], tuple(args[5:6])
        # vLLM's kernel takes the row length from the last dimension: rows must be dense.
        assert gating.is_contiguous(), "gating_output must be contiguous"
        _SEEN[name].append((renormalize, rest, is_padding))
        probs = torch.softmax(gating.float(), dim=-1)
        probs = torch.where(torch.isfinite(probs), probs, torch.zeros_like(probs))
        values, order = torch.sort(probs, dim=-1, descending=True, stable=True)
        values, order = values[:, : ids.shape[1]], order[:, : ids.shape[1]]
        if renormalize:
            values = values / values.sum(dim=-1, keepdim=True)
        weights.copy_(values)
        ids.copy_(order.to(torch.int32))
        if is_padding is not None:
            ids.masked_fill_(is_padding.view(-1, 1), -1)
        token_expert_indices.zero_()

    return impl


for _name, _schema in _SCHEMAS.items():
    _LIB.define(f"topk_softmax_{_name}{_schema}")
    _LIB.impl(f"topk_softmax_{_name}", _vllm_like_impl(_name), "CPU")


def _op(name):
    return getattr(torch.ops.kernmux_test_vllm, f"topk_softmax_{name}")


@pytest.mark.parametrize(
    "name,renorm_arg,none_args,padding",
    [("v4", False, (), False), ("v5", True, (), False), ("v6", True, ("bias",), False), ("v7", True, (), True)],
)
def test_vllm_call_plan_from_schema(name, renorm_arg, none_args, padding):
    plan = vllm_adapter.plan_from_schema(_op(name).default._schema)
    assert plan.passes_renormalize is renorm_arg and plan.none_args == none_args
    assert plan.passes_padding is padding


def test_vllm_call_plan_rejects_unknown_required_arguments():
    lib = torch.library.Library("kernmux_test_vllm", "FRAGMENT")
    lib.define("topk_softmax_future(Tensor(a!) w, Tensor(b!) i, Tensor(c!) t, Tensor g, "
               "bool renormalize, float scale) -> ()")
    with pytest.raises(ValueError, match="scale"):
        vllm_adapter.plan_from_schema(torch.ops.kernmux_test_vllm.topk_softmax_future.default._schema)


@pytest.mark.parametrize("name", list(_SCHEMAS))
@pytest.mark.parametrize("shared,renormalize,padding", [(0, False, False), (0, True, True), (2, True, True)])
@pytest.mark.parametrize("maker", [spec.make_inputs, spec.make_nonfinite_inputs])
def test_vllm_adapter_against_each_schema(monkeypatch, name, shared, renormalize, padding, maker):
    op = _op(name)
    monkeypatch.setattr(vllm_adapter, "load_op", lambda: op)
    monkeypatch.setattr(vllm_adapter, "call_plan", lambda: vllm_adapter.plan_from_schema(op.default._schema))
    feats = _features(7, 160, 8, shared, dtype="fp32", renormalize=renormalize, padding=padding)
    args = _inputs_with_mask(feats, ("vllm", name), maker)
    _SEEN[name].clear()
    got = vllm_adapter.moe_topk_softmax(*args)
    [(passed_renorm, rest, passed_mask)] = _SEEN[name]
    # The kernel renormalises where the schema lets it; otherwise the adapter does.
    assert passed_renorm is (renormalize if name != "v4" else False)
    assert all(value is None for value in rest)
    # The mask reaches vLLM's kernel where its schema takes one (the adapter applies it otherwise).
    assert (passed_mask is args[4]) if name == "v7" else passed_mask is None
    result = spec.compare(got, reference(*args), feats)
    assert result.passed, result.detail


def test_vllm_probe_reports_a_missing_build():
    from kernmux.dispatch.registry import REGISTRY

    kernel = REGISTRY.kernels_of(OP)["vllm"]
    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here; the probe's answer depends on its build")
    plat = Platform().with_overrides(libs={"vllm": "0.33.0"})
    plat = Platform(vendor=plat.vendor, arch=plat.arch, device=plat.device, units=plat.units, libs=plat.libs)
    support = kernel.availability(plat)
    assert not support.ok and "_moe_C::topk_softmax" in support.reason
