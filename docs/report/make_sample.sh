#!/usr/bin/env bash
# Build the sample tuning database behind docs/report/sample_report.html and its screenshot.
#
#   bash docs/report/make_sample.sh [OUT_DIR]      (default: docs/report)
#
# 1. moe_topk_softmax on this machine's CPU: torch (the reference) and torch_topk over
#    tokens x experts, two trials per problem (both kernels);
# 2. the test suite's fault-injection op (tests/tuning_db/fault_kernels.py: a correct
#    kernel with a 16-point config space beside kernels that are wrong or raise on
#    purpose), so that failures and a longer search history show in the report.
# Then `kernmux db report` and, when Chromium is installed, a headless screenshot.
# The database is `sample.sqlite` in a scratch directory (a relative URL, so the report
# names no machine path).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/../.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT/docs/report}" && cd "${1:-$ROOT/docs/report}" && pwd)"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
cd "$(mktemp -d)"
DB="sqlite:///sample.sqlite"
km() { "$PY" -m kernmux "$@"; }

km tune moe_topk_softmax tokens=1,8,64,256 experts=64,160,256 --kernels torch,torch_topk \
  --trials 2 --device cpu --db "$DB" >/dev/null || echo "some buckets have no usable row (see the report)"
km tune tuning_fault_test n=1024,65536 --import tests.tuning_db.fault_kernels \
  --kernels torch,good,nan,wrong,raises --trials 14 --device cpu --db "$DB" >/dev/null || true  # failures are the point
km db report --db "$DB" -o "$OUT/sample_report.html"
for browser in chromium chromium-browser google-chrome; do
  if command -v "$browser" >/dev/null; then
    "$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1400,1000 \
      --screenshot="$OUT/sample_report.png" "file://$OUT/sample_report.html" 2>/dev/null
    break
  fi
done
echo "database: $PWD/sample.sqlite"
