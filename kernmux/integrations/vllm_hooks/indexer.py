"""Sparse-attention indexer paged MQA logits -> ``kernmux.ops.indexer_logits``.

vLLM code paths replaced (decode / MTP logits of the DeepSeek V3.2 indexer):

* ``indexer.deep_gemm`` — ``vllm.utils.deep_gemm.fp8_fp4_paged_mqa_logits`` and its copy
  in ``model_executor/layers/sparse_attn_indexer.py`` (CUDA; DeepGEMM's kernel). Sent to
  kernmux: the FP8 path (``q = (fp8 values, None)``), one context length per request
  (or ``next_n == 1``), no ``indices``. The FP4 path and varlen ``indices`` stay on DeepGEMM.
* ``indexer.rocm`` — ``vllm.v1.attention.ops.rocm_aiter_mla_sparse.rocm_fp8_paged_mqa_logits``
  (ROCm: AITER ``deepgemm_fp8_paged_mqa_logits`` / ``_stage1(ChunkQ=heads)`` / PyTorch,
  chosen by if-chains on arch and head count). Sent to kernmux only where vLLM's cache
  has kernmux's page layout: ``compress_ratio == 1`` and ``block_size == 1`` (vLLM writes
  a SHUFFLE layout for larger pages on ROCm). A ``[B, next_n]`` context-length table is
  reduced to its last column, as vLLM does for AITER.

Arguments are mapped by name, read from the installed function's own signature (never
by a position list): vLLM 0.32's ``fp8_fp4_paged_mqa_logits`` has ``clean_logits`` before
``indices``, 0.33 removed it (``..., max_model_len, indices=None``), so a positional
8th argument means ``clean_logits`` in one and ``indices`` in the other.

Both receive the fused uint8 indexer cache ``[num_blocks, block_size, 1, D + 4]`` (page
layout: a page's fp8 keys, then its fp32 scales), split into kernmux's ``k_cache`` /
``k_scale`` views without a copy (``kernmux.kernels.indexer_logits.layout``). Output:
fp32 ``[B * next_n, max_model_len]`` with -inf past each context (DeepGEMM's
``clean_logits=True``; with ``clean_logits=False`` those entries are unspecified anyway).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from kernmux.integrations.vllm_hooks.base import HookRuntime, HookSpec, compiling, ops_module

OP = "indexer_logits"
DEEP_GEMM_MODULE = "vllm.utils.deep_gemm"
ROCM_MODULE = "vllm.v1.attention.ops.rocm_aiter_mla_sparse"

# The leading parameters both releases share (checked before installing); the rest is
# read from each installed function's signature.
_DG_PARAMS = ("q", "kv_cache", "weights", "context_lens", "block_tables", "schedule_metadata", "max_model_len")
_ROCM_PARAMS = ("q_fp8", "kv_cache_fp8", "weights", "context_lens", "block_tables", "schedule_metadata", "max_model_len")


def parameter_names(fn: Callable[..., Any]) -> tuple[tuple[str, ...], frozenset[str]]:
    """(names a positional argument binds to, in order; every name a keyword may use) of
    ``fn``'s real signature."""
    params = inspect.signature(fn).parameters.values()
    positional = tuple(p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD))
    keywords = frozenset(p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY))
    return positional, keywords


def _logits(q: Any, kv_cache: Any, weights: Any, context_lens: Any, block_tables: Any, max_model_len: int) -> Any:
    from kernmux.kernels.indexer_logits.layout import split_page_layout

    head_dim = q.shape[-1]
    k_cache, k_scale = split_page_layout(kv_cache, head_dim)
    return ops_module().indexer_logits(q, k_cache, k_scale, weights, context_lens, block_tables, int(max_model_len))


def _guarded(runtime: HookRuntime, original: Callable[..., Any],
             prepare: Callable[[dict[str, Any]], tuple | None]) -> Callable[..., Any]:
    """Replacement that names each argument by ``original``'s signature and maps the call
    with ``prepare`` (None = not expressible: vLLM's function runs)."""
    positional, keywords = parameter_names(original)

    def replacement(*args: Any, **kwargs: Any) -> Any:
        if runtime.disabled or len(args) > len(positional) or not keywords.issuperset(kwargs):
            return original(*args, **kwargs)  # vLLM reports a malformed call itself
        call = dict(zip(positional, args))
        call.update(kwargs)
        try:
            mapped = prepare(call)
        except KeyError:  # a required argument missing: vLLM's function reports it
            return original(*args, **kwargs)
        if mapped is None:
            runtime.passthrough()
            return original(*args, **kwargs)
        if compiling():
            return _logits(*mapped)
        try:
            out = _logits(*mapped)
        except Exception as e:
            runtime.fail(e)
            return original(*args, **kwargs)
        runtime.hit()
        return out

    replacement.__wrapped__ = original  # type: ignore[attr-defined]
    return replacement


def _is_fp8(t: Any) -> bool:
    import torch

    return t.dtype == torch.float8_e4m3fn


def _prepare_deep_gemm(call: dict[str, Any]) -> tuple | None:
    q = call.get("q")
    if not isinstance(q, (tuple, list)) or len(q) != 2 or q[1] is not None or not _is_fp8(q[0]):
        return None  # FP4 (values, scales) path
    if call.get("indices") is not None:
        return None
    lens = call["context_lens"]
    if lens.dim() != 1 and not (lens.dim() == 2 and lens.shape[1] == 1):
        return None  # per-row lengths of a varlen batch
    return (q[0], call["kv_cache"], call["weights"], lens.reshape(-1), call["block_tables"], call["max_model_len"])


def _prepare_rocm(call: dict[str, Any]) -> tuple | None:
    q, cache = call.get("q_fp8"), call.get("kv_cache_fp8")
    if q is None or cache is None or not _is_fp8(q):
        return None
    if call.get("compress_ratio", 1) != 1 or cache.shape[1] != 1:
        return None  # block-flat C4A or SHUFFLE page layout
    lens = call["context_lens"]
    if lens.dim() == 2:
        lens = lens[:, -1].contiguous()
    return (q, cache, call["weights"], lens, call["block_tables"], call["max_model_len"])


def make_deep_gemm(runtime: HookRuntime, original: Callable[..., Any]) -> Callable[..., Any]:
    return _guarded(runtime, original, _prepare_deep_gemm)


def make_rocm(runtime: HookRuntime, original: Callable[..., Any]) -> Callable[..., Any]:
    return _guarded(runtime, original, _prepare_rocm)


DEEP_GEMM = HookSpec(
    name="indexer.deep_gemm",
    op=OP,
    module=DEEP_GEMM_MODULE,
    attr="fp8_fp4_paged_mqa_logits",
    params=_DG_PARAMS,
    make=make_deep_gemm,
    replaces="deep_gemm.fp8_fp4_paged_mqa_logits (FP8 path): DeepGEMM's paged MQA logits in SparseAttnIndexer decode",
)

ROCM = HookSpec(
    name="indexer.rocm",
    op=OP,
    module=ROCM_MODULE,
    attr="rocm_fp8_paged_mqa_logits",
    params=_ROCM_PARAMS,
    make=make_rocm,
    replaces=(
        "rocm_aiter_mla_sparse.rocm_fp8_paged_mqa_logits (block_size 1, compress_ratio 1): "
        "the AITER / _stage1(ChunkQ=heads) / PyTorch if-chain of the ROCm indexer"
    ),
)
