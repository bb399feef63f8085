#!/usr/bin/env bash
# The GPU machine's run of the test suite (and the quick GPU checks that go with it).
#
#   bash benchmarks/gpu_suite.sh OUT_DIR [pytest args...]
#
# Installs the tuning extra from wheels in .whl/ when present (the GPU machine has no
# network), prints the GPU and versions, runs the whole suite except the slow and
# PostgreSQL/vLLM-venv tests on the GPU (the `device` fixture is "cuda" there and `gpu`
# tests run), and writes OUT_DIR/gpu_test_run_<gpu>.txt with the pytest summary line, the
# GPU name and the versions.
set -uo pipefail
OUT="${1:?usage: gpu_suite.sh OUT_DIR [pytest args]}"; shift
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD"
fi
export PYTHONUNBUFFERED=1
gpu="$(python3 -c 'import torch; print(torch.cuda.get_device_name(0))' 2>/dev/null || echo none)"
tag="$(echo "$gpu" | tr 'A-Z ' 'a-z_' | sed 's/[^a-z0-9_]//g; s/^nvidia_//')"
log="$OUT/gpu_test_run_${tag:-cpu}.log"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "gpu: $gpu"
  python3 -c 'import sys, torch, triton; print("python", sys.version.split()[0]); print("torch", torch.__version__, "cuda", torch.version.cuda); print("triton", triton.__version__)'
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv,noheader 2>/dev/null
} | tee "$OUT/gpu_env.txt"
workers=""
python3 -c "import xdist" 2>/dev/null && workers="-n ${GPU_SUITE_WORKERS:-6}"
# Tests marked gpu first, alone on the GPU (some time kernels: nothing may run beside
# them); then everything else, several processes at once.
python3 -m pytest -q -p no:cacheprovider -m "gpu and not slow" -ra "$@" tests 2>&1 | tee "$log"
gpu_status=${PIPESTATUS[0]}
gpu_summary="$(tail -n 1 "$log")"
python3 -m pytest -q -p no:cacheprovider -m "not slow and not gpu" $workers -ra "$@" tests 2>&1 | tee -a "$log"
rest_status=${PIPESTATUS[0]}
status=$(( gpu_status > rest_status ? gpu_status : rest_status ))
{
  cat "$OUT/gpu_env.txt"
  echo "command 1: python3 -m pytest -q -p no:cacheprovider -m \"gpu and not slow\" -ra $* tests"
  echo "result 1: $gpu_summary (exit $gpu_status)"
  echo "command 2: python3 -m pytest -q -p no:cacheprovider -m \"not slow and not gpu\" $workers -ra $* tests"
  echo "result 2: $(tail -n 1 "$log") (exit $rest_status)"
  grep -E "^(FAILED|ERROR) " "$log" | sort -u | head -50
} > "$OUT/gpu_test_run_${tag:-cpu}.txt"
exit "$status"
