"""Host cost of one eager ``moe_topk_softmax`` Triton call: the generic JIT launch path
against the launcher's direct launch of the cached compiled kernel. Parity first.

    PYTHONPATH=. python3 benchmarks/moe_topk_softmax_launch.py --out DIR [--workers 16]

1. Parity on the GPU, every call after the first of a launch key going through the
   direct launch: the acceptance grid (tokens {1, 7} x experts {160, 288} x topk {6, 8}
   x shared {0, 2} x fp32/bf16/fp16 x renormalise; default config and the bitonic pick)
   through ``verify_kernel`` twice per case with different seeds (the first call of a
   key compiles through ``kernel[grid](...)``, the second must hit the launch cache:
   checked by the cache size), the tie rows, and strided logits (row stride not a
   multiple of 16, a misaligned start, a column stride of 2) against the reference.
2. Host microseconds per call: N back-to-back calls timed on the host clock without
   synchronising inside the block (the kernel takes ~2 us, so the host is the limit);
   paths interleaved per round, median over rounds. Paths: ``direct`` (the shipped
   launcher), ``generic`` (the same outputs and launch parameters, launched through
   ``kernel[grid](...)`` as before), ``ops`` (kernmux.ops hot path), ``chain`` (the
   PyTorch chain), and pieces: two ``torch.empty``, two ``empty_output``, the JIT launch
   alone into preallocated outputs, an empty Triton kernel through the JIT.
3. A cProfile of both paths (top functions by own time) for the dispatch-overhead shape.
4. Eager ratio against the PyTorch chain (issue goal >= 5x, tokens <= 4096), with the
   shared ``measure`` routine as in ``moe_topk_softmax.py``: events with L2 flushed for
   the direct path, the generic path and the chain, plus graph replay of the direct path
   (the launch cache under stream capture), tokens {1, 16, 128, 1024, 4096} x experts
   {64, 128, 160, 256, 512} x shared {0, 1}, k = 8, bf16, renormalised.
Writes ``moe_topk_softmax_launch_<name>.json`` and ``.md`` under --out.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import cProfile
import io
import itertools
import json
import multiprocessing as mp
import os
import pstats
import statistics
import sys
import time
import traceback
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import moe_topk_softmax as bench  # noqa: E402  (parity tasks, the PyTorch chain)

OP = "moe_topk_softmax"
HOST_SHAPES = [  # (tokens, experts, topk, shared, renormalize)
    (7, 160, 6, 0, False),  # benchmarks/dispatch_overhead.py's default features
    (1, 256, 8, 1, True),
    (128, 160, 8, 0, True),
    (4096, 512, 8, 1, True),
]
RATIO_TOKENS = (1, 16, 128, 1024, 4096)
RATIO_EXPERTS = bench.EXPERTS
HOST_BLOCK, HOST_ROUNDS = 200, 30
if bench.QUICK:  # CPU smoke test of this script (TRITON_INTERPRET=1): a few shapes only
    HOST_SHAPES, RATIO_TOKENS, RATIO_EXPERTS, HOST_BLOCK, HOST_ROUNDS = HOST_SHAPES[:1], (1,), (64,), 3, 3


# --------------------------------------------------------------------------- parity


def _parity_twice(job: tuple) -> list[dict[str, Any]]:
    """Worker: each case of one (dtype, renorm, shared) group verified with two seeds."""
    dtype, renorm, shared, device, config = job
    rows = []
    label = "triton" + (f"[{config['select']}]" if config else "")
    try:
        from kernmux.dispatch.verify import verify_kernel
        from kernmux.kernels.moe_topk_softmax import triton as tk

        bench._load_registry()
        for tokens, experts, topk in itertools.product(*bench.PARITY.values()):
            feats = bench._features(tokens, experts, topk, shared, dtype, renorm, device)
            base = abs(hash(json.dumps([label, feats], sort_keys=True))) % (2**31)
            for call in (0, 1):
                before = len(tk.LAUNCHER.entries)
                result = verify_kernel(OP, "triton", feats, seed=base + call, config=config)
                grew = len(tk.LAUNCHER.entries) - before
                rows.append({
                    "kind": "parity", "kernel": label, "features": feats, "seed": base + call, "call": call,
                    "status": result.status, "metrics": dict(result.metrics), "detail": result.detail,
                    "launch_cache_grew": grew,
                    # the second call of a key must be a cache hit (direct launch)
                    "direct_launch": call == 1 and grew == 0 and len(tk.LAUNCHER.entries) > 0,
                })
    except Exception as e:
        rows.append({"kind": "parity", "kernel": label, "status": "error",
                     "detail": f"{type(e).__name__}: {e}", "group": [dtype, renorm, shared]})
    return rows


def strided_checks(device: str) -> list[dict[str, Any]]:
    """Strided and misaligned logits, each launched three times (direct after the first)."""
    import torch

    from kernmux.dispatch.numerics import check_call
    from kernmux.dispatch.registry import REGISTRY
    from kernmux.kernels.moe_topk_softmax.triton import moe_topk_softmax

    op = REGISTRY.op(OP)
    rows = []
    gen = torch.Generator(device="cpu").manual_seed(7)

    def fresh(shape, dtype):  # built on the device in its dtype, so views keep their strides
        return torch.randn(shape, generator=gen).to(dtype).to(device)

    cases = {
        "row stride w+5 (padded rows)": lambda t, w, dt: fresh((t, w + 5), dt)[:, :w],
        "misaligned start (offset 1 element)": lambda t, w, dt: fresh((t * w + 1,), dt)[1:].view(t, w),
        "column stride 2": lambda t, w, dt: fresh((t, 2 * w), dt)[:, ::2],
        "transposed storage": lambda t, w, dt: fresh((w, t), dt).t(),
    }
    for (name, make), dtype in itertools.product(cases.items(), (torch.bfloat16, torch.float32)):
        for tokens, experts, topk, shared in ((7, 160, 6, 2), (33, 288, 8, 0)):
            for call in range(3):
                logits = make(tokens, experts + shared, dtype)
                feats = {"tokens": tokens, "experts": experts, "topk": topk, "shared": shared,
                         "dtype": "bf16" if dtype == torch.bfloat16 else "fp32", "renormalize": True, "device": device}
                cmp = check_call(op, moe_topk_softmax, (logits, topk, True, shared), feats, device=device)
                if cmp.status == "error":
                    raise cmp.error
                rows.append({"kind": "strided", "case": name, "dtype": str(dtype), "tokens": tokens,
                             "experts": experts, "call": call, "stride": list(logits.stride()),
                             "ptr_mod16": logits.data_ptr() % 16,
                             "status": "pass" if cmp.passed else "fail", "detail": cmp.detail})
    return rows


def phase_parity(device: str, workers: int) -> list[dict[str, Any]]:
    jobs = [(d, r, s, device, cfg) for d, r, s in bench.PARITY_VARIANTS for cfg in (None, bench.BITONIC)]
    tie_jobs = [("triton", device), ("triton", device, bench.BITONIC)]
    rows: list[dict] = []
    start = time.time()
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_parity_twice, j) for j in jobs] + [pool.submit(bench._tie_task, j) for j in tie_jobs]
        for fut in futures:
            rows += fut.result()
    rows += strided_checks(device)
    bad = [r for r in rows if r["status"] != "pass"]
    direct = sum(1 for r in rows if r.get("direct_launch"))
    print(f"parity: {len(rows) - len(bad)} of {len(rows)} pass ({direct} verified calls hit the direct launch) "
          f"in {time.time() - start:.1f} s", flush=True)
    for r in bad[:20]:
        print("  FAIL", {k: r.get(k) for k in ("kind", "kernel", "case", "features", "logits", "detail")}, flush=True)
    return rows


# --------------------------------------------------------------------------- host cost


def _generic_call(logits, topk, renormalize, num_shared, config=None):
    """The launcher as it was: same outputs and launch parameters, ``kernel[grid](...)``."""
    import torch

    from kernmux.dispatch.outputs import empty_output
    from kernmux.kernels.moe_topk_softmax import triton as tk

    tokens, width = logits.shape
    device = logits.device
    weights = empty_output((tokens, topk + num_shared), torch.float32, device)
    ids = empty_output((tokens, topk + num_shared), torch.int32, device)
    rows, block, kp, sp, select, warps = tk._launch_params(tokens, width - num_shared, topk, num_shared, config)
    tk._moe_topk_softmax_kernel[((tokens + rows - 1) // rows,)](
        logits, weights, ids, ids, tokens, width - num_shared, logits.stride(0), logits.stride(1),
        K=topk, S=num_shared, RENORM=bool(renormalize), ROWS=rows, BLOCK_E=block, KP=kp, SP=sp,
        SELECT=select, HAS_PAD=False, num_warps=warps,
    )
    return weights, ids


def _host_paths(shape, device):
    import torch

    import kernmux.ops
    from kernmux.dispatch.outputs import empty_output
    from kernmux.kernels.moe_topk_softmax import triton as tk
    from kernmux.kernels.moe_topk_softmax.triton import moe_topk_softmax

    tokens, experts, topk, shared, renorm = shape
    gen = torch.Generator(device=device).manual_seed(11)
    logits = torch.randn(tokens, experts + shared, device=device, generator=gen).to(torch.bfloat16)
    shared_ids = torch.arange(experts, experts + shared, dtype=torch.int32, device=device).expand(tokens, shared)
    out_shape = (tokens, topk + shared)
    w_pre = torch.empty(out_shape, dtype=torch.float32, device=device)
    i_pre = torch.empty(out_shape, dtype=torch.int32, device=device)
    rows, block, kp, sp, select, warps = tk._launch_params(tokens, experts, topk, shared, None)
    grid = ((tokens + rows - 1) // rows,)
    empty = bench._empty_kernel()
    buf = torch.empty(16, device=device)

    def jit_only():
        tk._moe_topk_softmax_kernel[grid](
            logits, w_pre, i_pre, i_pre, tokens, experts, logits.stride(0), logits.stride(1),
            K=topk, S=shared, RENORM=renorm, ROWS=rows, BLOCK_E=block, KP=kp, SP=sp, SELECT=select,
            HAS_PAD=False, num_warps=warps)

    def two_empty():
        torch.empty(out_shape, dtype=torch.float32, device=device)
        torch.empty(out_shape, dtype=torch.int32, device=device)

    def two_empty_output():
        empty_output(out_shape, torch.float32, device)
        empty_output(out_shape, torch.int32, device)

    return logits, {
        "direct": lambda: moe_topk_softmax(logits, topk, renorm, shared),
        "generic": lambda: _generic_call(logits, topk, renorm, shared),
        "ops": lambda: kernmux.ops.moe_topk_softmax(logits, topk, renorm, shared),
        "chain": lambda: bench.torch_chain(logits, topk, renorm, shared, shared_ids),
        "jit_launch_only": jit_only,
        "two_torch_empty": two_empty,
        "two_empty_output": two_empty_output,
        "empty_kernel_jit": lambda: empty[(1,)](buf),
    }


def _sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def host_us(paths: dict, *, block: int, rounds: int) -> dict[str, dict[str, float]]:
    """Median over rounds of host-clock microseconds per call (issue time, no sync inside
    the block) and of wall time per call including the final synchronise."""
    for fn in paths.values():
        for _ in range(3 if bench.QUICK else 100):
            fn()
    _sync()
    issue: dict[str, list[float]] = {k: [] for k in paths}
    wall: dict[str, list[float]] = {k: [] for k in paths}
    names = list(paths)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:  # rotate the order
            fn = paths[name]
            _sync()
            t0 = time.perf_counter_ns()
            for _ in range(block):
                fn()
            t1 = time.perf_counter_ns()
            _sync()
            t2 = time.perf_counter_ns()
            issue[name].append((t1 - t0) / block / 1e3)
            wall[name].append((t2 - t0) / block / 1e3)
    return {
        name: {"issue_us": statistics.median(issue[name]),
               "issue_us_p20": statistics.quantiles(issue[name], n=10)[1],
               "issue_us_p80": statistics.quantiles(issue[name], n=10)[7],
               "wall_us": statistics.median(wall[name])}
        for name in names
    }


def phase_host(device: str, env: dict) -> list[dict[str, Any]]:
    rows = []
    for shape in HOST_SHAPES:
        _, paths = _host_paths(shape, device)
        res = host_us(paths, block=HOST_BLOCK, rounds=HOST_ROUNDS)
        row = {**env, "kind": "host", "shape": dict(zip(("tokens", "experts", "topk", "shared", "renormalize"), shape)),
               "paths": res}
        rows.append(row)
        print(f"host us/call T={shape[0]} E={shape[1]} k={shape[2]} S={shape[3]}: "
              + ", ".join(f"{k} {v['issue_us']:.2f}" for k, v in res.items()), flush=True)
    return rows


def phase_profile(device: str) -> str:
    _, paths = _host_paths(HOST_SHAPES[0], device)
    text = []
    for name in ("generic", "direct"):
        fn = paths[name]
        for _ in range(200):
            fn()
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(30 if bench.QUICK else 3000):
            fn()
        prof.disable()
        s = io.StringIO()
        pstats.Stats(prof, stream=s).sort_stats("tottime").print_stats(18)
        text.append(f"==== {name}: 3000 calls, T=7 E=160 k=6 S=0 bf16 ====\n{s.getvalue()}")
    return "\n".join(text)


# --------------------------------------------------------------------------- eager ratio


def phase_ratio(device: str, env: dict, warmup_ms: float, rep_ms: float) -> list[dict[str, Any]]:
    import torch

    from kernmux.kernels.moe_topk_softmax.triton import moe_topk_softmax
    from kernmux.kernels.moe_topk_softmax.triton_config import heuristic_config
    from kernmux.tuning_db.measurement.timing import measure

    rows = []
    gen = torch.Generator(device=device).manual_seed(1234)
    for shared, experts, tokens in itertools.product(bench.SHARED, RATIO_EXPERTS, RATIO_TOKENS):
        logits = torch.randn(tokens, experts + shared, device=device, generator=gen).to(torch.bfloat16)
        shared_ids = torch.arange(experts, experts + shared, dtype=torch.int32, device=device).expand(tokens, shared)
        args = (logits, bench.TOPK, bench.RENORMALIZE, shared)
        row: dict[str, Any] = {**env, "kind": "ratio", "features": bench._features(
            tokens, experts, bench.TOPK, shared, bench.DTYPE, bench.RENORMALIZE, device),
            "triton_config": heuristic_config(tokens, experts)}
        columns = {
            "direct_events": (lambda: moe_topk_softmax(*args), False),
            "generic_events": (lambda: _generic_call(*args), False),
            "chain_events": (lambda: bench.torch_chain(*args, shared_ids), False),
            "direct_graph": (lambda: moe_topk_softmax(*args), True),
        }
        for name, (fn, graph) in columns.items():
            try:
                row[name] = measure(fn, device=device, warmup_ms=warmup_ms, rep_ms=rep_ms, cuda_graph=graph).as_dict()
            except Exception as e:
                row[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
        dw, di = moe_topk_softmax(*args)
        gw, gi = _generic_call(*args)
        row["direct_vs_generic_identical"] = bool(torch.equal(dw, gw) and torch.equal(di, gi))
        rows.append(row)
        d, g, c = (row[k].get("p50_us") for k in ("direct_events", "generic_events", "chain_events"))
        if d and g and c:
            print(f"S={shared} E={experts:>3} T={tokens:>5}: direct {d:6.2f} generic {g:6.2f} chain {c:7.2f} "
                  f"ratio {c / d:5.1f}x (was {c / g:4.1f}x) graph {row['direct_graph'].get('p50_us', float('nan')):.2f}",
                  flush=True)
    return rows


# --------------------------------------------------------------------------- report


def markdown(rows: list[dict[str, Any]]) -> str:
    env = next((r for r in rows if "gpu" in r), {})
    out = [f"# moe_topk_softmax eager launch cost — {env.get('gpu', '?')}", "",
           f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, {env.get('date')}.", ""]
    par = [r for r in rows if r["kind"] in ("parity", "ties", "strided")]
    bad = [r for r in par if r["status"] != "pass"]
    direct = sum(1 for r in par if r.get("direct_launch"))
    out += [f"## Parity: {len(par) - len(bad)} of {len(par)} pass",
            f"- verify_kernel grid, two seeds per case: "
            f"{sum(1 for r in par if r['kind'] == 'parity' and r['status'] == 'pass')} of "
            f"{sum(1 for r in par if r['kind'] == 'parity')} pass; {direct} second calls hit the launch cache",
            f"- tie rows: {sum(1 for r in par if r['kind'] == 'ties' and r['status'] == 'pass')} of "
            f"{sum(1 for r in par if r['kind'] == 'ties')}",
            f"- strided / misaligned logits: {sum(1 for r in par if r['kind'] == 'strided' and r['status'] == 'pass')}"
            f" of {sum(1 for r in par if r['kind'] == 'strided')}", ""]
    host = [r for r in rows if r["kind"] == "host"]
    if host:
        names = list(host[0]["paths"])
        out += [f"## Host µs per eager call (median of {HOST_ROUNDS} rounds x {HOST_BLOCK} calls, issue time)", "",
                "| shape | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for r in host:
            s = r["shape"]
            out.append(f"| T={s['tokens']} E={s['experts']} k={s['topk']} S={s['shared']} | "
                       + " | ".join(f"{r['paths'][n]['issue_us']:.2f}" for n in names) + " |")
        out.append("")
    ratio = [r for r in rows if r["kind"] == "ratio"]
    if ratio:
        def p50(r, k):
            return r.get(k, {}).get("p50_us")
        ok = [r for r in ratio if p50(r, "direct_events") and p50(r, "chain_events")]
        met = sum(1 for r in ok if p50(r, "chain_events") / p50(r, "direct_events") >= 5)
        was = sum(1 for r in ok if p50(r, "generic_events") and p50(r, "chain_events") / p50(r, "generic_events") >= 5)
        out += ["## Eager ratio vs the PyTorch chain (events, L2 flushed; goal >= 5x, tokens <= 4096)", "",
                f"Direct launch: **{met} of {len(ok)} shapes >= 5x**; generic launch in the same run: {was} of {len(ok)}.",
                "", "| S | E | T | direct µs | generic µs | chain µs | chain/direct | chain/generic | direct graph µs |",
                "|---|---|---|---|---|---|---|---|---|"]
        for r in ratio:
            f = r["features"]
            d, g, c, gr = (p50(r, k) for k in ("direct_events", "generic_events", "chain_events", "direct_graph"))
            fmt = lambda v: f"{v:.2f}" if v else "-"  # noqa: E731
            out.append(f"| {f['shared']} | {f['experts']} | {f['tokens']} | {fmt(d)} | {fmt(g)} | {fmt(c)} | "
                       f"{(c / d if c and d else 0):.1f}x | {(c / g if c and g else 0):.1f}x | {fmt(gr)} |")
        out.append("")
    return "\n".join(out) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--name", default="h100")
    parser.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 4))
    parser.add_argument("--warmup-ms", type=float, default=5.0)
    parser.add_argument("--rep-ms", type=float, default=25.0)
    parser.add_argument("--skip-parity", action="store_true")
    args = parser.parse_args()
    try:
        import platformdirs  # noqa: F401  (the default tuning-database path needs it)
    except ImportError:  # no tuning database on the GPU image: rules and priorities only
        os.environ.setdefault("KERNMUX_DB", "sqlite:////tmp/kernmux-bench-absent.sqlite")
    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"moe_topk_softmax_launch_{args.name}")
    rows: list[dict[str, Any]] = []

    def save() -> None:
        with open(base + ".json", "w") as fh:
            json.dump(rows, fh, indent=1, default=str)
        with open(base + ".md", "w") as fh:
            fh.write(markdown(rows))

    start = time.time()
    try:
        bench._load_registry()
        from kernmux.tuning_db.measurement.timing import environment_row

        env = environment_row()
        if not args.skip_parity:
            rows += phase_parity(args.device, args.workers)
            save()
        rows += phase_host(args.device, env)
        save()
        with open(base + "_profile.txt", "w") as fh:
            fh.write(phase_profile(args.device))
        rows += phase_ratio(args.device, env, args.warmup_ms, args.rep_ms)
    except Exception:
        traceback.print_exc()
        rows.append({"kind": "note", "detail": "run aborted: " + traceback.format_exc()[-800:]})
    finally:
        save()
    print(markdown(rows).split("## Host")[-1][:6000], flush=True)
    print(f"total {time.time() - start:.1f} s; wrote {base}.json/.md/_profile.txt", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
