"""AITER adapter: ``deepgemm_fp8_paged_mqa_logits`` (and its ``_stage1`` two-pass form).

Not verified on AMD hardware (none here): argument construction and gating are tested
with a stand-in module; the AITER facts come from ``notes/aiter.md`` and the AITER
sources, cited in ``rules/shipped/indexer_logits.yaml``.

Config:
- ``entry``: ``"stage1"`` calls ``deepgemm_fp8_paged_mqa_logits_stage1`` into an
  ``[H, B*next_n, W]`` per-head buffer and sums over heads (what vLLM's ROCm indexer
  does); ``"fused"`` calls ``deepgemm_fp8_paged_mqa_logits`` (one pass, ChunkQ = heads
  inside AITER).
- ``ChunkQ`` (stage1): heads per program; AITER's default 64 divides by zero in its
  grid computation when heads < ChunkQ (ROCm/aiter#2563, open through v0.1.20.post1) --
  the shipped rules set it to the head count. The ``ChunkQ``/``ChunkK`` keywords exist
  from v0.1.7.post3; v0.1.7-v0.1.7.post2 fix ChunkQ at 32 and are denied by the rules
  (they also read the key cache as e4m3fnuz whatever the arch).
- ``ChunkK``: keys per inner step.
- ``layout``: ``"token"`` hands AITER a token-fused cache (``[tokens, 1, 1, D+4]``,
  ``KVBlockSize=1``) and a per-token index table -- the form every AITER version seen
  accepts; ``"page"`` hands the page-fused cache with ``KVBlockSize=block_size`` and the
  block table. stage1 reads paged caches only from v0.1.20 (commit 8abb3607e9, #4440):
  before it, stage1 takes the token layout whatever the config says (noted on the call).
  The cache is passed without a copy when ``k_cache`` and ``k_scale`` are views of a
  buffer of that layout (see ``layout.py``), else packed.

NaN in, NaN out: AITER's kernels apply relu as ``tl.maximum(o, 0.0)`` (v0.1.20.post1),
which on the GPU turns a NaN score into 0. After the call the adapter restores the
reference's rule for NaN in ``q``, ``weights`` and ``k_scale`` (a gather of the scales
through the block table: 4 bytes per position against D + 4 for the keys). A NaN byte
inside the fp8 keys is not detected on this path: finding it would read the cache a
second time.

AITER writes only positions inside each request's context: the output (and the stage1
buffer) start at -inf. The stage1 kernel stores whole ``ChunkK`` chunks without a
bound check, so its buffer rows are padded to a multiple of ``ChunkK``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from packaging.version import Version

from kernmux.dispatch.outputs import empty_output
from kernmux.dispatch.platform import lib_version
from kernmux.kernels.indexer_logits import layout
from kernmux.kernels.indexer_logits.checks import maybe_check_values

# Module paths across AITER versions (moved under attention/ in 2026).
MODULES = ("aiter.ops.triton.attention.pa_mqa_logits", "aiter.ops.triton.pa_mqa_logits")
# stage1 gained ChunkQ / ChunkK arguments in v0.1.7.post3 (v0.1.7-post2 hard-code ChunkQ=32).
CHUNKQ_ARG_SINCE = Version("0.1.7.post3")
# stage1 reads page-fused caches (KVBlockSize > 1) from v0.1.20 (commit 8abb3607e9).
STAGE1_PAGED_SINCE = Version("0.1.20")


def resolve_chunk_q(config: Mapping[str, Any], heads: int) -> int:
    """ChunkQ from the config ("heads" or an int)."""
    value = config.get("ChunkQ", 64)
    return heads if value == "heads" else int(value)


def load_module():
    """The AITER module holding the paged MQA logits entry points."""
    errors = []
    for name in MODULES:
        try:
            return importlib.import_module(name)
        except ImportError as e:
            errors.append(f"{name}: {e}")
    raise ImportError("AITER paged MQA logits not found (" + "; ".join(errors) + ")")


@dataclass
class AiterCall:
    """One AITER call, built without importing AITER (so tests can check it)."""

    entry: str  # function name in the AITER module
    args: tuple
    kwargs: dict[str, Any]
    out: torch.Tensor  # what the op returns (filled by the call, maybe after `reduce`)
    buffer: torch.Tensor | None = None  # stage1 per-head buffer, summed into `out`
    notes: list[str] = field(default_factory=list)

    def run(self, module) -> torch.Tensor:
        getattr(module, self.entry)(*self.args, **self.kwargs)
        if self.buffer is not None:
            width = self.out.shape[1]
            torch.sum(self.buffer[:, :, :width], dim=0, out=self.out)
        return self.out


def restore_nan(
    out: torch.Tensor, q: torch.Tensor, k_scale: torch.Tensor, weights: torch.Tensor,
    context_lens: torch.Tensor, block_table: torch.Tensor,
) -> torch.Tensor:
    """``out`` [B * next_n, W] with the reference's NaN rule for NaN in q, weights and
    k_scale applied within each row's causal range (in place; no host synchronisation)."""
    batch, next_n = q.shape[:2]
    width = out.shape[1]
    num_blocks, block_size = k_scale.shape
    row_nan = torch.isnan(q.float()).flatten(2).any(dim=2).reshape(-1) | torch.isnan(weights).any(dim=1)
    positions = torch.arange(width, device=out.device)
    pages_used = min(block_table.shape[1], -(-width // block_size))
    cols = positions[: pages_used * block_size]
    pages = block_table[:, cols // block_size].long().clamp(0, num_blocks - 1)
    scale_nan = torch.zeros(batch, width, dtype=torch.bool, device=out.device)
    scale_nan[:, : cols.numel()] = torch.isnan(k_scale[pages, cols % block_size])
    last = context_lens.long().view(batch, 1) - next_n + torch.arange(next_n, device=out.device).view(1, next_n)
    causal = positions.view(1, 1, width) <= last.view(batch, next_n, 1)  # [B, next_n, W]
    nan = causal & (row_nan.view(batch, next_n, 1) | scale_nan.view(batch, 1, width))
    return out.masked_fill_(nan.view(batch * next_n, width), float("nan"))


def _packed_cache(k_cache: torch.Tensor, k_scale: torch.Tensor, kind: str, notes: list[str]) -> torch.Tensor:
    base = layout.page_layout_base(k_cache, k_scale) if kind == "page" else layout.token_layout_base(k_cache, k_scale)
    if base is not None:
        return base
    notes.append(f"packed the key cache into the {kind}-fused layout (a copy: pass views of a fused buffer to avoid it)")
    return layout.fuse_page_layout(k_cache, k_scale) if kind == "page" else layout.fuse_token_layout(k_cache, k_scale)


def _token_table(block_table: torch.Tensor, block_size: int) -> torch.Tensor:
    """Per-token index table [B, max_blocks * block_size]: page * block_size + slot."""
    slots = torch.arange(block_size, device=block_table.device, dtype=torch.int32)
    return (block_table[:, :, None] * block_size + slots).reshape(block_table.shape[0], -1)


def build_call(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    k_scale: torch.Tensor,
    weights: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    max_context: int,
    config: Mapping[str, Any],
    aiter_version: str | None,
) -> AiterCall:
    """The AITER call for these inputs, config and installed AITER version."""
    batch, next_n, heads, _ = q.shape
    block_size = k_cache.shape[1]
    entry = config.get("entry", "stage1")
    chunk_k = int(config.get("ChunkK", 256))
    notes: list[str] = []
    layout_kind = config.get("layout", "token")
    if layout_kind == "page" and entry == "stage1" and aiter_version is not None and Version(aiter_version) < STAGE1_PAGED_SINCE:
        notes.append(f"amd-aiter {aiter_version} < {STAGE1_PAGED_SINCE}: stage1 reads token-fused caches only; layout 'token' used")
        layout_kind = "token"
    if layout_kind == "page":
        kv = _packed_cache(k_cache, k_scale, "page", notes)
        table, kv_block = block_table, block_size
    else:
        kv = _packed_cache(k_cache, k_scale, "token", notes)
        table, kv_block = (_token_table(block_table, block_size) if block_size > 1 else block_table), 1
    table = table.contiguous()
    out = empty_output((batch * next_n, max_context), torch.float32, q.device)
    out.fill_(float("-inf"))
    weights = weights.contiguous()
    q = q.contiguous()
    if entry == "fused":
        kwargs = {"Preshuffle": False, "KVBlockSize": kv_block, "ChunkK": chunk_k}
        return AiterCall("deepgemm_fp8_paged_mqa_logits", (q, kv, weights, out, context_lens, table, max_context), kwargs, out, notes=notes)
    if entry != "stage1":
        raise ValueError(f"aiter indexer_logits: unknown entry {entry!r}; expected 'stage1' or 'fused'")
    width = -(-max_context // chunk_k) * chunk_k  # stage1 stores whole chunks unchecked
    buffer = torch.full((heads, batch * next_n, width), float("-inf"), dtype=torch.float32, device=q.device)
    kwargs: dict[str, Any] = {}
    if aiter_version is None or Version(aiter_version) >= CHUNKQ_ARG_SINCE:
        kwargs = {"ChunkQ": resolve_chunk_q(config, heads), "ChunkK": chunk_k}
    else:
        notes.append(f"amd-aiter {aiter_version} < {CHUNKQ_ARG_SINCE}: stage1 fixes ChunkQ=32 itself, config ChunkQ/ChunkK not passed")
    return AiterCall(
        "deepgemm_fp8_paged_mqa_logits_stage1",
        (q, kv, weights, buffer, context_lens, table, max_context),
        kwargs,
        out,
        buffer=buffer,
        notes=notes,
    )


def indexer_logits_aiter(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    k_scale: torch.Tensor,
    weights: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    max_context: int,
    *,
    config: dict,
) -> torch.Tensor:
    """The op through AITER; shapes as in the reference."""
    maybe_check_values(q, k_cache, k_scale, weights, context_lens, block_table, max_context)
    call = build_call(q, k_cache, k_scale, weights, context_lens, block_table, max_context, config, lib_version("amd-aiter"))
    out = call.run(load_module())
    return restore_nan(out, q, k_scale, weights, context_lens, block_table)


def probe(platform) -> Any:
    """AITER importable and exposing the entry points (real platform only)."""
    from kernmux.dispatch.registry import SUPPORTED, unsupported

    module = load_module()
    for name in ("deepgemm_fp8_paged_mqa_logits", "deepgemm_fp8_paged_mqa_logits_stage1"):
        if not hasattr(module, name):
            return unsupported(f"{module.__name__} has no {name}")
    return SUPPORTED
