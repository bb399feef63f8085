"""Shared experts outside the grouped launch: "separate" and "dual-stream" strategies.

Both run the k routed slots through the Triton grouped GEMMs (``triton.routed_slots``)
and each shared expert E + s as dense GEMMs over all T tokens (``F.linear``, i.e.
cuBLAS/hipBLASLt; the activation by a small Triton kernel), then one reduction adds
``weights[t, k + s] * shared_s[t]`` to the routed sum.

* ``moe_experts_separate``: the dense GEMMs after the routed ones, on the same stream.
* ``moe_experts_dual_stream``: the dense GEMMs on a second stream overlapping the routed
  ones (vLLM PR #26440; on ROCm too, seed PR #38665), joined before the reduction.

Memory safety of the second stream: it first waits for the caller's stream (inputs
ready); everything it allocates is allocated while it is current, so the caching
allocator ties those blocks to it; the one tensor the caller's stream then reads
(``shared_out``) is ``record_stream``-ed on the caller's stream before it is used; the
caller's stream waits for the side stream before the reduction, so inputs the caller
frees after the call are only reused after the side stream is done with them. All of
it is events, so it captures into a CUDA graph.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from kernmux.dispatch.outputs import empty_output
from kernmux.kernels.moe_experts.triton import reduce_slots, resolve_config, routed_slots, silu_mul


def shared_expert_outputs(hidden: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, num_shared: int) -> torch.Tensor:
    """[S, T, H] in hidden's dtype: w2[E+s] @ (silu(gate) * up) of every token, for each
    of the last ``num_shared`` experts of w13/w2, as dense GEMMs."""
    tokens, hidden_size = hidden.shape
    first = w13.shape[0] - num_shared
    out = torch.empty((num_shared, tokens, hidden_size), dtype=hidden.dtype, device=hidden.device)
    for s in range(num_shared):
        gate_up = F.linear(hidden, w13[first + s])
        torch.matmul(silu_mul(gate_up), w2[first + s].t(), out=out[s])
    return out


def _split(weights: torch.Tensor, ids: torch.Tensor, num_shared: int) -> tuple[torch.Tensor, torch.Tensor]:
    routed = ids.shape[1] - num_shared
    return weights[:, :routed], ids[:, :routed]


def _config(config, hidden, w13, ids, num_shared) -> dict[str, Any]:
    tokens, hidden_size = hidden.shape
    num_experts, two_inter, _ = w13.shape
    # The grouped GEMMs see only the routed slots.
    return resolve_config(
        config, tokens, num_experts - num_shared, ids.shape[1] - num_shared, 0,
        hidden_size, two_inter // 2, hidden.dtype, hidden.device,
    )


def moe_experts_separate(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    activation: str = "silu",
    num_shared: int = 0,
    *,
    config: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """Routed slots grouped, then the shared experts as dense GEMMs, then one sum.

    Contract of the reference, with ids[:, k + s] = E + s required (a token whose shared
    column holds anything else comes out NaN, never silently different)."""
    tokens, hidden_size = hidden.shape
    out = empty_output((tokens, hidden_size), hidden.dtype, hidden.device)
    if tokens == 0:
        return out
    routed_w, routed_ids = _split(weights, ids, num_shared)
    slot_out = routed_slots(hidden, w13, w2, routed_w, routed_ids, _config(config, hidden, w13, ids, num_shared))
    shared_out = shared_expert_outputs(hidden, w13, w2, num_shared) if num_shared else None
    return reduce_slots(slot_out, weights, ids, w13.shape[0], routed_ids.shape[1], out, shared_out)


_STREAMS: dict[torch.device, torch.cuda.Stream] = {}
_STREAMS_LOCK = threading.Lock()


def side_stream(device: torch.device) -> torch.cuda.Stream:
    """One process-wide side stream per device (vLLM PR #28406: one global auxiliary
    stream rather than one per layer)."""
    stream = _STREAMS.get(device)
    if stream is None:
        with _STREAMS_LOCK:
            stream = _STREAMS.get(device)
            if stream is None:
                stream = _STREAMS[device] = torch.cuda.Stream(device=device)
    return stream


def moe_experts_dual_stream(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    activation: str = "silu",
    num_shared: int = 0,
    *,
    config: Mapping[str, Any] | None = None,
) -> torch.Tensor:
    """As :func:`moe_experts_separate`, with the dense shared GEMMs on a second stream
    overlapping the routed grouped GEMMs; GPU tensors only."""
    if not hidden.is_cuda:
        raise ValueError(f"hidden: the dual-stream strategy needs GPU tensors, got device {hidden.device}")
    tokens, hidden_size = hidden.shape
    out = empty_output((tokens, hidden_size), hidden.dtype, hidden.device)
    if tokens == 0:
        return out
    device = hidden.device if hidden.device.index is not None else torch.device("cuda", torch.cuda.current_device())
    main = torch.cuda.current_stream(device)
    side = side_stream(device)
    shared_out = None
    if num_shared:
        side.wait_stream(main)
        with torch.cuda.stream(side):
            shared_out = shared_expert_outputs(hidden, w13, w2, num_shared)
    routed_w, routed_ids = _split(weights, ids, num_shared)
    slot_out = routed_slots(hidden, w13, w2, routed_w, routed_ids, _config(config, hidden, w13, ids, num_shared))
    if shared_out is not None:
        main.wait_stream(side)
        shared_out.record_stream(main)
    return reduce_slots(slot_out, weights, ids, w13.shape[0], routed_ids.shape[1], out, shared_out)
