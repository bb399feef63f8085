"""moe_topk_softmax on CPU: the CPU kernels (``torch_topk``, ``numba``) against the reference.

One intra-op thread (what tuning workers time with), CPU tensors, bf16 logits by default.
Each shape is first checked through ``verify_kernel`` (fresh inputs, poisoned outputs, the
op's tolerance); then the kernels are timed with the shared timing routine
(:func:`kernmux.tuning_db.measurement.timing.measure`) in alternating rounds, so a slow
phase of the machine hits all of them. Each call takes the next of ``--inputs`` sets of
logits (different seeds): on one repeated input the branch predictor learns the data, which
flatters the sort-based kernels (torch.topk ran 2-3x faster on a repeated input than on
fresh ones here) and is not what an engine routing new tokens sees. Each kernel runs in its
own process (one per kernel, kept for all rounds): in one process the reference's large
sort buffers leave the allocator and caches in a state that slows whatever runs next.
Per shape: the median over rounds of each kernel's p50, and the median of the per-round
ratio reference / kernel.

Usage: python benchmarks/moe_topk_softmax_cpu.py [--tokens 1,8,128,1024] [--experts 64,160,256]
       [--topk 6] [--dtype bf16] [--rounds 15] [--inputs 16] [--threads 1] [--out benchmarks/results]
Writes moe_topk_softmax_cpu.json (every round) and moe_topk_softmax_cpu.md (summary).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform as pyplatform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kernmux.dispatch.registry import REGISTRY  # noqa: E402
from kernmux.dispatch.verify import verify_kernel  # noqa: E402
from kernmux.tuning_db.measurement.timing import environment_row, measure  # noqa: E402

OP = "moe_topk_softmax"
KERNELS = ("torch", "torch_topk", "numba")
FAST = KERNELS[1:]
# The shape and speed-up the CPU kernel was asked to reach (tokens, experts).
ACCEPTANCE_SHAPE = (128, 160)
ACCEPTANCE_SPEEDUP = 10.0


def _load() -> str:
    """The 1-minute load average ("-" where the OS has none)."""
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except (AttributeError, OSError):
        return "-"


def _numba_version() -> str:
    """numba's version, or "-" where it is not installed."""
    try:
        from importlib.metadata import version

        return version("numba")
    except Exception:
        return "-"


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else the platform module's)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return pyplatform.processor() or pyplatform.machine()


def _timer(conn, name: str, threads: int) -> None:
    """A process timing one kernel: receives (features, seed, rep_ms, inputs), answers
    (p50, p20, p80) us over calls rotating through ``inputs`` input sets."""
    torch.set_num_threads(threads)
    fn = REGISTRY.kernels_of(OP)[name].bind()
    op = REGISTRY.op(OP)
    while True:
        request = conn.recv()
        if request is None:
            return
        features, seed, rep_ms, inputs = request
        calls = []
        for i in range(inputs):
            args, kwargs = op.make_inputs(features, "cpu", seed + i)
            call_args = op.positional(args, kwargs)
            calls.append(lambda call_args=call_args: fn(*call_args))
        timing = measure(calls, device="cpu", warmup_ms=rep_ms / 4, rep_ms=rep_ms)
        conn.send((timing.p50_us, timing.p20_us, timing.p80_us))


class Timers:
    """One timing process per kernel."""

    def __init__(self, threads: int) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.conns, self.procs = {}, []
        for name in KERNELS:
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_timer, args=(child, name, threads), daemon=True)
            proc.start()
            self.conns[name] = parent
            self.procs.append(proc)

    def quantiles(self, name: str, features: dict, seed: int, rep_ms: float, inputs: int) -> tuple[float, float, float]:
        """(p50, p20, p80) in us of one timing of ``name``."""
        self.conns[name].send((features, seed, rep_ms, inputs))
        return self.conns[name].recv()

    def close(self) -> None:
        for conn in self.conns.values():
            conn.send(None)
        for proc in self.procs:
            proc.join(30)


def bench_shape(timers: Timers, features: dict, rounds: int, rep_ms: float, seed: int, inputs: int) -> dict:
    """Parity of every kernel, then ``rounds`` alternating timings; one result row."""
    parity = {}
    for name in KERNELS:
        result = verify_kernel(OP, name, features, seed=seed)
        parity[name] = {"passed": result.passed, "detail": result.detail}
        if not result.passed:
            return {"features": features, "parity": parity, "error": f"{name} failed parity: {result.detail}"}
    p50s: dict[str, list[float]] = {name: [] for name in KERNELS}
    p20s: dict[str, list[float]] = {name: [] for name in KERNELS}
    p80s: dict[str, list[float]] = {name: [] for name in KERNELS}
    ratios: dict[str, list[float]] = {name: [] for name in FAST}
    ratios_p20: dict[str, list[float]] = {name: [] for name in FAST}
    for r in range(rounds):
        order = KERNELS if r % 2 == 0 else KERNELS[::-1]
        got = {}
        for name in order:
            got[name] = timers.quantiles(name, features, seed, rep_ms, inputs)
            p50s[name].append(got[name][0])
            p20s[name].append(got[name][1])
            p80s[name].append(got[name][2])
        for name in FAST:
            ratios[name].append(got["torch"][0] / got[name][0])
            ratios_p20[name].append(got["torch"][1] / got[name][1])
    return {
        "features": features,
        "parity": parity,
        "p50_us": {name: statistics.median(v) for name, v in p50s.items()},
        "p20_us": {name: statistics.median(v) for name, v in p20s.items()},
        "p80_us": {name: statistics.median(v) for name, v in p80s.items()},
        "rounds_p50_us": p50s,
        "speedup_median": {name: statistics.median(v) for name, v in ratios.items()},
        "speedup_min": {name: min(v) for name, v in ratios.items()},
        "speedup_max": {name: max(v) for name, v in ratios.items()},
        "speedup_p20_median": {name: statistics.median(v) for name, v in ratios_p20.items()},
    }


def markdown(rows: list[dict], env: dict, args: argparse.Namespace) -> str:
    lines = [
        "# moe_topk_softmax on CPU: torch_topk and numba vs the reference",
        "",
        f"CPU: {env['cpu']}; {env['threads']} intra-op thread(s); torch {env['torch']}; numba {env.get('numba', '-')}; "
        f"Python {env['python']}; {env['date']}.",
        f"Logits {args.dtype}, topk {args.topk}, no shared slots; {args.rounds} alternating rounds of "
        f"{args.rep_ms:g} ms per kernel, each kernel in its own process (shared timing routine, p50 per round), "
        f"each call on the next of {args.inputs} input sets (fresh data for the branch predictor); speed-up = median over "
        "rounds of reference p50 / kernel p50. Every kernel passed `verify_kernel` at every shape first.",
        "",
        f"Machine load average (1 min) before / after: {env['load_before']} / {env['load_after']} on "
        f"{env['cores']} cores (other processes share this machine; p80/p20 shows how much that spread the times).",
        "",
        "| tokens | experts | reference p50 us (p80/p20) | "
        + " | ".join(f"{k} p50 us (p80/p20) | {k} speed-up p50 (min-max) | {k} speed-up p20" for k in FAST)
        + " |",
        "|---|---|---|" + "---|---|---|" * len(FAST),
    ]
    for row in rows:
        f = row["features"]
        if "error" not in row and (f["tokens"], f["experts"]) == ACCEPTANCE_SHAPE:
            found = []
            for name in FAST:
                met = "met" if row["speedup_median"][name] >= ACCEPTANCE_SPEEDUP else "not met"
                found.append(f"{name} {row['speedup_median'][name]:.1f}x by p50, "
                             f"{row['speedup_p20_median'][name]:.1f}x by p20 ({met})")
            lines[4:4] = ["", f"At tokens={f['tokens']}, experts={f['experts']} (the issue's shape; target >= "
                              f"{ACCEPTANCE_SPEEDUP:g}x the reference): " + "; ".join(found) + "."]
    for row in rows:
        f = row["features"]
        if "error" in row:
            lines.append(f"| {f['tokens']} | {f['experts']} | {row['error']} |" + " | | |" * len(FAST))
            continue
        spread = {k: row["p80_us"][k] / row["p20_us"][k] for k in KERNELS}
        cells = [f"{row['p50_us']['torch']:.1f} ({spread['torch']:.2f})"]
        for name in FAST:
            cells += [f"{row['p50_us'][name]:.1f} ({spread[name]:.2f})",
                      f"{row['speedup_median'][name]:.1f}x ({row['speedup_min'][name]:.1f}-{row['speedup_max'][name]:.1f})",
                      f"{row['speedup_p20_median'][name]:.1f}x"]
        lines.append(f"| {f['tokens']} | {f['experts']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="1,8,128,1024")
    parser.add_argument("--experts", default="64,160,256")
    parser.add_argument("--topk", type=int, default=6)
    parser.add_argument("--dtype", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--rep-ms", type=float, default=100.0)
    parser.add_argument("--inputs", type=int, default=16, help="input sets the timed calls rotate through")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    env = {**environment_row(), "cpu": cpu_model(), "threads": torch.get_num_threads(), "cores": os.cpu_count(),
           "load_before": _load(), "numba": _numba_version()}
    rows = []
    timers = Timers(args.threads)
    for tokens in (int(t) for t in args.tokens.split(",")):
        for experts in (int(e) for e in args.experts.split(",")):
            features = {**REGISTRY.op(OP).default_features("cpu"), "tokens": tokens, "experts": experts,
                        "topk": args.topk, "dtype": args.dtype, "shared": 0}
            row = bench_shape(timers, features, args.rounds, args.rep_ms, args.seed, args.inputs)
            rows.append(row)
            summary = row.get("error") or ", ".join(
                f"{name} {row['speedup_median'][name]:.1f}x ({row['p50_us']['torch']:.1f} -> {row['p50_us'][name]:.1f} us)"
                for name in FAST)
            print(f"tokens={tokens} experts={experts}: {summary}", flush=True)
    timers.close()
    env["load_after"] = _load()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe_topk_softmax_cpu.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    (out / "moe_topk_softmax_cpu.md").write_text(markdown(rows, env, args))
    print(f"wrote {out / 'moe_topk_softmax_cpu.md'}")
    return 0 if all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
