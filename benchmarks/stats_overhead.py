"""What statistics cost on a dispatch-cache hit: three entry functions of one op in one process.

* ``none``: statistics off (``KERNMUX_STATS_PATH`` unset: the hot path has no counter);
* ``per-op``: a counter keyed by op name called on every call (``on_call``);
* ``per-problem``: the cached callable wrapped in a closure that increments the problem's
  counter (what ``kernmux.ops`` uses with statistics on: per-problem counts for
  ``kernmux tune --from-stats``).

The three are timed round-robin in the same process (a loaded machine slows them alike);
each figure is the best block over the rounds, in ns per call of a benchmark-only identity
op, so the differences are the counting alone.

Usage: python benchmarks/stats_overhead.py [--rounds N] [--block N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from dispatch_overhead import _register_noop  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--block", type=int, default=5000)
    parser.add_argument("--out", default=None, help="directory for stats_overhead.json/.md (default: print only)")
    args = parser.parse_args()

    from kernmux import stats
    from kernmux.dispatch.hotpath import Dispatcher, make_entry_function
    from kernmux.dispatch.registry import REGISTRY
    from kernmux.dispatch.rule_model import RuleSet
    from kernmux.tuning_db.measurement.timing import environment_row

    _register_noop()
    op = REGISTRY.op("bench_noop")
    dispatcher = Dispatcher(rules=RuleSet(), tuning=None)
    entries = {
        "none": make_entry_function(op, dispatcher),
        "per-op": make_entry_function(op, dispatcher, on_call=stats.record_call),
        "per-problem": make_entry_function(op, dispatcher, counter=stats.problem_counter),
    }
    x = torch.randn(8)
    for fn in entries.values():
        fn(x, 1)
    best = {name: float("inf") for name in entries}
    for _ in range(args.rounds):
        for name, fn in entries.items():
            per_call = timeit.timeit(lambda fn=fn: fn(x, 1), number=args.block) / args.block * 1e9
            best[name] = min(best[name], per_call)
    (problem,) = stats.snapshot()["problems"]
    expected = 1 + args.rounds * args.block
    assert problem["calls"] == expected, f"per-problem count {problem['calls']} != {expected} calls made"
    rows = [{"counter": name, "ns_per_call": round(ns, 1), "added_vs_none_ns": round(ns - best["none"], 1)}
            for name, ns in best.items()]
    lines = ["| counter | ns per call (best block) | added vs none |", "|---|---:|---:|"]
    lines += [f"| {r['counter']} | {r['ns_per_call']:.0f} | {r['added_vs_none_ns']:+.0f} |" for r in rows]
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        env = environment_row()
        meta = {"environment": env, "rounds": args.rounds, "block": args.block,
                "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}
        (out / "stats_overhead.json").write_text(json.dumps({**meta, "rows": rows}, indent=2, default=str))
        (out / "stats_overhead.md").write_text(
            f"# Statistics cost on a cache hit\n\n`{meta['command']}` on {env.get('gpu')} (host CPU path), "
            f"{meta['date']}\n\n" + "\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
