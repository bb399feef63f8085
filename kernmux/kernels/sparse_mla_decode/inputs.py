"""Random problems for sparse MLA decode (verification, tests, benchmarks).

Each request owns a sequence of pages spread over a shared paged cache through a random
block table; unreferenced slots (spare blocks, block 0 among them) hold NaN, so a kernel
that reads an invalid slot (for instance ``-1`` clamped to slot 0) fails the comparison.
The main scope selects random positions of the request's sequence (DSA top-k); the
second scope, when present, is the last ``extra_topk`` positions of a separate cache
(a sliding window). With ``invalid=True`` some entries are ``-1`` (a trailing run, as
with a top-k length, plus scattered ones) and, when there are enough queries, one query
has no valid slot at all, one has only second-scope slots and one only main-scope slots.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kernmux.kernels.sparse_mla_decode.fp8 import quantize_kv

BLOCK_SIZE = 64  # page size of the generated caches (FlashMLA's)


def _paged_cache(
    seq_len: int, batch: int, d_qk: int, d_v: int, fp8: bool, gen: torch.Generator, dgen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A cache holding ``batch`` sequences of ``seq_len`` tokens and each request's
    block table ``[batch, blocks_per_seq]`` (int64)."""
    per_seq = -(-seq_len // BLOCK_SIZE)
    spare = 2
    num_blocks = batch * per_seq + spare
    # Block 0 and the last block are never assigned: they stay NaN.
    order = torch.randperm(num_blocks - spare, generator=gen) + 1
    table = order.view(batch, per_seq)
    values = torch.randn((num_blocks, BLOCK_SIZE, d_qk), generator=dgen, device=dgen.device).to(torch.bfloat16)
    values[0] = float("nan")
    values[-1] = float("nan")
    if fp8:
        cache = quantize_kv(values, d_v, pad_block=1)
        cache[0] = 0xFF  # NaN bytes for fp8, its scales and the bf16 rope
        cache[-1] = 0xFF
    else:
        cache = values
    return cache, table


def _slots(table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Positions ``[B, s_q, k]`` within each request -> flattened cache slots (int32)."""
    batch = table.shape[0]
    block = table[torch.arange(batch).view(batch, 1, 1), positions // BLOCK_SIZE]
    return (block * BLOCK_SIZE + positions % BLOCK_SIZE).to(torch.int32)


def _invalidate(idx: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Trailing run of -1 (0 .. topk/4 entries per query) plus ~5% scattered -1."""
    b, s, k = idx.shape
    cut = k - torch.randint(0, k // 4 + 1, (b, s, 1), generator=gen)
    trailing = torch.arange(k).view(1, 1, k) >= cut
    scattered = torch.rand((b, s, k), generator=gen) < 0.05
    return idx.masked_fill(trailing | scattered, -1)


def build_inputs(
    feats: Mapping[str, Any], device: Any = "cpu", seed: int = 0, *, invalid: bool = True
) -> tuple[tuple, dict]:
    """Arguments of ``sparse_mla_decode`` for ``feats`` (see the module docstring)."""
    gen = torch.Generator().manual_seed(int(seed))
    # Large tensors are drawn where they live (a CPU draw of a GPU-sized cache is slow).
    dgen = torch.Generator(device=torch.device(device)).manual_seed(int(seed))
    batch, s_q, heads = feats["batch"], feats["qlen"], feats["heads"]
    topk, extra_topk = feats["topk"], feats["extra_topk"]
    d_qk, d_v = feats["d_qk"], feats["d_v"]
    fp8 = feats["kv_dtype"] == "fp8"

    q = torch.randn((batch, s_q, heads, d_qk), generator=dgen, device=dgen.device).to(torch.bfloat16)
    seq_len = max(2 * topk, 256)
    cache, table = _paged_cache(seq_len, batch, d_qk, d_v, fp8, gen, dgen)
    positions = torch.rand((batch, s_q, seq_len), generator=gen).argsort(dim=-1)[..., :topk]
    indices = _slots(table, positions)

    extra_cache = extra_indices = None
    if extra_topk:
        extra_len = extra_topk + BLOCK_SIZE // 2
        extra_cache, extra_table = _paged_cache(extra_len, batch, d_qk, d_v, fp8, gen, dgen)
        window = torch.arange(extra_len - extra_topk, extra_len).expand(batch, s_q, extra_topk)
        extra_indices = _slots(extra_table, window)

    if invalid:
        indices = _invalidate(indices, gen)
        if extra_indices is not None:
            extra_indices = _invalidate(extra_indices, gen)
        flat = indices.view(batch * s_q, topk)
        flat_extra = extra_indices.view(batch * s_q, extra_topk) if extra_indices is not None else None
        queries = batch * s_q
        if queries >= 2:  # the last query sees nothing at all
            flat[-1] = -1
            if flat_extra is not None:
                flat_extra[-1] = -1
        if flat_extra is not None and queries >= 4:  # one scope empty, the other not
            flat[0] = -1
            flat_extra[1] = -1

    sink = None
    if feats["sink"]:
        # Spans "no effect" to "dominates" relative to lse ~ log(topk).
        sink = (torch.rand((heads,), generator=gen) * 14.0 - 2.0).to(device)
    args = (q, cache, indices.to(device), float(d_qk) ** -0.5, int(d_v))
    kwargs = {
        "extra_kv_cache": extra_cache,
        "extra_indices": extra_indices.to(device) if extra_indices is not None else None,
        "attn_sink": sink,
    }
    return args, kwargs


def make_inputs(feats: Mapping[str, Any], device: Any, seed: int) -> tuple[tuple, dict]:
    """The op's ``make_inputs``: random problems with invalid entries and empty queries."""
    return build_inputs(feats, device, seed, invalid=True)


def make_nonfinite_inputs(feats: Mapping[str, Any], device: Any, seed: int) -> tuple[tuple, dict]:
    """:func:`make_inputs` with NaN planted where the reference defines the result: in one
    head of q of a query that has valid slots, in a valid selected row of another query
    (a latent value; fp8: the fp32 scale of its first tile), in the rope part of a third
    query's row (when d_qk > d_v), and in the last head's sink. Every other row stays
    finite. (A NaN fp8 latent byte is not drawn here: Triton's interpreter decodes e4m3fn
    0x7F as 480, so only the GPU can check it; tests/kernels/test_gpu_paths.py does.)"""
    args, kwargs = build_inputs(feats, device, seed, invalid=True)
    q, cache, indices = args[0].clone(), args[1].clone(), args[2]
    batch, s_q, heads, d_qk = q.shape
    d_v = args[4]
    flat = indices.reshape(batch * s_q, -1).cpu()
    with_slots = [i for i in range(flat.shape[0]) if bool((flat[i] >= 0).any())]
    block_size = cache.shape[1]
    fp8 = cache.dtype == torch.uint8

    nan32 = torch.tensor([float("nan")], dtype=torch.float32).view(torch.uint8).to(cache.device)
    nan16 = torch.tensor([float("nan")], dtype=torch.bfloat16).view(torch.uint8).to(cache.device)

    def poison_row(query: int, column: int) -> None:
        slot = int(flat[query][flat[query] >= 0][0])
        row = cache[slot // block_size, slot % block_size]
        if not fp8:
            row[column] = float("nan")
        elif column < d_v:  # the scale of the latent tile holding the column
            at = d_v + 4 * (column // 128)
            row[at : at + 4] = nan32
        else:  # a bf16 rope value
            at = d_v + 4 * (d_v // 128) + 2 * (column - d_v)
            row[at : at + 2] = nan16

    qf = q.view(batch * s_q, heads, d_qk)
    if with_slots:
        qf[with_slots[0], 0, 5] = float("nan")
    if len(with_slots) > 1:
        poison_row(with_slots[1], 3)
    if len(with_slots) > 2 and d_qk > d_v:
        poison_row(with_slots[2], d_v + 1)
    sink = kwargs["attn_sink"]
    if sink is not None and heads > 1:
        sink = sink.clone()
        sink[-1] = float("nan")
    return (q, cache, indices, *args[3:]), {**kwargs, "attn_sink": sink}
