"""AITER adapter: ``aiter.mla.mla_decode_fwd`` in persistent mode with ``return_lse``.

Unverified on AMD hardware here: the argument construction and the version gating are
tested against a stand-in module (tests/kernels/stand_ins/mla_aiter.py); the facts it
follows are in notes/aiter.md and seed 003 (ROCm/vllm PR #901):

- fp8 q / fp8 kv only: on gfx950 the persistent kernels with ``return_lse`` exist only for
  fp8/fp8. The fp8 type is AITER's ``dtypes.fp8`` for the arch (aiter/utility/dtypes.py,
  v0.1.12 through v0.1.20.post1): ``float8_e4m3fn`` on gfx950, ``float8_e4m3fnuz`` on
  gfx942 (another exponent bias and range, largest 240). q and the selected rows are
  cast with one per-tensor power-of-two fp32 scale each (``q_scale`` / ``kv_scale``,
  computed on the device, no host sync; NaN and inf do not enter the scale). The op's fp8
  layout (per-128-column scales, bf16 rope) is dequantised first; its latent re-quantises
  exactly up to exponent range, its bf16 rope and q are rounded to e4m3 (the seed's
  parity, cosine mean ~0.9991, is this rounding).
- The selected rows of each scope are gathered into a compact ``[Q * topk, 1, 1, d_qk]``
  buffer (page size 1), so ``kv_indices`` is a fixed-stride ``[Q, topk]`` table: row ``i``
  of query ``q`` is ``q * topk + j`` for its valid entries, moved to the front, then
  ``-1`` sentinels; ``kv_indptr`` is the running count of valid entries.
- Persistent metadata (``get_mla_metadata_info_v1`` sizes, the work/reduce buffers, the
  index and output buffers) is allocated once per (queries, heads, topk, dtype, scope)
  and reused across calls (and layers); ``get_mla_metadata_v1`` is re-run every call
  because the work plan encodes the valid lengths. Its first twelve arguments are passed
  positionally in the order of amd-aiter >= 0.1.10.post2 (``kv_last_page_lens`` third,
  and ``mla_decode_fwd``'s ``page_size``/``nhead_kv``, appear in v0.1.10.post2;
  ``return_lse`` in v0.1.9; older versions are denied by the shipped rules), the rest by
  keyword.
- Each scope is one call; scopes are merged by LSE and the sink applied here, so a head
  split (rule ``split_heads: 32``) keeps every merge inside one complete call.
- A query with no valid slot in a scope gets that scope's lse = -inf before the merge
  whatever AITER returns for it; with none in any scope, o = 0 and lse = +inf.
- NaN in, NaN out (the reference's rule) whatever the ASM kernel does with NaN: a
  (query, head) whose q holds a NaN, and every head of a query whose valid selected rows
  hold one, get NaN o and lse in that scope (the gathered rows are already in hand).
- gfx942: from v0.1.12 no persistent LSE code object fits this call (rule
  ``aiter-mla-gfx942-no-lse-kernel``); sparse MLA decode with LSE via AITER is a gfx950 path.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Optional

import torch

from kernmux.dispatch.outputs import empty_output
from kernmux.kernels.sparse_mla_decode.checks import maybe_check_values
from kernmux.kernels.sparse_mla_decode.fp8 import dequantize_rows

# AITER's dtypes.fp8 per arch and the largest finite value of each type.
FP8_BY_ARCH = {"gfx942": torch.float8_e4m3fnuz}
FP8_DEFAULT = torch.float8_e4m3fn


def fp8_dtype(arch: str) -> torch.dtype:
    """AITER's fp8 type on ``arch`` (e4m3fnuz on gfx942, e4m3fn on gfx950 and later)."""
    return FP8_BY_ARCH.get(arch, FP8_DEFAULT)


def device_arch(device: torch.device) -> str:
    """``gfx942`` / ``gfx950`` of a ROCm device ("" elsewhere), as AITER's get_gfx reads it."""
    if device.type != "cuda":
        return ""
    props = torch.cuda.get_device_properties(device)
    return str(getattr(props, "gcnArchName", "")).split(":")[0]

MAX_SPLIT_PER_BATCH = 256  # seed 003's num_kv_splits / max_split_per_batch
_SCRATCH_SLOTS = 16


class Scratch:
    """Persistent-mode buffers for one (queries, heads, topk, dtype, scope) key."""

    def __init__(self, aiter: Any, queries: int, heads: int, topk: int, d_qk: int, d_v: int, device: torch.device, fp8: torch.dtype):
        info = aiter.get_mla_metadata_info_v1(
            queries, 1, heads, fp8, fp8, is_sparse=True, fast_mode=True, num_kv_splits=MAX_SPLIT_PER_BATCH
        )
        names = ("work_meta_data", "work_indptr", "work_info_set", "reduce_indptr", "reduce_final_map", "reduce_partial_map")
        self.meta = {name: torch.empty(size, dtype=dtype, device=device) for name, (size, dtype) in zip(names, info)}
        self.qo_indptr = torch.arange(queries + 1, dtype=torch.int32, device=device)
        self.kv_indptr = torch.zeros(queries + 1, dtype=torch.int32, device=device)
        self.kv_indices = torch.empty((queries, topk), dtype=torch.int32, device=device)
        self.kv_last_page_lens = torch.ones(queries, dtype=torch.int32, device=device)
        self.out = torch.empty((queries, heads, d_v), dtype=torch.bfloat16, device=device)
        self.heads = heads
        self.topk = topk


_CACHE: OrderedDict[tuple, Scratch] = OrderedDict()


def scratch_for(
    aiter: Any, queries: int, heads: int, topk: int, d_qk: int, d_v: int, device: torch.device, scope: str,
    fp8: torch.dtype,
) -> Scratch:
    """The cached scratch for this key (LRU of a few keys: one per layer shape and scope)."""
    key = (queries, heads, topk, str(fp8), d_qk, d_v, str(device), scope)
    scratch = _CACHE.get(key)
    if scratch is None:
        scratch = Scratch(aiter, queries, heads, topk, d_qk, d_v, device, fp8)
        _CACHE[key] = scratch
        while len(_CACHE) > _SCRATCH_SLOTS:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    return scratch


def _to_fp8(x: torch.Tensor, fp8: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor fp8: (x / scale) in ``fp8`` and the fp32 scale [1], without a host sync.

    The scale is a power of two (amax / the type's largest value, rounded up), so rows of
    the op's fp8 layout, whose per-tile scales are powers of two too, re-quantise with
    only an exponent shift (exact unless a tile is far below the largest); only bf16
    values are rounded. NaN and inf are left out of amax (they stay NaN/inf, or NaN in
    e4m3fnuz which has no inf) so they cannot spoil every other value's scale."""
    finite = torch.nan_to_num(x.abs().float(), nan=0.0, posinf=0.0)
    amax = finite.amax().clamp_min(1e-30)
    scale = torch.exp2(torch.ceil(torch.log2(amax / torch.finfo(fp8).max))).reshape(1)
    return (x.float() / scale).to(fp8), scale


def _gather(cache: torch.Tensor, indices: torch.Tensor, d_qk: int, d_v: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected rows ``[Q, topk, d_qk]`` fp32 (valid rows first, in order) and valid counts [Q]."""
    queries, topk = indices.shape
    invalid = indices < 0
    # Stable partition: valid entries to the front, sentinels behind.
    order = torch.sort(invalid.to(torch.int8), dim=1, stable=True).indices
    slots = torch.gather(indices, 1, order).clamp_min(0).long()
    block_size = cache.shape[1]
    rows = cache[slots // block_size, slots % block_size]
    rows = dequantize_rows(rows, d_qk, d_v) if cache.dtype == torch.uint8 else rows.float()
    counts = (~invalid).sum(dim=1, dtype=torch.int32)
    keep = torch.arange(topk, device=indices.device).view(1, topk) < counts.view(queries, 1)
    return rows.masked_fill(~keep.unsqueeze(-1), 0.0), counts


def _one_scope(
    aiter: Any, q_fp8: torch.Tensor, q_scale: torch.Tensor, q_nan: torch.Tensor, cache: torch.Tensor,
    indices: torch.Tensor, sm_scale: float, d_v: int, scope: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(o [Q, h, d_v] fp32, lse [Q, h] fp32 natural log, valid counts [Q]) of one scope.
    q_nan: [Q, h] bool, heads whose q holds a NaN."""
    queries, heads, d_qk = q_fp8.shape
    fp8 = q_fp8.dtype
    indices = indices.reshape(queries, -1)
    topk = indices.shape[1]
    scratch = scratch_for(aiter, queries, heads, topk, d_qk, d_v, q_fp8.device, scope, fp8)
    rows, counts = _gather(cache, indices, d_qk, d_v)
    rows_nan = torch.isnan(rows).flatten(1).any(dim=1)  # [Q]; invalid slots are zeros
    kv_fp8, kv_scale = _to_fp8(rows, fp8)
    kv_buffer = kv_fp8.view(queries * topk, 1, 1, d_qk)  # [pages, page_size 1, nhead_kv 1, d_qk]

    positions = torch.arange(queries * topk, dtype=torch.int32, device=q_fp8.device).view(queries, topk)
    keep = torch.arange(topk, device=q_fp8.device).view(1, topk) < counts.view(queries, 1)
    scratch.kv_indices.copy_(torch.where(keep, positions, torch.full_like(positions, -1)))
    scratch.kv_indptr[1:].copy_(torch.cumsum(counts, dim=0))

    meta = scratch.meta
    aiter.get_mla_metadata_v1(
        scratch.qo_indptr,
        scratch.kv_indptr,
        scratch.kv_last_page_lens,
        heads,  # query heads per KV head (one latent KV head)
        1,
        True,
        meta["work_meta_data"],
        meta["work_info_set"],
        meta["work_indptr"],
        meta["reduce_indptr"],
        meta["reduce_final_map"],
        meta["reduce_partial_map"],
        page_size=1,
        kv_granularity=16,
        max_seqlen_qo=1,
        uni_seqlen_qo=1,
        fast_mode=True,
        max_split_per_batch=MAX_SPLIT_PER_BATCH,
        topk=topk,
        dtype_q=fp8,
        dtype_kv=fp8,
    )
    _, lse = aiter.mla.mla_decode_fwd(
        q_fp8,
        kv_buffer,
        scratch.out,
        scratch.qo_indptr,
        scratch.kv_indptr,
        scratch.kv_indices.view(-1),
        scratch.kv_last_page_lens,
        1,  # max_seqlen_q: every query is its own sequence
        page_size=1,
        nhead_kv=1,
        sm_scale=float(sm_scale),
        num_kv_splits=MAX_SPLIT_PER_BATCH,
        q_scale=q_scale,
        kv_scale=kv_scale,
        work_meta_data=meta["work_meta_data"],
        work_indptr=meta["work_indptr"],
        work_info_set=meta["work_info_set"],
        reduce_indptr=meta["reduce_indptr"],
        reduce_final_map=meta["reduce_final_map"],
        reduce_partial_map=meta["reduce_partial_map"],
        return_lse=True,
    )
    if lse is None:
        raise RuntimeError("aiter.mla.mla_decode_fwd returned no LSE (needs return_lse support, amd-aiter >= 0.1.9)")
    lse = lse.reshape(queries, heads).float()
    empty = (counts == 0).view(queries, 1)
    nan = (q_nan | rows_nan.view(queries, 1)) & ~empty
    lse = lse.masked_fill(empty, float("-inf")).masked_fill(nan, float("nan"))
    o = scratch.out.float().masked_fill(empty.unsqueeze(-1), 0.0).masked_fill(nan.unsqueeze(-1), float("nan"))
    return o, lse, counts


def sparse_mla_decode_aiter(
    q: torch.Tensor,
    kv_cache: torch.Tensor,
    indices: torch.Tensor,
    sm_scale: float,
    d_v: int,
    extra_kv_cache: Optional[torch.Tensor] = None,
    extra_indices: Optional[torch.Tensor] = None,
    attn_sink: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as ``reference.sparse_mla_decode`` (heads a multiple of 16, d_v 512)."""
    import aiter
    import aiter.mla  # noqa: F401  (the submodule holding mla_decode_fwd)

    maybe_check_values(q, kv_cache, indices, sm_scale, d_v, extra_kv_cache, extra_indices, attn_sink)
    batch, s_q, heads, d_qk = q.shape
    queries = batch * s_q
    q_rows = q.reshape(queries, heads, d_qk)
    q_nan = torch.isnan(q_rows).any(dim=-1)
    q_fp8, q_scale = _to_fp8(q_rows, fp8_dtype(device_arch(q.device)))
    q_fp8 = q_fp8.contiguous()  # AITER requires a contiguous Q
    o, lse, _ = _one_scope(aiter, q_fp8, q_scale, q_nan, kv_cache, indices, sm_scale, d_v, "main")
    if extra_kv_cache is not None and extra_indices is not None:
        o_x, lse_x, _ = _one_scope(aiter, q_fp8, q_scale, q_nan, extra_kv_cache, extra_indices, sm_scale, d_v, "extra")
        total = torch.logaddexp(lse, lse_x)
        safe = torch.where(torch.isneginf(total), torch.zeros_like(total), total)
        o = torch.exp(lse - safe).unsqueeze(-1) * o + torch.exp(lse_x - safe).unsqueeze(-1) * o_x
        lse = total
    if attn_sink is not None:
        o = o * torch.sigmoid(lse - attn_sink.float().view(1, heads)).unsqueeze(-1)
    lonely = torch.isneginf(lse)
    o = o.masked_fill(lonely.unsqueeze(-1), 0.0)
    lse = lse.masked_fill(lonely, float("inf"))
    out = empty_output((batch, s_q, heads, d_v), torch.bfloat16, q.device)
    out.copy_(o.view(batch, s_q, heads, d_v))
    lse_out = empty_output((batch, s_q, heads), torch.float32, q.device)
    lse_out.copy_(lse.view(batch, s_q, heads))
    return out, lse_out
