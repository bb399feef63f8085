"""Problem description of sparse MLA decode: features, validation, fake outputs, bucket, roofline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch

from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import FeatureSpec, HeadAxes, Roofline
from kernmux.kernels.sparse_mla_decode.checks import check_values  # noqa: F401 - part of the spec
from kernmux.kernels.sparse_mla_decode.compare import compare  # noqa: F401 - part of the spec
from kernmux.kernels.sparse_mla_decode.fp8 import TILE, fp8_row_bytes
from kernmux.kernels.sparse_mla_decode.inputs import make_inputs, make_nonfinite_inputs  # noqa: F401 - part of the spec
from kernmux.kernels.sparse_mla_decode.reference import sparse_mla_decode as reference  # noqa: F401 - part of the spec

OP_NAME = "sparse_mla_decode"
DOC = (
    "DeepSeek sparse MLA decode: top-k gathered latent KV (bf16 or fp8 V3.2 layout), "
    "optional second scope and attention sink"
)
# Heads are independent: padding repeats heads; o and lse concatenate on axis 2.
HEAD_AXES = HeadAxes(inputs={"q": (2, "tile"), "attn_sink": (0, "tile")}, outputs={0: 2, 1: 2}, feature="heads")
# The parity table of seed 003 (TP 2/4/8 of 128 heads x one/two scopes, with/without sink).
SWEEP_DEFAULTS: dict[str, tuple[Any, ...]] = {"heads": (64, 32, 16), "extra_topk": (0, 512), "sink": (False, True)}

FEATURE_SPECS: tuple[FeatureSpec, ...] = (
    FeatureSpec("batch", "int", "decode requests B", 4, minimum=1),
    FeatureSpec("qlen", "int", "query tokens per request s_q (1, or more with MTP)", 1, minimum=1),
    FeatureSpec("heads", "int", "query heads h_q on this rank", 64, minimum=1, maximum=128),
    FeatureSpec("topk", "int", "selected slots per query in the main scope", 2048, minimum=1),
    FeatureSpec("extra_topk", "int", "slots per query in the second scope (0 = one scope)", 0, minimum=0),
    FeatureSpec("d_qk", "int", "q/k head size (576 = V3.2, 512 = V4)", 576, minimum=16),
    FeatureSpec("d_v", "int", "value size (first d_v columns of the latent)", 512, minimum=16),
    FeatureSpec("kv_dtype", "str", "KV cache format", "bf16", choices=("bf16", "fp8")),
    FeatureSpec("sink", "bool", "attention sink present", False),
)


def features(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int,
    extra_kv_cache: Optional[torch.Tensor] = None,
    extra_indices: Optional[torch.Tensor] = None,
    attn_sink: Optional[torch.Tensor] = None,
) -> dict[str, Any]:
    return {
        "batch": int(q.shape[0]),
        "qlen": int(q.shape[1]),
        "heads": int(q.shape[2]),
        "topk": int(indices.shape[-1]),
        "extra_topk": int(extra_indices.shape[-1]) if extra_indices is not None else 0,
        "d_qk": int(q.shape[3]),
        "d_v": int(d_v),
        "kv_dtype": "fp8" if kv_cache.dtype == torch.uint8 else "bf16",
        "sink": attn_sink is not None,
        "device": q.device.type,
    }


def _expect(cond: bool, what: str, expected: str, got: Any, exc: type[Exception] = ValueError) -> None:
    if not cond:
        raise exc(f"sparse_mla_decode: {what}: expected {expected}, got {got}")


def _check_cache(name: str, cache: torch.Tensor, d_qk: int, d_v: int, device: torch.device) -> None:
    _expect(isinstance(cache, torch.Tensor), name, "a Tensor", type(cache).__name__, TypeError)
    _expect(cache.dim() == 3, f"{name} rank", "[num_blocks, block_size, row] (3-D)", tuple(cache.shape))
    _expect(cache.shape[0] >= 1 and cache.shape[1] >= 1, f"{name} shape",
            "at least one block of at least one slot (an empty cache has nothing to attend to)", tuple(cache.shape))
    _expect(cache.device == device, f"{name} device", str(device), cache.device)
    _expect(cache.stride(-1) == 1, f"{name} last stride", "1 (rows contiguous)", cache.stride())
    if cache.dtype == torch.uint8:
        _expect(d_v % TILE == 0, "d_v with fp8 KV", f"a multiple of {TILE}", d_v)
        row = fp8_row_bytes(d_qk, d_v)
        _expect(cache.shape[-1] == row, f"{name} fp8 row bytes", f"{row} for d_qk={d_qk}, d_v={d_v}", cache.shape[-1])
        _expect(cache.stride(1) % 4 == 0 and cache.stride(0) % 4 == 0, f"{name} strides", "multiples of 4 bytes (fp32 scales)", cache.stride())
    else:
        _expect(cache.dtype == torch.bfloat16, f"{name} dtype", "bfloat16 or uint8 (fp8 layout)", cache.dtype, TypeError)
        _expect(cache.shape[-1] == d_qk, f"{name} row", f"d_qk={d_qk}", cache.shape[-1])


def _check_indices(name: str, idx: torch.Tensor, batch: int, s_q: int, device: torch.device) -> None:
    _expect(isinstance(idx, torch.Tensor), name, "a Tensor", type(idx).__name__, TypeError)
    _expect(idx.dtype == torch.int32, f"{name} dtype", "int32", idx.dtype, TypeError)
    _expect(idx.dim() == 3 and tuple(idx.shape[:2]) == (batch, s_q) and idx.shape[2] >= 1,
            f"{name} shape", f"[{batch}, {s_q}, topk>=1]", tuple(idx.shape))
    _expect(idx.device == device, f"{name} device", str(device), idx.device)


def validate(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int,
    extra_kv_cache: Optional[torch.Tensor] = None,
    extra_indices: Optional[torch.Tensor] = None,
    attn_sink: Optional[torch.Tensor] = None,
) -> None:
    """Raise ValueError/TypeError naming the argument, what was expected and what was got."""
    _expect(isinstance(q, torch.Tensor), "q", "a Tensor", type(q).__name__, TypeError)
    _expect(q.dim() == 4, "q shape", "[B, s_q, h_q, d_qk]", tuple(q.shape))
    _expect(q.dtype == torch.bfloat16, "q dtype", "bfloat16", q.dtype, TypeError)
    _expect(min(q.shape) >= 1, "q shape", "[B, s_q, h_q, d_qk] with no empty dimension", tuple(q.shape))
    batch, s_q, h_q, d_qk = q.shape
    _expect(isinstance(d_v, int) and 0 < d_v <= d_qk, "d_v", f"an int in 1..d_qk={d_qk}", d_v)
    _expect(isinstance(sm_scale, (int, float)), "sm_scale", "a float", type(sm_scale).__name__, TypeError)
    _check_cache("kv_cache", kv_cache, d_qk, d_v, q.device)
    _check_indices("indices", indices, batch, s_q, q.device)
    _expect((extra_kv_cache is None) == (extra_indices is None), "extra_kv_cache/extra_indices",
            "both given or both None", f"kv={'set' if extra_kv_cache is not None else None}, indices={'set' if extra_indices is not None else None}")
    if extra_kv_cache is not None:
        _check_cache("extra_kv_cache", extra_kv_cache, d_qk, d_v, q.device)
        _expect(extra_kv_cache.dtype == kv_cache.dtype, "extra_kv_cache dtype", f"{kv_cache.dtype} (same format as kv_cache)", extra_kv_cache.dtype, TypeError)
        _check_indices("extra_indices", extra_indices, batch, s_q, q.device)
    if attn_sink is not None:
        _expect(isinstance(attn_sink, torch.Tensor), "attn_sink", "a Tensor", type(attn_sink).__name__, TypeError)
        _expect(attn_sink.dtype == torch.float32, "attn_sink dtype", "float32", attn_sink.dtype, TypeError)
        _expect(tuple(attn_sink.shape) == (h_q,), "attn_sink shape", f"[{h_q}]", tuple(attn_sink.shape))
        _expect(attn_sink.device == q.device, "attn_sink device", str(q.device), attn_sink.device)


def fake(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int,
    extra_kv_cache: Optional[torch.Tensor] = None,
    extra_indices: Optional[torch.Tensor] = None,
    attn_sink: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    batch, s_q, h_q, _ = q.shape
    return (
        q.new_empty((batch, s_q, h_q, d_v), dtype=torch.bfloat16),
        q.new_empty((batch, s_q, h_q), dtype=torch.float32),
    )


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length() if n > 0 else 0


def bucket(feats: Mapping[str, Any]) -> dict[str, Any]:
    """Tuning bucket: batch and both top-k sizes rounded up to a power of two."""
    out = {k: v for k, v in feats.items() if k != "device"}
    out["batch"] = _pow2(feats["batch"])
    out["topk"] = _pow2(feats["topk"])
    out["extra_topk"] = _pow2(feats["extra_topk"])
    return out


def kv_row_bytes(feats: Mapping[str, Any]) -> int:
    if feats["kv_dtype"] == "fp8":
        return fp8_row_bytes(feats["d_qk"], feats["d_v"])
    return 2 * feats["d_qk"]


def roofline(feats: Mapping[str, Any], platform: Platform | None = None) -> Roofline:
    """Bytes: every selected KV row gathered once, its index, q, o and lse.
    FLOPs: ``2 * h_q * tokens * (d_qk + d_v)`` per query (QK^T and PV)."""
    queries = feats["batch"] * feats["qlen"]
    tokens = feats["topk"] + feats["extra_topk"]
    heads = feats["heads"]
    kv = queries * tokens * (kv_row_bytes(feats) + 4)
    io = queries * heads * (2 * feats["d_qk"] + 2 * feats["d_v"] + 4) + (4 * heads if feats["sink"] else 0)
    flops = 2.0 * queries * heads * tokens * (feats["d_qk"] + feats["d_v"])
    return Roofline(bytes=float(kv + io), flops=flops)
