"""moe_topk_softmax: kernels against the reference, ties, layouts, padding mask, NaN
rules, argument checks.

Kernels run on the ``device`` fixture: the GPU when there is one, else CPU tensors with
Triton in its interpreter (tests/conftest.py). Parity goes through ``verify_kernel``
(fresh inputs, poisoned outputs, ``op.compare``: identical ids, weights within 1e-5
relative, NaN exactly where the reference has NaN). Tests of pure spec functions
(validation, buckets, input drawing, comparison) are CPU-only by nature.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch
import torch.nn.functional as F

from kernmux.dispatch.platform import current_platform
from kernmux.dispatch.registry import REGISTRY
from kernmux.dispatch.verify import verify_kernel
from kernmux.kernels.moe_topk_softmax import spec
from kernmux.kernels.moe_topk_softmax.fuse import fuse_router_weights
from kernmux.kernels.moe_topk_softmax.reference import moe_topk_softmax as reference
from kernmux.kernels.moe_topk_softmax.triton_config import (
    CONFIG_SPACE,
    config_valid,
    heuristic_config,
)

OP = "moe_topk_softmax"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def _features(tokens, experts, topk, shared, dtype, renormalize, device="cpu", padding=False):
    return {
        "tokens": tokens,
        "experts": experts,
        "topk": topk,
        "shared": shared,
        "dtype": dtype,
        "renormalize": renormalize,
        "padding": padding,
        "device": device,
    }


def _run(kernel: str, logits: torch.Tensor, topk: int, renormalize: bool, num_shared: int, config=None, is_padding=None):
    fn = REGISTRY.kernels_of(OP)[kernel].bind(config)
    return fn(logits, topk, renormalize, num_shared, is_padding)


def _triton_runs_here() -> bool:
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


needs_triton = pytest.mark.skipif(
    not _triton_runs_here(), reason="Triton needs a GPU or TRITON_INTERPRET=1"
)


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("renormalize", [False, True])
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shared", [0, 2])
@pytest.mark.parametrize("topk", [6, 8])
@pytest.mark.parametrize("experts", [160, 288])
@pytest.mark.parametrize("tokens", [1, 7])
@pytest.mark.parametrize("kernel", ["torch", pytest.param("triton", marks=needs_triton)])
def test_parity_grid(device, kernel, tokens, experts, topk, shared, dtype, renormalize):
    feats = _features(tokens, experts, topk, shared, dtype, renormalize, device)
    result = verify_kernel(OP, kernel, feats, seed=_seed(kernel, feats))
    assert result.passed, f"{result.status}: {result.detail} {dict(result.metrics)}"


@needs_triton
@pytest.mark.parametrize("experts,topk,shared", [(8, 8, 1), (64, 8, 0), (256, 16, 8), (1024, 8, 1)])
def test_parity_triton_power_of_two_and_limits(device, experts, topk, shared):
    feats = _features(5, experts, topk, shared, "bf16", True, device)
    result = verify_kernel(OP, "triton", feats, seed=_seed("pow2", feats))
    assert result.passed, f"{result.status}: {result.detail} {dict(result.metrics)}"


# ------------------------------------------------------------ padding and NaN rules


def _verify_on(maker, kernel, feats, seed, config=None):
    """verify_kernel's protocol (poisoned outputs, op.compare) on inputs from ``maker``."""
    from kernmux.dispatch.outputs import poisoned_outputs

    op = REGISTRY.op(OP)
    args, kwargs = maker(feats, feats["device"], seed)
    expected = op.reference(*args, **kwargs)
    with poisoned_outputs():
        got = REGISTRY.kernels_of(OP)[kernel].bind(config)(*op.positional(args, kwargs))
    return op.compare(got, expected, feats), got, kwargs


KERNELS_HERE = ["torch", "torch_compile", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("kernel", KERNELS_HERE)
@pytest.mark.parametrize("shared,renormalize", [(0, False), (2, True)])
def test_padding_mask_routes_padded_rows_nowhere(device, kernel, shared, renormalize):
    """vLLM's is_padding (PR #48979, in 0.32.0/0.33.0): every id of a padded row is -1,
    weights as for any row; unpadded rows unchanged."""
    feats = _features(9, 160, 6, shared, "bf16", renormalize, device, padding=True)
    result, got, kwargs = _verify_on(spec.make_inputs, kernel, feats, _seed("pad", kernel, shared))
    assert result.passed, result.detail
    mask = kwargs["is_padding"].cpu()
    assert mask.any() and not mask.all()
    ids = got[1].cpu()
    assert (ids[mask] == -1).all() and (ids[~mask] >= 0).all()
    plain = reference(*REGISTRY.op(OP).make_inputs({**feats, "padding": False}, device, _seed("pad", kernel, shared))[0], renormalize, shared)
    torch.testing.assert_close(got[0].cpu(), plain[0].cpu(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("kernel", KERNELS_HERE)
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("experts,shared,renormalize,padding", [(160, 2, True, True), (64, 0, False, False), (288, 1, False, True)])
def test_nonfinite_rows_follow_the_reference(device, kernel, dtype, experts, shared, renormalize, padding):
    """NaN / +inf / all -inf rows: NaN weights, ids 0..k-1 in every kernel; -inf entries
    rank last; NaN shared gates stay NaN. NaN never passes where the reference is finite."""
    if kernel == "torch_compile" and (dtype != "bf16" or experts != 160):
        pytest.skip("one compiled variant is enough (each costs a compilation)")
    feats = _features(8, experts, 6, shared, dtype, renormalize, device, padding=padding)
    result, got, kwargs = _verify_on(spec.make_nonfinite_inputs, kernel, feats, _seed("nan", kernel, dtype, experts))
    assert result.passed, result.detail
    assert result.metrics["nan_weights"] >= 3 * 6
    w, ids = got[0].cpu(), got[1].cpu()
    padded = kwargs["is_padding"].cpu() if padding else torch.zeros(8, dtype=torch.bool)
    for row in range(3):  # NaN, +inf, all -inf
        assert torch.isnan(w[row, :6]).all()
        assert ids[row, :6].tolist() == ([-1] * 6 if padded[row] else list(range(6)))
    assert torch.isfinite(w[3, :6]).all()  # half the logits -inf: a finite answer


def test_compare_rejects_a_finite_answer_to_a_nan_row():
    feats = _features(6, 32, 4, 1, "fp32", False)
    (logits, topk), kwargs = spec.make_nonfinite_inputs(feats, "cpu", 3)
    ref = reference(logits, topk, **kwargs)
    assert spec.compare(tuple(t.clone() for t in ref), ref, feats).passed
    w, ids = (t.clone() for t in ref)
    w[0, :4] = 0.25  # what a kernel that clamps NaN probabilities to 0 would report
    result = spec.compare((w, ids), ref, feats)
    assert not result.passed and result.metrics["nan_missing"] == 4
    w, ids = (t.clone() for t in ref)
    w[4, 0] = float("nan")
    assert not spec.compare((w, ids), ref, feats).passed


# Every (dtype, renormalize, shared > 0) is a compiled function of its own (compile.py)
# and costs a compilation: each dtype with (shared, renormalised) and (no shared, plain),
# each over two expert counts and both top-k values (dynamic shapes, no recompilation);
# tokens=1 (a size Dynamo specialises) on one variant.
@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shared,renormalize", [(2, True), (0, False)])
def test_parity_torch_compile(device, dtype, shared, renormalize):
    shapes = [(7, 160, 6), (7, 288, 8)] + ([(1, 160, 8)] if dtype == "bf16" and shared else [])
    for tokens, experts, topk in shapes:
        feats = _features(tokens, experts, topk, shared, dtype, renormalize, device)
        result = verify_kernel(OP, "torch_compile", feats, seed=_seed("compile", feats))
        assert result.status != "unsupported", result.detail
        assert result.passed, f"{feats}: {result.status}: {result.detail} {dict(result.metrics)}"


@needs_triton
@pytest.mark.parametrize(
    "config",
    [
        {"rows": 1, "num_warps": 1, "select": "twopass"},
        {"rows": 4, "num_warps": 2, "select": "packed"},
        {"rows": 8, "num_warps": 4, "select": "twopass"},
        {"rows": 2, "num_warps": 8, "select": "packed"},
        {"rows": 1, "num_warps": 1, "select": "bitonic"},
        {"rows": 4, "num_warps": 2, "select": "bitonic"},
    ],
)
def test_triton_configs(device, config):
    feats = _features(13, 160, 8, 1, "bf16", True, device)
    assert config_valid(config, feats)
    result = verify_kernel(OP, "triton", feats, seed=_seed("cfg", config), config=config)
    assert result.passed, f"{result.status}: {result.detail}"


# ----------------------------------------------------------------------------- ties


def _tie_cases():
    """(logits row, topk, expected routed ids) with ties resolved to the lower index."""
    equal = torch.zeros(12)
    top_ties = torch.tensor([0.0, 1.0, 3.0, 5.0, 2.0, 5.0, 5.0, 1.0, 3.0, 0.0])
    # exp(-1000 - 0) underflows to 0: probabilities tie even though the logits differ.
    underflow = torch.tensor([0.0, -1000.0, -2000.0, -1500.0, -3000.0, 0.5])
    boundary = torch.tensor([4.0, 1.0, 2.0, 2.0, 2.0, 3.0, 2.0])
    return [
        (equal, 4, [0, 1, 2, 3]),
        (top_ties, 4, [3, 5, 6, 2]),
        (underflow, 4, [5, 0, 1, 2]),
        (boundary, 3, [0, 5, 2]),
    ]


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("kernel", ["torch", "torch_compile", pytest.param("triton", marks=needs_triton)])
def test_ties_go_to_the_lower_index(device, kernel, dtype):
    for row, topk, expected in _tie_cases():
        logits = row.to(DTYPES[dtype]).unsqueeze(0).repeat(3, 1).to(device)
        weights, ids = _run(kernel, logits, topk, False, 0)
        assert ids.tolist() == [expected] * 3, (row.tolist(), ids.tolist())
        ref_w, _ = reference(logits, topk)
        torch.testing.assert_close(weights, ref_w, rtol=1e-5, atol=0)


@needs_triton
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_many_ties_match_reference(device, dtype):
    """Small-integer logits: most values tie; ids must still equal the reference's."""
    gen = torch.Generator().manual_seed(_seed("many-ties", dtype))
    logits = torch.randint(-3, 4, (9, 160 + 2), generator=gen).to(DTYPES[dtype]).to(device)
    for renormalize in (False, True):
        got = _run("triton", logits, 8, renormalize, 2)
        ref = reference(logits, 8, renormalize, 2)
        result = spec.compare(got, ref, _features(9, 160, 8, 2, dtype, renormalize))
        assert result.passed, result.detail


# --------------------------------------------------------------------------- layouts


def _non_contiguous_views(tokens: int, width: int, dtype: torch.dtype, gen: torch.Generator):
    base = torch.randn(tokens, width + 5, generator=gen).to(dtype)
    yield "column-slice", base[:, 3 : 3 + width]  # row stride > width
    yield "transposed", torch.randn(width, tokens, generator=gen).to(dtype).t()  # stride(1) != 1
    yield "row-step", torch.randn(2 * tokens, width, generator=gen).to(dtype)[::2]


@pytest.mark.parametrize(
    "kernel,layouts",
    [
        # torch.compile recompiles per stride pattern (~10 s each on CPU): one layout.
        ("torch_compile", ("column-slice",)),
        pytest.param("triton", ("column-slice", "transposed", "row-step"), marks=needs_triton),
    ],
)
def test_non_contiguous_input(device, kernel, layouts):
    gen = torch.Generator().manual_seed(_seed("layout", kernel))
    for name, logits in _non_contiguous_views(5, 160 + 2, torch.float32, gen):
        if name not in layouts:
            continue
        logits = logits.to(device) if device == "cpu" else _same_layout_on(logits, device)
        assert not logits.is_contiguous()
        got = _run(kernel, logits, 6, True, 2)
        ref = reference(logits.contiguous(), 6, True, 2)
        result = spec.compare(got, ref, _features(5, 160, 6, 2, "fp32", True))
        assert result.passed, f"{name}: {result.detail}"


def _same_layout_on(view: torch.Tensor, device: str) -> torch.Tensor:
    """The view's values on ``device`` with the same strides (``.to`` would compact it)."""
    base = torch.empty_strided(view.size(), view.stride(), dtype=view.dtype, device=device)
    return base.copy_(view)


@pytest.mark.parametrize("kernel", KERNELS_HERE)
def test_zero_tokens(device, kernel):
    """An engine's empty batch is a valid call: empty outputs, no launch needed."""
    for mask in (None, torch.zeros(0, dtype=torch.bool, device=device)):
        weights, ids = _run(kernel, torch.empty(0, 66, device=device), 4, False, 2, is_padding=mask)
        assert weights.shape == (0, 6) and ids.shape == (0, 6)


# ---------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "args,kwargs,error,names",
    [
        ((torch.randn(4, 16).to(torch.int32), 2), {}, TypeError, "gating_logits"),
        ((torch.randn(4, 16).double(), 2), {}, TypeError, "gating_logits"),
        ((torch.randn(16), 2), {}, ValueError, "gating_logits"),
        ((torch.randn(2, 4, 16), 2), {}, ValueError, "gating_logits"),
        (([[1.0, 2.0]], 1), {}, TypeError, "gating_logits"),
        ((torch.randn(4, 16), 17), {}, ValueError, "topk"),
        ((torch.randn(4, 16), 15), {"num_shared": 2}, ValueError, "topk"),
        ((torch.randn(4, 16), 0), {}, ValueError, "topk"),
        ((torch.randn(4, 16), 2.0), {}, TypeError, "topk"),
        ((torch.randn(4, 16), True), {}, TypeError, "topk"),
        ((torch.randn(4, 16), 2), {"num_shared": 9}, ValueError, "num_shared"),
        ((torch.randn(4, 16), 2), {"num_shared": -1}, ValueError, "num_shared"),
        ((torch.randn(4, 3), 1), {"num_shared": 3}, ValueError, "gating_logits"),
        ((torch.randn(4, 16), 2), {"renormalize": 1}, TypeError, "renormalize"),
        ((torch.randn(4, 16), 2), {"is_padding": torch.zeros(4, dtype=torch.int32)}, TypeError, "is_padding"),
        ((torch.randn(4, 16), 2), {"is_padding": torch.zeros(3, dtype=torch.bool)}, ValueError, "is_padding"),
        ((torch.randn(4, 16), 2), {"is_padding": torch.zeros(4, 1, dtype=torch.bool)}, ValueError, "is_padding"),
        ((torch.randn(4, 16), 2), {"is_padding": [False] * 4}, TypeError, "is_padding"),
        ((torch.randn(4, 0), 1), {}, ValueError, "gating_logits"),
    ],
)
def test_validation_names_the_argument(args, kwargs, error, names):
    with pytest.raises(error, match=names):
        spec.validate(*args, **kwargs)


def test_validation_accepts_valid_calls():
    spec.validate(torch.randn(3, 162, dtype=torch.bfloat16), 8, True, 2)
    spec.validate(torch.randn(1, 8), 8)
    spec.validate(torch.randn(0, 9, dtype=torch.float16), 1, False, 8)
    spec.validate(torch.randn(3, 9), 1, False, 0, torch.tensor([False, True, False]))


def test_features_never_raise_and_describe_the_call():
    feats = spec.features(torch.randn(3, 162, dtype=torch.bfloat16), 8, True, 2)
    assert feats == {
        "tokens": 3, "experts": 160, "topk": 8, "shared": 2,
        "dtype": "bf16", "renormalize": True, "padding": False, "device": "cpu",
    }
    assert spec.features(torch.randn(3, 8), 2, False, 0, torch.zeros(3, dtype=torch.bool))["padding"] is True
    spec.features(torch.randn(16), 2)  # malformed: placeholder values, no exception


# ------------------------------------------------------------------ op definition


@pytest.mark.parametrize("tokens,bucketed", [(1, 1), (7, 8), (16, 16), (1025, 2048), (0, 1)])
def test_bucket_rounds_tokens_only(tokens, bucketed):
    feats = _features(tokens, 160, 6, 2, "bf16", True)
    assert spec.bucket(feats) == {**feats, "tokens": bucketed}


def test_make_inputs_are_tie_free_and_exact_in_every_dtype():
    for dtype in ("fp32", "bf16", "fp16"):
        feats = _features(6, 1024, 16, 3, dtype, False)
        (logits, topk), kwargs = spec.make_inputs(feats, "cpu", seed=_seed("inputs", dtype))
        assert logits.shape == (6, 1027) and logits.dtype == DTYPES[dtype] and topk == 16
        assert kwargs == {"renormalize": False, "num_shared": 3}
        routed = logits[:, :1024].float()
        assert all(row.unique().numel() == 1024 for row in routed)
        # Grid values survive the cast to bf16 unchanged, so every dtype sees one problem.
        assert torch.equal(routed.to(torch.bfloat16).float(), routed)
    (a, _), _ = spec.make_inputs(feats, "cpu", seed=1)
    (b, _), _ = spec.make_inputs(feats, "cpu", seed=2)
    assert not torch.equal(a, b)


def test_compare_catches_nan_wrong_ids_and_weight_error():
    feats = _features(4, 32, 4, 1, "fp32", False)
    (logits, topk), kwargs = spec.make_inputs(feats, "cpu", seed=3)
    ref = reference(logits, topk, **kwargs)
    assert spec.compare(tuple(t.clone() for t in ref), ref, feats).passed
    w, ids = (t.clone() for t in ref)
    w[2, 1] = float("nan")
    assert not spec.compare((w, ids), ref, feats).passed
    w, ids = (t.clone() for t in ref)
    ids[1, 0], ids[1, 1] = ids[1, 1].item(), ids[1, 0].item()
    result = spec.compare((w, ids), ref, feats)
    assert not result.passed and result.metrics["id_mismatches"] == 2
    w, ids = (t.clone() for t in ref)
    w[0, 0] *= 1 + 3e-5
    assert not spec.compare((w, ids), ref, feats).passed
    w, ids = (t.clone() for t in ref)
    w[0, 0] *= 1 + 3e-6
    assert spec.compare((w, ids), ref, feats).passed
    assert not spec.compare((w[:, :-1], ids[:, :-1]), ref, feats).passed
    assert not spec.compare((w, ids.long()), ref, feats).passed


def test_fake_matches_real_outputs():
    logits = torch.randn(5, 66, dtype=torch.float16)
    mask = torch.tensor([False, True, False, False, True])
    fake_w, fake_ids = spec.fake(logits, 6, True, 2, mask)
    real_w, real_ids = reference(logits, 6, True, 2, mask)
    assert (fake_w.shape, fake_w.dtype) == (real_w.shape, real_w.dtype)
    assert (fake_ids.shape, fake_ids.dtype) == (real_ids.shape, real_ids.dtype)


def test_reference_shared_slots_and_renormalisation():
    logits = torch.randn(3, 10 + 2)
    weights, ids = reference(logits, 4, True, 2)
    assert ids[:, 4:].tolist() == [[10, 11]] * 3
    torch.testing.assert_close(weights[:, 4:], torch.sigmoid(logits[:, 10:]))
    torch.testing.assert_close(weights[:, :4].sum(dim=1), torch.ones(3))
    plain, _ = reference(logits, 4, False, 2)
    probs = torch.softmax(logits[:, :10], dim=1)
    torch.testing.assert_close(plain[:, :4], probs.gather(1, ids[:, :4].long()))


# ---------------------------------------------------------------- kernel metadata


def test_triton_config_space_and_pruning():
    points = [
        dict(zip(CONFIG_SPACE, values))
        for values in __import__("itertools").product(*CONFIG_SPACE.values())
    ]
    assert len(points) == 72
    decode = _features(1, 256, 8, 0, "bf16", False)
    prefill = _features(4096, 1024, 8, 0, "bf16", False)
    valid_decode = [p for p in points if config_valid(p, decode)]
    valid_prefill = [p for p in points if config_valid(p, prefill)]
    assert valid_decode and all(p["rows"] == 1 for p in valid_decode)
    # 32 rows of 1024 experts on one warp would need 1024 elements per thread: pruned.
    assert {"rows": 32, "num_warps": 1, "select": "packed"} not in valid_prefill
    assert len(valid_prefill) >= 24
    for tokens, experts in [(1, 64), (7, 160), (4096, 288), (16384, 1024)]:
        cfg = heuristic_config(tokens, experts)
        assert config_valid(cfg, _features(tokens, experts, 8, 0, "bf16", False)), cfg


def test_triton_support_reasons(monkeypatch):
    kernel = REGISTRY.kernels_of(OP)["triton"]
    plat = current_platform()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "GPU" in kernel.check(_features(1, 64, 8, 0, "bf16", False), plat).reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernel.check(_features(1, 1024, 16, 8, "bf16", False), plat).ok
    assert "experts" in kernel.check(_features(1, 1025, 8, 0, "bf16", False), plat).reason
    assert "topk" in kernel.check(_features(1, 160, 17, 0, "bf16", False), plat).reason


@needs_triton
def test_dispatch_through_kernmux_ops(device):
    import kernmux.ops

    gen = torch.Generator().manual_seed(_seed("ops"))
    logits = torch.randn(3, 130, generator=gen).to(torch.bfloat16).to(device)
    weights, ids = kernmux.ops.moe_topk_softmax(logits, 8, True, 2)
    result = spec.compare((weights, ids), reference(logits, 8, True, 2), _features(3, 128, 8, 2, "bf16", True))
    assert result.passed, result.detail
    mask = torch.tensor([False, True, False], device=device)
    weights, ids = kernmux.ops.moe_topk_softmax(logits, 8, True, 2, mask)
    assert (ids[1] == -1).all() and (ids[0] >= 0).all()


# ------------------------------------------------------------------ gate fusion


def test_fused_gate_gives_the_op_its_logits():
    gen = torch.Generator().manual_seed(_seed("fuse"))
    hidden = torch.randn(5, 32, generator=gen)
    router, shared_gate = torch.randn(160, 32, generator=gen), torch.randn(32, generator=gen)
    rb, sb = torch.randn(160, generator=gen), torch.randn(1, generator=gen)
    weight, bias = fuse_router_weights(router, shared_gate, rb, sb)
    assert weight.shape == (161, 32) and bias.shape == (161,)
    logits = F.linear(hidden, weight, bias)
    separate = torch.cat([F.linear(hidden, router, rb), F.linear(hidden, shared_gate.unsqueeze(0), sb)], dim=1)
    torch.testing.assert_close(logits, separate)
    two, none = fuse_router_weights(router, torch.randn(2, 32, generator=gen))
    assert two.shape == (162, 32) and none is None


@pytest.mark.parametrize(
    "shared,kwargs,names",
    [
        (torch.randn(2, 31), {}, "shared_gate_weight"),
        (torch.randn(2, 32, dtype=torch.float16), {}, "shared_gate_weight"),
        (torch.randn(1, 32), {"router_bias": torch.randn(160)}, "both or neither"),
        (torch.randn(1, 32), {"router_bias": torch.randn(159), "shared_gate_bias": torch.randn(1)}, "router_bias"),
    ],
)
def test_fuse_router_weights_rejects_mismatches(shared, kwargs, names):
    with pytest.raises(ValueError, match=names):
        fuse_router_weights(torch.randn(160, 32), shared, **kwargs)
