"""mxfp4_linear on a GPU: parity first, then every kernel side by side with cuBLAS bf16.

Run on the GPU machine (kernmux need not be installed):

    PYTHONPATH=. python3 benchmarks/mxfp4_linear.py --out "$OUT" [--quick] [--tag h200]

``--quick`` (about 3 minutes of GPU time): M = 1, 16, 256, 4096, the auto configs only.
The full run adds M = 4, 64, 1024, 16384 and a few alternative configs of the two fused
kernels (``triton``, and ``triton_gemv`` up to 16 rows) per problem (the fastest is what
a tuned database would keep). ``--smoke`` runs tiny shapes on the CPU under
TRITON_INTERPRET=1 to check the script.

Writes ``mxfp4_linear_<tag>.json`` (rows: environment, ceilings, parity, timings) and
``mxfp4_linear_<tag>.md`` (the issue's goals, each with its numbers).

``--explore-decode`` (about 90 s of GPU time) instead times a handful of ``triton_gemv``
configs (``EXPLORE_CONFIGS``) at M = 1 and 16 on the five shapes, each checked against
the reference first, beside dequantize-then-cuBLAS and cuBLAS bf16, and reports the
fastest config per shape (for the shape heuristic in ``triton_gemv_config.py``):
``mxfp4_linear_explore_decode_<tag>.{json,md}``.

- Ceilings are measured here, on this GPU: a 1 GiB device-to-device copy (bytes read +
  written) and a bf16 8192^3 matmul (notes/performance.md: 4.27 TB/s, 797 TFLOP/s on the
  H200 of 2026-11-29).
- Parity follows ``kernmux verify``: fresh inputs per case, outputs poisoned, the op's
  reference and tolerance of the kernel's precision class.
- Timing: ``measure`` (the project's one routine). M <= 64: CUDA-graph replay (what an
  engine decoding under graphs sees) rotating over enough weight copies (at least three
  times the L2 between two uses of one copy, every copy once per captured graph) that
  no call finds its weights in L2; larger M: CUDA events with L2 flushed before each
  call. (Runs before 2026-11-30 rotated over at most 8 copies: the smallest shapes'
  weights could partly stay in the H200's L2 between uses.)
- "cuBLAS bf16" is ``F.linear`` on weights dequantized ahead of time: the unquantized
  upper bound. "choice" is the fastest measured kernmux kernel (any config) for the M
  bucket: what ``kernmux tune`` records and the dispatcher then picks; "default" is what
  the dispatcher picks with no tuning database. "fused" is the faster of the two fused
  Triton kernels (``triton``, ``triton_gemv``): the decode goals are about it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kernmux.dispatch.outputs import poisoned_outputs  # noqa: E402
from kernmux.dispatch.platform import current_platform  # noqa: E402
from kernmux.dispatch.registry import REGISTRY  # noqa: E402
from kernmux.dispatch.resolver import resolve  # noqa: E402
from kernmux.kernels.mxfp4_linear import OP_NAME as OP  # noqa: E402  (registers the op)
from kernmux.kernels.mxfp4_linear.formats import dequantize_mxfp4, quantize_mxfp4  # noqa: E402
from kernmux.rules.loader import load_rules  # noqa: E402

from kernmux.tuning_db.measurement.timing import environment_row, measure  # noqa: E402

SHAPES = [(1536, 7168), (24576, 1536), (7168, 16384), (5120, 2880), (2880, 4096)]  # (N, K)
TOKENS_FULL = [1, 4, 16, 64, 256, 1024, 4096, 16384]
TOKENS_QUICK = [1, 16, 256, 4096]
SMOKE_SHAPES = [(64, 128), (40, 96)]
SMOKE_TOKENS = [1, 5, 33]
GRAPH_MAX_TOKENS = 64
GOALS = {"decode_copy": 0.60, "fused_vs_dequant_m1": 3.0, "prefill_vs_cublas": 0.85, "bucket_gain": 1.15}
FUSED = ("triton", "triton_gemv")
# Distinct weight copies rotated through in graph timing: enough for 3x the L2, at most.
MAX_ROTATION_SETS = 64
EXPLORE_TOKENS = (1, 16)
# triton_gemv configs tried by --explore-decode (0 / absent = the shape heuristic's value;
# MODE 1 FMA, 2 one dot in k order, 3 eight dots by position; REDUCE 1 second kernel,
# 2 last program; num_stages >= 2 prefetches in MODE 1).
EXPLORE_CONFIGS = {
    1: [{}, {"BLOCK_K": 1024, "num_stages": 1}, {"BLOCK_K": 256}, {"BLOCK_N": 32}, {"REDUCE": 1}, {"MODE": 3}],
    16: [{}, {"MODE": 2}, {"MODE": 3, "num_stages": 2}, {"MODE": 3, "BLOCK_N": 32}, {"MODE": 3, "num_warps": 8}, {"MODE": 1}],
}


def alternatives(kernel: str, tokens: int) -> list[dict[str, int]]:
    """Configs of ``kernel`` tried besides the auto one in the full run."""
    if kernel == "triton":
        return triton_alternatives(tokens)
    if kernel == "triton_gemv":
        return [c for c in EXPLORE_CONFIGS[1 if tokens <= 2 else 16] if c]
    return []


def triton_alternatives(tokens: int) -> list[dict[str, int]]:
    """``triton`` configs tried besides the auto one in the full run (0 = auto for that key)."""
    if tokens <= 16:
        return [{"MODE": 1}, {"BLOCK_N": 64, "SPLIT_K": 8}, {"BLOCK_N": 128, "SPLIT_K": 4}, {"BLOCK_N": 32, "BLOCK_K": 128, "SPLIT_K": 8},
                {"BLOCK_N": 64, "SPLIT_K": 4, "num_warps": 8}]
    if tokens <= 256:
        return [{"MODE": 1}, {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128}, {"BLOCK_N": 64, "SPLIT_K": 2}]
    return [{"MODE": 1}, {"BLOCK_M": 128, "BLOCK_N": 256, "BLOCK_K": 64, "num_warps": 8, "num_stages": 3},
            {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4},
            {"BLOCK_M": 64, "BLOCK_N": 256, "BLOCK_K": 128, "num_warps": 8, "num_stages": 3}]


# --------------------------------------------------------------------------- ceilings


def measure_ceilings(device: str, quick: bool) -> dict:
    if device == "cpu":
        return {"kind": "ceiling", "copy_tbs": None, "bf16_tflops": None, "note": "no GPU ceiling on CPU"}
    numel = (1 << 30) // 4
    src = torch.empty(numel, dtype=torch.float32, device=device).normal_()
    dst = torch.empty_like(src)
    copy = measure(lambda: dst.copy_(src), device=device, flush_l2=False, rep_ms=50 if quick else 200)
    copy_tbs = 2 * numel * 4 / (copy.p50_us * 1e6)
    del src, dst
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    mm = measure(lambda: a @ b, device=device, flush_l2=False, rep_ms=100 if quick else 300)
    tflops = 2 * 8192**3 / (mm.p50_us * 1e6)
    return {"kind": "ceiling", "copy_tbs": copy_tbs, "bf16_tflops": tflops, "copy_us": copy.p50_us, "matmul_us": mm.p50_us}


# --------------------------------------------------------------------------- inputs


def make_problem(tokens: int, n: int, k: int, device: str, seed: int, bias: bool = False, dtype=torch.bfloat16):
    """Inputs built on the device (the weight ~ N(0, 1/K), quantized with the OCP rule)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    weight = torch.randn(n, k, generator=gen, device=device) * k**-0.5
    w, w_scale = quantize_mxfp4(weight)
    del weight
    x = torch.randn(tokens, k, generator=gen, device=device).to(dtype)
    b = torch.randn(n, generator=gen, device=device).to(dtype) if bias else None
    return x, w, w_scale, b


def feats_of(tokens, n, k, device, bias=False, dtype="bf16"):
    return {"tokens": tokens, "n": n, "k": k, "dtype": dtype, "bias": bias, "device": device}


def available_kernels(feats: dict) -> dict[str, str]:
    """kernel -> "" if it can run this problem here, else why not."""
    platform = current_platform()
    out = {}
    for name, kernel in sorted(REGISTRY.kernels_of(OP).items()):
        support = kernel.availability(platform)
        if support.ok:
            support = kernel.check(feats, platform)
        out[name] = "" if support.ok else support.reason
    return out


# --------------------------------------------------------------------------- parity


def parity_case(tokens, n, k, device, kernel, seed, bias=False, dtype="bf16", config=None) -> dict:
    op = REGISTRY.op(OP)
    spec = REGISTRY.kernels_of(OP)[kernel]
    feats = feats_of(tokens, n, k, device, bias, dtype)
    row = {"kind": "parity", "kernel": kernel, "precision": spec.precision, "features": feats, "config": spec.full_config(config), "seed": seed}
    x, w, s, b = make_problem(tokens, n, k, device, seed, bias, torch.bfloat16 if dtype == "bf16" else torch.float16)
    expected = op.reference_for(spec.precision)(x.clone(), w.clone(), s.clone(), None if b is None else b.clone())
    try:
        with poisoned_outputs():
            got = spec.bind(config)(x, w, s, b)
        if device == "cuda":
            torch.cuda.synchronize()
    except Exception as e:  # a failure is a result
        return {**row, "status": "error", "detail": f"{type(e).__name__}: {e}"[:500]}
    result = op.compare_for(spec.precision)(got, expected, feats)
    return {**row, "status": "pass" if result.passed else "fail", "metrics": dict(result.metrics), "detail": result.detail}


def parity_rows(device: str, shapes, tokens_list, quick: bool, smoke: bool) -> list[dict]:
    rows, seed = [], 0
    cases = [(m, n, k, False, "bf16") for n, k in shapes for m in ((tokens_list[0], tokens_list[-1]) if quick else tokens_list[::2])]
    odd = [(1, 1, 32, False, "bf16"), (1, 2880, 4096, True, "bf16"), (4097, 2880, 64, True, "bf16"), (7, 96, 4128, True, "fp16"),
           (4097, 1, 4128, False, "fp16"), (33, 5120, 32, True, "bf16")]
    cases += [(min(m, 64) if smoke else m, n if not smoke else min(n, 96), k, bias, dtype) for m, n, k, bias, dtype in odd]
    for m, n, k, bias, dtype in cases:
        kernels = [name for name, why in available_kernels(feats_of(m, n, k, device, bias, dtype)).items() if not why]
        for kernel in kernels:
            if kernel == "torch" and m * n * k > (1 << 36):
                continue  # the reference itself; timed against itself it says nothing
            rows.append(parity_case(m, n, k, device, kernel, seed, bias, dtype))
            seed += 1
            if not quick and not smoke:
                for config in alternatives(kernel, m):
                    if _config_ok(kernel, config, feats_of(m, n, k, device, bias, dtype)):
                        rows.append(parity_case(m, n, k, device, kernel, seed, bias, dtype, config))
                        seed += 1
    return rows


def _config_ok(kernel: str, config: dict, feats: dict) -> bool:
    valid = REGISTRY.kernels_of(OP)[kernel].config_valid
    return valid is None or valid(config, feats)


# --------------------------------------------------------------------------- timing


def _l2_bytes(device: str) -> int:
    if device == "cpu":
        return 0
    return getattr(torch.cuda.get_device_properties(torch.device(device)), "L2_cache_size", 50 << 20)


def rotation_sets(n: int, k: int, device: str) -> int:
    """Weight copies to rotate through so that 3x the L2 passes between two uses of one."""
    if device == "cpu":
        return 1
    packed_bytes = n * k // 2 + n * k // 32
    return max(1, min(MAX_ROTATION_SETS, math.ceil(3 * _l2_bytes(device) / packed_bytes)))


def time_row(fns, device, graph, row, ceilings, roof, warmup_ms, rep_ms) -> dict:
    """One timing row (a failure is a result): graph replay holds every copy once."""
    try:
        t = measure(fns, device=device, warmup_ms=warmup_ms, rep_ms=rep_ms, cuda_graph=graph, graph_batch=max(20, len(fns)))
    except Exception as e:  # a failure is a result
        return {**row, "status": "error", "detail": f"{type(e).__name__}: {e}"[:400]}
    row = {**row, "status": "ok", "timing": t.as_dict(), "p50_us": t.p50_us, "tbs": roof.bytes / (t.p50_us * 1e6),
           "tflops": roof.flops / (t.p50_us * 1e6)}
    if ceilings.get("copy_tbs"):
        row["copy_fraction"] = row["tbs"] / ceilings["copy_tbs"]
        row["peak_fraction"] = row["tflops"] / ceilings["bf16_tflops"]
    return row


def timing_rows(device: str, shapes, tokens_list, quick: bool, ceilings: dict) -> list[dict]:
    rows = []
    rep_ms = 40 if quick else 100
    warmup_ms = 10 if quick else 25
    for n, k in shapes:
        sets = rotation_sets(n, k, device)
        problems = [make_problem(1, n, k, device, seed=100 + i) for i in range(sets)]
        dequantized = [dequantize_mxfp4(w, s, torch.bfloat16) for _, w, s, _ in problems]
        for tokens in tokens_list:
            feats = feats_of(tokens, n, k, device)
            kernels = available_kernels(feats)
            graph = device != "cpu" and tokens <= GRAPH_MAX_TOKENS
            xs = [torch.randn(tokens, k, device=device, dtype=torch.bfloat16) for _ in range(sets if graph else 1)]
            args = [(xs[i % len(xs)], w, s) for i, (_, w, s, _) in enumerate(problems[: len(xs)])]
            roof = REGISTRY.op(OP).roofline(feats, current_platform())
            candidates = [("cublas_bf16", None, [lambda x=x, wd=wd: F.linear(x, wd) for x, wd in zip(xs, dequantized)])]
            for name, why in kernels.items():
                if why or (name == "torch" and tokens > 16):
                    continue
                configs = [None] + ([] if quick else alternatives(name, tokens))
                for config in configs:
                    if config and not _config_ok(name, config, feats):
                        continue
                    fn = REGISTRY.kernels_of(OP)[name].bind(config)
                    candidates.append((name, config, [lambda a=a, fn=fn: fn(*a) for a in args]))
            for name, config, fns in candidates:
                # The reference (a baseline, not a contender) is timed with events.
                row = {"kind": "timing", "kernel": name, "config": config or {}, "features": feats, "bytes": roof.bytes,
                       "flops": roof.flops, "weight_sets": len(fns)}
                row = time_row(fns, device, graph and name != "torch", row, ceilings, roof, warmup_ms, rep_ms)
                rows.append(row)
                shown = f"{row['p50_us']:9.1f} us" if row["status"] == "ok" else row["detail"][:80]
                print(f"  N={n} K={k} M={tokens} {name:<15} {json.dumps(config or {}):<60} {shown}", flush=True)
            del xs, args
        del problems, dequantized
        if device != "cpu":
            torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- explore


def explore_decode(device: str, shapes, tokens_list, ceilings: dict) -> list[dict]:
    """Each EXPLORE_CONFIGS entry of triton_gemv per (shape, M): parity on fresh inputs
    first (a config that fails is not timed), then graph timing over rotated weight
    copies; dequantize-then-cuBLAS and cuBLAS bf16 beside them."""
    rows, seed = [], 1000
    kernel = REGISTRY.kernels_of(OP)["triton_gemv"]
    for n, k in shapes:
        sets = rotation_sets(n, k, device)
        problems = [make_problem(1, n, k, device, seed=200 + i) for i in range(sets)]
        dequantized = [dequantize_mxfp4(w, s, torch.bfloat16) for _, w, s, _ in problems]
        for tokens in tokens_list:
            feats = feats_of(tokens, n, k, device)
            roof = REGISTRY.op(OP).roofline(feats, current_platform())
            xs = [torch.randn(tokens, k, device=device, dtype=torch.bfloat16) for _ in range(sets)]
            args = [(x, w, s) for x, (_, w, s, _) in zip(xs, problems)]
            graph = device != "cpu"
            dequant = REGISTRY.kernels_of(OP)["dequant_cublas"].bind(None)
            baselines = [("cublas_bf16", None, [lambda x=x, wd=wd: F.linear(x, wd) for x, wd in zip(xs, dequantized)]),
                         ("dequant_cublas", None, [lambda a=a: dequant(*a) for a in args])]
            configs = EXPLORE_CONFIGS[1 if tokens <= 2 else 16]
            for name, config, fns in baselines + [("triton_gemv", c, None) for c in configs]:
                row = {"kind": "explore", "kernel": name, "config": config or {}, "features": feats, "bytes": roof.bytes,
                       "flops": roof.flops, "weight_sets": len(args)}
                if name == "triton_gemv":
                    problem = config_problem_of(config, feats)
                    if problem:
                        rows.append({**row, "status": "pruned", "detail": problem})
                        continue
                    row["resolved"] = resolved_config(config, tokens, n, k, device)
                    check = parity_case(tokens, n, k, device, name, seed, config=config)
                    seed += 1
                    if check["status"] != "pass":
                        rows.append({**row, "status": f"parity_{check['status']}", "detail": check.get("detail", "")})
                        print(f"  N={n} K={k} M={tokens} {json.dumps(config)} PARITY {check['status']}: {check.get('detail', '')[:120]}", flush=True)
                        continue
                    fn = kernel.bind(config)
                    fns = [lambda a=a, fn=fn: fn(*a) for a in args]
                row = time_row(fns, device, graph, row, ceilings, roof, warmup_ms=10, rep_ms=30)
                rows.append(row)
                shown = f"{row['p50_us']:8.1f} us" if row["status"] == "ok" else row["detail"][:80]
                print(f"  N={n} K={k} M={tokens} {name:<15} {json.dumps(config or {}):<45} {shown}", flush=True)
            del xs, args
        del problems, dequantized
        if device != "cpu":
            torch.cuda.empty_cache()
    return rows


def config_problem_of(config: dict, feats: dict) -> str:
    from kernmux.kernels.mxfp4_linear.triton_gemv_config import config_problem

    return config_problem(config, feats)


def resolved_config(config: dict, tokens: int, n: int, k: int, device: str) -> dict:
    """The config a launch uses on this device (the heuristic fills its zeros)."""
    from kernmux.kernels.mxfp4_linear.triton_gemv import launch_config

    return launch_config(torch.empty(tokens, k, device=device), n, config)


def summarize_explore(rows, shapes, tokens_list, ceilings, env) -> str:
    lines = [f"# mxfp4_linear decode exploration (triton_gemv) on {env.get('gpu')}", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, {env.get('date')}."]
    if ceilings.get("copy_tbs"):
        lines.append(f"Measured copy ceiling {ceilings['copy_tbs']:.2f} TB/s. Times: p50 us over CUDA-graph replays "
                     "rotating weight copies (>= 3x L2 between uses). `{}` = the shape heuristic's config.")
    best_lines = []
    for n, k in shapes:
        for tokens in tokens_list:
            sel = [r for r in rows if r["kind"] == "explore" and r["features"]["n"] == n and r["features"]["k"] == k
                   and r["features"]["tokens"] == tokens]
            if not sel:
                continue
            lines += ["", f"## N={n}, K={k}, M={tokens}", "", "| kernel | config | resolved | status | p50 us | copy % |", "|---|---|---|---|---|---|"]
            for r in sel:
                frac = r.get("copy_fraction")
                lines.append(f"| {r['kernel']} | `{json.dumps(r['config'])}` | `{json.dumps(r.get('resolved', {}))}` | {r['status']} | "
                             + (f"{r['p50_us']:.1f}" if r.get("p50_us") else "-") + " | " + (f"{100 * frac:.0f}%" if frac is not None else "-") + " |")
            gemv = [r for r in sel if r["kernel"] == "triton_gemv" and r["status"] == "ok"]
            dequant = next((r for r in sel if r["kernel"] == "dequant_cublas" and r["status"] == "ok"), None)
            default = next((r for r in gemv if not r["config"]), None)
            if gemv:
                best = min(gemv, key=lambda r: r["p50_us"])
                frac = best.get("copy_fraction")
                vs_default = f"{default['p50_us'] / best['p50_us']:.2f}x the heuristic's" if default else "heuristic config not timed"
                vs_dequant = f", {dequant['p50_us'] / best['p50_us']:.2f}x dequantize+cuBLAS" if dequant else ""
                best_lines.append(f"- N={n} K={k} M={tokens}: `{json.dumps(best['resolved'])}` {best['p50_us']:.1f} us"
                                  + (f" ({100 * frac:.0f}% of copy)" if frac is not None else "") + f", {vs_default}{vs_dequant}")
    return "\n".join(lines[:3] + ["", "## Best config per shape", ""] + best_lines + lines[3:]) + "\n"


# --------------------------------------------------------------------------- summary


def _reference_class(kernel: str) -> bool:
    kernels = REGISTRY.kernels_of(OP)
    return kernel not in kernels or kernels[kernel].precision == REGISTRY.op(OP).precision


def _best(rows, n, k, tokens, kernel=None, exclude=("cublas_bf16",)):
    """The fastest row for one problem: of ``kernel`` (a name or a tuple of names), or
    of every kernmux kernel of the op's reference class (a W4A4 kernel is not a choice
    unless a rule allows it)."""
    names = (kernel,) if isinstance(kernel, str) else kernel
    pick = [r for r in rows if r["kind"] == "timing" and r["status"] == "ok" and r["features"]["n"] == n and r["features"]["k"] == k
            and r["features"]["tokens"] == tokens
            and (r["kernel"] in names if kernel else r["kernel"] not in exclude and _reference_class(r["kernel"]))]
    return min(pick, key=lambda r: r["p50_us"]) if pick else None


def _default_kernel(n, k, tokens, device) -> str:
    from kernmux.dispatch.rule_model import RuleSet

    try:
        return resolve(OP, feats_of(tokens, n, k, device), current_platform(), load_rules(), force={}).kernel
    except Exception:  # no rules file readable: the plain priority order
        return resolve(OP, feats_of(tokens, n, k, device), current_platform(), RuleSet(), force={}).kernel


def _geomean(values):
    values = [v for v in values if v and v > 0]
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def summarize(rows, shapes, tokens_list, device, ceilings, env, quick) -> str:
    lines = [f"# mxfp4_linear on {env.get('gpu')} ({'quick' if quick else 'full'} run)", "",
             f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, {env.get('date')}."]
    if ceilings.get("copy_tbs"):
        lines.append(f"Measured ceilings: copy {ceilings['copy_tbs']:.2f} TB/s, bf16 matmul {ceilings['bf16_tflops']:.0f} TFLOP/s.")
    parity = [r for r in rows if r["kind"] == "parity"]
    passed = sum(r["status"] == "pass" for r in parity)
    lines += ["", f"## Parity: {passed}/{len(parity)} pass", ""]
    for r in parity:
        if r["status"] != "pass":
            lines.append(f"- **{r['status']}** {r['kernel']} {r['features']} {r['config']}: {r.get('detail', '')[:300]}")
    lines += ["", "## Timings (p50 us; Triton = fastest config measured)", ""]
    kernels = sorted({r["kernel"] for r in rows if r["kind"] == "timing" and r["status"] == "ok"})
    goals = {"decode": [], "m1": [], "prefill": [], "prefill_default": [], "gain": [], "crossover": []}
    for n, k in shapes:
        lines += [f"### N={n}, K={k}", "", "| M | " + " | ".join(kernels) + " | choice | default | copy % (fused) |",
                  "|---|" + "---|" * (len(kernels) + 3)]
        per_kernel: dict[str, list[float]] = {}
        bucket_best = []
        crossover = None
        for tokens in tokens_list:
            cells = []
            for name in kernels:
                best = _best(rows, n, k, tokens, name, exclude=())
                cells.append(f"{best['p50_us']:.1f}" if best else "-")
                if best and name != "cublas_bf16":
                    per_kernel.setdefault(name, []).append(best["p50_us"])
            choice = _best(rows, n, k, tokens)
            default = _default_kernel(n, k, tokens, device)
            default_row = _best(rows, n, k, tokens, default)
            triton = _best(rows, n, k, tokens, FUSED)
            dequant = _best(rows, n, k, tokens, "dequant_cublas")
            cublas = _best(rows, n, k, tokens, "cublas_bf16", exclude=())
            frac = triton.get("copy_fraction") if triton else None
            lines.append(f"| {tokens} | " + " | ".join(cells) + f" | {choice['kernel'] if choice else '-'} | {default} | "
                         + (f"{100 * frac:.0f}%" if frac is not None else "-") + " |")
            if choice:
                bucket_best.append(choice["p50_us"])
            if tokens <= 16 and frac is not None:
                goals["decode"].append((n, k, tokens, frac, triton["kernel"]))
            if tokens == 1 and triton and dequant:
                goals["m1"].append((n, k, dequant["p50_us"] / triton["p50_us"]))
            if tokens >= 4096 and cublas and choice:
                goals["prefill"].append((n, k, tokens, cublas["p50_us"] / choice["p50_us"], choice["kernel"]))
                if default_row:
                    goals["prefill_default"].append((n, k, tokens, cublas["p50_us"] / default_row["p50_us"], default))
            if crossover is None and triton and dequant and dequant["p50_us"] < triton["p50_us"]:
                crossover = tokens
        complete = {name: v for name, v in per_kernel.items() if len(v) == len(tokens_list)}
        if complete and bucket_best:
            single = min(complete, key=lambda name: _geomean(complete[name]))
            gain = _geomean([s / b for s, b in zip(complete[single], bucket_best)])
            goals["gain"].append((n, k, single, gain))
        goals["crossover"].append((n, k, crossover))
        lines.append("")
    lines += ["## Goals", ""]
    if goals["decode"]:
        worst = min(goals["decode"], key=lambda g: g[3])
        lines.append(f"- decode (M <= 16) fused Triton >= {GOALS['decode_copy']:.0%} of copy: "
                     f"{sum(g[3] >= GOALS['decode_copy'] for g in goals['decode'])}/{len(goals['decode'])} problems; "
                     f"worst {worst[3]:.0%} at N={worst[0]} K={worst[1]} M={worst[2]}; "
                     + ", ".join(f"({n},{k},M{m}) {f:.0%} {kern}" for n, k, m, f, kern in goals["decode"]))
    if goals["m1"]:
        lines.append(f"- fused (best of {'/'.join(FUSED)}) >= {GOALS['fused_vs_dequant_m1']}x dequantize-then-cuBLAS at M=1: "
                     + ", ".join(f"({n},{k}) {r:.2f}x" for n, k, r in goals["m1"]))
    if goals["prefill"]:
        lines.append(f"- prefill (M >= 4096) choice >= {GOALS['prefill_vs_cublas']}x cuBLAS bf16: "
                     + ", ".join(f"({n},{k},M{m}) {r:.2f}x {kern}" for n, k, m, r, kern in goals["prefill"]))
        lines.append("  - with no tuning database (default decision): "
                     + ", ".join(f"({n},{k},M{m}) {r:.2f}x {kern}" for n, k, m, r, kern in goals["prefill_default"]))
    if goals["gain"]:
        lines.append(f"- per-M-bucket choice vs best single kernel (geomean over M) >= {GOALS['bucket_gain']}x: "
                     + ", ".join(f"({n},{k}) {g:.2f}x over {s}" for n, k, s, g in goals["gain"]))
    lines.append("- crossover M (first M where dequantize+cuBLAS beats the fused kernel): "
                 + ", ".join(f"({n},{k}) {c if c is not None else 'none in sweep'}" for n, k, c in goals["crossover"]))
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--tag", default=None, help="file name tag (default: gpu name, or 'cpu_smoke')")
    parser.add_argument("--quick", action="store_true", help="~3 minutes: M = 1, 16, 256, 4096, auto configs only")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU under the Triton interpreter")
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--explore-decode", action="store_true",
                        help="~90 s: triton_gemv configs at M = 1 and 16 on the five shapes, best config per shape")
    args = parser.parse_args(argv)
    device = "cpu" if args.smoke or not torch.cuda.is_available() else "cuda"
    if device == "cpu" and not args.smoke:
        parser.error("no CUDA GPU: use --smoke for the CPU check")
    torch.manual_seed(0)
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    tokens_list = SMOKE_TOKENS if args.smoke else (TOKENS_QUICK if args.quick else TOKENS_FULL)
    quick = args.quick or args.smoke
    env = environment_row()
    tag = args.tag or ("cpu_smoke" if args.smoke else env["gpu"].lower().replace("nvidia ", "").replace(" ", "_"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    ceilings = measure_ceilings(device, quick or args.explore_decode)
    print(f"ceilings: {ceilings}", flush=True)
    rows = [{"kind": "environment", **env}, ceilings]
    if args.explore_decode:
        rows += explore_decode(device, shapes, EXPLORE_TOKENS, ceilings)
        for row in rows:
            row.setdefault("env", {k: env[k] for k in ("gpu", "torch", "triton", "date")})
        (out / f"mxfp4_linear_explore_decode_{tag}.json").write_text(json.dumps(rows, indent=1, default=str))
        summary = summarize_explore(rows, shapes, EXPLORE_TOKENS, ceilings, env)
        (out / f"mxfp4_linear_explore_decode_{tag}.md").write_text(summary)
        print(summary)
        print(f"total {time.time() - start:.0f} s")
        return 1 if any(r.get("status", "").startswith("parity_") for r in rows) else 0
    if not args.skip_parity:
        parity = parity_rows(device, shapes, tokens_list, quick, args.smoke)
        rows += parity
        print(f"parity: {sum(r['status'] == 'pass' for r in parity)}/{len(parity)} pass ({time.time() - start:.0f} s)", flush=True)
    rows += timing_rows(device, shapes, tokens_list, quick, ceilings)
    for row in rows:
        row.setdefault("env", {k: env[k] for k in ("gpu", "torch", "triton", "date")})
    (out / f"mxfp4_linear_{tag}.json").write_text(json.dumps(rows, indent=1, default=str))
    summary = summarize(rows, shapes, tokens_list, device, ceilings, env, quick)
    (out / f"mxfp4_linear_{tag}.md").write_text(summary)
    print(summary)
    print(f"total {time.time() - start:.0f} s")
    failed = [r for r in rows if r["kind"] == "parity" and r["status"] != "pass"]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
