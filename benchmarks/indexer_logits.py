"""indexer_logits on a GPU: parity grid first, then timings of Triton configs vs the torch reference.

Run on the GPU machine (kernmux need not be installed):

    PYTHONPATH=. python3 benchmarks/indexer_logits.py --out "$OUT"

``--smoke`` runs tiny shapes on the CPU under TRITON_INTERPRET=1 to check the script.
Writes ``indexer_logits_<tag>.json`` (one row per parity case / timing, each with the
environment row) and ``indexer_logits_<tag>.md`` (summary against the issue's goals).

Parity is the one numerics check of ``kernmux verify`` (``kernmux.dispatch.numerics``):
fresh inputs per case from the op's ``make_inputs``, outputs poisoned before the call,
``op.compare`` as the judge. Every timed config is also checked (``check_call``) against
the torch output on the timed inputs before it is timed. Timing:
``kernmux.tuning_db.measurement.timing.measure`` (CUDA events, L2 flushed before each repetition),
all requests at the full context, pages scattered over the cache in random order.
Roofline: the op's ``roofline`` bytes over the copy ceiling measured on this GPU
(``kernmux.tuning_db.measurement.ceilings``; none on the CPU smoke run).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from pathlib import Path

if os.environ.get("INDEXER_BENCH_SMOKE") == "1" or "--smoke" in sys.argv:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from kernmux.dispatch.numerics import check_call, check_numerics  # noqa: E402
from kernmux.dispatch.registry import REGISTRY  # noqa: E402
from kernmux.kernels.indexer_logits import OP  # noqa: E402  (registers the op)
from kernmux.kernels.indexer_logits.layout import split_page_layout  # noqa: E402
from kernmux.kernels.indexer_logits.reference import indexer_logits as reference  # noqa: E402
from kernmux.tuning_db.measurement.ceilings import Ceilings, device_ceilings  # noqa: E402
from kernmux.tuning_db.measurement.timing import environment_row, measure  # noqa: E402


def _cfg(block_n, warps, stages, mma="kh", tiles=0, prefetch=0, dot="bf16", joint=0):
    cfg = {"BLOCK_N": block_n, "TILES": tiles, "num_warps": warps, "num_stages": stages, "dot": dot, "mma": mma, "prefetch": prefetch}
    if joint:  # both next_n queries in one MMA (launcher key, not yet in the registered space)
        cfg["joint"] = 1
    return cfg


# Configs timed at every shape (the first was the registered default during the second
# H100 run; the default now is the tenth, see indexer_logits_h100.md). fp8 operands are
# left out: they missed the 1e-3 tolerance at every large shape of the first run
# (indexer_logits_h100_run1.md), Hopper's fp8 MMA accumulates with reduced precision.
TIMED_CONFIGS = [
    _cfg(128, 8, 3),
    _cfg(128, 4, 3),
    _cfg(128, 8, 4),
    _cfg(128, 4, 4),
    _cfg(64, 4, 3),
    _cfg(64, 4, 4),
    _cfg(128, 8, 3, tiles=8),
    _cfg(128, 8, 3, tiles=32),
    _cfg(128, 8, 1, prefetch=1),
    _cfg(128, 4, 2, prefetch=1),
    _cfg(128, 8, 3, mma="hk"),
]
# Non-default configs that also run the (reduced) parity grid.
PARITY_ALTERNATES = [TIMED_CONFIGS[1], TIMED_CONFIGS[8]]

# --focus N: the goal shape only (B=256, context 8192), configs of round N timed, the
# round's parity configs on the reduced grid. Joint-MMA configs are skipped at next_n=1
# (the same kernel there). Round 1: the second run's best configs again (same-run
# baseline), neighbours of the next_n=1 best, the joint MMA for next_n=2
# (indexer_logits_h100_focus1.md). Round 2: repeats of round 1's winners and their
# neighbours (stages, tiles, warps), so a winner is confirmed by a second run.
FOCUS_ROUNDS = {
    1: [
        _cfg(128, 8, 3, tiles=32),
        _cfg(128, 4, 2, prefetch=1),
        _cfg(128, 8, 3),
        _cfg(128, 8, 4, tiles=32),
        _cfg(128, 8, 2, tiles=32),
        _cfg(128, 8, 3, tiles=16),
        _cfg(128, 8, 1, prefetch=1, tiles=32),
        _cfg(128, 8, 3, joint=1),
        _cfg(128, 8, 3, tiles=32, joint=1),
        _cfg(128, 8, 1, prefetch=1, joint=1),
        _cfg(128, 8, 2, prefetch=1, joint=1),
        _cfg(128, 4, 2, prefetch=1, joint=1),
        _cfg(64, 4, 3, joint=1),
        _cfg(64, 8, 3, joint=1),
    ],
    2: [
        _cfg(128, 8, 2, tiles=32),
        _cfg(128, 8, 3, tiles=32),
        _cfg(128, 4, 2, prefetch=1),
        _cfg(128, 8, 2),
        _cfg(128, 8, 2, tiles=16),
        _cfg(128, 8, 2, tiles=8),
        _cfg(128, 4, 2, tiles=32),
        _cfg(128, 8, 2, prefetch=1, tiles=32),
        _cfg(64, 4, 3, joint=1),
        _cfg(64, 4, 3),
        _cfg(64, 4, 2, joint=1),
        _cfg(64, 4, 4, joint=1),
        _cfg(64, 4, 3, tiles=32, joint=1),
        _cfg(64, 4, 2, prefetch=1, joint=1),
        _cfg(128, 8, 2, tiles=32, joint=1),
    ],
}
FOCUS_PARITY = {
    1: [FOCUS_ROUNDS[1][9], FOCUS_ROUNDS[1][11], FOCUS_ROUNDS[1][12]],
    2: [FOCUS_ROUNDS[2][0], FOCUS_ROUNDS[2][8], FOCUS_ROUNDS[2][13]],
}


def config_name(config: dict) -> str:
    name = f"N{config['BLOCK_N']}-w{config['num_warps']}-s{config['num_stages']}-{config['dot']}-{config['mma']}"
    if config.get("TILES"):
        name += f"-t{config['TILES']}"
    if config.get("prefetch"):
        name += "-pf"
    if config.get("joint"):
        name += "-joint"
    return name


def triton_fn():
    from kernmux.kernels.indexer_logits.triton import indexer_logits_triton

    return indexer_logits_triton


def full_config(config: dict | None) -> dict:
    return REGISTRY.kernels[OP]["triton"].full_config(config)


def parity_case(feats: dict, seed: int, config: dict) -> dict:
    """One verify check: fresh inputs, poisoned output, op.compare (a failure is a result)."""
    op = REGISTRY.ops[OP]
    kernel = REGISTRY.kernels_of(OP)["triton"]
    row = {"kind": "parity", "kernel": "triton", "features": feats, "config": full_config(config), "seed": seed}
    result = check_numerics(op, kernel, feats, seed=seed, config=config)
    if result.status == "error":
        return {**row, "status": "error", "detail": result.detail[:500]}
    return {**row, "status": result.status, "metrics": dict(result.metrics), "detail": result.detail}


def parity_grid(device: str, smoke: bool) -> list[dict]:
    contexts = (1, 63, 200) if smoke else (1, 63, 1000)
    rows = []
    seed = 0
    for heads, next_n, context, block_size in itertools.product((8, 16, 32, 64), (1, 2), contexts, (16, 64)):
        feats = dict(batch=3, next_n=next_n, heads=heads, head_dim=128, context=context, block_size=block_size, device=device)
        rows.append(parity_case(feats, seed, {}))
        seed += 1
    # Head size 64, odd head counts, and the non-default configs on small problems.
    extra = [
        (dict(heads=16, next_n=2, head_dim=64, context=63, block_size=16), {}),
        (dict(heads=7, next_n=1, head_dim=128, context=63, block_size=64), {}),
        (dict(heads=128, next_n=2, head_dim=128, context=1000 if not smoke else 100, block_size=64), {}),
    ]
    for config in PARITY_ALTERNATES:
        for heads, next_n, context, block_size in itertools.product((8, 64), (1, 2), (1, contexts[-1]), (16, 64)):
            extra.append((dict(heads=heads, next_n=next_n, head_dim=128, context=context, block_size=block_size), config))
    # Every timed config is also checked against torch at every timed shape (timing_rows).
    for case, config in extra:
        feats = dict(batch=3, device=device, **case)
        rows.append(parity_case(feats, seed, config))
        seed += 1
    return rows


def bench_inputs(batch: int, next_n: int, heads: int, head_dim: int, context: int, block_size: int, device: str, seed: int):
    """Timed inputs, built on the device: every request at the full context, pages in
    random order over a page-fused cache (the layout engines keep)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    pages = -(-context // block_size)
    num_blocks = batch * pages + 1
    table = torch.randperm(num_blocks, generator=gen, device=device)[: batch * pages].view(batch, pages).to(torch.int32)
    fused = torch.empty(num_blocks, block_size * (head_dim + 4), dtype=torch.uint8, device=device)
    step = max(1, (1 << 26) // (block_size * head_dim))  # ~256 MB of fp32 keys at a time
    for start in range(0, num_blocks, step):
        stop = min(num_blocks, start + step)
        keys = torch.randn(stop - start, block_size, head_dim, generator=gen, device=device)
        scale = keys.abs().amax(dim=-1).clamp_min(1e-4) / 448.0
        fused[start:stop, : block_size * head_dim] = (keys / scale[..., None]).to(torch.float8_e4m3fn).view(torch.uint8).view(stop - start, -1)
        fused[start:stop, block_size * head_dim :] = scale.view(torch.uint8).view(stop - start, -1)
    k_cache, k_scale = split_page_layout(fused.view(num_blocks, block_size, 1, head_dim + 4), head_dim)
    q = torch.randn(batch, next_n, heads, head_dim, generator=gen, device=device).to(torch.float8_e4m3fn)
    weights = torch.randn(batch * next_n, heads, generator=gen, device=device) * heads**-0.5
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return (q, k_cache, k_scale, weights, lens, table, context)


def timing_rows(device: str, smoke: bool, deadline: float, focus: bool = False,
                ceilings: Ceilings | None = None) -> list[dict]:
    op = REGISTRY.ops[OP]
    # The goal shape first, so a cut by the time budget leaves the shapes that matter.
    shapes = [(4, 256), (1, 256)] if smoke else [(256, 8192), (256, 4096), (64, 8192), (64, 4096), (1, 8192), (1, 4096)]
    if focus:
        shapes = shapes[:1]
    heads, head_dim, block_size = (16, 64, 16) if smoke else (64, 128, 64)
    timing = dict(warmup_ms=10.0, rep_ms=60.0) if not smoke else dict(warmup_ms=0.0, rep_ms=0.0, min_reps=1, max_reps=1)
    rows = []
    for (batch, context), next_n in itertools.product(shapes, (1, 2)):
        feats = dict(batch=batch, next_n=next_n, heads=heads, head_dim=head_dim, context=context, block_size=block_size, device=device)
        roof = op.roofline(feats, None)
        base = {"kind": "timing", "features": feats, "roofline_bytes": roof.bytes, "roofline_flops": roof.flops}
        if time.time() > deadline:
            rows.append({**base, "kernel": "*", "status": "skipped", "detail": "time budget"})
            continue
        args = bench_inputs(batch, next_n, heads, head_dim, context, block_size, device, seed=batch * 10 + next_n)
        expected = reference(*args)
        t = measure(lambda: reference(*args), device=device, **timing)
        torch_us = t.p50_us
        rows.append({**base, "kernel": "torch", "config": {}, "status": "ok", **t.as_dict(), **_rates(roof, t.p50_us, ceilings)})
        for config in TIMED_CONFIGS:
            if config.get("joint") and next_n == 1:
                continue
            row = {**base, "kernel": "triton", "config": config, "config_name": config_name(config)}
            if time.time() > deadline:
                rows.append({**row, "status": "skipped", "detail": "time budget"})
                continue
            fn = triton_fn()
            cfg = full_config(config)
            try:
                check = check_call(op, lambda *a, fn=fn, cfg=cfg: fn(*a, config=cfg), args, feats, expected=expected)
                if check.status == "error":
                    raise check.error
                if not check.passed:
                    rows.append({**row, "status": "numerics_failed", "metrics": dict(check.metrics), "detail": check.detail})
                    continue
                t = measure(check.call, device=device, **timing)
            except Exception as e:
                rows.append({**row, "status": "error", "detail": f"{type(e).__name__}: {e}"[:500]})
                continue
            rows.append({**row, "status": "ok", "metrics": dict(check.metrics), **t.as_dict(), **_rates(roof, t.p50_us, ceilings), "speedup_vs_torch": torch_us / t.p50_us})
        del args, expected
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def _rates(roof, p50_us: float, ceilings: Ceilings | None) -> dict:
    tbs = roof.bytes / (p50_us * 1e6)
    return {
        "tb_per_s": tbs,
        "frac_of_copy_ceiling": tbs / ceilings.bandwidth_tbs if ceilings else None,
        "tflops": roof.flops / (p50_us * 1e6),
        "floor_us": ceilings.floor_us(roof) if ceilings else None,
        "ceilings": ceilings.as_dict() if ceilings else None,
    }


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _copy_ceiling_text(timings: list[dict]) -> str:
    """The copy ceiling the rows were computed with (rows written before ceilings were
    measured per device carry none: they used a fixed H100 figure, 2.96 TB/s)."""
    c = next((r["ceilings"] for r in timings if r.get("ceilings")), None)
    if c:
        return f"the copy ceiling measured on this GPU, {c['bandwidth_tbs']:.3g} TB/s ({c['source']}, measured {c['measured_at'][:16]})"
    if any(r.get("frac_of_copy_ceiling") for r in timings):
        return "the fixed copy ceiling these rows were computed with (2.96 TB/s, an H100 measurement)"
    return "no copy ceiling (none measured on this device: no fraction)"


def summary(env: dict, parity: list[dict], timings: list[dict], command: str, note: str = "") -> str:
    lines = [f"# indexer_logits on {env.get('gpu')}", ""]
    if note:
        lines += [note, ""]
    lines.append(f"torch {env.get('torch')}, triton {env.get('triton')}, CUDA {env.get('cuda')}, {env.get('date')}. Command: `{command}`.")
    lines.append(f"Default config (\"triton default\" column): `{config_name(full_config(None))}`.")
    lines.append(f"Roofline: the op's minimum bytes (keys + scales once, q, weights, table, logits) over {_copy_ceiling_text(timings)}.")
    lines.append("")
    passed = sum(r["status"] == "pass" for r in parity)
    lines.append(f"## Parity (before timing): {passed}/{len(parity)} cases pass")
    by_config: dict[str, list[dict]] = {}
    for r in parity:
        # Older result files stored {} for "the registered default at run time".
        name = f"`{config_name(r['config'])}`" if r["config"] else "the registered default at run time"
        by_config.setdefault(name, []).append(r)
    for name, rows in by_config.items():
        lines.append(f"- {name}: {sum(r['status'] == 'pass' for r in rows)}/{len(rows)}")
    for r in parity:
        if r["status"] != "pass":
            f = r["features"]
            lines.append(f"- {r['status']}: heads={f['heads']} next_n={f['next_n']} context={f['context']} block_size={f['block_size']} config={r['config']}: {r.get('detail', '')}")
    worst = max((r.get("metrics", {}).get("max_rel_err", 0.0) for r in parity if r["status"] == "pass"), default=0.0)
    lines.append(f"Largest relative error among passing cases: {worst:.2e} (tolerance 1e-3).")
    lines.append("")
    lines.append("## Timings (p50 µs; H=64, D=128, block_size=64, all requests at full context)")
    lines.append("")
    lines.append("| next_n | B | context | torch µs | triton default µs | best triton µs (config) | best TB/s | % of copy ceiling | speedup vs torch |")
    lines.append("|---|---|---|---|---|---|---|---|---|")
    groups: dict[tuple, list[dict]] = {}
    for r in timings:
        f = r["features"]
        groups.setdefault((f["next_n"], f["batch"], f["context"]), []).append(r)
    goal_lines = []
    for (next_n, batch, context), rows in groups.items():
        torch_row = next((r for r in rows if r["kernel"] == "torch" and r["status"] == "ok"), None)
        ok = [r for r in rows if r["kernel"] == "triton" and r["status"] == "ok"]
        default = next((r for r in ok if r["config"] == full_config(None)), None)
        best = min(ok, key=lambda r: r["p50_us"]) if ok else None
        cells = [
            str(next_n), str(batch), str(context),
            f"{torch_row['p50_us']:.1f}" if torch_row else "-",
            f"{default['p50_us']:.1f}" if default else "-",
            f"{best['p50_us']:.1f} ({best['config_name']})" if best else "-",
            f"{best['tb_per_s']:.2f}" if best else "-",
            _pct(best["frac_of_copy_ceiling"]) if best else "-",
            f"{best['speedup_vs_torch']:.1f}x" if best else "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
        if batch == 256 and context == 8192 and default:
            goal_lines.append(
                f"- default config, next_n={next_n}: {default['p50_us']:.1f} µs = {_pct(default['frac_of_copy_ceiling'])} of the copy ceiling, "
                f"{default['speedup_vs_torch']:.1f}x torch"
            )
        if batch == 256 and context == 8192 and best:
            met_bw = best["frac_of_copy_ceiling"] is not None and best["frac_of_copy_ceiling"] >= 0.5
            met_x = best["speedup_vs_torch"] >= 10
            goal_lines.append(
                f"- next_n={next_n}, B=256, context 8192: {best['p50_us']:.1f} µs = {_pct(best['frac_of_copy_ceiling'])} of the copy ceiling "
                f"({'met' if met_bw else 'MISSED'} >= 50%), {best['speedup_vs_torch']:.1f}x torch ({'met' if met_x else 'MISSED'} >= 10x), config {best['config_name']}"
            )
    lines.append("")
    lines.append("## Every config (p50 µs; - = not timed, see below)")
    lines.append("")
    keys = list(groups)
    lines.append("| config | " + " | ".join(f"n{n} B{b} L{c}" for n, b, c in keys) + " |")
    lines.append("|---|" + "---|" * len(keys))
    for config in TIMED_CONFIGS:
        cells = []
        for key in keys:
            row = next((r for r in groups[key] if r["kernel"] == "triton" and r["config"] == config and r["status"] == "ok"), None)
            cells.append(f"{row['p50_us']:.1f}" if row else "-")
        lines.append(f"| {config_name(config)} | " + " | ".join(cells) + " |")
    failed = [r for r in timings if r["status"] not in ("ok",)]
    lines.append("")
    lines.append("## Goals (issue: triton >= 50% of the bandwidth roofline at B=256, context 8192, and >= 10x torch)")
    lines.extend(goal_lines or ["- not measured"])
    if failed:
        lines.append("")
        lines.append("## Configs that did not produce a timing")
        for r in failed:
            f = r["features"]
            lines.append(f"- next_n={f['next_n']} B={f['batch']} context={f['context']} {r['kernel']} {r.get('config_name', '')}: {r['status']} {r.get('detail', '')}")
    return "\n".join(lines) + "\n"


def render(path: Path, note: str) -> int:
    """Rewrite ``<path>.md`` from the rows of a results file (no GPU needed)."""
    rows = json.loads(path.read_text())
    env_keys = ("gpu", "arch", "vendor", "torch", "triton", "cuda", "python", "date")
    env = {k: rows[0].get(k) for k in env_keys}
    parity = [r for r in rows if r.get("kind") == "parity"]
    timings = [r for r in rows if r.get("kind") == "timing"]
    text = summary(env, parity, timings, "PYTHONPATH=. python3 benchmarks/indexer_logits.py", note)
    path.with_suffix(".md").write_text(text)
    print(text)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "benchmarks/results")
    parser.add_argument("--tag", default=None, help="file name tag (default: h100, or smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU run under TRITON_INTERPRET=1")
    parser.add_argument("--budget-s", type=float, default=110.0, help="stop starting new timings after this many seconds")
    parser.add_argument("--render", metavar="JSON", help="only re-render the markdown summary of a results file")
    parser.add_argument("--note", default="", help="a paragraph placed under the markdown title (with --render)")
    parser.add_argument("--focus", type=int, choices=sorted(FOCUS_ROUNDS), default=0,
                        help="goal shape only: time FOCUS_ROUNDS[N], parity grid for FOCUS_PARITY[N]")
    args = parser.parse_args()
    if args.focus:
        global TIMED_CONFIGS, PARITY_ALTERNATES
        TIMED_CONFIGS, PARITY_ALTERNATES = FOCUS_ROUNDS[args.focus], FOCUS_PARITY[args.focus]
    if args.render:
        return render(Path(args.render), args.note)
    start = time.time()
    device = "cpu" if args.smoke else "cuda"
    tag = args.tag or ("smoke" if args.smoke else "h100") + (f"_focus{args.focus}" if args.focus else "")
    env = environment_row()
    print(f"environment: {env}", flush=True)

    parity = parity_grid(device, args.smoke)
    print(f"parity: {sum(r['status'] == 'pass' for r in parity)}/{len(parity)} pass ({time.time() - start:.0f}s)", flush=True)
    for r in parity:
        if r["status"] != "pass":
            print("  ", r["status"], r["features"], r["config"], r.get("detail", ""), flush=True)

    ceilings, why_none = device_ceilings() if device == "cuda" else (None, "CPU smoke run: no GPU ceiling")
    print(f"ceilings: {ceilings.describe() if ceilings else why_none}", flush=True)
    timings = timing_rows(device, args.smoke, start + args.budget_s, args.focus, ceilings)
    command = "PYTHONPATH=. python3 benchmarks/indexer_logits.py" + (" --smoke" if args.smoke else "") + (f" --focus {args.focus}" if args.focus else "")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [{**env, **r} for r in parity + timings]
    (out / f"indexer_logits_{tag}.json").write_text(json.dumps(rows, indent=1, default=str))
    text = summary(env, parity, timings, command)
    (out / f"indexer_logits_{tag}.md").write_text(text)
    print(text, flush=True)
    print(f"total {time.time() - start:.0f}s", flush=True)
    return 0 if all(r["status"] == "pass" for r in parity) else 1


if __name__ == "__main__":
    sys.exit(main())
