"""``indexer_logits``: paged fp8 MQA logits of the DeepSeek sparse-attention indexer.

Registers the op and its kernels (torch reference, Triton, AITER) without importing
triton or aiter. Semantics (NaN rule included): ``reference.py``; key-cache layouts:
``layout.py``; features, validation, tolerance and roofline: ``spec.py``; value checks
(every call in the reference, opt-in ``KERNMUX_CHECK_VALUES=1`` in kernels): ``checks.py``. Version-specific AITER knowledge lives
in ``kernmux/rules/shipped/indexer_logits.yaml``, not here.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import SUPPORTED, Support, register_kernel, register_op, unsupported
from kernmux.kernels.indexer_logits import spec
from kernmux.kernels.indexer_logits.reference import indexer_logits as reference



def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _sm_version(arch: str) -> int | None:
    if arch.startswith("sm_"):
        digits = "".join(ch for ch in arch[3:] if ch.isdigit())
        return int(digits) if digits else None
    return None


def triton_supports(feats: Mapping[str, Any], platform: Platform) -> Support:
    if feats["device"] == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return unsupported("CPU tensors run Triton only under TRITON_INTERPRET=1")
    sm = _sm_version(platform.arch)
    if feats["device"] == "cuda" and sm is not None and sm < 89:
        return unsupported(f"fp8 e4m3 (fp8e4nv) needs sm_89 or newer, platform is {platform.arch}")
    if feats["next_n"] not in (1, 2):
        return unsupported(f"next_n must be 1 or 2, got {feats['next_n']}")
    if feats["head_dim"] not in (64, 128):
        return unsupported(f"head_dim must be 64 or 128, got {feats['head_dim']}")
    if not 1 <= feats["heads"] <= 128:
        return unsupported(f"heads must be in 1..128, got {feats['heads']}")
    return SUPPORTED


def aiter_supports(feats: Mapping[str, Any], platform: Platform) -> Support:
    """Structural limits only; AITER's version-specific bugs are rules."""
    if feats["device"] != "cuda":
        return unsupported(f"AITER needs GPU tensors, got device {feats['device']!r}")
    if platform.arch == "gfx942":
        return unsupported("AITER reads fp8 as e4m3fnuz on gfx942; this op's fp8 is e4m3fn (different bias and range)")
    if not _is_pow2(feats["heads"]):
        return unsupported(f"AITER tiles heads with tl.arange(ChunkQ): heads must be a power of two, got {feats['heads']}")
    if not _is_pow2(feats["head_dim"]):
        return unsupported(f"AITER tiles head_dim with tl.arange: head_dim must be a power of two, got {feats['head_dim']}")
    return SUPPORTED


def aiter_config_valid(config: Mapping[str, Any], feats: Mapping[str, Any]) -> bool:
    """Combinations AITER asserts against. ChunkQ > heads is left valid: it is AITER's
    ZeroDivisionError (ROCm/aiter#2563), which the tuner records as a crash."""
    from kernmux.kernels.indexer_logits.aiter import resolve_chunk_q

    chunk_q = resolve_chunk_q(config, feats["heads"])
    if not _is_pow2(chunk_q) or (chunk_q <= feats["heads"] and feats["heads"] % chunk_q):
        return False
    if config.get("layout") == "page":
        chunk_k, block = int(config["ChunkK"]), feats["block_size"]
        return chunk_k % block == 0 or block % chunk_k == 0
    return True


OP_SPEC = register_op(spec)
OP = OP_SPEC.name

register_kernel(
    op=OP,
    name="torch",
    impl=reference,
    priority=0,
    doc="PyTorch reference: gathers the pages, fp32 einsum (materialises the dequantised keys)",
)

register_kernel(
    op=OP,
    name="triton",
    impl="kernmux.kernels.indexer_logits.triton:indexer_logits_triton",
    requires={"triton": ">=3.0"},
    vendors=("cuda", "cpu"),
    supports=triton_supports,
    config_space={
        "BLOCK_N": (32, 64, 128),
        "TILES": (0, 1, 4, 8, 16, 32),
        "num_warps": (4, 8),
        "num_stages": (1, 2, 3, 4),
        "dot": ("bf16", "fp8", "tf32"),
        "mma": ("hk", "kh"),
        "prefetch": (0, 1),
        # Both next_n queries in one MMA (next_n=2 with mma="kh" only): 11% faster at
        # B=256, ctx 8192 on an H100 (benchmarks/results/indexer_logits_focus_summary.md).
        "joint": (0, 1),
    },
    # Best worst case over next_n 1 and 2 at B=256 on an H100 (benchmarks/results/
    # indexer_logits_h100.md): 211 / 245 µs at context 8192. next_n=1 alone prefers
    # num_warps=8, num_stages=3, prefetch=0 (196 µs) -- the tuning database's job.
    default_config={"BLOCK_N": 128, "TILES": 0, "num_warps": 4, "num_stages": 2, "dot": "bf16", "mma": "kh", "prefetch": 1, "joint": 0},
    priority=20,
    doc="Triton paged kernel: one pass over the fp8 keys, tl.dot against all heads, next_n in (1, 2)",
)

register_kernel(
    op=OP,
    name="aiter",
    impl="kernmux.kernels.indexer_logits.aiter:indexer_logits_aiter",
    requires={"amd-aiter": ">=0.1.7"},
    vendors=("rocm",),
    supports=aiter_supports,
    config_space={
        "entry": ("stage1", "fused"),
        "ChunkQ": (64, 32, 16, 128),
        "ChunkK": (256, 128, 64),
        "layout": ("token", "page"),
    },
    default_config={"entry": "stage1", "ChunkQ": 64, "ChunkK": 256, "layout": "token"},
    config_valid=aiter_config_valid,
    probe=lambda platform: _aiter_probe(platform),
    # Below triton like every adapter never run here (triton is CUDA-only for this op, so
    # on ROCm AITER still wins over the torch reference).
    priority=10,
    doc="AITER deepgemm_fp8_paged_mqa_logits (stage1 + head sum by default); unverified on AMD here",
)


def _aiter_probe(platform: Platform) -> Support:
    from kernmux.kernels.indexer_logits.aiter import probe

    return probe(platform)
