#!/usr/bin/env bash
# The README's main job: tune a small default sweep of moe_topk_softmax into the embedded
# SQLite tuning database on whatever device is present, then show what the dispatcher now
# chooses for one of the tuned problems, and why.
#
# CPU-only machines tune the CPU-capable kernels (torch, torch_topk, numba, torch_compile), timed
# on one intra-op thread; with CUDA the Triton kernel and its config space join. Every
# trial passes the numerics gate first and runs in a worker subprocess; a timing whose
# p80/p20 exceeds the dispersion bound is taken again and, if still dispersed, stored
# flagged and never chosen. Re-running resumes the same optuna studies: once their budgets
# are met nothing is re-measured (`kernmux tune --remeasure` times the stored points
# again) and only the explanation is printed again.
#
# Environment: KERNMUX_DB (database URL or path; default: the user cache directory),
# PYTHON (interpreter; default python3 on PATH), KERNMUX_TUNE_ARGS (extra `tune` flags).
set -euo pipefail
cd "$(dirname "$0")/.."

PY="${PYTHON:-python3}"
km() { "$PY" -m kernmux "$@"; }

device="$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')"
if [[ "$device" == "cuda" ]]; then
  kernels="torch,torch_compile,triton"
  sweep=(tokens=1,128,4096 experts=128,160)
  trials=24
else
  kernels="torch,torch_topk,numba,torch_compile"
  sweep=(tokens=1,128 experts=160)
  trials=4
fi
db="$("$PY" -c 'from kernmux.tuning_db.storage.paths import default_url; print(default_url())')"

echo "== kernmux main job: device=$device kernels=$kernels database=$db"
echo "== 1/3 tune moe_topk_softmax ${sweep[*]} (trials per problem: $trials)"
# shellcheck disable=SC2086  # KERNMUX_TUNE_ARGS is a list of flags
km tune moe_topk_softmax "${sweep[@]}" --kernels "$kernels" --trials "$trials" \
  --device "$device" --timeout 600 ${KERNMUX_TUNE_ARGS:-}

echo
echo "== 2/3 the stored timings and their spread (p80/p20; above the bound: re-measured, then flagged)"
"$PY" - "$db" <<'PY'
import sys
from kernmux.dispatch.platform import current_platform
from kernmux.tuning_db.storage.dispersion import DISPERSION_BOUND, dispersion
from kernmux.tuning_db.storage.store import TuningStore

with TuningStore(sys.argv[1]) as store:
    rows = store.rows(op="moe_topk_softmax", status="ok", fingerprint=current_platform().fingerprint())
over = 0
for row in rows:
    spread = dispersion(row.p20_us, row.p80_us) or 0.0
    over += spread > DISPERSION_BOUND
    threads = row.metrics.get("threads", "-")
    print(f"  row {row.id}: tokens={row.features['tokens']} {row.kernel:<14} p50 {row.p50_us:9.2f} us  "
          f"p80/p20 {spread:5.2f}  threads {threads}{'  (dispersed)' if spread > DISPERSION_BOUND else ''}")
print(f"  {len(rows)} ok row(s), {over} over the bound {DISPERSION_BOUND:g}")
PY

echo
echo "== 3/3 what the dispatcher chooses now, and why"
km explain moe_topk_softmax tokens=128 experts=160
