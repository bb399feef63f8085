"""Per-call cost of ``kernmux.ops.<op>`` over calling the chosen kernel directly.

Same process, same inputs, interleaved blocks: each round times a block of calls
through kernmux and a block of direct calls to the callable the dispatcher cached for
that key; the added cost is the median over rounds of (kernmux - direct) per call.
Three kinds of subject:

- ``noop``: a benchmark-only op (one tensor, one int) whose kernel returns its input: the
  dispatch path alone (raw key, dict lookup, try/except, call indirection);
- ``<op> path``: a real op's entry function and real arguments, with the cached kernel
  replaced by a no-op: what dispatch costs for that op's signature (its raw key covers
  every tensor's shape, strides, dtype and device), free of the kernel's own run-time
  noise;
- ``<op>``: the real op end to end against its chosen kernel called directly (on CPU the
  kernel's own variance can exceed the dispatch cost; the ``path`` row is the figure).

Usage: python benchmarks/dispatch_overhead.py [--ops A,B] [--rounds N] [--block N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kernmux.dispatch.registry import (  # noqa: E402
    REGISTRY,
    Comparison,
    FeatureSpec,
    Op,
    Roofline,
    register_kernel,
    register_op,
)
from kernmux.tuning_db.measurement.timing import environment_row  # noqa: E402


def _noop_reference(x: torch.Tensor, k: int) -> torch.Tensor:
    """Identity: the cheapest possible kernel, so only dispatch is measured."""
    return x


def _register_noop() -> None:
    if "bench_noop" in REGISTRY.ops:
        return
    register_op(Op(
        name="bench_noop", doc="benchmark-only identity op", reference=_noop_reference,
        feature_specs=(FeatureSpec("n", "int", "elements", 8), FeatureSpec("k", "int", "a scalar", 1)),
        features=lambda x, k: {"n": x.shape[0], "k": k, "device": x.device.type},
        validate=lambda x, k: None,
        make_inputs=lambda f, d, s: ((torch.randn(f["n"], device=d), f["k"]), {}),
        compare=lambda o, r, f: Comparison(bool(torch.equal(o, r)), {}),
        fake=lambda x, k: torch.empty_like(x), bucket=dict, roofline=lambda f, p: Roofline(0, 0),
    ))
    register_kernel(op="bench_noop", name="identity", impl=_noop_reference, test_only=True)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure_pair(via_kernmux, direct, args, *, rounds: int, block: int, device: str) -> dict:
    """Interleaved blocks; per-call microseconds for each path and their difference."""
    for _ in range(200):  # warm both paths (decision made, caches hot)
        via_kernmux(*args)
        direct(*args)
    _sync(device)
    kx, dx, diff = [], [], []
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)  # alternate which path goes first
        times = [0.0, 0.0]
        for which in order:
            fn = via_kernmux if which == 0 else direct
            _sync(device)
            t0 = time.perf_counter_ns()
            for _ in range(block):
                fn(*args)
            _sync(device)
            times[which] = (time.perf_counter_ns() - t0) / block / 1e3
        kx.append(times[0])
        dx.append(times[1])
        diff.append(times[0] - times[1])
    return {
        "kernmux_us": statistics.median(kx),
        "direct_us": statistics.median(dx),
        "added_us": statistics.median(diff),
        "added_us_p20": statistics.quantiles(diff, n=10)[1],
        "added_us_p80": statistics.quantiles(diff, n=10)[7],
        "rounds": rounds,
        "block": block,
    }


def chosen_callable(entry_fn, args):
    entry_fn(*args)
    cache = entry_fn.kernmux_entry.cache
    assert len(cache) == 1, "expected exactly one cached decision"
    fn = next(iter(cache.values()))
    return getattr(fn, "__wrapped__", fn)  # with statistics on, the kernel behind the counting closure


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default="moe_topk_softmax,sparse_mla_decode,indexer_logits")
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--block", type=int, default=200)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"

    import kernmux.ops

    _register_noop()
    rows = []
    noop = kernmux.ops.bench_noop
    x = torch.randn(8, device=device)
    direct = chosen_callable(noop, (x, 1))
    rows.append({"subject": "noop", "kernel": "identity", "device": device, **measure_pair(noop, direct, (x, 1), rounds=args.rounds, block=args.block, device=device)})

    from kernmux.dispatch.hotpath import make_entry_function
    from kernmux.runtime import default_dispatcher

    for name in [n for n in args.ops.split(",") if n]:
        op = REGISTRY.op(name)
        feats = op.default_features(device)
        inputs = op.positional(*op.make_inputs(feats, device, 0))  # called positionally here
        entry = getattr(kernmux.ops, name)
        direct = chosen_callable(entry, inputs)
        decision = next(iter(entry.kernmux_entry.keyinfo.values()))[1]
        # The same signature's entry function with a no-op in its cache: dispatch alone.
        path = make_entry_function(op, default_dispatcher())
        path(*inputs)
        key = next(iter(path.kernmux_entry.cache))
        first = inputs[0]
        path.kernmux_entry.cache[key] = lambda *a: first
        rows.append({
            "subject": f"{name} path", "kernel": "no-op", "features": feats, "device": device,
            "tensor_args": sum(isinstance(a, torch.Tensor) for a in inputs),
            **measure_pair(path, lambda *a: first, inputs, rounds=args.rounds, block=args.block, device=device),
        })
        rows.append({
            "subject": name, "kernel": decision.kernel, "features": feats, "device": device,
            **measure_pair(entry, direct, inputs, rounds=max(20, args.rounds // 4), block=max(20, args.block // 4), device=device),
        })

    env = environment_row()
    env["cpu"] = _cpu_name()
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "cuda" if device == "cuda" else "cpu"
    (out_dir / f"dispatch_overhead_{tag}.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=2, default=str))
    print(f"{'subject':<18} {'kernel':<14} {'kernmux us':>11} {'direct us':>10} {'added us (p20..p80)':>24}")
    for row in rows:
        print(f"{row['subject']:<18} {row['kernel']:<14} {row['kernmux_us']:>11.3f} {row['direct_us']:>10.3f} "
              f"{row['added_us']:>8.3f} ({row['added_us_p20']:.3f}..{row['added_us_p80']:.3f})")
    return 0


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor()


if __name__ == "__main__":
    sys.exit(main())
