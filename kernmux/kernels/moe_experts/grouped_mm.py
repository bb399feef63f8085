"""``moe_experts`` through PyTorch's grouped GEMM, ``torch._grouped_mm``.

On CUDA sm_90/sm_100 with bf16 operands ``_grouped_mm`` runs CUTLASS kernels with no
host synchronisation; elsewhere it falls back to a loop of ``mm`` over the groups after
copying the offsets to the host (PyTorch ``aten/src/ATen/native/GroupedMMUtils.h``
``_grouped_mm_fallback`` and ``cuda/GroupedBlas.cpp`` ``_grouped_mm_cuda``), which is
right but synchronises: the kernel is offered on CUDA only where the fast path applies,
and on CPU (where the fallback is the only path) for tests. Operand row strides must be
multiples of 16 bytes (``check_valid_strides_and_return_transposed``).

Steps: sort the T * (k + S) slots by expert (stable), gather the token rows, grouped
GEMM with w13 ([E+S, H, 2I] as a transposed view, int32 cumulative offsets), SiLU-mul,
grouped GEMM with w2, scale each row by its routing weight, scatter the rows back to
slot order and sum each token's k + S rows in fp32. Static shapes throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kernmux.dispatch.outputs import empty_output


def moe_experts(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    activation: str = "silu",
    num_shared: int = 0,
) -> torch.Tensor:
    """Contract of the reference (``reference.py``). A token with an id outside
    [0, E + S) comes out as a NaN row (its rows get a NaN weight); ids never index
    memory unchecked."""
    tokens, hidden_size = hidden.shape
    num_experts, two_inter, _ = w13.shape
    inter = two_inter // 2
    slots_per_token = ids.shape[1]
    out = empty_output((tokens, hidden_size), hidden.dtype, hidden.device)
    if tokens == 0:
        return out
    # The CUTLASS path needs K-contiguous weights with 16-byte row strides; a strided
    # view of the weights is copied once per call (correct, not fast).
    w13 = w13 if w13.is_contiguous() else w13.contiguous()
    w2 = w2 if w2.is_contiguous() else w2.contiguous()
    flat = ids.reshape(-1).long()
    valid = (flat >= 0) & (flat < num_experts)
    key = torch.where(valid, flat, num_experts)  # out-of-range slots sort last, past offs[-1]
    order = torch.argsort(key, stable=True)
    counts = torch.zeros(num_experts + 1, dtype=torch.int32, device=hidden.device)
    counts.scatter_add_(0, key, torch.ones_like(key, dtype=torch.int32))
    offsets = torch.cumsum(counts[:num_experts], 0, dtype=torch.int32)
    token = order // slots_per_token
    rows = hidden.index_select(0, token)
    gate_up = torch._grouped_mm(rows, w13.transpose(1, 2), offs=offsets)
    act = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    down = torch._grouped_mm(act, w2.transpose(1, 2), offs=offsets)
    slot_weight = weights.reshape(-1).index_select(0, order)
    slot_weight = torch.where(valid.index_select(0, order), slot_weight, float("nan"))
    down.mul_(slot_weight.unsqueeze(1).to(down.dtype))
    by_slot = torch.empty_like(down).index_copy_(0, order, down)
    out.copy_(by_slot.view(tokens, slots_per_token, hidden_size).sum(dim=1, dtype=torch.float32))
    return out
