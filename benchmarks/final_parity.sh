#!/usr/bin/env bash
# Every op's acceptance parity grid through `kernmux verify` on the current device, for
# every kernel that runs there (torch_compile left out of the older ops: one compile per
# variant).
# Writes one JSON per op under ${OUT:-benchmarks/results} and prints the summaries.
set -uo pipefail
out="${OUT:-benchmarks/results}"
km() { python3 -m kernmux "$@"; }
status=0
km verify moe_topk_softmax tokens=1,7,128 experts=160,288,64 topk=6,8 shared=0,2 dtype=fp32,bf16,fp16 renormalize=true,false \
  --kernels torch,triton --json > "$out/final_parity_moe_topk_softmax.json" || status=1
km verify sparse_mla_decode --kernels torch,triton --json > "$out/final_parity_sparse_mla_decode_seed_table.json" || status=1
km verify sparse_mla_decode heads=8,128 topk=2045 extra_topk=0,512 sink=true kv_dtype=bf16,fp8 d_qk=576,512 \
  --kernels torch,triton --json > "$out/final_parity_sparse_mla_decode_extra.json" || status=1
km verify indexer_logits heads=8,16,32,64 next_n=1,2 context=1,63,1000 block_size=16,64 head_dim=64,128 \
  --kernels torch,triton --json > "$out/final_parity_indexer_logits.json" || status=1
# moe_experts: the benchmark models (Qwen3-30B-A3B, Qwen3-Next-80B, DeepSeek-V3) and the odd
# shapes of issue 14 (288 experts, topk 7, 2 shared, inter not a multiple of 64, tokens 1 and 4097).
km verify moe_experts tokens=1,4097 experts=128 topk=8 shared=0 hidden=2048 inter=768 dtype=bf16 \
  --json > "$out/final_parity_moe_experts_qwen3_30b.json" || status=1
km verify moe_experts tokens=1,4097 experts=512 topk=10 shared=1 hidden=2048 inter=512 dtype=bf16 \
  --json > "$out/final_parity_moe_experts_qwen3_next.json" || status=1
km verify moe_experts tokens=1,33 experts=256 topk=8 shared=1 hidden=7168 inter=2048 dtype=bf16 \
  --json > "$out/final_parity_moe_experts_deepseek_v3.json" || status=1
km verify moe_experts tokens=1,4097 experts=288 topk=7 shared=2 hidden=1024 inter=200 dtype=bf16,fp16 \
  --json > "$out/final_parity_moe_experts_odd.json" || status=1
# mxfp4_linear: the benchmark (N, K) shapes and the odd ones of issue 15.
for nk in "1536 7168" "24576 1536" "7168 16384" "5120 2880" "2880 4096" "1 32" "2880 4128"; do
  set -- $nk
  km verify mxfp4_linear tokens=1,4097 n=$1 k=$2 bias=false,true dtype=bf16 \
    --json > "$out/final_parity_mxfp4_linear_n$1_k$2.json" || status=1
done
for f in "$out"/final_parity_*.json; do
  python3 - "$f" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
rows = d["results"]
bad = [r for r in rows if r["status"] in ("fail", "error")]
by = {}
for r in rows:
    by.setdefault(r["kernel"], {}).setdefault(r["status"], 0)
    by[r["kernel"]][r["status"]] += 1
print(sys.argv[1].rsplit("/", 1)[-1], "seed", d["seed"], by, "FAILED:" if bad else "ok", [ (r["kernel"], r["features"], r["detail"]) for r in bad][:3])
PY
done
exit $status
