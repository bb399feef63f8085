"""Test-only stand-in for the parts of AITER the sparse MLA decode adapter calls (no ROCm here).

It keeps the signatures of amd-aiter >= 0.1.10.post2 (read from aiter/mla.py and
aiter/ops/attention.py) and models, in PyTorch, what the persistent sparse path does with
its arguments:

- ``get_mla_metadata_info_v1`` asserts ``num_head_qo % 16`` (``% 8`` with ``min_heads=8``,
  0.1.12+) and returns six (size, dtype) pairs, ``work_info_set`` 2-D as in AITER;
- ``get_mla_metadata_v1`` checks each buffer is the one its parameter expects (so a
  positional order mix-up fails) and records the work plan for the current ``kv_indptr``;
- ``mla.mla_decode_fwd`` requires persistent mode with a plan made for the current
  ``kv_indptr`` (AITER reads out of bounds with a stale plan), fp8 q with both scales, a
  contiguous q, ``[pages, 1, 1, d]`` kv, ``-1`` sentinels and fixed-stride indices whose
  valid count matches ``kv_indptr``; it computes attention in fp32 from the dequantised fp8
  operands, writes ``o`` in place and returns ``(o, lse)`` (natural log). Rows with no valid
  entry get NaN (what AITER returns there is not documented). With ``h64_inf_lse=True``
  a 64-head call returns +inf LSE on some rows, as the gfx950 ``qh64_qseqlen4`` kernel does
  (v0.1.12 only). ``fp8`` is the arch's ``dtypes.fp8`` (e4m3fnuz on gfx942): q, kv and the
  metadata dtypes must be that type. With ``nan_as_empty=True`` a row whose scores hold a
  NaN comes back as o = 0, lse = +inf (what a max that skips NaN makes of it), so the
  adapter's NaN rule is what the tests see.

Every call is recorded in ``module.CALLS``.
"""

from __future__ import annotations

import types

import torch

FP8 = torch.float8_e4m3fn


def make_modules(
    *, min_heads: int = 16, h64_inf_lse: bool = False, return_lse: bool = True, fp8: torch.dtype = FP8,
    nan_as_empty: bool = False,
) -> tuple[types.ModuleType, types.ModuleType]:
    """(aiter, aiter.mla) stand-ins. ``return_lse=False`` models amd-aiter < 0.1.9."""
    aiter = types.ModuleType("aiter")
    mla = types.ModuleType("aiter.mla")
    aiter.mla = mla
    aiter.CALLS = []
    plans: dict[int, torch.Tensor] = {}

    def get_mla_metadata_info_v1(batch_size, max_seqlen_qo, num_head_qo, q_dtype, kv_dtype, is_sparse, fast_mode=True, num_kv_splits=32, intra_batch_mode=False):
        aiter.CALLS.append(("info", dict(batch_size=batch_size, max_seqlen_qo=max_seqlen_qo, num_head_qo=num_head_qo, q_dtype=q_dtype, kv_dtype=kv_dtype, is_sparse=is_sparse, num_kv_splits=num_kv_splits)))
        assert num_head_qo % min_heads == 0, f"num_head_qo % {min_heads} == 0"
        assert q_dtype == fp8 and kv_dtype == fp8, f"dtypes.fp8 of this arch is {fp8}, got {q_dtype}/{kv_dtype}"
        cu_num, tiles = 256, batch_size
        max_work = tiles * cu_num
        return (
            (2, torch.uint64),
            (cu_num + 1, torch.int32),
            ((max_work, 8), torch.int32),
            (tiles + 1, torch.int32),
            ((tiles, 2), torch.int32),
            (max_work, torch.int32),
        )

    def get_mla_metadata_v1(
        seqlens_qo_indptr, seqlens_kv_indptr, kv_last_page_lens, num_heads_per_head_k, num_heads_k, is_causal,
        work_metadata_ptrs, work_info_set, work_indptr, reduce_indptr, reduce_final_map, reduce_partial_map,
        page_size=1, kv_granularity=16, max_seqlen_qo=-1, uni_seqlen_qo=-1, fast_mode=True, topk=-1,
        max_split_per_batch=-1, intra_batch_mode=False, dtype_q=None, dtype_kv=None,
    ):
        aiter.CALLS.append(("metadata", dict(num_heads_per_head_k=num_heads_per_head_k, num_heads_k=num_heads_k, page_size=page_size, topk=topk, max_seqlen_qo=max_seqlen_qo, dtype_q=dtype_q, dtype_kv=dtype_kv)))
        batch = seqlens_qo_indptr.numel() - 1
        assert seqlens_kv_indptr.dtype == torch.int32 and seqlens_kv_indptr.numel() == batch + 1
        assert kv_last_page_lens.dtype == torch.int32 and kv_last_page_lens.numel() == batch, "kv_last_page_lens is the third argument"
        assert work_metadata_ptrs.dtype == torch.uint64, "work_metadata_ptrs"
        assert work_info_set.dim() == 2 and work_info_set.shape[1] == 8, "work_info_set is [max_work, 8] (seventh positional)"
        assert work_indptr.dim() == 1 and work_indptr.dtype == torch.int32, "work_indptr"
        assert reduce_final_map.dim() == 2 and reduce_final_map.shape[1] == 2, "reduce_final_map"
        assert num_heads_k == 1 and topk > 0 and page_size == 1
        assert dtype_q == fp8 and dtype_kv == fp8, f"dtypes.fp8 of this arch is {fp8}"
        plans[work_metadata_ptrs.data_ptr()] = seqlens_kv_indptr.clone()

    def mla_decode_fwd(
        q, kv_buffer, o, qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, max_seqlen_q, page_size=1, nhead_kv=1,
        sm_scale=None, logit_cap=0.0, num_kv_splits=None, num_kv_splits_indptr=None, work_meta_data=None,
        work_indptr=None, work_info_set=None, reduce_indptr=None, reduce_final_map=None, reduce_partial_map=None,
        q_scale=None, kv_scale=None, intra_batch_mode=False, return_logits=False, **kwargs,
    ):
        if "return_lse" in kwargs and not return_lse:
            raise TypeError("mla_decode_fwd() got an unexpected keyword argument 'return_lse'")
        want_lse = kwargs.pop("return_lse", False)
        assert not kwargs, f"unexpected arguments {sorted(kwargs)}"
        aiter.CALLS.append(("decode", dict(q_shape=tuple(q.shape), kv_shape=tuple(kv_buffer.shape), max_seqlen_q=max_seqlen_q, page_size=page_size, nhead_kv=nhead_kv, sm_scale=sm_scale, persistent=work_meta_data is not None, return_lse=want_lse)))
        assert work_meta_data is not None, "the sparse path runs in persistent mode"
        plan = plans.get(work_meta_data.data_ptr())
        assert plan is not None and torch.equal(plan, kv_indptr), "stale or missing work plan for this kv_indptr"
        assert q.dtype == fp8 and kv_buffer.dtype == fp8, f"fp8 q / fp8 kv in {fp8}"
        assert q_scale is not None and kv_scale is not None, "fp8 q needs q_scale and kv_scale"
        assert q.is_contiguous(), "Q contiguous"
        assert kv_buffer.dim() == 4 and kv_buffer.shape[1] == page_size == 1 and kv_buffer.shape[2] == nhead_kv == 1
        total_q, heads, d_qk = q.shape
        assert o.shape[:2] == (total_q, heads) and o.dtype == torch.bfloat16
        d_v = o.shape[2]
        assert kv_indices.dim() == 1 and kv_indices.numel() % total_q == 0, "fixed stride: total_q * topk entries"
        topk = kv_indices.numel() // total_q
        table = kv_indices.view(total_q, topk)
        valid = table >= 0
        counts = valid.sum(dim=1)
        assert torch.equal(counts.to(torch.int32), (kv_indptr[1:] - kv_indptr[:-1])), "kv_indptr must count the valid entries"
        # Sentinels must trail: a valid entry after a -1 would be beyond the counted length.
        assert torch.equal(valid, torch.arange(topk).view(1, topk) < counts.view(total_q, 1)), "-1 sentinels trail the valid entries"
        kv = kv_buffer.view(-1, d_qk).float() * kv_scale.float()
        qf = q.float() * q_scale.float()
        rows = kv[table.clamp_min(0).long()]  # [Q, topk, d_qk]
        scores = torch.einsum("qhd,qtd->qht", qf, rows) * float(sm_scale)
        scores = scores.masked_fill(~valid.view(total_q, 1, topk), float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        out = torch.einsum("qht,qtd->qhd", torch.softmax(scores, dim=-1), rows[..., :d_v])
        empty = counts == 0
        out[empty] = float("nan")
        lse[empty] = float("nan")
        if nan_as_empty:
            hidden = torch.isnan(lse) & ~empty.view(total_q, 1)
            out[hidden] = 0.0
            lse[hidden] = float("inf")
        if h64_inf_lse and heads == 64:
            lse[:, 1::7] = float("inf")
        o.copy_(out.to(o.dtype))
        return o, (lse if want_lse else None)

    aiter.get_mla_metadata_info_v1 = get_mla_metadata_info_v1
    aiter.get_mla_metadata_v1 = get_mla_metadata_v1
    mla.mla_decode_fwd = mla_decode_fwd
    return aiter, mla
