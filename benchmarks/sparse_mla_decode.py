"""Sparse MLA decode on one GPU: parity grid first, then timings against the roofline.

    PYTHONPATH=. python3 benchmarks/sparse_mla_decode.py --out DIR [--quick]

1. Parity: the seed's table (h_q 64/32/16 x one/two scopes x sink) plus the extended
   shapes, torch and triton on the GPU (``kernmux.kernels.sparse_mla_decode.parity``).
2. Timings: B in {1, 8, 32, 128} x h_q in {16, 64, 128}, topk 2048, one scope and two
   scopes (+512), bf16 and fp8 KV; the torch reference and the Triton kernel under each
   candidate config (best reported, all recorded), with the shared timing routine
   (``kernmux.tuning_db.timing.measure``: L2 flushed, CUDA events, median).
   Achieved TB/s and TFLOP/s use the op's roofline bytes/FLOPs; the floor uses the
   measured H100 ceilings (2.96 TB/s, 699 TFLOP/s, notes/performance.md).
Triton variants are compiled first in parallel worker processes (same resolved configs,
tiny batch), so the timing loop only loads them from Triton's cache.
Writes ``sparse_mla_decode_{parity,h100}.{json,md}`` under --out.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from dataclasses import asdict
from typing import Any

OP = "sparse_mla_decode"
BATCHES = (1, 8, 32, 128)
HEADS = (16, 64, 128)
TOPK, EXTRA = 2048, 512

# Candidate Triton configs by head count (SPLITS 0 = automatic); chosen from the sm_90
# compile report (registers / spills / shared memory), the sweep decides.
CANDIDATES: dict[int, list[dict[str, int]]] = {
    16: [
        {"H_BLOCK": 16, "N_BLOCK": 32, "num_warps": 4, "num_stages": 2},
        {"H_BLOCK": 16, "N_BLOCK": 32, "num_warps": 4, "num_stages": 3},
        {"H_BLOCK": 16, "N_BLOCK": 64, "num_warps": 4, "num_stages": 3},
        {"H_BLOCK": 16, "N_BLOCK": 64, "num_warps": 8, "num_stages": 3},
        {"H_BLOCK": 16, "N_BLOCK": 16, "num_warps": 4, "num_stages": 3},
    ],
    64: [
        {"H_BLOCK": 64, "N_BLOCK": 16, "num_warps": 8, "num_stages": 3},
        {"H_BLOCK": 64, "N_BLOCK": 32, "num_warps": 8, "num_stages": 2},
        {"H_BLOCK": 32, "N_BLOCK": 32, "num_warps": 8, "num_stages": 3},
        {"H_BLOCK": 32, "N_BLOCK": 64, "num_warps": 8, "num_stages": 3},
        {"H_BLOCK": 16, "N_BLOCK": 64, "num_warps": 8, "num_stages": 3},
    ],
}
CANDIDATES[128] = CANDIDATES[64]


def features(batch: int, heads: int, topk: int, extra: int, kv_dtype: str, device: str) -> dict[str, Any]:
    return {
        "batch": batch, "qlen": 1, "heads": heads, "topk": topk, "extra_topk": extra,
        "d_qk": 576, "d_v": 512, "kv_dtype": kv_dtype, "sink": False, "device": device,
    }


def grid(batches, heads, topk: int, extra: int, device: str) -> list[dict[str, Any]]:
    return [features(b, h, topk, e, d, device) for d in ("bf16", "fp8") for e in (0, extra) for h in heads for b in batches]


def resolved(feats: dict[str, Any], config: dict[str, int]) -> dict[str, int]:
    import torch

    from kernmux.kernels.sparse_mla_decode.triton import resolve_config

    return resolve_config(config, feats["heads"], feats["batch"] * feats["qlen"], feats["topk"], torch.device(feats["device"]))


# --------------------------------------------------------------------------- compile


def _compile_one(job: tuple[dict[str, Any], dict[str, int]]) -> tuple[str, str]:
    """Worker: run the kernel once on a 2-request problem with the resolved config."""
    feats, config = job
    key = json.dumps([feats, config], sort_keys=True)
    try:
        import torch

        from kernmux.kernels.sparse_mla_decode.inputs import build_inputs
        from kernmux.kernels.sparse_mla_decode.triton import sparse_mla_decode_triton

        small = {**feats, "batch": 2}
        args, kwargs = build_inputs(small, feats["device"], 0, invalid=False)
        sparse_mla_decode_triton(*args, **kwargs, config=config)
        if feats["device"] == "cuda":
            torch.cuda.synchronize()
        return key, ""
    except Exception as e:  # a config that does not compile is a result, not a crash
        return key, f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def precompile(jobs: list[tuple[dict[str, Any], dict[str, int]]], workers: int) -> dict[str, str]:
    unique = {json.dumps([f, c], sort_keys=True): (f, c) for f, c in jobs}
    start = time.time()
    ctx = mp.get_context("spawn")
    errors: dict[str, str] = {}
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
        for key, err in pool.map(_compile_one, list(unique.values())):
            if err:
                errors[key] = err
    print(f"compiled {len(unique)} variants in {time.time() - start:.1f} s ({len(errors)} failed)", flush=True)
    return errors


# --------------------------------------------------------------------------- timing


def time_grid(shapes: list[dict[str, Any]], compile_errors: dict[str, str], rep_ms: float, save: str | None = None) -> list[dict[str, Any]]:
    import torch

    from kernmux.dispatch.outputs import poisoned_outputs  # noqa: F401  (kernels allocate through it)
    from kernmux.dispatch.registry import REGISTRY
    from kernmux.kernels.sparse_mla_decode.inputs import build_inputs
    from kernmux.kernels.sparse_mla_decode.reference import sparse_mla_decode as reference
    from kernmux.kernels.sparse_mla_decode.triton import sparse_mla_decode_triton
    from kernmux.tuning_db.ceilings import ceilings_for
    from kernmux.tuning_db.timing import environment_row, measure

    op = REGISTRY.op(OP)
    env = environment_row()
    ceilings = ceilings_for(env["gpu"] or "")
    rows = []
    for feats in shapes:
        device = feats["device"]
        args, kwargs = build_inputs(feats, device, 1, invalid=False)
        roof = op.roofline(feats, None)
        floor_us = ceilings.floor_us(roof) if ceilings else None

        def row(kernel: str, config: dict | None, timing=None, error: str = "", cos: dict | None = None) -> dict:
            p50 = timing.p50_us if timing else None
            return {
                **env, "features": feats, "kernel": kernel, "config": config, "error": error,
                "p50_us": p50, "p20_us": timing.p20_us if timing else None, "p80_us": timing.p80_us if timing else None,
                "reps": timing.reps if timing else None, "bytes": roof.bytes, "flops": roof.flops,
                "floor_us": floor_us, "fraction_of_roofline": (floor_us / p50) if (p50 and floor_us) else None,
                "achieved_tbs": roof.bytes / p50 / 1e6 if p50 else None,
                "achieved_tflops": roof.flops / p50 / 1e6 if p50 else None,
                "ceilings": {"bandwidth_tbs": ceilings.bandwidth_tbs, "tflops": ceilings.tflops} if ceilings else None,
                "metrics": cos or {},
            }

        ref_out = reference(*args, **kwargs)
        try:
            t = measure(lambda: reference(*args, **kwargs), device=device, warmup_ms=10, rep_ms=rep_ms)
            rows.append(row("torch", None, t))
        except Exception as e:
            rows.append(row("torch", None, error=f"{type(e).__name__}: {e}"))
        for cand in CANDIDATES[feats["heads"]]:
            cfg = resolved(feats, cand)
            small_key = json.dumps([{**feats, "batch": 2}, cfg], sort_keys=True)
            if small_key in compile_errors:
                rows.append(row("triton", cfg, error=compile_errors[small_key]))
                continue
            try:
                out = sparse_mla_decode_triton(*args, **kwargs, config=cfg)
                cmp = op.compare(out, ref_out, feats)
                if not cmp.passed:
                    rows.append(row("triton", cfg, error=f"numerics: {cmp.detail}", cos=dict(cmp.metrics)))
                    continue
                t = measure(lambda: sparse_mla_decode_triton(*args, **kwargs, config=cfg), device=device, warmup_ms=10, rep_ms=rep_ms)
                rows.append(row("triton", cfg, t, cos={k: cmp.metrics[k] for k in ("cos_min", "cos_mean", "rel_err") if k in cmp.metrics}))
            except Exception as e:
                rows.append(row("triton", cfg, error=f"{type(e).__name__}: {str(e)[:300]}"))
        best = _best(rows, feats)
        ref_row = next((r for r in rows if r["features"] == feats and r["kernel"] == "torch"), None)
        print(_line(feats, best, ref_row), flush=True)
        if save:  # after every shape, so a run cut short still leaves its rows
            with open(save, "w") as f:
                json.dump(rows, f, indent=1, default=str)
        del args, kwargs, ref_out
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _best(rows: list[dict], feats: dict) -> dict | None:
    timed = [r for r in rows if r["features"] == feats and r["kernel"] == "triton" and r["p50_us"]]
    return min(timed, key=lambda r: r["p50_us"]) if timed else None


def _line(feats: dict, best: dict | None, ref: dict | None) -> str:
    name = f"{feats['kv_dtype']} B={feats['batch']:>3} h={feats['heads']:>3} {'2sc' if feats['extra_topk'] else '1sc'}"
    if not best:
        return f"{name}: triton no timing"
    speed = f"{ref['p50_us'] / best['p50_us']:.1f}x torch" if ref and ref["p50_us"] else "torch n/a"
    return (f"{name}: triton {best['p50_us']:8.1f} us  {best['achieved_tbs']:.2f} TB/s  {best['achieved_tflops']:6.1f} TF/s  "
            f"{100 * (best['fraction_of_roofline'] or 0):5.1f}% roofline  {speed}  cfg={best['config']}")


# --------------------------------------------------------------------------- report


def summary_markdown(rows: list[dict], parity: dict, shapes: list[dict]) -> str:
    env = rows[0] if rows else {}
    lines = [
        "# sparse_mla_decode on " + str(env.get("gpu")),
        "",
        f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, {env.get('date')}. "
        "Timings: `kernmux.tuning_db.timing.measure` (L2 flushed before each repetition, CUDA events, median). "
        "Roofline: op bytes (each selected KV row once + its index + q/o/lse) and FLOPs (2·h·tokens·(d_qk+d_v)) "
        "over the measured H100 ceilings 2.96 TB/s and 699 TFLOP/s (notes/performance.md). "
        "Triton: best of the candidate configs per shape (every candidate is in the JSON).",
        "",
        "Parity on this GPU before timing: **"
        + {True: "PASS", False: "FAIL", None: "not run"}[parity.get("passed")]
        + "** (table in sparse_mla_decode_parity.md).",
        "",
        "| kv | B | h_q | scopes | torch µs | triton µs | × torch | TB/s | TFLOP/s | % roofline | floor µs | config |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    goal_rows = []
    for feats in shapes:
        best = _best(rows, feats)
        ref = next((r for r in rows if r["features"] == feats and r["kernel"] == "torch"), None)
        ref_us = ref["p50_us"] if ref and ref["p50_us"] else None
        if best:
            speed = ref_us / best["p50_us"] if ref_us else None
            frac = best["fraction_of_roofline"]
            cfg = {k: best["config"][k] for k in ("H_BLOCK", "N_BLOCK", "SPLITS", "num_warps", "num_stages")}
            lines.append(
                f"| {feats['kv_dtype']} | {feats['batch']} | {feats['heads']} | {'2 (+512)' if feats['extra_topk'] else '1'} | "
                f"{ref_us:.1f} | {best['p50_us']:.1f} | {speed:.1f} | {best['achieved_tbs']:.2f} | {best['achieved_tflops']:.1f} | "
                f"{100 * frac:.1f} | {best['floor_us']:.1f} | {cfg} |" if ref_us and frac else
                f"| {feats['kv_dtype']} | {feats['batch']} | {feats['heads']} | {'2' if feats['extra_topk'] else '1'} | - | {best['p50_us']:.1f} | - | - | - | - | - | |"
            )
            if feats["batch"] >= 32:
                goal_rows.append((feats, frac, speed))
        else:
            lines.append(f"| {feats['kv_dtype']} | {feats['batch']} | {feats['heads']} | {'2' if feats['extra_topk'] else '1'} | - | no timing | | | | | | |")
    met_bw = [g for g in goal_rows if g[1] is not None and g[1] >= 0.5]
    met_speed = [g for g in goal_rows if g[2] is not None and g[2] >= 10]
    lines += [
        "",
        "## Against the goals (B >= 32)",
        f"- >= 50% of the roofline: {len(met_bw)} of {len(goal_rows)} shapes.",
        f"- >= 10x the torch reference: {len(met_speed)} of {len(goal_rows)} shapes.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="B in {1, 32}, h_q in {16, 64} only (smoke test)")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only as a dry run under TRITON_INTERPRET=1")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default: 1,8,32,128)")
    parser.add_argument("--heads", default=None, help="comma-separated head counts (default: 16,64,128)")
    parser.add_argument("--topk", type=int, default=TOPK)
    parser.add_argument("--extra-topk", type=int, default=EXTRA)
    parser.add_argument("--parity-batch", type=int, default=4)
    parser.add_argument("--skip-parity", action="store_true")
    parser.add_argument("--workers", type=int, default=min(12, os.cpu_count() or 4))
    parser.add_argument("--rep-ms", type=float, default=60.0)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    import torch

    from kernmux.kernels.sparse_mla_decode import parity as parity_mod

    t0 = time.time()
    batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else (1, 32) if args.quick else BATCHES
    heads = tuple(int(h) for h in args.heads.split(",")) if args.heads else (16, 64) if args.quick else HEADS
    shapes = grid(batches, heads, args.topk, args.extra_topk, args.device)
    jobs = [({**f, "batch": 2}, resolved(f, c)) for f in shapes for c in CANDIDATES[f["heads"]]]
    # The parity grid runs the default config: compile those variants too.
    from kernmux.dispatch.registry import REGISTRY

    base = {**REGISTRY.op(OP).default_features(args.device), "batch": args.parity_batch, "topk": args.topk}
    parity_grid = parity_mod.labelled_seed_grid(base, args.extra_topk) + parity_mod.extended_grid(base, args.extra_topk)
    jobs += [({**f, "batch": 2}, resolved(f, {})) for _, f in parity_grid]
    errors = precompile(jobs, args.workers) if args.device == "cuda" else {}
    for key, err in list(errors.items())[:10]:
        print("compile failed:", key, err)

    parity: dict[str, Any] = {"passed": None}
    if not args.skip_parity:
        out = parity_mod.run_all(device=args.device, batch=args.parity_batch, topk=args.topk, extra_topk=args.extra_topk, kernels=["torch", "triton"], seed=0)
        parity = {"rows": [asdict(r) for r in out["rows"]], "transforms": [asdict(t) for t in out["transforms"]], "passed": out["passed"]}
        table = parity_mod.format_parity(out["rows"]) + "\n\n" + parity_mod.format_transforms(out["transforms"])
        with open(os.path.join(args.out, "sparse_mla_decode_parity.md"), "w") as f:
            gpu = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
            f.write(f"# sparse_mla_decode parity on {gpu} (batch {args.parity_batch}, topk {args.topk}, extra {args.extra_topk})\n\n")
            f.write(table + f"\n\n**{'PASS' if out['passed'] else 'FAIL'}**\n")
        with open(os.path.join(args.out, "sparse_mla_decode_parity.json"), "w") as f:
            json.dump(parity, f, indent=1, default=str)
        print(table, flush=True)
        print(f"parity {'PASS' if out['passed'] else 'FAIL'} after {time.time() - t0:.0f} s", flush=True)

    rows: list[dict] = []
    try:
        rows = time_grid(shapes, errors, args.rep_ms, save=os.path.join(args.out, "sparse_mla_decode_h100.json"))
    except Exception:
        traceback.print_exc()
    finally:
        with open(os.path.join(args.out, "sparse_mla_decode_h100.json"), "w") as f:
            json.dump(rows, f, indent=1, default=str)
        if rows:
            md = summary_markdown(rows, parity, shapes)
            with open(os.path.join(args.out, "sparse_mla_decode_h100.md"), "w") as f:
                f.write(md)
            print(md)
    print(f"total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
