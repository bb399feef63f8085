"""moe_experts on a GPU: parity first, then every strategy timed side by side.

Run on the GPU machine (kernmux need not be installed):

    PYTHONPATH=. python3 benchmarks/moe_experts.py --out "$OUT" [--quick]

``--smoke`` runs tiny shapes on the CPU under TRITON_INTERPRET=1 to check the script.
Writes ``moe_experts_<tag>.json`` (one row per ceiling / parity case / timing, each with
the environment: gpu name, versions, date) and ``moe_experts_<tag>.md`` (summary against
the issue's goals).

Shapes: Qwen3-30B-A3B (E=128, k=8, H=2048, I=768, S=0), Qwen3-Next-80B (E=512, k=10,
H=2048, I=512, S=1), DeepSeek-V3 (E=256, k=8, H=7168, I=2048, S=1); bf16; tokens 1 ...
16384 (``--quick``: fewer token counts, shorter repetitions).

Parity follows ``kernmux verify`` (fresh inputs from the op's ``make_inputs``, outputs
poisoned, ``op.compare``) for every kernel available here on each model at 1 and 33
tokens and on odd shapes (288 experts, topk 7, 2 shared, inter 200, tokens 1 and 4097);
a kernel failing parity on a model is not timed on it. Every timed call is also compared
with the reference on up to 64 of its tokens (the op is row-wise, so a token subset is
an exact check of those rows).

Timing: ``kernmux.tuning_db.measurement.timing.measure``; up to 64 tokens by CUDA-graph replay (20
calls per graph), above by CUDA events with L2 flushed before each repetition; in both,
calls rotate over 8 routings drawn afresh (softmax top-k of random logits), so replays
do not find the previous call's experts in L2. Bytes touched: the distinct experts the
timed routings actually hit, times 3HI bf16 elements each, plus activations (averaged
over the routings). Ceilings (copy TB/s, bf16 TFLOP/s) are measured at the start of the
run on the GPU at hand.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zlib
from pathlib import Path

if "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from kernmux.dispatch.platform import current_platform  # noqa: E402
from kernmux.dispatch.registry import REGISTRY  # noqa: E402
from kernmux.dispatch.verify import verify_kernel  # noqa: E402
from kernmux.kernels.moe_experts import OP  # noqa: E402  (registers the op)
from kernmux.kernels.moe_experts import spec  # noqa: E402
from kernmux.kernels.moe_experts.reference import moe_experts as reference  # noqa: E402
from kernmux.kernels.moe_experts.triton_config import config_valid  # noqa: E402
from kernmux.tuning_db.measurement.timing import environment_row, measure  # noqa: E402

MODELS = {
    "Qwen3-30B-A3B": dict(experts=128, topk=8, hidden=2048, inter=768, shared=0),
    "Qwen3-Next-80B": dict(experts=512, topk=10, hidden=2048, inter=512, shared=1),
    "DeepSeek-V3": dict(experts=256, topk=8, hidden=7168, inter=2048, shared=1),
}
TOKENS = (1, 4, 16, 64, 256, 1024, 4096, 16384)
QUICK_TOKENS = (1, 16, 256, 4096, 16384)
ODD_SHAPES = [dict(experts=288, topk=7, shared=2, hidden=2048, inter=200, tokens=t) for t in (1, 4097)]
SMOKE_MODELS = {
    "tiny-S0": dict(experts=8, topk=2, hidden=64, inter=32, shared=0),
    "tiny-S1": dict(experts=12, topk=3, hidden=64, inter=48, shared=1),
}
SMOKE_TOKENS = (1, 5, 33)
STRATEGIES = ("triton", "triton_separate", "triton_dual_stream", "grouped_mm", "torch")
KERNMUX_STRATEGIES = ("triton", "triton_separate", "triton_dual_stream")
SHARED_STRATEGIES = {"triton": "FSE", "triton_separate": "separate", "triton_dual_stream": "dual-stream"}
GRAPH_MAX_TOKENS = 64
ROUTINGS = 8
CHECK_TOKENS = 64
TORCH_MAX_TOKENS = 16  # the reference loops in Python over experts: timed at decode sizes only
# --explore: Triton configs timed beside the heuristic's (fused strategy), at these
# token counts; each checked against the reference like every timed call.
EXPLORE_TOKENS = (1, 16, 4096, 16384)
EXPLORE_DECODE = [
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=1, num_warps=4, num_stages=4),
    dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=256, GROUP_M=1, num_warps=4, num_stages=3),
    dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=5),
    dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, GROUP_M=1, num_warps=4, num_stages=5),
]
EXPLORE_PREFILL = [
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=8, num_stages=4),
    dict(BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4),
    dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=32, GROUP_M=8, num_warps=8, num_stages=3),
]


# --------------------------------------------------------------------- ceilings


def _copy_tbs(device: str):
    src = torch.empty(1 << 30, dtype=torch.bfloat16, device=device)
    dst = torch.empty_like(src)
    timing = measure(lambda: dst.copy_(src), device=device, warmup_ms=20, rep_ms=200, flush_l2=False)
    return 2 * (1 << 31) / (timing.p50_us * 1e6), timing


def _matmul_tflops(device: str):
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=device)
    timing = measure(lambda: a @ b, device=device, warmup_ms=50, rep_ms=300, flush_l2=False)
    return 2 * 8192**3 / (timing.p50_us * 1e6), timing


def measure_ceilings(device: str) -> dict:
    """Copy bandwidth (bytes read + written) of a 2 GiB device-to-device copy and the
    rate of a bf16 8192^3 matmul, measured now on this GPU."""
    copy_tbs, copy = _copy_tbs(device)
    tflops, mm = _matmul_tflops(device)
    torch.cuda.empty_cache()
    return {"kind": "ceiling", "copy_tbs": copy_tbs, "bf16_tflops": tflops,
            "copy_timing": copy.as_dict(), "matmul_timing": mm.as_dict()}


# ----------------------------------------------------------------------- parity


def _kernels_for(feats: dict) -> list[str]:
    platform = current_platform()
    kernels = REGISTRY.kernels_of(OP.name)
    return [n for n in STRATEGIES if kernels[n].availability(platform).ok and kernels[n].check(feats, platform).ok]


def parity_rows(models: dict, device: str, smoke: bool) -> list[dict]:
    rows, seed = [], 1000
    cases = [(name, {**shape, "tokens": t}) for name, shape in models.items() for t in ((1, 33) if not smoke else (1, 7))]
    if not smoke:
        cases += [("odd", shape) for shape in ODD_SHAPES]
    for model, shape in cases:
        feats = {**shape, "dtype": "bf16", "device": device}
        for kernel in [k for k in _kernels_for(feats) if k != "torch"]:  # torch is the reference
            seed += 1
            result = verify_kernel(OP.name, kernel, feats, seed=seed)
            rows.append({"kind": "parity", "model": model, **result.as_dict()})
            mark = "PASS" if result.passed else result.status.upper()
            print(f"parity {mark:5} {model:15} {kernel:18} T={feats['tokens']:<5} {result.detail}", flush=True)
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------- timing


def _bytes_touched(ids_sets: list[torch.Tensor], feats: dict) -> float:
    """Mean over the timed routings of the bytes the call must move: weights of the
    distinct experts hit (3HI elements each) plus hidden, output, weights and ids."""
    per_expert = 3 * feats["hidden"] * feats["inter"] * 2
    acts = 2 * feats["tokens"] * feats["hidden"] * 2 + feats["tokens"] * (feats["topk"] + feats["shared"]) * 8
    hits = [int(torch.unique(ids).numel()) for ids in ids_sets]
    return sum(hits) / len(hits) * per_expert + acts


def _config_of(kernel: str, feats: dict, device: str) -> dict:
    if kernel not in KERNMUX_STRATEGIES:
        return {}
    from kernmux.kernels.moe_experts.triton import resolve_config

    # The separate strategies send only the k routed slots through the grouped GEMMs.
    shared = feats["shared"] if kernel == "triton" else 0
    return resolve_config(None, feats["tokens"], feats["experts"], feats["topk"], shared, feats["hidden"],
                          feats["inter"], torch.bfloat16, torch.device(device))


class _Run:
    """What every timing of one run shares: device, repetition budget, ceilings, the
    deadline, and the (model, kernel) pairs that failed their check (not timed again)."""

    def __init__(self, device: str, smoke: bool, quick: bool, ceilings: dict | None, deadline: float, explore: bool):
        self.device, self.smoke, self.ceilings, self.deadline, self.explore = device, smoke, ceilings, deadline, explore
        self.timing = (dict(warmup_ms=0.0, rep_ms=0.0, min_reps=1, max_reps=1) if smoke
                       else dict(warmup_ms=10.0, rep_ms=40.0 if quick else 100.0, min_reps=5))
        self.failed: set[tuple[str, str]] = set()


def _runs_for(run: _Run, feats: dict) -> list[tuple[str, dict | None, str]]:
    """(kernel, config or None for its default, "default" | "explore") to time."""
    runs = [(k, None, "default") for k in _kernels_for(feats)
            if k != "torch" or feats["tokens"] <= TORCH_MAX_TOKENS]
    if run.explore and feats["tokens"] in EXPLORE_TOKENS and any(k == "triton" for k, _, _ in runs):
        heuristic = _config_of("triton", feats, run.device)
        alternates = EXPLORE_DECODE if heuristic["BLOCK_M"] == 16 else EXPLORE_PREFILL
        runs += [("triton", c, "explore") for c in alternates if c != heuristic and config_valid(c, feats)]
    return runs


def _time_tokens(run: _Run, model: str, shape: dict, tokens: int, w13, w2, kwargs: dict, gen) -> list[dict]:
    """Every strategy at one token count, on one set of hidden states and 8 routings."""
    device = run.device
    feats = {**shape, "tokens": tokens, "dtype": "bf16", "device": device}
    hidden = torch.randn(tokens, shape["hidden"], generator=gen, device=device).to(torch.bfloat16)
    routings = [spec.make_routing(tokens, shape["experts"], shape["topk"], shape["shared"], gen, device)
                for _ in range(1 if run.smoke else ROUTINGS)]
    bytes_touched = _bytes_touched([ids for _, ids in routings], feats)
    flops = 2.0 * tokens * (shape["topk"] + shape["shared"]) * 3 * shape["hidden"] * shape["inter"]
    check = torch.randperm(tokens, generator=gen, device=device)[:CHECK_TOKENS].sort().values
    weights0, ids0 = routings[0]
    expected = reference(hidden[check], w13, w2, weights0[check], ids0[check], **kwargs)
    base = {"kind": "timing", "model": model, "features": feats, "bytes_touched": bytes_touched, "flops": flops}
    rows = []
    for kernel, config, variant in _runs_for(run, feats):
        row = {**base, "kernel": kernel, "variant": variant,
               "config": dict(config) if config else _config_of(kernel, feats, device)}
        if (model, kernel) in run.failed or time.time() > run.deadline:
            rows.append({**row, "status": "skipped", "detail": "time budget" if time.time() > run.deadline else "parity failed"})
            continue
        fn = REGISTRY.kernels_of(OP.name)[kernel].bind(config)
        try:
            got = fn(hidden, w13, w2, weights0, ids0, **kwargs)
            result = OP.compare(got[check], expected, {**feats, "tokens": int(check.numel())})
            if not result.passed:
                if variant == "default":
                    run.failed.add((model, kernel))
                rows.append({**row, "status": "numerics_failed", "metrics": dict(result.metrics), "detail": result.detail})
                continue
            calls = [lambda w=w, i=i: fn(hidden, w13, w2, w, i, **kwargs) for w, i in routings]
            # The reference synchronises with the host (ids check, expert loop): events only.
            graph = device == "cuda" and tokens <= GRAPH_MAX_TOKENS and kernel != "torch"
            t = measure(calls, device=device, cuda_graph=graph, **run.timing)
        except Exception as e:  # a failure is a result
            rows.append({**row, "status": "error", "detail": f"{type(e).__name__}: {e}"[:500]})
            continue
        rates = {"tb_per_s": bytes_touched / (t.p50_us * 1e6), "tflops": flops / (t.p50_us * 1e6)}
        if run.ceilings:
            rates["frac_of_copy"] = rates["tb_per_s"] / run.ceilings["copy_tbs"]
            rates["frac_of_bf16_peak"] = rates["tflops"] / run.ceilings["bf16_tflops"]
        rows.append({**row, "status": "ok", **t.as_dict(), **rates})
        label = kernel + ("*" if variant != "default" else "")
        print(f"time {model:15} T={tokens:<6} {label:18} {t.p50_us:10.1f} us  {rates['tb_per_s']:.2f} TB/s  {rates['tflops']:.1f} TFLOP/s", flush=True)
    return rows


def _time_model(run: _Run, model: str, shape: dict, tokens_list: tuple) -> list[dict]:
    """One model's weights (all E + S experts), every token count."""
    gen = torch.Generator(device=run.device).manual_seed(zlib.crc32(model.encode()))
    (_, w13, w2, _, _), kwargs = spec.make_inputs({**shape, "tokens": 0, "dtype": "bf16"}, run.device, gen.initial_seed())
    rows = []
    for tokens in tokens_list:
        rows += _time_tokens(run, model, shape, tokens, w13, w2, kwargs, gen)
    return rows


def timing_rows(models: dict, tokens_list: tuple, device: str, smoke: bool, quick: bool,
                ceilings: dict | None, deadline: float, explore: bool = False) -> list[dict]:
    run = _Run(device, smoke, quick, ceilings, deadline, explore)
    rows = []
    for model, shape in models.items():
        rows += _time_model(run, model, shape, tokens_list)
        if device == "cuda":
            torch.cuda.empty_cache()  # the model's weights are gone with _time_model's frame
    return rows


# ---------------------------------------------------------------------- summary


def _geomean(values: list[float]) -> float:
    return math.exp(sum(math.log(v) for v in values) / len(values)) if values else float("nan")


def analyse(timings: list[dict]) -> dict:
    """Per model: the best strategy per token count, the best static strategy and the
    per-bucket gain over it, crossovers among the shared-expert strategies, the ratio
    of grouped_mm's time to the best kernmux strategy's."""
    out = {}
    models = list(dict.fromkeys(r["model"] for r in timings))  # in the order they ran
    for model in models:
        table: dict[int, dict[str, float]] = {}
        for r in timings:
            if r["model"] == model and r["status"] == "ok" and r.get("variant", "default") == "default":
                table.setdefault(r["features"]["tokens"], {})[r["kernel"]] = r["p50_us"]
        contenders = [k for k in STRATEGIES if k != "torch" and all(k in table[t] for t in table)]
        best = {t: min((us, k) for k, us in row.items() if k != "torch") for t, row in table.items() if any(k != "torch" for k in row)}
        static = {k: _geomean([table[t][k] / best[t][0] for t in best]) for k in contenders}
        best_static = min(static, key=static.get) if static else None
        shared_only = [k for k in KERNMUX_STRATEGIES if k in contenders]
        winners = [(t, min(shared_only, key=lambda k: table[t][k])) for t in sorted(table)] if len(shared_only) > 1 else []
        crossovers = [(prev[0], t, prev[1], k) for prev, (t, k) in zip(winners, winners[1:]) if prev[1] != k]
        vs_grouped = {}
        for t, row in table.items():
            ours = [row[k] for k in KERNMUX_STRATEGIES if k in row]
            if "grouped_mm" in row and ours:
                vs_grouped[t] = row["grouped_mm"] / min(ours)
        out[model] = {"table": table, "best": best, "static": static, "best_static": best_static,
                      "gain": static.get(best_static, float("nan")) if best_static else float("nan"),
                      "winners": winners, "crossovers": crossovers, "vs_grouped_mm": vs_grouped}
    return out


def summary(env: dict, ceilings: dict | None, parity: list[dict], timings: list[dict], command: str) -> str:
    lines = [f"# moe_experts on {env.get('gpu')}", ""]
    lines.append(f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, {env.get('date')}. Command: `{command}`.")
    if ceilings:
        lines.append(f"Ceilings measured in this run: copy {ceilings['copy_tbs']:.2f} TB/s, bf16 matmul {ceilings['bf16_tflops']:.0f} TFLOP/s.")
    lines.append("Triton configs: the shape heuristic (`triton_config.heuristic_config`), untuned.")
    lines.append("")
    passed = sum(r["passed"] for r in parity)
    lines.append(f"## Parity (before timing): {passed}/{len(parity)} pass")
    for r in parity:
        if not r["passed"]:
            lines.append(f"- {r['status']}: {r['model']} {r['kernel']} {r['features']}: {r['detail']}")
    worst = {}
    for r in parity:
        if r["passed"]:
            worst[r["kernel"]] = max(worst.get(r["kernel"], 0.0), r["metrics"].get("max_row_rel_err", 0.0))
    lines.append("Largest row relative error per kernel (bf16 bound 2e-2): " + ", ".join(f"{k} {v:.1e}" for k, v in worst.items()))
    lines.append("")
    analysis = analyse(timings)
    goals = []
    for model, a in analysis.items():
        shape = MODELS.get(model) or SMOKE_MODELS.get(model, {})
        lines.append(f"## {model} ({', '.join(f'{k}={v}' for k, v in shape.items())})")
        lines.append("")
        lines.append("| tokens | " + " | ".join(STRATEGIES) + " | best | best TB/s (% copy) | best TFLOP/s (% peak) | grouped_mm / best kernmux |")
        lines.append("|---|" + "---|" * (len(STRATEGIES) + 4))
        for t in sorted(a["table"]):
            row = a["table"][t]
            cells = [f"{row[k]:.1f}" if k in row else "-" for k in STRATEGIES]
            best_us, best_k = a["best"].get(t, (None, None))
            rec = next((r for r in timings if r["model"] == model and r["features"]["tokens"] == t and r["kernel"] == best_k
                        and r["status"] == "ok" and r.get("variant", "default") == "default"), None)
            bw = f"{rec['tb_per_s']:.2f} ({100 * rec['frac_of_copy']:.0f}%)" if rec and "frac_of_copy" in rec else (f"{rec['tb_per_s']:.3f}" if rec else "-")
            fl = f"{rec['tflops']:.0f} ({100 * rec['frac_of_bf16_peak']:.0f}%)" if rec and "frac_of_bf16_peak" in rec else (f"{rec['tflops']:.3f}" if rec else "-")
            ratio = a["vs_grouped_mm"].get(t)
            lines.append(f"| {t} | " + " | ".join(cells) + f" | {best_k or '-'} | {bw} | {fl} | {f'{ratio:.2f}x' if ratio else '-'} |")
        lines.append("")
        if a["best_static"]:
            lines.append(f"Best single static strategy: `{a['best_static']}`; the per-token-count best is {100 * (a['gain'] - 1):.1f}% faster (geomean over the sweep). "
                         "Static strategies, geomean time over the per-count best: " + ", ".join(f"{k} {v:.3f}" for k, v in a["static"].items()) + ".")
        if a["winners"]:
            lines.append("Fastest shared-expert strategy per token count: " + ", ".join(f"{t}: {SHARED_STRATEGIES[k]}" for t, k in a["winners"]) + ".")
            lines.append("Crossovers: " + ("; ".join(f"{SHARED_STRATEGIES[k0]} -> {SHARED_STRATEGIES[k1]} between {t0} and {t1} tokens" for t0, t1, k0, k1 in a["crossovers"]) or "none in the sweep") + ".")
        lines.append("")
        # Goals of the issue, per model.
        ours = {t: [r for r in timings if r["model"] == model and r["features"]["tokens"] == t and r["kernel"] in KERNMUX_STRATEGIES
                    and r["status"] == "ok" and r.get("variant", "default") == "default"] for t in a["table"]}
        for t, rs in ours.items():
            if not rs or not ceilings:
                continue
            fastest = min(rs, key=lambda r: r["p50_us"])
            if t <= 16:
                goals.append(f"- decode {model} T={t}: {fastest['kernel']} {100 * fastest['frac_of_copy']:.0f}% of copy on weight bytes touched ({'met' if fastest['frac_of_copy'] >= 0.75 else 'MISSED'} >= 75%)")
            if t >= 4096:
                goals.append(f"- prefill {model} T={t}: {fastest['kernel']} {100 * fastest['frac_of_bf16_peak']:.0f}% of bf16 peak ({'met' if fastest['frac_of_bf16_peak'] >= 0.55 else 'MISSED'} >= 55%)")
        below = {t: v for t, v in a["vs_grouped_mm"].items() if v < 1.0}
        if a["vs_grouped_mm"]:
            goals.append(f"- {model}: >= 1.0x grouped_mm at {len(a['vs_grouped_mm']) - len(below)}/{len(a['vs_grouped_mm'])} token counts"
                         + (f" (below at {', '.join(f'{t}: {v:.2f}x' for t, v in sorted(below.items()))})" if below else ""))
        if shape.get("shared") and a["best_static"]:
            goals.append(f"- {model}: per-bucket choice {100 * (a['gain'] - 1):.1f}% over the best static strategy ({'met' if a['gain'] >= 1.10 else 'MISSED'} >= 10%)")
    explored = [r for r in timings if r.get("variant") == "explore" and r["status"] == "ok"]
    if explored:
        lines.append("## Triton configs beside the heuristic's (fused strategy; the tuner searches the full space)")
        lines.append("")
        lines.append("| model | tokens | heuristic µs | best explored µs | its config |")
        lines.append("|---|---|---|---|---|")
        for model, a in analysis.items():
            for t in sorted(a["table"]):
                alts = [r for r in explored if r["model"] == model and r["features"]["tokens"] == t]
                if alts and "triton" in a["table"][t]:
                    best_alt = min(alts, key=lambda r: r["p50_us"])
                    lines.append(f"| {model} | {t} | {a['table'][t]['triton']:.1f} | {best_alt['p50_us']:.1f} | `{best_alt['config']}` |")
        lines.append("")
    lines.append("## Goals (issue 14)")
    lines.extend(goals or ["- not measured"])
    problems = [r for r in timings if r["status"] != "ok"]
    if problems:
        lines.append("")
        lines.append("## Timings not produced")
        for r in problems:
            lines.append(f"- {r['model']} T={r['features']['tokens']} {r['kernel']}: {r['status']} {r.get('detail', '')}")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    parser.add_argument("--tag", default=None, help="file name tag (default: the GPU name, or smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run under TRITON_INTERPRET=1")
    parser.add_argument("--quick", action="store_true", help=f"tokens {QUICK_TOKENS}, shorter repetitions")
    parser.add_argument("--models", default=None, help="comma-separated subset of " + ", ".join(MODELS))
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop starting new timings after this many seconds")
    parser.add_argument("--explore", action="store_true", help=f"also time a few Triton configs around the heuristic at tokens {EXPLORE_TOKENS}")
    args = parser.parse_args()
    start = time.time()
    device = "cpu" if args.smoke else "cuda"
    models = SMOKE_MODELS if args.smoke else MODELS
    if args.models:
        models = {k: v for k, v in models.items() if k in args.models.split(",")}
    tokens = SMOKE_TOKENS if args.smoke else (QUICK_TOKENS if args.quick else TOKENS)
    env = environment_row()
    tag = args.tag or ("smoke" if args.smoke else str(env.get("gpu", "gpu")).split()[-1].lower())
    print(f"environment: {env}", flush=True)
    ceilings = None if args.smoke else measure_ceilings(device)
    if ceilings:
        print(f"ceilings: copy {ceilings['copy_tbs']:.2f} TB/s, bf16 {ceilings['bf16_tflops']:.0f} TFLOP/s", flush=True)
    parity = parity_rows(models, device, args.smoke)
    print(f"parity: {sum(r['passed'] for r in parity)}/{len(parity)} pass ({time.time() - start:.0f}s)", flush=True)
    timings = timing_rows(models, tokens, device, args.smoke, args.quick, ceilings, start + args.budget_s, args.explore)
    flags = [a for a in sys.argv[1:] if a in ("--smoke", "--quick", "--explore")] + ([f"--models {args.models}"] if args.models else [])
    command = " ".join(["PYTHONPATH=. python3 benchmarks/moe_experts.py --out DIR", *flags])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{**env, **r} for r in ([ceilings] if ceilings else []) + parity + timings]
    (out / f"moe_experts_{tag}.json").write_text(json.dumps(rows, indent=1, default=str))
    text = summary(env, ceilings, parity, timings, command)
    (out / f"moe_experts_{tag}.md").write_text(text)
    print(text, flush=True)
    print(f"total {time.time() - start:.0f}s", flush=True)
    return 0 if all(r["passed"] for r in parity) else 1


if __name__ == "__main__":
    sys.exit(main())
