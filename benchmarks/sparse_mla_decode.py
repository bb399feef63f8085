"""Sparse MLA decode on one GPU: parity grid first, then timings against the roofline.

    PYTHONPATH=. python3 benchmarks/sparse_mla_decode.py --out DIR [--quick]

1. Parity: the seed's table (h_q 64/32/16 x one/two scopes x sink) plus the extended
   shapes, torch and triton on the GPU (``kernmux.kernels.sparse_mla_decode.parity``).
2. Timings: B in {1, 8, 32, 128} x h_q in {16, 64, 128}, topk 2048, one scope and two
   scopes (+512), bf16 and fp8 KV; the torch reference and the Triton kernel under each
   candidate config (best reported, all recorded), with the shared timing routine
   ``kernmux.tuning_db.measurement.timing.measure`` in two modes: CUDA-graph replay over rotating
   input sets (each replay touches 4x the L2, so no call finds its rows cached) and eager
   calls with an L2 flush before each (host launch overhead included).
   Achieved TB/s and TFLOP/s use the op's roofline bytes/FLOPs; the floor uses the
   ceilings measured on this GPU (``kernmux.tuning_db.measurement.ceilings``: 2 GiB
   copy, bf16 8192^3 matmul; measured on first need, kept in the tuning database).
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

# Candidate Triton configs (SPLITS 0 = automatic), from the sm_90 compile report
# (registers / spills / shared memory) and a first H100 sweep; the timings decide.
_SMALL_HEADS = [
    {},  # the kernel's automatic choice
    {"H_BLOCK": 16, "N_BLOCK": 32, "num_warps": 4, "num_stages": 2},
    {"H_BLOCK": 16, "N_BLOCK": 32, "num_warps": 4, "num_stages": 2, "SPLITS": 8},
    {"H_BLOCK": 16, "N_BLOCK": 64, "num_warps": 8, "num_stages": 3},
]
_MANY_HEADS = [
    {},
    {"LAYOUT": 1, "H_BLOCK": 16, "N_BLOCK": 64, "num_warps": 8, "num_stages": 3},
    {"LAYOUT": 1, "H_BLOCK": 64, "N_BLOCK": 32, "num_warps": 8, "num_stages": 2},
    # Two-warpgroup layouts (64 heads, S split by slots between the warpgroups): the
    # one-tile body with two or three row buffers, the four-tile body.
    {"LAYOUT": 2, "num_stages": 3},
    {"LAYOUT": 2},
    {"LAYOUT": 3},
    {"LAYOUT": 3, "num_stages": 5},
]
_FP8_SMALL_HEADS = [
    {},
    {"H_BLOCK": 16, "N_BLOCK": 32, "num_warps": 4, "num_stages": 2, "SPLITS": 8},
    {"H_BLOCK": 16, "N_BLOCK": 32, "num_warps": 4, "num_stages": 3, "FP8_MODE": 2},
    {"H_BLOCK": 16, "N_BLOCK": 32, "num_warps": 4, "num_stages": 2, "SPLITS": 8, "FP8_MODE": 2},
]
_FP8_MANY_HEADS = [
    {},
    {"LAYOUT": 1, "H_BLOCK": 32, "N_BLOCK": 64, "num_warps": 8, "num_stages": 3},
    {"LAYOUT": 1, "H_BLOCK": 64, "N_BLOCK": 32, "num_warps": 8, "num_stages": 2},
    {"LAYOUT": 1, "H_BLOCK": 16, "N_BLOCK": 32, "num_warps": 4, "num_stages": 2},
    {"LAYOUT": 2, "num_stages": 3},
    {"LAYOUT": 2},
]
# Configs whose layouts the default parity grid (automatic tiles at batch 4) does not
# reach: each runs the whole parity grid too, before any timing.
PARITY_CONFIGS = [
    {"LAYOUT": 2},
    {"LAYOUT": 2, "N_BLOCK": 16, "num_stages": 3, "SPLITS": 3},
    {"LAYOUT": 3},
]


H100_SMS = 132


def candidates(feats: dict[str, Any]) -> list[dict[str, int]]:
    if feats["heads"] <= 16:
        return _FP8_SMALL_HEADS if feats["kv_dtype"] == "fp8" else _SMALL_HEADS
    many = _FP8_MANY_HEADS if feats["kv_dtype"] == "fp8" else _MANY_HEADS
    # The wide layout's automatic split count fills the SMs once without a second wave;
    # also time the next larger count (two waves of half the work, plus the combine).
    programs = feats["batch"] * feats["qlen"] * -(-feats["heads"] // 64)
    more = -(-H100_SMS // programs)
    return many + [{"LAYOUT": 2, "SPLITS": min(64, more)}] if more != max(1, H100_SMS // programs) else many


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

    return resolve_config(config, feats["heads"], feats["batch"] * feats["qlen"], feats["topk"], torch.device(feats["device"]), feats["kv_dtype"])


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

ROTATE_BYTES = 200e6  # inputs touched per graph replay: 4x the H100's 50 MB L2


def _rotating(feats: dict[str, Any], roof_bytes: float) -> list[tuple[tuple, dict]]:
    """Enough independent input sets that one pass over them does not fit in L2."""
    from kernmux.kernels.sparse_mla_decode.inputs import build_inputs

    count = max(1, min(64, int(-(-ROTATE_BYTES // roof_bytes))))
    return [build_inputs(feats, feats["device"], 1 + i, invalid=False) for i in range(count)]


def _timed(fn_for, sets, device: str, rep_ms: float, graph: bool):
    """Time ``fn_for(args, kwargs)`` with the shared routine. graph: one CUDA graph holds
    one call per input set (cold L2 for each), per-call time = replay / sets. Otherwise
    the first set alone, L2 flushed before each call (host launch overhead included)."""
    from kernmux.tuning_db.measurement.timing import measure

    if not graph or device != "cuda":
        args, kwargs = sets[0]
        return measure(lambda: fn_for(args, kwargs), device=device, warmup_ms=10, rep_ms=rep_ms)
    state = {"i": 0}

    def step():
        args, kwargs = sets[state["i"] % len(sets)]
        state["i"] += 1
        return fn_for(args, kwargs)

    return measure(step, device=device, warmup_ms=10, rep_ms=rep_ms, cuda_graph=True, graph_batch=len(sets))


def time_grid(shapes: list[dict[str, Any]], compile_errors: dict[str, str], rep_ms: float, save: str | None = None) -> list[dict[str, Any]]:
    import torch

    from kernmux.dispatch.numerics import check_call
    from kernmux.dispatch.registry import REGISTRY
    from kernmux.kernels.sparse_mla_decode.reference import sparse_mla_decode as reference
    from kernmux.kernels.sparse_mla_decode.triton import sparse_mla_decode_triton
    from kernmux.tuning_db.measurement.ceilings import device_ceilings
    from kernmux.tuning_db.measurement.timing import environment_row

    op = REGISTRY.op(OP)
    env = environment_row()
    ceilings, why_none = device_ceilings()
    print(f"ceilings: {ceilings.describe() if ceilings else why_none}", flush=True)
    rows: list[dict[str, Any]] = []
    for feats in shapes:
        device = feats["device"]
        roof = op.roofline(feats, None)
        sets = _rotating(feats, roof.bytes) if device == "cuda" else _rotating(feats, 1e12)
        floor_us = ceilings.floor_us(roof) if ceilings else None

        def row(kernel: str, config: dict | None, mode: str, timing=None, error: str = "", metrics: dict | None = None) -> dict:
            p50 = timing.p50_us if timing else None
            return {
                **env, "features": feats, "kernel": kernel, "config": config, "mode": mode, "error": error,
                "input_sets": len(sets) if mode == "graph" else 1, "method": timing.method if timing else None,
                "p50_us": p50, "p20_us": timing.p20_us if timing else None, "p80_us": timing.p80_us if timing else None,
                "reps": timing.reps if timing else None, "bytes": roof.bytes, "flops": roof.flops,
                "floor_us": floor_us, "fraction_of_roofline": (floor_us / p50) if (p50 and floor_us) else None,
                "achieved_tbs": roof.bytes / p50 / 1e6 if p50 else None,
                "achieved_tflops": roof.flops / p50 / 1e6 if p50 else None,
                "ceilings": ceilings.as_dict() if ceilings else None,
                "metrics": metrics or {},
            }

        def ref_fn(a, k):
            return reference(*a, **k)

        ref_out = reference(*sets[0][0], **sets[0][1])
        for mode in ("graph", "eager"):
            try:
                rows.append(row("torch", None, mode, _timed(ref_fn, sets, device, rep_ms, mode == "graph")))
            except Exception as e:
                rows.append(row("torch", None, mode, error=f"{type(e).__name__}: {str(e)[:300]}"))
        timed = []
        seen: list[dict] = []
        for cand in candidates(feats):
            cfg = resolved(feats, cand)
            if cfg in seen:  # the automatic choice may equal a listed candidate
                continue
            seen.append(cfg)
            small_key = json.dumps([{**feats, "batch": 2}, cfg], sort_keys=True)
            if small_key in compile_errors:
                rows.append(row("triton", cfg, "graph", error=compile_errors[small_key]))
                continue
            try:
                cmp = check_call(op, lambda *a, cfg=cfg: sparse_mla_decode_triton(*a, config=cfg),
                                 op.positional(*sets[0]), feats, device=device, expected=ref_out)
                if cmp.status == "error":
                    raise cmp.error
                if not cmp.passed:
                    rows.append(row("triton", cfg, "graph", error=f"numerics: {cmp.detail}", metrics=dict(cmp.metrics)))
                    continue
                metrics = {k: cmp.metrics[k] for k in ("cos_min", "cos_mean", "rel_err") if k in cmp.metrics}

                def tri_fn(a, k, cfg=cfg):
                    return sparse_mla_decode_triton(*a, **k, config=cfg)

                rows.append(row("triton", cfg, "graph", _timed(tri_fn, sets, device, rep_ms, True), metrics=metrics))
                timed.append((rows[-1]["p50_us"], cfg, tri_fn, metrics))
            except Exception as e:
                rows.append(row("triton", cfg, "graph", error=f"{type(e).__name__}: {str(e)[:300]}"))
        if timed:  # the winner of the graph timings, also eager
            _, cfg, tri_fn, metrics = min(timed, key=lambda t: t[0])
            try:
                rows.append(row("triton", cfg, "eager", _timed(tri_fn, sets, device, rep_ms, False), metrics=metrics))
            except Exception as e:
                rows.append(row("triton", cfg, "eager", error=f"{type(e).__name__}: {str(e)[:300]}"))
        print(_line(rows, feats), flush=True)
        if save:  # after every shape, so a run cut short still leaves its rows
            with open(save, "w") as f:
                json.dump(rows, f, indent=1, default=str)
        sets = ref_out = None  # free this shape's inputs before the next one
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def hot_probe(shapes: list[dict[str, Any]], rep_ms: float) -> list[dict[str, Any]]:
    """Diagnosis, not a result: the same calls with every index drawn from 256 rows that
    stay in L2, so the time is the kernel's work without the HBM gather (graph replay)."""
    import torch

    from kernmux.kernels.sparse_mla_decode.triton import sparse_mla_decode_triton

    rows = []
    for feats in shapes:
        sets = []
        for i in range(8):
            (q, kv, idx, scale, d_v), kw = _one_set(feats, 1 + i)
            pool = idx.flatten()[:256]
            idx = pool[torch.randint(0, 256, idx.shape, device=idx.device)]
            if kw.get("extra_indices") is not None:
                kw = {**kw, "extra_indices": pool[torch.randint(0, 256, kw["extra_indices"].shape, device=idx.device)]}
                kw["extra_kv_cache"] = kv
            sets.append(((q, kv, idx, scale, d_v), kw))
        for cand in candidates(feats):
            cfg = resolved(feats, cand)
            if cfg.get("LAYOUT") not in (2, 3) and cand:
                continue

            def fn(a, k, cfg=cfg):
                return sparse_mla_decode_triton(*a, **k, config=cfg)

            try:
                t = _timed(fn, sets, "cuda", rep_ms, True)
                rows.append({"features": feats, "kernel": "triton", "config": cfg, "mode": "graph-hot", "p50_us": t.p50_us})
                print(f"hot {feats['kv_dtype']} B={feats['batch']} h={feats['heads']} extra={feats['extra_topk']}: {t.p50_us:8.1f} us {cfg}", flush=True)
            except Exception as e:
                rows.append({"features": feats, "kernel": "triton", "config": cfg, "mode": "graph-hot", "p50_us": None, "error": f"{type(e).__name__}: {e}"[:300]})
        sets = None
        torch.cuda.empty_cache()
    return rows


def _one_set(feats: dict[str, Any], seed: int):
    from kernmux.kernels.sparse_mla_decode.inputs import build_inputs

    return build_inputs(feats, feats["device"], seed, invalid=False)


def compile_report() -> list[dict[str, Any]]:
    """Registers, spills and shared memory of every main-kernel variant this process
    loaded (the timed ones), from Triton's compiled-kernel objects."""
    from kernmux.kernels.sparse_mla_decode import triton as tiles
    from kernmux.kernels.sparse_mla_decode import triton_wide as wide

    out: list[dict[str, Any]] = []
    for name, fn in (("tiles", tiles._sparse_mla_decode_kernel), ("wide", wide._sparse_mla_decode_wide_kernel)):
        for caches in getattr(fn, "device_caches", {}).values():
            for key, kernel in caches[0].items():
                try:
                    kernel._init_handles()
                    md = kernel.metadata
                    out.append({
                        "kernel": name, "num_warps": md.num_warps, "num_stages": md.num_stages, "shared": md.shared,
                        "n_regs": kernel.n_regs, "n_spills": kernel.n_spills, "key": str(key)[:1500],
                    })
                except Exception as e:  # a report, never a failure of the run
                    out.append({"kernel": name, "error": f"{type(e).__name__}: {e}"[:300]})
    return out


def _pick(rows: list[dict], feats: dict, kernel: str, mode: str) -> dict | None:
    timed = [r for r in rows if r["features"] == feats and r["kernel"] == kernel and r["mode"] == mode and r["p50_us"]]
    return min(timed, key=lambda r: r["p50_us"]) if timed else None


def _line(rows: list[dict], feats: dict) -> str:
    name = f"{feats['kv_dtype']} B={feats['batch']:>3} h={feats['heads']:>3} {'2sc' if feats['extra_topk'] else '1sc'}"
    best, ref = _pick(rows, feats, "triton", "graph"), _pick(rows, feats, "torch", "graph")
    eager, ref_eager = _pick(rows, feats, "triton", "eager"), _pick(rows, feats, "torch", "eager")
    if not best:
        return f"{name}: triton no timing"
    speed = f"{ref['p50_us'] / best['p50_us']:.1f}x" if ref else "n/a"
    eag = f"eager {eager['p50_us']:.1f} us ({ref_eager['p50_us'] / eager['p50_us']:.1f}x)" if eager and ref_eager else ""
    return (f"{name}: graph {best['p50_us']:8.1f} us {best['achieved_tbs']:.2f} TB/s {best['achieved_tflops']:6.1f} TF/s "
            f"{100 * (best['fraction_of_roofline'] or 0):5.1f}% roof {speed} torch | {eag} | {best['config']}")


# --------------------------------------------------------------------------- report


def _cfg_text(cfg: dict, feats: dict) -> str:
    keys = ("H_BLOCK", "N_BLOCK", "SPLITS", "num_warps", "num_stages")
    text = "/".join(str(cfg[k]) for k in keys)
    text += {2: " wide", 3: " split-S"}.get(cfg.get("LAYOUT"), "")
    if feats["kv_dtype"] == "fp8" and cfg.get("LAYOUT") != 2:
        text += {0: " dequant-rows", 1: " bf16-fold", 2: " f16-fold"}.get(cfg.get("FP8_MODE"), "")
    return text


def _ceilings_text(rows: list[dict]) -> str:
    """The ceilings the rows were computed with, and where they came from when recorded."""
    c = next((r["ceilings"] for r in rows if r.get("ceilings")), None)
    if not c:
        return "no ceilings (no fraction of roofline)"
    text = f"the ceilings measured on this GPU, {c['bandwidth_tbs']:.3g} TB/s and {c['tflops']:.4g} TFLOP/s"
    if c.get("source"):
        text += f" ({c['source']}, measured {str(c.get('measured_at'))[:16]})"
    return text


def summary_markdown(rows: list[dict], parity: dict, shapes: list[dict]) -> str:
    env = rows[0] if rows else {}
    lines = [
        "# sparse_mla_decode on " + str(env.get("gpu")),
        "",
        f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, {env.get('date')}. "
        "All timings through `kernmux.tuning_db.measurement.timing.measure`. **graph**: one CUDA graph holding one call per "
        "input set, the sets rotating so that a replay touches >= 200 MB (4x L2), per-call = replay / sets. "
        "**eager**: one call per repetition with L2 flushed before it (CUDA events; host launch overhead included "
        "when the GPU work is shorter than it). "
        "Roofline: op bytes (each selected KV row once + its index + q/o/lse) and FLOPs (2·h·tokens·(d_qk+d_v)) "
        f"over {_ceilings_text(rows)}; % roofline = floor / "
        "graph time. Triton: fastest graph time among the candidate configs (config = H_BLOCK/N_BLOCK/SPLITS/"
        "warps/stages; every candidate is in the JSON).",
        "",
        "Parity on this GPU before timing: **"
        + {True: "PASS", False: "FAIL", None: "not run"}[parity.get("passed")]
        + "** (table in sparse_mla_decode_parity.md).",
        "",
        "| kv | B | h_q | scopes | floor µs | torch graph µs | triton graph µs | × torch | TB/s | TFLOP/s | % roofline | torch eager µs | triton eager µs | config |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    goal = []
    for feats in shapes:
        best, ref = _pick(rows, feats, "triton", "graph"), _pick(rows, feats, "torch", "graph")
        eager, ref_eager = _pick(rows, feats, "triton", "eager"), _pick(rows, feats, "torch", "eager")
        scope = f"2 (+{feats['extra_topk']})" if feats["extra_topk"] else "1"
        if not best:
            lines.append(f"| {feats['kv_dtype']} | {feats['batch']} | {feats['heads']} | {scope} | | | no timing | | | | | | | |")
            continue
        speed = ref["p50_us"] / best["p50_us"] if ref else None
        frac = best["fraction_of_roofline"]
        fmt = lambda r: f"{r['p50_us']:.1f}" if r else "-"  # noqa: E731
        lines.append(
            f"| {feats['kv_dtype']} | {feats['batch']} | {feats['heads']} | {scope} | {best['floor_us'] or 0:.1f} | {fmt(ref)} | "
            f"{best['p50_us']:.1f} | {speed or 0:.1f} | {best['achieved_tbs']:.2f} | {best['achieved_tflops']:.1f} | "
            f"{100 * (frac or 0):.1f} | {fmt(ref_eager)} | {fmt(eager)} | {_cfg_text(best['config'], feats)} |"
        )
        if feats["batch"] >= 32:
            goal.append((frac or 0, speed or 0))
    lines += [
        "",
        "## Against the goals (B >= 32, graph timings)",
        f"- >= 50% of the roofline: {sum(f >= 0.5 for f, _ in goal)} of {len(goal)} shapes "
        f"(range {100 * min((f for f, _ in goal), default=0):.0f}%..{100 * max((f for f, _ in goal), default=0):.0f}%).",
        f"- >= 10x the torch reference: {sum(s >= 10 for _, s in goal)} of {len(goal)} shapes "
        f"(range {min((s for _, s in goal), default=0):.1f}x..{max((s for _, s in goal), default=0):.1f}x).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--quick", action="store_true", help="B in {1, 32}, h_q in {16, 64} only (smoke test)")
    parser.add_argument("--device", default="cuda", help="cuda; cpu only as a dry run under TRITON_INTERPRET=1")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default: 1,8,32,128)")
    parser.add_argument("--heads", default=None, help="comma-separated head counts (default: 16,64,128)")
    parser.add_argument("--kv-dtypes", default="bf16,fp8", help="comma-separated KV dtypes")
    parser.add_argument("--scopes", default="1,2", help="1: one scope, 2: two scopes (+extra-topk)")
    parser.add_argument("--hot-probe", action="store_true", help="also time B=128 with L2-resident rows (diagnosis)")
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
    shapes = [
        f for f in grid(batches, heads, args.topk, args.extra_topk, args.device)
        if f["kv_dtype"] in args.kv_dtypes.split(",") and str(2 if f["extra_topk"] else 1) in args.scopes.split(",")
    ]
    jobs = [({**f, "batch": 2}, resolved(f, c)) for f in shapes for c in candidates(f)]
    # The parity grid runs the default config: compile those variants too.
    from kernmux.dispatch.registry import REGISTRY

    base = {**REGISTRY.op(OP).default_features(args.device), "batch": args.parity_batch, "topk": args.topk}
    parity_grid = parity_mod.labelled_seed_grid(base, args.extra_topk) + parity_mod.extended_grid(base, args.extra_topk)
    jobs += [({**f, "batch": 2}, resolved(f, c)) for _, f in parity_grid for c in [{}] + PARITY_CONFIGS]
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
        extra_rows = []
        for cfg in PARITY_CONFIGS:
            extra_rows += [
                {**asdict(r), "config": cfg}
                for r in parity_mod.parity_rows(parity_grid, ["triton"], seed=100, configs={"triton": cfg})
            ]
        extra_ok = all(r["status"] == "pass" for r in extra_rows)
        parity["config_rows"] = extra_rows
        parity["passed"] = bool(out["passed"] and extra_ok)
        lines = ["| config | layout config | cosine min / mean / max | result |", "|---|---|---|---|"]
        for r in extra_rows:
            result = "PASS" if r["status"] == "pass" else f"{r['status'].upper()} {r['detail']}"
            lines.append(f"| {r['label']} | {json.dumps(r['config'])} | {r['cos_min'] or 0:.6f} / {r['cos_mean'] or 0:.6f} / {r['cos_max'] or 0:.6f} | {result} |")
        with open(os.path.join(args.out, "sparse_mla_decode_parity.md"), "a") as f:
            f.write("\n## Layouts outside the automatic choice at batch 4 (triton)\n\n" + "\n".join(lines) + f"\n\n**{'PASS' if extra_ok else 'FAIL'}**\n")
        with open(os.path.join(args.out, "sparse_mla_decode_parity.json"), "w") as f:
            json.dump(parity, f, indent=1, default=str)
        print("\n".join(lines), flush=True)
        print(f"parity {'PASS' if parity['passed'] else 'FAIL'} after {time.time() - t0:.0f} s", flush=True)

    rows: list[dict] = []
    try:
        rows = time_grid(shapes, errors, args.rep_ms, save=os.path.join(args.out, "sparse_mla_decode_h100.json"))
    except Exception:
        traceback.print_exc()
    finally:
        if args.hot_probe and args.device == "cuda":
            try:
                hot = [f for f in shapes if f["batch"] == 128 and not f["extra_topk"] and f["heads"] >= 64]
                rows += hot_probe(hot, args.rep_ms)
            except Exception:
                traceback.print_exc()
        with open(os.path.join(args.out, "sparse_mla_decode_h100.json"), "w") as f:
            json.dump(rows, f, indent=1, default=str)
        if args.device == "cuda":
            try:
                with open(os.path.join(args.out, "sparse_mla_decode_compile_h100.json"), "w") as f:
                    json.dump(compile_report(), f, indent=1, default=str)
            except Exception:
                traceback.print_exc()
        if rows:
            md = summary_markdown(rows, parity, shapes)
            with open(os.path.join(args.out, "sparse_mla_decode_h100.md"), "w") as f:
                f.write(md)
            print(md)
    print(f"total {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
