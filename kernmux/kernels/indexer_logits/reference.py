"""The semantics of ``indexer_logits`` in PyTorch, fp32 math (DeepGEMM ``fp8_paged_mqa_logits``).

For request ``b``, query ``n`` of its ``next_n`` queries (output row ``i = b * next_n + n``)
and key position ``j``:

    logits[i, j] = sum_h weights[i, h] * relu(q[b, n, h] . (k_j * s_j))   if j <= ctx_b - next_n + n
                   -inf                                                  otherwise

where ``k_j`` is the fp8 key of position ``j`` in page ``block_table[b, j // block_size]``
at slot ``j % block_size`` and ``s_j`` its fp32 scale. The last ``next_n`` positions of a
request are its own (speculative) queries, so query ``n`` sees the prefix up to itself.
"""

# No ``from __future__ import annotations``: the signature below is the op's signature,
# and torch.library reads its annotations at runtime.
import torch

from kernmux.kernels.indexer_logits.checks import check_lens


def indexer_logits(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    k_scale: torch.Tensor,
    weights: torch.Tensor,
    context_lens: torch.Tensor,
    block_table: torch.Tensor,
    max_context: int,
) -> torch.Tensor:
    """Paged fp8 MQA logits of the DeepSeek sparse-attention indexer.

    q: fp8 e4m3 ``[B, next_n, H, D]``.
    k_cache: fp8 e4m3 ``[num_blocks, block_size, D]`` (any strides; e.g. a view of a
        fused uint8 cache, see ``layout.py``).
    k_scale: fp32 ``[num_blocks, block_size]``, per-token dequantisation scale.
    weights: fp32 ``[B * next_n, H]``.
    context_lens: int32 ``[B]``, ``0 <= ctx_b <= min(max_context, max_blocks * block_size)``.
    block_table: int32 ``[B, max_blocks]``; entries past a request's context are never read.
    max_context: width of the output.
    Returns fp32 ``[B * next_n, max_context]``.

    Values are checked here on every call (one host synchronisation: the reference can
    afford it); kernels check them only under ``KERNMUX_CHECK_VALUES=1``.

    Non-finite inputs (NaN in, NaN out; relu(NaN) is NaN, and NaN times any weight is
    NaN): a NaN in ``q[b, n, h]`` or ``weights[i, h]`` makes every in-context entry of
    row ``i = b * next_n + n`` NaN; a NaN key byte or scale of position ``j`` makes entry
    ``j`` NaN in every row of request ``b`` whose causal range reaches ``j``. Entries
    outside the causal range stay ``-inf`` whatever the cache holds there.
    """
    batch, next_n, heads, _ = q.shape
    num_blocks, block_size, _ = k_cache.shape
    max_blocks = block_table.shape[1]
    device = q.device
    lens = context_lens.to(device=device, dtype=torch.long)
    check_lens(context_lens, block_table, num_blocks, block_size, max_context)

    used_blocks = min(max_blocks, -(-max_context // block_size))
    span = min(max_context, used_blocks * block_size)  # positions that can be valid
    out = torch.full((batch, next_n, max_context), float("-inf"), dtype=torch.float32, device=device)
    if span > 0:
        # Pages past a request's context are never read: point them at page 0.
        page_start = torch.arange(used_blocks, device=device) * block_size
        needed = page_start[None, :] < lens[:, None]
        table = torch.where(needed, block_table[:, :used_blocks].to(device=device, dtype=torch.long), 0)
        keys = k_cache[table].to(torch.float32).reshape(batch, used_blocks * block_size, -1)[:, :span]
        scales = k_scale[table].to(torch.float32).reshape(batch, used_blocks * block_size)[:, :span]
        keys = keys * scales[..., None]
        scores = torch.einsum("bnhd,bld->bnhl", q.to(torch.float32), keys)
        logits = (scores.relu() * weights.to(torch.float32).view(batch, next_n, heads, 1)).sum(dim=2)
        positions = torch.arange(span, device=device)
        last = lens[:, None] - next_n + torch.arange(next_n, device=device)[None, :]  # [B, next_n]
        valid = positions[None, None, :] <= last[..., None]
        out[..., :span] = torch.where(valid, logits, float("-inf"))
    return out.view(batch * next_n, max_context)
