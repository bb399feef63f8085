"""mxfp4_linear's decode kernel ``triton_gemv`` (M <= 16) against the reference, its
split-K reductions, config space and heuristic, dispatch by M, and (without a GPU) its
compilation for sm_90.

On CPU the kernel runs in the Triton interpreter (small shapes, every mode); tests
marked ``gpu`` run the benchmark shapes on CUDA. Shapes include the issue's odd ones:
N = 1 and 2880, K = 32 and 4128, M = 1, 3 and 16, bias on and off, fp16 and bf16.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kernmux.dispatch.outputs import poisoned_outputs
from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import REGISTRY
from kernmux.dispatch.resolver import resolve
from kernmux.dispatch.verify import verify_kernel
from kernmux.kernels.mxfp4_linear import spec
from kernmux.kernels.mxfp4_linear import triton_gemv as gemv
from kernmux.kernels.mxfp4_linear.formats import quantize_mxfp4
from kernmux.kernels.mxfp4_linear.reference import mxfp4_linear as reference
from kernmux.kernels.mxfp4_linear.triton_gemv_config import (
    MAX_TOKENS,
    MODE_DOT,
    MODE_DOT_BY_POSITION,
    MODE_FMA,
    PARTIAL_TRAFFIC,
    PROGRAMS_PER_UNIT,
    REDUCE_KERNEL,
    REDUCE_LAST_PROGRAM,
    WEIGHT_BYTES_PER_VALUE,
    auto_config,
    block_m,
    config_problem,
    splits_run,
)
from kernmux.dispatch.rule_model import RuleSet
from kernmux.rules.loader import load_rules

OP = "mxfp4_linear"
KERNEL = "triton_gemv"
MODES = {"fma": MODE_FMA, "dot": MODE_DOT, "dot_by_position": MODE_DOT_BY_POSITION}
BENCH_SHAPES = [(1536, 7168), (24576, 1536), (7168, 16384), (5120, 2880), (2880, 4096)]  # (N, K)
ROOT = Path(__file__).resolve().parents[2]


def feats(tokens=3, n=40, k=96, dtype="bf16", bias=False, device="cpu"):
    return dict(tokens=tokens, n=n, k=k, dtype=dtype, bias=bias, device=device)


def run(args, config):
    fn = REGISTRY.kernels_of(OP)[KERNEL].bind(config)
    with poisoned_outputs():
        return fn(*args)


# --------------------------------------------------------------------------- parity

# ((tokens, n, k, dtype, bias), mode): the odd sizes, kept small for the
# interpreter; MODE_FMA (one or two rows per program) where few rows make sense.
CASES = [
    ((1, 1, 32, "bf16", False), MODE_FMA),
    ((1, 1, 32, "bf16", False), MODE_DOT),
    ((1, 1, 32, "fp16", False), MODE_DOT_BY_POSITION),
    ((1, 2880, 64, "bf16", True), MODE_FMA),
    ((1, 2880, 64, "bf16", True), MODE_DOT_BY_POSITION),
    ((3, 40, 4128, "fp16", True), MODE_FMA),
    ((3, 40, 4128, "fp16", True), MODE_DOT),
    ((3, 40, 4128, "bf16", True), MODE_DOT_BY_POSITION),
    ((16, 24, 4128, "bf16", False), MODE_DOT),
    ((16, 24, 4128, "bf16", False), MODE_DOT_BY_POSITION),
    ((16, 2880, 32, "fp16", True), MODE_DOT_BY_POSITION),
    ((2, 33, 320, "bf16", True), MODE_FMA),
    ((2, 33, 320, "fp16", False), MODE_DOT),
]
MODE_NAMES = {mode: name for name, mode in MODES.items()}


@pytest.mark.parametrize(
    "shape, mode", CASES,
    ids=["M{}-N{}-K{}-{}-{}-{}".format(*s[:4], "bias" if s[4] else "nobias", MODE_NAMES[m]) for s, m in CASES],
)
def test_modes_match_reference(device, shape, mode):
    tokens, n, k, dtype, bias = shape
    f = feats(tokens=tokens, n=n, k=k, dtype=dtype, bias=bias, device=device)
    assert not config_problem({"MODE": mode}, f), config_problem({"MODE": mode}, f)
    result = verify_kernel(OP, KERNEL, f, seed=tokens + n + k + mode, config={"MODE": mode})
    assert result.status == "pass", (result.detail, result.metrics)


# Explicit configs: prefetching with and without whole blocks, split-K by both
# reductions, narrow and wide tiles.
CONFIG_CASES = [
    ((1, 40, 4096, "bf16", True), {"MODE": MODE_FMA, "num_stages": 2, "BLOCK_K": 256, "SPLIT_K": 4}),
    ((2, 40, 4128, "fp16", False), {"MODE": MODE_FMA, "num_stages": 2, "BLOCK_K": 256, "SPLIT_K": 4}),
    ((2, 40, 1056, "bf16", True), {"MODE": MODE_FMA, "num_stages": 1, "BLOCK_N": 8, "BLOCK_K": 128, "SPLIT_K": 4, "REDUCE": REDUCE_KERNEL}),
    ((5, 70, 1024, "bf16", True), {"MODE": MODE_FMA, "BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 2}),  # 3 programs along M
    ((9, 70, 1056, "fp16", True), {"MODE": MODE_DOT, "BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 2}),
    ((16, 70, 1024, "bf16", False), {"MODE": MODE_DOT_BY_POSITION, "BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 4, "REDUCE": REDUCE_KERNEL}),
]


@pytest.mark.parametrize("shape, config", CONFIG_CASES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()) if isinstance(c, dict) else "M{}-K{}".format(c[0], c[2]))
def test_configs_match_reference(device, shape, config):
    tokens, n, k, dtype, bias = shape
    f = feats(tokens=tokens, n=n, k=k, dtype=dtype, bias=bias, device=device)
    assert not config_problem(config, f), config_problem(config, f)
    result = verify_kernel(OP, KERNEL, f, seed=11, config=config)
    assert result.status == "pass", (result.detail, result.metrics)


@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_both_reductions_give_the_same_bits_and_leave_the_counters_zero(device, mode):
    f = feats(tokens=3 if mode != MODE_FMA else 2, n=70, k=1024, bias=True, device=device)
    (x, w, s, b), _ = spec.make_inputs(f, device, 5)
    base = {"MODE": mode, "BLOCK_N": 32, "BLOCK_K": 256 if mode == MODE_FMA else 128, "SPLIT_K": 4}
    in_kernel = run((x, w, s, b), {**base, "REDUCE": REDUCE_LAST_PROGRAM})
    again = run((x, w, s, b), {**base, "REDUCE": REDUCE_LAST_PROGRAM})
    second_kernel = run((x, w, s, b), {**base, "REDUCE": REDUCE_KERNEL})
    assert torch.equal(in_kernel, again) and torch.equal(in_kernel, second_kernel)
    assert spec.compare(in_kernel, reference(x, w, s, b), f).passed
    counters = gemv._tile_counters(torch.device(device))
    assert int(counters.count_nonzero()) == 0


@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
def test_non_finite_inputs_give_the_reference_pattern(device, mode):
    f = feats(tokens=4, n=40, k=256, bias=True, device=device)
    (x, w, s, b), _ = spec.make_nonfinite_inputs(f, device, 2)
    got = run((x, w, s, b), {"MODE": mode, "SPLIT_K": 2})
    result = spec.compare(got, reference(x, w, s, b), f)
    assert result.passed, result.detail
    assert got[0].isnan().all() and got[:, -1].isnan().all()


def _scaled_problem(scale_bytes, x_scale, device, dtype=torch.bfloat16):
    """One weight row per E8M0 byte (every group of the row at that scale), random
    codes; x ~ N(0, 1) * x_scale so that every output is a normal number."""
    gen = torch.Generator().manual_seed(3)
    k = 64
    codes_src = torch.randn(len(scale_bytes), k, generator=gen)
    w, _ = quantize_mxfp4(codes_src)
    s = torch.tensor(scale_bytes, dtype=torch.uint8)[:, None].repeat(1, k // 32)
    x = (torch.randn(3, k, generator=gen) * x_scale).to(dtype)
    return x.to(device), w.to(device), s.to(device)


@pytest.mark.parametrize("mode", MODES.values(), ids=MODES.keys())
@pytest.mark.parametrize(
    "scale_bytes, x_scale",
    [((0, 1, 2, 10, 100, 127), 2.0**8), ((128, 200, 240, 241, 247, 252), 2.0**-16)],
    ids=["low-scales", "high-scales"],
)
def test_every_finite_scale_range_is_exact(device, mode, scale_bytes, x_scale):
    """The factor split 2^(min(s,240)-113) * 2^(max(s,240)-240): scales around 240, the
    smallest (2^-127, a float32 subnormal in the reference) and the largest a quantizer
    makes from finite weights (252)."""
    x, w, s = _scaled_problem(scale_bytes, x_scale, device)
    got = run((x, w, s, None), {"MODE": mode})
    expected = reference(x, w, s)
    assert torch.isfinite(expected.float()).all()
    result = spec.compare(got, expected, feats(tokens=3, n=len(scale_bytes), k=64, device=device))
    assert result.passed, result.detail


@pytest.mark.parametrize("mode", [MODE_DOT, MODE_DOT_BY_POSITION], ids=["dot", "dot_by_position"])
def test_dot_modes_keep_weights_beyond_float32_infinite(device, mode):
    """Scale bytes 253/254 with large codes dequantize beyond float32 (inf in the
    reference); the dot modes form each weight value, so they agree. (MODE_FMA scales
    group sums instead and returns a finite number there: README, "Tolerance".)"""
    x, w, s = _scaled_problem((253, 254, 127), 2.0**-16, device)
    got = run((x, w, s, None), {"MODE": mode})
    expected = reference(x, w, s)
    assert not torch.isfinite(expected[:, :2].float()).all()
    assert spec.compare(got, expected, feats(tokens=3, n=3, k=64, device=device)).passed


@pytest.mark.parametrize("mode", [MODE_FMA, MODE_DOT_BY_POSITION], ids=["fma", "dot_by_position"])
def test_strided_inputs(device, mode):
    f, = (feats(tokens=6, n=40, k=128, bias=True, device=device),)
    (x, w, s, b), _ = spec.make_inputs(f, device, 4)
    wide_x = torch.zeros(6, 256, dtype=x.dtype, device=device)
    wide_x[:, ::2] = x
    wide_w = torch.zeros(40, 130, dtype=torch.uint8, device=device)
    wide_w[:, 66:] = w  # rows not 4-byte aligned: the kernel works on a contiguous copy
    wide_s = torch.zeros(8, 40, dtype=torch.uint8, device=device).T  # column-major scales
    wide_s[:, 2:6] = s
    args = (wide_x[:, ::2], wide_w[:, 66:], wide_s[:, 2:6], b)
    assert not args[0].is_contiguous() and not args[1].is_contiguous() and not args[2].is_contiguous()
    got = run(args, {"MODE": mode})
    assert spec.compare(got, reference(x, w, s, b), f).passed


# --------------------------------------------------------------------------- config space


def _programs(config, tokens, n, k):
    splits, _ = splits_run(k, config["BLOCK_K"], config["SPLIT_K"])
    return -(-n // config["BLOCK_N"]) * splits * -(-tokens // block_m(config["MODE"], tokens))


@pytest.mark.parametrize("n, k", BENCH_SHAPES)
def test_heuristic_fills_the_h200_and_bounds_the_partials(n, k):
    for tokens in (1, 2, 4, 16):
        config = auto_config(tokens, n, k, units=132)
        assert config["MODE"] == (MODE_FMA if tokens <= 2 else MODE_DOT_BY_POSITION)
        programs = _programs(config, tokens, n, k)
        # Decode rows: four programs per SM; 16 rows: at least two (the partials' bound).
        assert programs >= (PROGRAMS_PER_UNIT if tokens <= 2 else 2) * 132, (tokens, config, programs)
        splits, _ = splits_run(k, config["BLOCK_K"], config["SPLIT_K"])
        assert splits == config["SPLIT_K"]
        partial_bytes = 2 * 4 * splits * tokens * n
        assert splits == 1 or partial_bytes <= PARTIAL_TRAFFIC * n * k * WEIGHT_BYTES_PER_VALUE
        assert not config_problem({}, feats(tokens=tokens, n=n, k=k))


def test_every_decode_problem_has_a_valid_default():
    for tokens in range(1, MAX_TOKENS + 1):
        for n, k in BENCH_SHAPES + [(1, 32), (2880, 64), (96, 4128), (33, 320), (7, 32)]:
            for mode in (0, *MODES.values()):
                problem = config_problem({"MODE": mode}, feats(tokens=tokens, n=n, k=k))
                assert not problem, (tokens, n, k, mode, problem)


def test_config_problems_are_named():
    small = feats(tokens=1, n=16, k=256)
    assert "up to 16" in config_problem({}, feats(tokens=17))
    assert "BLOCK_N=8 < 16" in config_problem({"MODE": MODE_DOT, "BLOCK_N": 8}, small)
    assert "BLOCK_K=64 < 128" in config_problem({"MODE": MODE_DOT_BY_POSITION, "BLOCK_K": 64}, small)
    assert "BLOCK_N=32 > N" in config_problem({"BLOCK_N": 32}, small)
    assert "SPLIT_K=4 > K blocks" in config_problem({"SPLIT_K": 4, "BLOCK_K": 128}, small)
    assert "per thread" in config_problem({"BLOCK_N": 128, "BLOCK_K": 1024, "num_warps": 2}, feats(tokens=1, n=4096, k=4096))
    kernel = REGISTRY.kernels_of(OP)[KERNEL]
    assert kernel.config_valid({"MODE": MODE_FMA}, small) and not kernel.config_valid({"SPLIT_K": 32}, small)


# --------------------------------------------------------------------------- dispatch


def _sm90() -> Platform:
    return Platform(vendor="cuda", arch="sm_90", device="NVIDIA H200", units=132,
                    libs={"torch": "2.11.0", "triton": "3.6.0"}, what_if=True)


def test_dispatch_takes_the_decode_kernel_up_to_16_rows_only():
    # Priority alone: the decode kernel up to 16 rows; with the shipped rules, from 3 rows
    # the GEMM is preferred (measured faster there on the H200).
    for tokens, kernel in ((1, KERNEL), (3, KERNEL), (16, KERNEL), (17, "triton"), (4096, "triton")):
        decision = resolve(OP, feats(tokens=tokens, n=1536, k=7168, device="cuda"), _sm90(), RuleSet(), force={})
        assert (decision.kernel, decision.source) == (kernel, "priority"), (tokens, decision.kernel)
    shipped = {t: resolve(OP, feats(tokens=t, n=1536, k=7168, device="cuda"), _sm90(), load_rules(), force={})
               for t in (1, 2, 3, 16)}
    assert [(shipped[t].kernel, shipped[t].source) for t in (1, 2)] == [(KERNEL, "priority")] * 2
    assert [(shipped[t].kernel, shipped[t].source) for t in (3, 16)] == [("triton", "prefer")] * 2
    support = REGISTRY.kernels_of(OP)[KERNEL].check(feats(tokens=17, device="cuda"), _sm90())
    assert not support.ok and "M <= 16" in support.reason


# --------------------------------------------------------------------------- sm_90 compile

_COMPILE = r"""
import json, re, subprocess, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource
from kernmux.kernels.mxfp4_linear import triton_gemv as g

out = []
for c in json.loads(sys.argv[1]):
    fn = g._mxfp4_gemv_kernel
    consts = dict(HAS_BIAS=c["bias"], SPLIT=True, REDUCE_HERE=True, MODE=c["mode"], BLOCK_M=c["bm"],
                  BLOCK_N=c["bn"], BLOCK_K=c["bk"], EVEN_K=c["even"], PREFETCH=c["prefetch"], UPCAST=False,
                  stride_xk=1, stride_sk=1, stride_yn=1)
    pointers = {"x_ptr": "*bf16", "w_ptr": "*i32", "s_ptr": "*u8", "b_ptr": "*bf16", "y_ptr": "*bf16",
                "p_ptr": "*fp32", "c_ptr": "*i32"}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        sig[name] = "constexpr" if name in consts else pointers.get(name, "i32")
        if name in pointers or name in ("N", "K", "K_PER_SPLIT", "stride_xm", "stride_wn", "stride_sn", "stride_ym"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    kernel = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                            target=GPUTarget("cuda", 90, 32), options={"num_warps": c["warps"], "num_stages": c["stages"]})
    with open(sys.argv[2], "w") as f:
        f.write(kernel.asm["ptx"])
    info = subprocess.run([get_ptxas(90).path, "-arch=sm_90a", "-v", sys.argv[2], "-o", sys.argv[2] + ".cubin"],
                          capture_output=True, text=True).stderr
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.findall(r"(\d+) bytes spill (?:stores|loads)", info)
    out.append({"config": c, "shared": kernel.metadata.shared, "registers": int(regs.group(1)) if regs else None,
                "spill_bytes": sum(map(int, spills)) if spills else None, "ptxas": info[-300:]})
print(json.dumps(out))
"""


def _nvidia_backend() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _nvidia_backend(), reason="Triton's NVIDIA backend (ptxas) is not installed")
def test_heuristic_kernels_compile_for_sm90_without_spills(tmp_path):
    """Triton's own compiler (the one installed here) for sm_90, no GPU needed: the
    kernel variants the heuristic launches at the benchmark shapes build, fit the
    shared memory of an H100/H200 (227 KB) and do not spill registers."""
    variants = [
        dict(mode=MODE_FMA, bm=1, bn=16, bk=512, warps=4, stages=2, even=True, prefetch=True, bias=False),
        dict(mode=MODE_FMA, bm=2, bn=16, bk=512, warps=4, stages=2, even=False, prefetch=True, bias=True),
        dict(mode=MODE_DOT_BY_POSITION, bm=16, bn=64, bk=256, warps=4, stages=3, even=False, prefetch=False, bias=True),
        dict(mode=MODE_DOT, bm=16, bn=32, bk=256, warps=4, stages=3, even=True, prefetch=False, bias=False),
    ]
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run([sys.executable, "-c", _COMPILE, json.dumps(variants), str(tmp_path / "k.ptx")],
                          capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for row in json.loads(proc.stdout.strip().splitlines()[-1]):
        assert row["registers"] is not None and row["spill_bytes"] == 0, row
        assert row["shared"] <= 227 * 1024, row


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 2, 3, 16])
@pytest.mark.parametrize("n, k", BENCH_SHAPES)
def test_gpu_heuristic_and_other_modes_match_at_benchmark_shapes(tokens, n, k):
    f = feats(tokens=tokens, n=n, k=k, bias=tokens == 3, device="cuda")
    for config in ({}, {"MODE": MODE_FMA}, {"MODE": MODE_DOT}, {"MODE": MODE_DOT_BY_POSITION}, {"REDUCE": REDUCE_KERNEL}):
        result = verify_kernel(OP, KERNEL, f, seed=tokens + n, config=config)
        assert result.status == "pass", (config, result.detail, result.metrics)


@pytest.mark.gpu
def test_gpu_in_kernel_reduction_is_deterministic_and_graph_safe():
    """Many programs race for the arrival counters: the bits never change, match the
    two-kernel reduction, survive CUDA-graph capture on a fresh stream (the counters
    first allocated during capture) and replay, and the counters end at zero."""
    f = feats(tokens=16, n=1536, k=7168, bias=True, device="cuda")
    (x, w, s, b), _ = spec.make_inputs(f, "cuda", 9)
    for mode in MODES.values():
        config = {"MODE": mode, "SPLIT_K": 8, "BLOCK_N": 16}
        first = run((x, w, s, b), config)
        for _ in range(20):
            assert torch.equal(run((x, w, s, b), config), first)
        assert torch.equal(run((x, w, s, b), {**config, "REDUCE": REDUCE_KERNEL}), first)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            captured = REGISTRY.kernels_of(OP)[KERNEL].bind(config)(x, w, s, b)
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
            assert torch.equal(captured, first)
    torch.cuda.synchronize()
    for counters in gemv._COUNTERS.values():
        assert int(counters.count_nonzero()) == 0
