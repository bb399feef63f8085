"""First-call latency of ``kernmux.ops.<op>`` with and without the self-check.

For each op, fresh processes make one first call on the op's default problem (the
device at hand) and time it (wall clock, synchronized): with ``KERNMUX_SELF_CHECK=off``;
with ``auto`` on an empty database (the check runs and is recorded); and with ``auto``
again on that database (a second process reads the record and does not check). Later
calls are cache hits in every mode (see dispatch_overhead.py).

Usage: python benchmarks/selfcheck_cost.py [--ops A,B] [--repeats N] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time, torch
import kernmux
from kernmux.dispatch.registry import REGISTRY
name, device = sys.argv[1], sys.argv[2]
op = REGISTRY.op(name)
args = op.positional(*op.make_inputs(op.default_features(device), device, 0))
fn = getattr(kernmux.ops, name)
def sync():
    if device == "cuda":
        torch.cuda.synchronize()
sync()
t0 = time.perf_counter()
fn(*args)
sync()
first = time.perf_counter() - t0
t0 = time.perf_counter()
fn(*args)
sync()
second = time.perf_counter() - t0
entry = fn.kernmux_entry
decision = next(iter(entry.keyinfo.values()))[1]
print(json.dumps({"first_s": first, "second_s": second, "kernel": decision.kernel, "notes": list(decision.notes)}))
"""


def run_child(name: str, device: str, env: dict) -> dict:
    proc = subprocess.run([sys.executable, "-c", CHILD, name, device], env=env, capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    if proc.returncode:
        return {"error": proc.stderr[-500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ops", default="moe_topk_softmax,sparse_mla_decode,indexer_logits,moe_experts,mxfp4_linear")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = parser.parse_args()
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = {k: v for k, v in os.environ.items() if not k.startswith("KERNMUX_")}
    base["PYTHONPATH"] = os.pathsep.join([str(ROOT), base.get("PYTHONPATH", "")])
    rows = []
    for name in [n for n in args.ops.split(",") if n]:
        samples: dict[str, list[float]] = {"off": [], "check": [], "recorded": []}
        kernel, notes = None, []
        for _ in range(args.repeats):
            with tempfile.TemporaryDirectory() as tmp:
                db = {"KERNMUX_DB": f"sqlite:///{tmp}/t.sqlite"}
                off = run_child(name, device, {**base, **db, "KERNMUX_SELF_CHECK": "off"})
                check = run_child(name, device, {**base, **db, "KERNMUX_SELF_CHECK": "auto"})
                recorded = run_child(name, device, {**base, **db, "KERNMUX_SELF_CHECK": "auto"})
            for mode, result in (("off", off), ("check", check), ("recorded", recorded)):
                if "error" in result:
                    print(f"{name} {mode}: {result['error']}", file=sys.stderr)
                    continue
                samples[mode].append(result["first_s"] * 1e3)
            kernel, notes = check.get("kernel"), check.get("notes", [])
        row = {"op": name, "device": device, "kernel": kernel, "notes": notes,
               **{f"first_call_ms_{m}": statistics.median(v) if v else None for m, v in samples.items()}}
        rows.append(row)
        print(f"{name:<18} {kernel or '?':<16} off {row['first_call_ms_off'] or float('nan'):9.1f} ms   "
              f"checked {row['first_call_ms_check'] or float('nan'):9.1f} ms   "
              f"recorded {row['first_call_ms_recorded'] or float('nan'):9.1f} ms")
    from kernmux.tuning_db.measurement.timing import environment_row

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"selfcheck_cost_{device}.json").write_text(json.dumps({"environment": environment_row(), "rows": rows},
                                                                  indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
