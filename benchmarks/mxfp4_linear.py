"""mxfp4_linear on a GPU: parity first, then every kernel side by side with cuBLAS bf16.

Run on the GPU machine (kernmux need not be installed):

    PYTHONPATH=. python3 benchmarks/mxfp4_linear.py --out "$OUT" [--quick] [--tag h200]

``--quick`` (about 3 minutes of GPU time): M = 1, 16, 256, 4096, the auto configs only.
The full run adds M = 4, 64, 1024, 16384 and a few alternative Triton configs per problem
(the fastest is what a tuned database would keep). ``--smoke`` runs tiny shapes on the
CPU under TRITON_INTERPRET=1 to check the script.

Writes ``mxfp4_linear_<tag>.json`` (rows: environment, ceilings, parity, timings) and
``mxfp4_linear_<tag>.md`` (the issue's goals, each with its numbers).

- Ceilings are measured here, on this GPU: a 1 GiB device-to-device copy (bytes read +
  written) and a bf16 8192^3 matmul (notes/performance.md: 4.27 TB/s, 797 TFLOP/s on the
  H200 of 2026-11-29).
- Parity follows ``kernmux verify``: fresh inputs per case, outputs poisoned, the op's
  reference and tolerance of the kernel's precision class.
- Timing: ``measure`` (the project's one routine). M <= 64: CUDA-graph replay (what an
  engine decoding under graphs sees) rotating over enough weight copies that no call
  finds its weights in L2; larger M: CUDA events with L2 flushed before each call.
- "cuBLAS bf16" is ``F.linear`` on weights dequantized ahead of time: the unquantized
  upper bound. "choice" is the fastest measured kernmux kernel (any config) for the M
  bucket: what ``kernmux tune`` records and the dispatcher then picks; "default" is what
  the dispatcher picks with no tuning database.
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


def triton_alternatives(tokens: int) -> list[dict[str, int]]:
    """Configs tried besides the auto one in the full run (0 = auto for that key)."""
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
    """kernel -> "" if it can run here, else why not."""
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
    kernels = [name for name, why in available_kernels(feats_of(1, 64, 64, device)).items() if not why]
    cases = [(m, n, k, False, "bf16") for n, k in shapes for m in ((tokens_list[0], tokens_list[-1]) if quick else tokens_list[::2])]
    odd = [(1, 1, 32, False, "bf16"), (1, 2880, 4096, True, "bf16"), (4097, 2880, 64, True, "bf16"), (7, 96, 4128, True, "fp16"),
           (4097, 1, 4128, False, "fp16"), (33, 5120, 32, True, "bf16")]
    cases += [(min(m, 64) if smoke else m, n if not smoke else min(n, 96), k, bias, dtype) for m, n, k, bias, dtype in odd]
    for m, n, k, bias, dtype in cases:
        for kernel in kernels:
            if kernel == "torch" and m * n * k > (1 << 36):
                continue  # the reference itself; timed against itself it says nothing
            rows.append(parity_case(m, n, k, device, kernel, seed, bias, dtype))
            seed += 1
        if not quick and not smoke:
            for config in triton_alternatives(m):
                rows.append(parity_case(m, n, k, device, "triton", seed, bias, dtype, config))
                seed += 1
    return rows


# --------------------------------------------------------------------------- timing


def _l2_bytes(device: str) -> int:
    if device == "cpu":
        return 0
    return getattr(torch.cuda.get_device_properties(torch.device(device)), "L2_cache_size", 50 << 20)


def timing_rows(device: str, shapes, tokens_list, quick: bool, ceilings: dict) -> list[dict]:
    rows = []
    kernels = {name: why for name, why in available_kernels(feats_of(1, 64, 64, device)).items()}
    rep_ms = 40 if quick else 100
    warmup_ms = 10 if quick else 25
    for n, k in shapes:
        packed_bytes = n * k // 2 + n * k // 32
        sets = 1 if device == "cpu" else max(1, min(8, math.ceil(3 * _l2_bytes(device) / packed_bytes)))
        problems = [make_problem(1, n, k, device, seed=100 + i) for i in range(sets)]
        dequantized = [dequantize_mxfp4(w, s, torch.bfloat16) for _, w, s, _ in problems]
        for tokens in tokens_list:
            feats = feats_of(tokens, n, k, device)
            graph = device != "cpu" and tokens <= GRAPH_MAX_TOKENS
            xs = [torch.randn(tokens, k, device=device, dtype=torch.bfloat16) for _ in range(sets if graph else 1)]
            args = [(xs[i % len(xs)], w, s) for i, (_, w, s, _) in enumerate(problems[: len(xs)])]
            roof = REGISTRY.op(OP).roofline(feats, current_platform())
            candidates = [("cublas_bf16", None, [lambda x=x, wd=wd: F.linear(x, wd) for x, wd in zip(xs, dequantized)])]
            for name, why in kernels.items():
                if why or (name == "torch" and tokens > 16):
                    continue
                configs = [None] + (triton_alternatives(tokens) if name == "triton" and not quick else [])
                for config in configs:
                    if name == "triton" and config and REGISTRY.kernels_of(OP)["triton"].config_valid and not REGISTRY.kernels_of(OP)["triton"].config_valid(config, feats):
                        continue
                    fn = REGISTRY.kernels_of(OP)[name].bind(config)
                    candidates.append((name, config, [lambda a=a, fn=fn: fn(*a) for a in args]))
            for name, config, fns in candidates:
                # The reference (a baseline, not a contender) is timed with events.
                use_graph = graph and name != "torch"
                row = {"kind": "timing", "kernel": name, "config": config or {}, "features": feats, "bytes": roof.bytes, "flops": roof.flops}
                try:
                    t = measure(fns, device=device, warmup_ms=warmup_ms, rep_ms=rep_ms, cuda_graph=use_graph)
                except Exception as e:  # a failure is a result
                    rows.append({**row, "status": "error", "detail": f"{type(e).__name__}: {e}"[:400]})
                    continue
                row.update(status="ok", timing=t.as_dict(), p50_us=t.p50_us, tbs=roof.bytes / (t.p50_us * 1e6), tflops=roof.flops / (t.p50_us * 1e6))
                if ceilings.get("copy_tbs"):
                    row["copy_fraction"] = row["tbs"] / ceilings["copy_tbs"]
                    row["peak_fraction"] = row["tflops"] / ceilings["bf16_tflops"]
                rows.append(row)
                print(f"  N={n} K={k} M={tokens} {name:<15} {json.dumps(config or {}):<60} {t.p50_us:9.1f} us", flush=True)
            del xs, args
        del problems, dequantized
        if device != "cpu":
            torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------- summary


def _reference_class(kernel: str) -> bool:
    kernels = REGISTRY.kernels_of(OP)
    return kernel not in kernels or kernels[kernel].precision == REGISTRY.op(OP).precision


def _best(rows, n, k, tokens, kernel=None, exclude=("cublas_bf16",)):
    """The fastest row for one problem: of ``kernel``, or of every kernmux kernel of the
    op's reference class (a W4A4 kernel is not a choice unless a rule allows it)."""
    pick = [r for r in rows if r["kind"] == "timing" and r["status"] == "ok" and r["features"]["n"] == n and r["features"]["k"] == k
            and r["features"]["tokens"] == tokens
            and (r["kernel"] == kernel if kernel else r["kernel"] not in exclude and _reference_class(r["kernel"]))]
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
        lines += [f"### N={n}, K={k}", "", "| M | " + " | ".join(kernels) + " | choice | default | copy % (triton) |",
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
            triton = _best(rows, n, k, tokens, "triton")
            dequant = _best(rows, n, k, tokens, "dequant_cublas")
            cublas = _best(rows, n, k, tokens, "cublas_bf16", exclude=())
            frac = triton.get("copy_fraction") if triton else None
            lines.append(f"| {tokens} | " + " | ".join(cells) + f" | {choice['kernel'] if choice else '-'} | {default} | "
                         + (f"{100 * frac:.0f}%" if frac is not None else "-") + " |")
            if choice:
                bucket_best.append(choice["p50_us"])
            if tokens <= 16 and frac is not None:
                goals["decode"].append((n, k, tokens, frac))
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
                     + ", ".join(f"({n},{k},M{m}) {f:.0%}" for n, k, m, f in goals["decode"]))
    if goals["m1"]:
        lines.append(f"- fused >= {GOALS['fused_vs_dequant_m1']}x dequantize-then-cuBLAS at M=1: "
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
    ceilings = measure_ceilings(device, quick)
    print(f"ceilings: {ceilings}", flush=True)
    rows = [{"kind": "environment", **env}, ceilings]
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
