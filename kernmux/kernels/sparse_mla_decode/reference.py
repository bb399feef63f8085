"""Sparse MLA decode (DeepSeek V3.2 / V4): the semantics, in PyTorch with fp32 math.

Follows FlashMLA's ``tests/ref.py`` ``ref_sparse_attn_decode`` (one latent KV head,
gathered by per-query top-k indices), with the LSE returned as ``[B, s_q, h_q]``.
"""

from __future__ import annotations

from typing import Optional

import torch

from kernmux.kernels.sparse_mla_decode.checks import maybe_check_values
from kernmux.kernels.sparse_mla_decode.fp8 import dequantize_rows


def sparse_mla_decode(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int,
    extra_kv_cache: Optional[torch.Tensor] = None,
    extra_indices: Optional[torch.Tensor] = None,
    attn_sink: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over its selected cache slots; returns ``(o, lse)``.

    Args:
        q: ``[B, s_q, h_q, d_qk]`` bf16 (any strides).
        kv_cache: paged cache of one latent head, ``[num_blocks, block_size, row]`` with a
            unit last stride. bf16: ``row = d_qk`` (K is the whole row, V its first ``d_v``
            columns). fp8: uint8 with ``row = fp8_row_bytes(d_qk, d_v)`` (656 for 576/512):
            per slot ``d_v`` fp8 e4m3fn latent bytes, ``d_v / 128`` fp32 scales (one per 128
            latent columns), then the ``d_qk - d_v`` rope columns as bf16 (see ``fp8.py``).
        indices: ``[B, s_q, topk]`` int32 slots of ``kv_cache`` flattened over
            ``(num_blocks, block_size)`` (slot ``i`` is ``kv_cache[i // block_size,
            i % block_size]``); any negative entry (``-1``) is invalid and ignored. Entries
            ``>= num_blocks * block_size`` are undefined behaviour.
        sm_scale: softmax scale applied to ``q . k``.
        d_v: value width; V is the first ``d_v`` columns of each row.
        extra_kv_cache, extra_indices: an optional second scope (e.g. a sliding window
            beside the selected tokens), same format as ``kv_cache``/``indices`` with its
            own ``extra_topk``. The two scopes are merged by LSE:
            ``lse = logaddexp(lse_a, lse_b)``, ``o = e^(lse_a - lse) o_a + e^(lse_b - lse) o_b``,
            which equals one softmax over the union of the selected tokens.
        attn_sink: optional ``[h_q]`` fp32 per-head sink logit ``s_h``: ``o`` is scaled by
            ``1 / (1 + exp(s_h - lse))``; the returned ``lse`` excludes the sink.

    Returns:
        o: ``[B, s_q, h_q, d_v]`` bf16; lse: ``[B, s_q, h_q]`` fp32 (natural log).
        A query with no valid index in any scope gets ``o = 0`` and ``lse = +inf``.

    Non-finite inputs (NaN in, NaN out; what the fp32 arithmetic above gives):
        - a NaN in ``q[b, s, h]`` makes ``o`` and ``lse`` of that (query, head) NaN;
        - a NaN anywhere in a valid selected row of query ``(b, s)`` (its K columns, which
          hold V) makes ``o`` and ``lse`` NaN for every head of that query;
        - a NaN ``attn_sink[h]`` makes ``o`` NaN on head h (``lse`` excludes the sink);
        - NaN in slots that are not selected, or selected through a negative index, has
          no effect; a query with no valid slot keeps ``o = 0``, ``lse = +inf``.
        No kernel may report such a row as finite or as "no valid slot".
    """
    maybe_check_values(q, kv_cache, indices, sm_scale, d_v, extra_kv_cache, extra_indices, attn_sink)
    batch, s_q, h_q, d_qk = q.shape
    kv, invalid = _gather(kv_cache, indices, d_qk, d_v)
    if extra_kv_cache is not None and extra_indices is not None:
        kv_extra, invalid_extra = _gather(extra_kv_cache, extra_indices, d_qk, d_v)
        kv = torch.cat([kv, kv_extra], dim=2)
        invalid = torch.cat([invalid, invalid_extra], dim=2)
    queries = batch * s_q
    kv = kv.reshape(queries, -1, d_qk)
    invalid = invalid.reshape(queries, 1, -1)
    qf = q.float().reshape(queries, h_q, d_qk)

    scores = torch.bmm(qf, kv.transpose(1, 2)) * sm_scale  # [Q, h_q, T]
    scores = scores.masked_fill(invalid, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [Q, h_q]; -inf where nothing is valid
    lonely = torch.isneginf(lse)
    probs = torch.exp(scores - torch.where(lonely, 0.0, lse).unsqueeze(-1))
    out = torch.bmm(probs, kv[..., :d_v])  # [Q, h_q, d_v]
    if attn_sink is not None:
        out = out * torch.sigmoid(lse - attn_sink.float().view(1, h_q)).unsqueeze(-1)
    out = out.masked_fill(lonely.unsqueeze(-1), 0.0)
    lse = lse.masked_fill(lonely, float("inf"))
    return out.to(torch.bfloat16).view(batch, s_q, h_q, d_v), lse.view(batch, s_q, h_q)


def _gather(cache: torch.Tensor, indices: torch.Tensor, d_qk: int, d_v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of ``cache`` at ``indices`` as fp32 ``[B, s_q, topk, d_qk]`` (zeros where
    invalid, so a NaN in an unused slot cannot leak) and the invalid mask."""
    invalid = indices < 0
    slots = indices.clamp_min(0).long()
    block_size = cache.shape[1]
    rows = cache[slots // block_size, slots % block_size]  # [B, s_q, topk, row]
    if cache.dtype == torch.uint8:
        rows = dequantize_rows(rows, d_qk, d_v)
    else:
        rows = rows.float()
    return rows.masked_fill(invalid.unsqueeze(-1), 0.0), invalid
