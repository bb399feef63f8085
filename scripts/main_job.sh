#!/usr/bin/env bash
# The README's main job: tune a small default sweep of moe_topk_softmax into the embedded
# SQLite tuning database on whatever device is present, then show what the dispatcher now
# chooses for one of the tuned problems, and why.
#
# CPU-only machines tune the CPU-capable kernels (torch, torch_compile); with CUDA the
# Triton kernel and its config space join. Every trial passes the numerics gate first and
# runs in a worker subprocess. Re-running resumes the same optuna studies: once their
# budgets are met nothing is re-measured and only the explanation is printed again.
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
  kernels="torch,torch_compile"
  sweep=(tokens=1,128 experts=160)
  trials=4
fi
db="$("$PY" -c 'from kernmux.tuning_db.storage.paths import default_url; print(default_url())')"

echo "== kernmux main job: device=$device kernels=$kernels database=$db"
echo "== 1/2 tune moe_topk_softmax ${sweep[*]} (trials per problem: $trials)"
# shellcheck disable=SC2086  # KERNMUX_TUNE_ARGS is a list of flags
km tune moe_topk_softmax "${sweep[@]}" --kernels "$kernels" --trials "$trials" \
  --device "$device" --timeout 600 ${KERNMUX_TUNE_ARGS:-}

echo
echo "== 2/2 what the dispatcher chooses now, and why"
km explain moe_topk_softmax tokens=128 experts=160
