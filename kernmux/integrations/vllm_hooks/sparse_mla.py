"""Sparse MLA decode (DeepSeek V3.2 / V4 sparse attention) -> ``kernmux.ops.sparse_mla_decode``.

vLLM code path replaced: ``vllm.v1.attention.ops.flashmla.flash_mla_with_kvcache`` and
its imported copies (the FlashMLA-sparse backend
``v1/attention/backends/mla/flashmla_sparse.py`` calls it from ``_fp8_flash_mla_kernel``
with ``indices=`` global cache slots and ``is_fp8_kvcache=True``). Only *sparse* calls
(``indices`` given, no per-query ``topk_length``, no descales or other extras) are sent
to kernmux; dense decode and anything kernmux's op does not express go to FlashMLA
unchanged.

Layout mapping (FlashMLA -> kernmux): ``k_cache [num_blocks, block_size, 1, row]`` ->
``[num_blocks, block_size, row]`` (uint8 656-byte fp8 rows or bf16 ``d_qk`` rows: the same
formats); ``indices [B, s_q, topk]`` are global slots in both; ``extra_k_cache`` /
``extra_indices_in_kvcache`` -> ``extra_kv_cache`` / ``extra_indices``; ``attn_sink`` as is.
Outputs: ``o [B, s_q, h_q, d_v]`` unchanged; kernmux's ``lse [B, s_q, h_q]`` is returned
as FlashMLA's ``[B, h_q, s_q]``.

Not installed where vLLM has no FlashMLA (CPU and ROCm wheels bind a stub that raises;
the signature check reports it).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from kernmux.integrations.vllm_hooks.base import HookRuntime, HookSpec, compiling, ops_module

MODULE = "vllm.v1.attention.ops.flashmla"
OP = "sparse_mla_decode"
# Arguments kernmux understands; any other one given with a non-default value means
# the call needs FlashMLA itself.
_USED = frozenset({
    "q", "k_cache", "block_table", "cache_seqlens", "head_dim_v", "tile_scheduler_metadata",
    "num_splits", "softmax_scale", "causal", "is_fp8_kvcache", "indices", "attn_sink",
    "extra_k_cache", "extra_indices_in_kvcache",
})


def _flashmla_missing(module: Any) -> str | None:
    probe = getattr(module, "_is_flashmla_available", None)
    if probe is None:
        return None
    ok, reason = probe()
    return None if ok else f"FlashMLA is not available in this vLLM build ({reason})"


def make_flash_mla_with_kvcache(runtime: HookRuntime, original: Callable[..., Any]) -> Callable[..., Any]:
    names = tuple(inspect.signature(original).parameters)

    def flash_mla_with_kvcache(*args: Any, **kwargs: Any) -> Any:
        if runtime.disabled or len(args) > len(names):
            return original(*args, **kwargs)
        call = dict(zip(names, args))
        call.update(kwargs)
        if not _expressible(call):
            runtime.passthrough()
            return original(*args, **kwargs)
        if compiling():
            return _run(call)
        try:
            out = _run(call)
        except Exception as e:
            runtime.fail(e)
            return original(*args, **kwargs)
        runtime.hit()
        return out

    flash_mla_with_kvcache.__wrapped__ = original  # type: ignore[attr-defined]
    return flash_mla_with_kvcache


def _expressible(call: dict[str, Any]) -> bool:
    if call.get("indices") is None or "q" not in call or "k_cache" not in call or "head_dim_v" not in call:
        return False
    for name, value in call.items():
        if name not in _USED and value is not None and value is not False:
            return False  # topk_length, descale_q/k, shared_kv_*, out, ...
    cache = call["k_cache"]
    if cache.dim() == 4 and cache.shape[2] != 1:
        return False  # one latent KV head only
    extra = call.get("extra_k_cache")
    if (extra is None) != (call.get("extra_indices_in_kvcache") is None):
        return False
    return True


def _squeeze_head(cache: Any) -> Any:
    return cache.squeeze(2) if cache is not None and cache.dim() == 4 else cache


def _run(call: dict[str, Any]) -> tuple[Any, Any]:
    q = call["q"]
    scale = call.get("softmax_scale")
    if scale is None:
        scale = q.shape[-1] ** -0.5
    out, lse = ops_module().sparse_mla_decode(
        q,
        _squeeze_head(call["k_cache"]),
        call["indices"],
        float(scale),
        int(call["head_dim_v"]),
        _squeeze_head(call.get("extra_k_cache")),
        call.get("extra_indices_in_kvcache"),
        call.get("attn_sink"),
    )
    return out, lse.transpose(1, 2).contiguous()


FLASHMLA = HookSpec(
    name="sparse_mla.flashmla",
    op=OP,
    module=MODULE,
    attr="flash_mla_with_kvcache",
    params=("q", "k_cache", "block_table", "cache_seqlens", "head_dim_v"),
    make=make_flash_mla_with_kvcache,
    replaces=(
        "flashmla.flash_mla_with_kvcache for sparse (indices=) calls: FlashMLA's sparse "
        "decode kernel in the FlashMLA-sparse backend's _fp8_flash_mla_kernel"
    ),
    skip_if=_flashmla_missing,
)
