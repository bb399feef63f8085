"""moe_experts: every kernel that runs here against the reference, the align helper,
layouts, empty and non-finite inputs, bad ids, argument checks, spec and config space.

Triton runs under TRITON_INTERPRET=1 without a GPU (tests/conftest.py), with the same
tests on the GPU through the ``device`` fixture. Parity goes through ``verify_kernel``
(fresh inputs, poisoned outputs, ``spec.compare``: per-dtype row and element bounds,
NaN exactly where the reference has it).
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

from kernmux.dispatch.outputs import poisoned_outputs
from kernmux.dispatch.platform import current_platform
from kernmux.dispatch.registry import REGISTRY
from kernmux.dispatch.verify import verify_kernel
from kernmux.kernels.moe_experts import spec
from kernmux.kernels.moe_experts.reference import moe_experts as reference
from kernmux.kernels.moe_experts.triton_config import CONFIG_SPACE, config_valid, heuristic_config

OP = "moe_experts"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TRITON_KERNELS = ("triton", "triton_separate", "triton_dual_stream")


def _seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


def _features(tokens, experts, topk, shared, hidden, inter, dtype, device):
    return {"tokens": tokens, "experts": experts, "shared": shared, "topk": topk,
            "hidden": hidden, "inter": inter, "dtype": dtype, "device": device}


def _triton_runs(device: str) -> bool:
    return device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def _kernels_here(feats) -> list[str]:
    """Kernels of the op that run here for these features: every kernel whose
    availability and supports() pass. On CPU that must include torch, grouped_mm (where
    its stride rule allows) and, in the interpreter, the Triton strategies."""
    platform = current_platform()
    kernels = REGISTRY.kernels_of(OP)
    names = [n for n, k in sorted(kernels.items())
             if not k.test_only and k.availability(platform).ok and k.check(feats, platform).ok]
    assert "torch" in names
    if _triton_runs(feats["device"]):
        assert "triton" in names and ("triton_separate" in names) == (feats["shared"] > 0), names
    return names


def _check(kernel, feats, seed, config=None):
    result = verify_kernel(OP, kernel, feats, seed=seed, config=config)
    assert result.passed, f"{kernel} {feats}: {result.status}: {result.detail} {dict(result.metrics)}"
    return result


def _run(kernel, *args, config=None, **kwargs):
    return REGISTRY.kernels_of(OP)[kernel].bind(config)(*args, **kwargs)


# --------------------------------------------------------------------------- parity


@pytest.mark.parametrize("dtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shared", [0, 2])
@pytest.mark.parametrize("tokens", [1, 7])
def test_parity_acceptance_grid(device, tokens, shared, dtype):
    """The op's declared CPU grid: 13 experts, topk 7, inter 40 (not a multiple of 16)."""
    feats = _features(tokens, 13, 7, shared, 64, 40, dtype, device)
    for kernel in _kernels_here(feats):
        _check(kernel, feats, _seed(kernel, feats))


@pytest.mark.parametrize(
    "tokens,experts,topk,shared,hidden,inter",
    [
        (5, 12, 3, 1, 96, 24),  # odd everything, one shared expert
        (33, 6, 2, 1, 48, 72),  # more slots than one 16-row tile per expert
        (4, 30, 7, 2, 40, 36),  # hidden and inter not multiples of 16
        (1, 5, 5, 0, 32, 16),  # every routed expert picked
    ],
)
def test_parity_odd_shapes(device, tokens, experts, topk, shared, hidden, inter):
    feats = _features(tokens, experts, topk, shared, hidden, inter, "bf16", device)
    for kernel in _kernels_here(feats):
        _check(kernel, feats, _seed("odd", kernel, feats))


@pytest.mark.parametrize(
    "config",
    [
        {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 2},
        {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "GROUP_M": 8, "num_warps": 4, "num_stages": 3},
        {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32, "GROUP_M": 16, "num_warps": 8, "num_stages": 2},
    ],
)
def test_triton_configs(device, config):
    """Tile shapes that cover even and ragged K, several tiles per expert and the
    grouped tile order, for the fused and the separate strategy."""
    if not _triton_runs(device):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    feats = _features(19, 11, 4, 1, 64, 48, "fp16", device)
    assert config_valid(config, feats)
    for kernel in ("triton", "triton_separate"):
        _check(kernel, feats, _seed("cfg", kernel, config), config=config)


def test_duplicate_ids_in_a_token_are_summed(device):
    """Two slots of one token naming the same expert count twice (the formula's sum)."""
    feats = _features(6, 9, 3, 1, 64, 32, "fp32", device)
    (hidden, w13, w2, weights, ids), kwargs = spec.make_inputs(feats, device, _seed("dup"))
    ids[:, 1] = ids[:, 0]
    expected = reference(hidden, w13, w2, weights, ids, **kwargs)
    for kernel in _kernels_here(feats):
        got = _run(kernel, hidden, w13, w2, weights, ids, **kwargs)
        result = spec.compare(got, expected, feats)
        assert result.passed, f"{kernel}: {result.detail}"


# --------------------------------------------------------------------------- layouts


def _strided_inputs(feats, device, seed):
    """The same values as make_inputs, every tensor a non-contiguous view."""
    (hidden, w13, w2, weights, ids), kwargs = spec.make_inputs(feats, device, seed)
    tokens, slots = ids.shape
    wide = torch.full((tokens, hidden.shape[1] + 8), float("nan"), dtype=hidden.dtype, device=device)
    wide[:, 3:3 + hidden.shape[1]] = hidden
    w13_t = w13.transpose(1, 2).contiguous().transpose(1, 2)  # column-major experts
    w2_step = torch.empty((2 * w2.shape[0],) + tuple(w2.shape[1:]), dtype=w2.dtype, device=device)[::2]
    w2_step.copy_(w2)
    ids_wide = torch.full((tokens, slots + 3), -7, dtype=torch.int32, device=device)
    ids_wide[:, 1:1 + slots] = ids
    weights_t = weights.t().contiguous().t()
    views = (wide[:, 3:3 + hidden.shape[1]], w13_t, w2_step, weights_t, ids_wide[:, 1:1 + slots])
    assert not any(v.is_contiguous() for v in views)
    return (hidden, w13, w2, weights, ids), views, kwargs


def test_non_contiguous_inputs(device):
    feats = _features(9, 10, 3, 2, 64, 32, "bf16", device)
    contiguous, views, kwargs = _strided_inputs(feats, device, _seed("strided"))
    expected = reference(*contiguous, **kwargs)
    for kernel in _kernels_here(feats):
        got = _run(kernel, *views, **kwargs)
        result = spec.compare(got, expected, feats)
        assert result.passed, f"{kernel}: {result.detail} {dict(result.metrics)}"


def test_zero_tokens(device):
    feats = _features(0, 8, 2, 1, 32, 16, "bf16", device)
    args, kwargs = spec.make_inputs(feats, device, 1)
    spec.validate(*args, **kwargs)
    for kernel in _kernels_here(feats):
        out = _run(kernel, *args, **kwargs)
        assert out.shape == (0, 32) and out.dtype == torch.bfloat16


# ------------------------------------------------------------- non-finite and bad ids


@pytest.mark.parametrize("tokens", [1, 6])
def test_nan_in_nan_out(device, tokens):
    """NaN in a hidden row and in one expert's weights: exactly the reference's rows NaN."""
    feats = _features(tokens, 9, 3, 1, 64, 32, "bf16", device)
    args, kwargs = spec.make_nonfinite_inputs(feats, device, _seed("nan", tokens))
    expected = reference(*args, **kwargs)
    assert torch.isnan(expected[0]).all()
    if tokens > 1:
        assert torch.isnan(expected).any(dim=1).sum() >= 2
        assert torch.isfinite(expected).all(dim=1).any()
    for kernel in _kernels_here(feats):
        with poisoned_outputs():
            got = _run(kernel, *args, **kwargs)
        result = spec.compare(got, expected, feats)
        assert result.passed, f"{kernel}: {result.detail} {dict(result.metrics)}"


@pytest.mark.parametrize("bad_id", [-1, 11, 1 << 20])
def test_out_of_range_ids_never_read_memory(device, bad_id):
    """An id past E + S (only a kernel can see values on later calls): the reference
    raises naming it; kernels that would need a device sync to check return a NaN row
    for that token only, and never read out of bounds."""
    feats = _features(5, 9, 3, 2, 64, 32, "bf16", device)
    (hidden, w13, w2, weights, ids), kwargs = spec.make_inputs(feats, device, _seed("bad", bad_id))
    good = reference(hidden, w13, w2, weights, ids, **kwargs)
    ids[2, 1] = bad_id
    with pytest.raises(ValueError, match=r"ids: .*token 2 slot 1"):
        reference(hidden, w13, w2, weights, ids, **kwargs)
    for kernel in [k for k in _kernels_here(feats) if k != "torch"]:
        if kernel == "vllm":  # checks ids on the host (CPU: no sync to avoid) and raises
            with pytest.raises(ValueError, match="ids: expected expert ids"):
                _run(kernel, hidden, w13, w2, weights, ids, **kwargs)
            continue
        got = _run(kernel, hidden, w13, w2, weights, ids, **kwargs)
        assert torch.isnan(got[2]).all(), kernel
        rows = [0, 1, 3, 4]
        result = spec.compare(got[rows], good[rows], {**feats, "tokens": 4})
        assert result.passed, f"{kernel}: {result.detail}"


def test_separate_strategies_refuse_misplaced_shared_ids(device):
    """triton_separate runs expert E + s densely for column k + s; a token whose shared
    column names another expert gets a NaN row instead of a silently different sum."""
    if not _triton_runs(device):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    feats = _features(4, 9, 3, 2, 64, 32, "fp32", device)
    (hidden, w13, w2, weights, ids), kwargs = spec.make_inputs(feats, device, _seed("misplaced"))
    ids[1, 3], ids[1, 4] = ids[1, 4].clone(), ids[1, 3].clone()
    with pytest.raises(ValueError, match="last num_shared=2 columns"):
        spec.validate(hidden, w13, w2, weights, ids, **kwargs)
    got = _run("triton_separate", hidden, w13, w2, weights, ids, **kwargs)
    assert torch.isnan(got[1]).all() and torch.isfinite(got[[0, 2, 3]]).all()
    fused = _run("triton", hidden, w13, w2, weights, ids, **kwargs)  # ids as given: the formula
    assert spec.compare(fused, reference(hidden, w13, w2, weights, ids, **kwargs), feats).passed


# --------------------------------------------------------------------------- align


def _align_python(ids: list[list[int]], num_experts: int, block_m: int):
    """Pure-Python moe_align_block_size: per expert its slots (row-major), padded to
    block_m with the sentinel T*K; the expert of each tile; slots with bad ids dropped."""
    slots_per_token = len(ids[0])
    sentinel = len(ids) * slots_per_token
    per_expert = {e: [] for e in range(num_experts)}
    for t, row in enumerate(ids):
        for j, e in enumerate(row):
            if 0 <= e < num_experts:
                per_expert[e].append(t * slots_per_token + j)
    runs, tiles = [], []
    for e in range(num_experts):
        slots = per_expert[e]
        padded = -(-len(slots) // block_m) * block_m
        runs.append((e, sorted(slots), padded))
        tiles += [e] * (padded // block_m)
    return runs, tiles, sentinel


@pytest.mark.parametrize(
    "tokens,slots,experts,block_m,bad",
    [(1, 9, 129, 16, False), (7, 3, 13, 16, True), (300, 8, 64, 64, False), (40, 10, 513, 32, True), (3, 4, 2, 16, False)],
)
def test_align_matches_python(device, tokens, slots, experts, block_m, bad):
    if not _triton_runs(device):
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    from kernmux.kernels.moe_experts.triton import align

    gen = torch.Generator().manual_seed(_seed("align", tokens, experts))
    ids = torch.randint(0, experts, (tokens, slots), generator=gen, dtype=torch.int32)
    if bad:
        ids[0, 0], ids[-1, -1] = -3, experts + 5
    base = torch.zeros((tokens, slots + 2), dtype=torch.int32)
    base[:, 1:1 + slots] = ids
    sorted_slots, block_expert, num_padded, max_blocks = align(base[:, 1:1 + slots].to(device), experts, block_m)
    runs, tiles, sentinel = _align_python(ids.tolist(), experts, block_m)
    total = sum(padded for _, _, padded in runs)
    assert int(num_padded) == total
    assert max_blocks * block_m >= total
    assert block_expert.cpu().tolist() == tiles + [-1] * (max_blocks - len(tiles))
    got = sorted_slots.cpu().tolist()
    start = 0
    for expert, slots_of_e, padded in runs:
        run = got[start:start + padded]
        assert sorted(s for s in run if s != sentinel) == slots_of_e, expert
        assert run.count(sentinel) == padded - len(slots_of_e), expert
        start += padded
    assert all(s == sentinel for s in got[total:])


# ---------------------------------------------------------------------- validation


def _valid_args(device="cpu"):
    feats = _features(3, 6, 2, 1, 32, 16, "bf16", device)
    return spec.make_inputs(feats, device, 5)


@pytest.mark.parametrize(
    "mutate,error,pattern",
    [
        (lambda a, k: a.__setitem__(0, a[0].float()), TypeError, "w13: expected hidden's dtype"),
        (lambda a, k: a.__setitem__(0, a[0][0]), ValueError, r"hidden: expected a 2-D tensor"),
        (lambda a, k: a.__setitem__(0, a[0].to(torch.int32)), TypeError, "hidden: expected dtype"),
        (lambda a, k: a.__setitem__(1, a[1].float()), TypeError, "w13: expected hidden's dtype"),
        (lambda a, k: a.__setitem__(1, a[1][:, :-1]), ValueError, "w13: expected an even"),
        (lambda a, k: a.__setitem__(1, a[1][..., :-1]), ValueError, "w13: expected last dimension"),
        (lambda a, k: a.__setitem__(2, a[2][..., :-1]), ValueError, r"w2: expected shape"),
        (lambda a, k: a.__setitem__(3, a[3].double()), TypeError, "weights: expected dtype float32"),
        (lambda a, k: a.__setitem__(3, a[3][:, :-1]), ValueError, "weights: expected ids' shape"),
        (lambda a, k: a.__setitem__(4, a[4].long()), TypeError, "ids: expected dtype int32"),
        (lambda a, k: a.__setitem__(4, a[4][:-1]), ValueError, "ids/weights: expected 3 rows"),
        (lambda a, k: a[4].__setitem__((1, 0), 7), ValueError, r"ids: expected expert ids in \[0, 7\)"),
        (lambda a, k: a[4].__setitem__((2, 2), 0), ValueError, "last num_shared=1 columns"),
        (lambda a, k: a.__setitem__(1, a[1][:0]), ValueError, "w13: expected at least one expert"),
        (lambda a, k: a.__setitem__(0, a[0][:, :0]), ValueError, "hidden: expected a non-empty"),
        (lambda a, k: k.__setitem__("activation", "gelu"), ValueError, "activation: expected one of"),
        (lambda a, k: k.__setitem__("num_shared", 3), ValueError, r"ids: expected topk \+ num_shared"),
        (lambda a, k: k.__setitem__("num_shared", 7), ValueError, "num_shared: expected 0 <= num_shared < 7"),
        (lambda a, k: k.__setitem__("num_shared", 1.0), TypeError, "num_shared: expected an int"),
        (lambda a, k: a.__setitem__(2, "w2"), TypeError, "w2: expected a torch.Tensor"),
    ],
)
def test_validate_names_the_argument(mutate, error, pattern):
    args, kwargs = _valid_args()
    args = list(args)
    spec.validate(*args, **kwargs)
    mutate(args, kwargs)
    with pytest.raises(error, match=pattern):
        spec.validate(*args, **kwargs)


def test_validate_device_mismatch():
    if not torch.cuda.is_available():
        pytest.skip("needs two devices")
    args, kwargs = _valid_args()
    args = list(args)
    args[3] = args[3].cuda()
    with pytest.raises(ValueError, match="weights: expected hidden's device"):
        spec.validate(*args, **kwargs)


def test_features_recover_experts_and_topk():
    args, kwargs = _valid_args()
    assert spec.features(*args, **kwargs) == _features(3, 6, 2, 1, 32, 16, "bf16", "cpu")
    # Malformed arguments never raise here (validate() reports them).
    assert spec.features("x", None, 3, [], (), num_shared="2")["experts"] == -1


def test_ops_entry_point_dispatches(device):
    """kernmux.ops.moe_experts: validation on a miss, then the chosen kernel's answer."""
    import kernmux.ops

    feats = _features(5, 7, 2, 1, 32, 16, "bf16", device)
    args, kwargs = spec.make_inputs(feats, device, _seed("ops"))
    got = kernmux.ops.moe_experts(*args, **kwargs)
    assert spec.compare(got, reference(*args, **kwargs), feats).passed
    bad = list(args)
    bad[4] = bad[4].clone()
    bad[4][0, 0] = 99
    with pytest.raises(ValueError, match="ids: expected expert ids"):
        kernmux.ops.moe_experts(*bad[:3], bad[3][:, :2].contiguous(), bad[4][:, :2].contiguous())


# --------------------------------------------------------------- spec and configs


def test_bucket_rounds_tokens_only():
    feats = _features(4097, 128, 8, 1, 2048, 768, "bf16", "cuda")
    assert spec.bucket(feats) == {**feats, "tokens": 8192}
    assert spec.bucket({**feats, "tokens": 1})["tokens"] == 1


def test_roofline_model():
    # One token reads exactly its k + S experts; many tokens read all E + S at most.
    one = spec.roofline(_features(1, 128, 8, 1, 2048, 768, "bf16", "cuda"), current_platform())
    expert_bytes = 3 * 2048 * 768 * 2
    assert one.bytes == pytest.approx(9 * expert_bytes + 2 * 2048 * 2 + 9 * 8)
    assert one.flops == 2 * 9 * 3 * 2048 * 768
    many = spec.roofline(_features(16384, 128, 8, 1, 2048, 768, "bf16", "cuda"), current_platform())
    assert 128.9 * expert_bytes < many.bytes - 2 * 16384 * 2048 * 2 - 16384 * 9 * 8 <= 129 * expert_bytes
    assert spec.expected_experts_hit(0, 128, 8, 1) == 0.0


@pytest.mark.parametrize("tokens", [1, 4, 16, 64, 256, 1024, 4096, 16384])
@pytest.mark.parametrize(
    "experts,topk,shared,hidden,inter",
    [(128, 8, 0, 2048, 768), (512, 10, 1, 2048, 512), (256, 8, 1, 7168, 2048), (13, 7, 2, 64, 40)],
)
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_heuristic_config_is_in_the_space_and_valid(tokens, experts, topk, shared, hidden, inter, dtype):
    feats = _features(tokens, experts, topk, shared, hidden, inter, dtype, "cuda")
    config = heuristic_config(feats, units=132)
    assert set(config) == set(CONFIG_SPACE)
    assert all(config[k] in CONFIG_SPACE[k] for k in config), config
    assert config_valid(config, feats), config


def test_decode_heuristic_spreads_weight_streaming():
    """At one token the gate/up GEMM gets enough programs to keep every SM streaming."""
    feats = _features(1, 128, 8, 0, 2048, 768, "bf16", "cuda")
    config = heuristic_config(feats, units=132)
    assert config["BLOCK_M"] == 16
    assert 8 * -(-768 // config["BLOCK_N"]) >= 2 * 132


def test_config_valid_prunes_shared_memory_and_oversized_tiles():
    big = _features(16384, 128, 8, 0, 2048, 768, "bf16", "cuda")
    assert not config_valid({"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 256, "GROUP_M": 8, "num_warps": 8, "num_stages": 5}, big)
    small = _features(1, 8, 2, 0, 64, 32, "bf16", "cuda")
    assert not config_valid({"BLOCK_M": 128, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 2}, small)
    assert not config_valid({"BLOCK_M": 16, "BLOCK_N": 256, "BLOCK_K": 32, "GROUP_M": 1, "num_warps": 4, "num_stages": 2}, small)


# --------------------------------------------------------------------------- GPU only


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", ["triton", "triton_separate", "triton_dual_stream", "grouped_mm"])
def test_cuda_graph_replay_matches_eager(kernel):
    """Static shapes, no host sync: each strategy captures into a CUDA graph."""
    feats = _features(6, 16, 4, 1, 256, 128, "bf16", "cuda")
    args, kwargs = spec.make_inputs(feats, "cuda", _seed("graph", kernel))
    fn = REGISTRY.kernels_of(OP)[kernel].bind(None)
    eager = fn(*args, **kwargs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn(*args, **kwargs)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = fn(*args, **kwargs)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, eager)


@pytest.mark.gpu
def test_dual_stream_with_inputs_released_after_the_call():
    """hidden freed right after the call and a NaN tensor allocated in its place while the
    side stream may still be reading: the result still equals the reference."""
    feats = _features(64, 32, 4, 2, 512, 256, "bf16", "cuda")
    args, kwargs = spec.make_inputs(feats, "cuda", _seed("release"))
    expected = reference(*args, **kwargs)
    hidden = args[0].clone()
    out = _run("triton_dual_stream", hidden, *args[1:], **kwargs)
    del hidden
    junk = torch.full((64, 512), float("nan"), dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    result = spec.compare(out, expected, feats)
    assert result.passed, result.detail
    del junk
