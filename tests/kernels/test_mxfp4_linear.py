"""mxfp4_linear: reference, validation, tolerance, and every kernel available here against
the reference on the test device (Triton in its interpreter without a GPU).

Shapes include the odd ones of the issue: N = 1 and 2880, K = 32 and 4128, M = 1 and
4097, bias on and off, fp16 and bf16. The GPU benchmark (benchmarks/mxfp4_linear.py)
runs the large shapes.
"""

from __future__ import annotations

import math

import pytest
import torch

import kernmux.ops
from kernmux.dispatch.outputs import poisoned_outputs
from kernmux.dispatch.registry import REGISTRY
from kernmux.dispatch.verify import verify_kernel
from kernmux.kernels.mxfp4_linear import spec
from kernmux.kernels.mxfp4_linear.formats import dequantize_mxfp4, quantize_mxfp4
from kernmux.kernels.mxfp4_linear.reference import mxfp4_linear as reference
from kernmux.kernels.mxfp4_linear.triton_config import MODE_DEQUANT, MODE_DOT_SCALED, auto_config, config_problem

OP = "mxfp4_linear"

# (tokens, n, k, dtype, bias)
SHAPES = [
    (1, 1, 32, "bf16", False),
    (1, 2880, 64, "bf16", True),
    (5, 96, 4128, "fp16", True),
    (4097, 16, 32, "bf16", False),
    (64, 160, 256, "fp16", False),
    (17, 70, 1024, "bf16", True),
]


def feats(tokens=3, n=40, k=96, dtype="bf16", bias=False, device="cpu"):
    return dict(tokens=tokens, n=n, k=k, dtype=dtype, bias=bias, device=device)


def inputs(device="cpu", seed=0, **kw):
    f = feats(device=device, **kw)
    args, _ = REGISTRY.op(OP).make_inputs(f, device, seed)
    return f, list(args)


# --------------------------------------------------------------------------- reference


def test_reference_is_the_float32_definition():
    f, (x, w, s, b) = inputs(tokens=3, n=5, k=64, bias=True)
    weight = dequantize_mxfp4(w, s).double()
    expected = torch.zeros(3, 5, dtype=torch.float64)
    for i in range(3):
        for j in range(5):
            expected[i, j] = sum(float(x[i, kk]) * float(weight[j, kk]) for kk in range(64)) + float(b[j])
    got = reference(x, w, s, b)
    assert got.dtype == torch.bfloat16 and got.shape == (3, 5)
    assert torch.equal(got, expected.to(torch.bfloat16))


def test_reference_non_finite_semantics():
    f = feats(tokens=3, n=4, k=64)
    (x, w, s, b), _ = spec.make_nonfinite_inputs(f, "cpu", 0)
    out = reference(x, w, s, b).float()
    assert out[0].isnan().all()  # NaN in row 0 of x
    assert not torch.isfinite(out[2]).any()  # +inf in row 2: inf or NaN, never a number
    assert out[:, 3].isnan().all()  # scale 255 on a block of weight row 3
    assert torch.isfinite(out[1, :3]).all()


def test_features_bucket_roofline():
    f, args = inputs(tokens=7, n=40, k=96, bias=True)
    assert spec.features(*args) == f
    assert spec.bucket(f)["tokens"] == 8 and spec.bucket({**f, "tokens": 4097})["tokens"] == 8192
    roof = spec.roofline({**f, "tokens": 1, "n": 1536, "k": 7168, "bias": False}, None)
    assert roof.bytes == 1536 * 7168 / 2 + 1536 * 7168 / 32 + 7168 * 2 + 1536 * 2
    assert roof.flops == 2 * 1536 * 7168


@pytest.mark.parametrize(
    "mutate, exc, match",
    [
        (lambda a: a.__setitem__(0, a[0][:, :48]), ValueError, "multiple of 32"),
        (lambda a: a.__setitem__(0, a[0].float()), TypeError, "x must be bfloat16 or float16"),
        (lambda a: a.__setitem__(1, a[1].view(torch.int8)), TypeError, "w must be uint8"),
        (lambda a: a.__setitem__(2, a[2][:, :1]), ValueError, r"w_scale must be \[N, K/32\] = \[40, 3\]"),
        (lambda a: a.__setitem__(1, a[1][:, :40]), ValueError, r"w must be \[N, K/2\] = \[40, 48\]"),
        (lambda a: a.__setitem__(3, torch.zeros(39, dtype=torch.bfloat16)), ValueError, r"bias must be \[N\] = \[40\]"),
        (lambda a: a.__setitem__(3, torch.zeros(40, dtype=torch.float16)), TypeError, "bias must be torch.bfloat16"),
        (lambda a: a.__setitem__(0, a[0][:0]), ValueError, "empty problem"),
        (lambda a: a.__setitem__(0, a[0][0]), ValueError, "x must be 2-D"),
    ],
)
def test_validate_names_the_argument(mutate, exc, match):
    _, args = inputs(bias=True)
    mutate(args)
    with pytest.raises(exc, match=match):
        spec.validate(*args)
    with pytest.raises(exc, match=match):
        kernmux.ops.mxfp4_linear(*args)


# --------------------------------------------------------------------------- tolerance


def test_compare_catches_swapped_nibbles_wrong_scales_and_nan():
    f, (x, w, s, b) = inputs(tokens=4, n=64, k=256)
    ref = reference(x, w, s, b)
    assert spec.compare(reference(x, w, s, b), ref, f).passed
    swapped = (w >> 4) | (w << 4)
    assert not spec.compare(reference(x, swapped, s, b), ref, f).passed
    one_off = s.clone()
    one_off[5, 3] += 1  # one block of one weight row twice as large
    result = spec.compare(reference(x, w, one_off, b), ref, f)
    assert not result.passed and "[" in result.detail
    poisoned = ref.clone()
    poisoned[2, 7] = float("nan")
    assert not spec.compare(poisoned, ref, f).passed
    assert not spec.compare(ref.float(), ref, f).passed  # wrong dtype


def test_compare_allows_one_rounding_step_and_no_more():
    f, (x, w, s, b) = inputs(tokens=8, n=64, k=512)
    ref = reference(x, w, s, b)
    exact = x.float() @ dequantize_mxfp4(w, s).T
    # Rounded once more through the output dtype at a different point: within tolerance.
    assert spec.compare((exact.to(torch.bfloat16).float() * 1.0).to(torch.bfloat16), ref, f).passed
    # The documented bound at one entry, exceeded by half: fails.
    r = ref.double()
    scale = max(float(r[3].square().mean().sqrt()), float(r[:, 9].square().mean().sqrt()))
    ulp = 2.0 ** (math.frexp(abs(float(r[3, 9])))[1] - 1 - 7)
    bad = r.clone()
    bad[3, 9] += 1.5 * (ulp + 2.0**-7 * scale)
    result = spec.compare(bad.to(torch.bfloat16), ref, f)
    assert not result.passed and 1.2 < result.metrics["max_err_over_tol"] < 1.8


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "M{}-N{}-K{}-{}-{}".format(*s[:4], "bias" if s[4] else "nobias"))
@pytest.mark.parametrize("kernel", ["torch", "dequant_cublas", "triton"])
def test_kernels_match_reference(device, kernel, shape):
    tokens, n, k, dtype, bias = shape
    f = feats(tokens=tokens, n=n, k=k, dtype=dtype, bias=bias, device=device)
    result = verify_kernel(OP, kernel, f, seed=tokens + n + k)
    assert result.status == "pass", (result.detail, result.metrics)


K4128 = (5, 96, 4128, "fp16", True)
M33 = (33, 70, 320, "bf16", False)
TRITON_CASES = [
    (K4128, {"MODE": MODE_DEQUANT, "SPLIT_K": 1, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 64}),
    (K4128, {"MODE": MODE_DEQUANT, "SPLIT_K": 4, "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 8}),
    (K4128, {"MODE": MODE_DOT_SCALED, "SPLIT_K": 2, "BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 128}),
    (M33, {"MODE": MODE_DOT_SCALED, "SPLIT_K": 1, "BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128, "GROUP_M": 8}),
    (M33, {"MODE": MODE_DEQUANT, "SPLIT_K": 2, "BLOCK_M": 64, "BLOCK_N": 16, "BLOCK_K": 64, "GROUP_M": 8}),
]


@pytest.mark.parametrize(
    "shape, config", TRITON_CASES,
    ids=lambda c: "mode{MODE}-split{SPLIT_K}-{BLOCK_M}x{BLOCK_N}x{BLOCK_K}".format(**c) if isinstance(c, dict) else "M{}-K{}".format(c[0], c[2]),
)
def test_triton_configs_match_reference(device, shape, config):
    tokens, n, k, dtype, bias = shape
    f = feats(tokens=tokens, n=n, k=k, dtype=dtype, bias=bias, device=device)
    assert not config_problem(config, f), config_problem(config, f)
    result = verify_kernel(OP, "triton", f, seed=7, config=config)
    assert result.status == "pass", (result.detail, result.metrics)


@pytest.mark.parametrize("dequant", ["triton", "torch"])
def test_dequant_cublas_paths_match_reference(device, dequant):
    f = feats(tokens=3, n=70, k=320, bias=True, device=device)
    result = verify_kernel(OP, "dequant_cublas", f, seed=3, config={"dequant": dequant})
    assert result.status == "pass", (result.detail, result.metrics)


def test_dequantize_triton_is_exact(device):
    from kernmux.kernels.mxfp4_linear.triton_dequant import dequantize_triton

    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(70, 320, generator=gen) * torch.exp2(torch.randint(-8, 8, (70, 1), generator=gen).float())
    w, s = quantize_mxfp4(weight)
    s[3, 2] = 255
    with poisoned_outputs():
        got = dequantize_triton(w.to(device), s.to(device), torch.bfloat16).cpu()
    expected = dequantize_mxfp4(w, s).to(torch.bfloat16)
    assert torch.equal(got.isnan(), expected.isnan())
    assert torch.equal(torch.nan_to_num(got), torch.nan_to_num(expected))


@pytest.mark.parametrize("kernel", ["dequant_cublas", "triton"])
def test_strided_inputs(device, kernel):
    f, (x, w, s, b) = inputs(device=device, tokens=6, n=40, k=128, bias=True)
    wide_x = torch.zeros(6, 256, dtype=x.dtype, device=device)
    wide_x[:, ::2] = x
    wide_w = torch.zeros(40, 128, dtype=torch.uint8, device=device)
    wide_w[:, 64:] = w
    wide_s = torch.zeros(8, 40, dtype=torch.uint8, device=device).T  # column-major scales
    wide_s[:, 2:6] = s
    args = (wide_x[:, ::2], wide_w[:, 64:], wide_s[:, 2:6], b)
    assert not args[0].is_contiguous() and not args[1].is_contiguous() and not args[2].is_contiguous()
    fn = REGISTRY.kernels_of(OP)[kernel].bind(None)
    with poisoned_outputs():
        got = fn(*args)
    assert spec.compare(got, reference(x, w, s, b), f).passed


@pytest.mark.parametrize("kernel", ["torch", "dequant_cublas", "triton"])
def test_non_finite_inputs_give_the_reference_pattern(device, kernel):
    f = feats(tokens=4, n=40, k=128, bias=True, device=device)
    (x, w, s, b), _ = spec.make_nonfinite_inputs(f, device, 2)
    fn = REGISTRY.kernels_of(OP)[kernel].bind(None)
    with poisoned_outputs():
        got = fn(x, w, s, b)
    result = spec.compare(got, reference(x, w, s, b), f)
    assert result.passed, result.detail


def test_ops_entry_point_dispatches_and_matches(device):
    f, args = inputs(device=device, tokens=9, n=48, k=256, bias=True)
    got = kernmux.ops.mxfp4_linear(*args)
    assert spec.compare(got, reference(*args), f).passed


# --------------------------------------------------------------------------- config space


def test_auto_config_by_shape():
    decode = auto_config(1, 1536, 7168)
    assert decode["BLOCK_M"] == 16 and decode["SPLIT_K"] > 1
    assert math.ceil(1536 / decode["BLOCK_N"]) * decode["SPLIT_K"] >= 132
    prefill = auto_config(4096, 7168, 16384)
    assert prefill["BLOCK_M"] == 128 and prefill["SPLIT_K"] == 1 and prefill["GROUP_M"] == 8
    for tokens in (1, 4, 5, 16, 33, 64, 256, 1024, 4096, 4097, 16384):
        for n, k in ((1536, 7168), (24576, 1536), (7168, 16384), (5120, 2880), (2880, 4096), (1, 32), (2880, 64), (96, 4128)):
            f = feats(tokens=tokens, n=n, k=k)
            assert not config_problem({}, f), (tokens, n, k, config_problem({}, f))


def test_config_valid_prunes():
    big = feats(tokens=4096, n=7168, k=16384)
    assert "split-K only up to" in config_problem({"SPLIT_K": 4}, big)
    assert "shared memory" in config_problem({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 256, "num_stages": 5, "num_warps": 8}, big)
    small = feats(tokens=1, n=16, k=64)
    assert "BLOCK_M" in config_problem({"BLOCK_M": 64}, small)
    assert "BLOCK_N" in config_problem({"BLOCK_N": 32}, small)
    assert "SPLIT_K=4 > K blocks" in config_problem({"SPLIT_K": 4, "BLOCK_K": 64}, small)
    kernel = REGISTRY.kernels_of(OP)["triton"]
    assert kernel.config_valid({"BLOCK_M": 16}, small) and not kernel.config_valid({"BLOCK_M": 128}, small)


def test_traces_as_one_custom_op_with_its_fake():
    f, (x, w, s, b) = inputs(tokens=3, n=40, k=96, bias=True)
    compiled = torch.compile(lambda *a: kernmux.ops.mxfp4_linear(*a), backend="eager", fullgraph=True)
    got = compiled(x, w, s, b)
    assert got.shape == (3, 40) and spec.compare(got, reference(x, w, s, b), f).passed
    fake = spec.fake(x.to("meta"), w.to("meta"), s.to("meta"), None)
    assert fake.shape == (3, 40) and fake.dtype == torch.bfloat16


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16, 256, 4096])
@pytest.mark.parametrize("n, k", [(1536, 7168), (2880, 4096)])
def test_gpu_auto_configs_compile_and_match_at_benchmark_shapes(tokens, n, k):
    """The shape heuristic's tiles (shared memory, dot_scaled on this GPU) at real sizes,
    and the dequantize-in-registers mode at the same tiles."""
    f = feats(tokens=tokens, n=n, k=k, device="cuda")
    for config in ({}, {"MODE": MODE_DEQUANT}):
        result = verify_kernel(OP, "triton", f, seed=tokens, config=config)
        assert result.status == "pass", (config, result.detail, result.metrics)
