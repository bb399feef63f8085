"""Fused Triton kernel for ``moe_topk_softmax``: one launch for the whole routing step.

One program handles ``ROWS`` tokens. It loads their logits once as a [ROWS, BLOCK_E]
tile (BLOCK_E = next power of two >= E, the tail masked to -inf, so any E up to 1024
works, e.g. 160 or 288), computes e = exp(x - max) in fp32 registers and picks the top
k without leaving registers, by one of three strategies (config ``select``):

* ``"twopass"``: per pick, a max-reduction for the value, then a min-reduction over the
  columns holding it (ties to the lower index); the winner is masked out.
* ``"packed"``: each candidate is one int64 key, (fp32 bits of e) << 32 | (BLOCK_E -
  column). e >= 0, so its bit pattern orders like its value; equal values compare by the
  low word, larger for the lower column. One max-reduction per pick.
* ``"bitonic"``: ``tl.topk`` over the same packed keys: a log-depth compare-exchange
  network instead of k sequential reductions. Keys are unique, so the result is the
  exact descending order with ties to the lower index.

Selection uses e = exp(x - max), the numerator of the probability, so ties that exp
creates (underflow to 0, values that round to 1) are ties here as in the reference.
A row whose sum of e is NaN (a NaN or +inf logit, or all logits -inf) has no softmax:
its routed weights are written as NaN and its ids as 0 .. k-1, the reference's rule.
With an ``is_padding`` mask (``HAS_PAD``), padded rows get id -1 in every slot.
Weights are e_j / sum(e) or, with renormalisation, e_j / sum over the k picks. The k
picks of a row block are stored as one [ROWS, KP] tile (KP = power of two >= k); shared
slot s (output column k + s) gets id E + s and sigmoid(logit[E + s]) from a second small
tile. H100 timings per strategy: benchmarks/results/moe_topk_softmax_summary.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import triton
import triton.language as tl

from kernmux.dispatch.outputs import empty_output
from kernmux.kernels.moe_topk_softmax.direct_launch import DirectLauncher, direct_key
from kernmux.kernels.moe_topk_softmax.triton_config import (
    block_e,
    heuristic_config,
    heuristic_tokens_class,
    next_power_of_two,
)


# Token and expert counts only feed masks and offsets: specialising on their value or
# divisibility would only multiply compilations (one per batch size).
@triton.jit(do_not_specialize=["num_tokens", "num_experts"])
def _moe_topk_softmax_kernel(
    logits_ptr,
    weights_ptr,
    ids_ptr,
    pad_ptr,
    num_tokens,
    num_experts,
    stride_lt,
    stride_le,
    K: tl.constexpr,
    S: tl.constexpr,
    RENORM: tl.constexpr,
    ROWS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    KP: tl.constexpr,
    SP: tl.constexpr,
    SELECT: tl.constexpr,
    HAS_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)
    row_ok = rows < num_tokens
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_E)
    col_ok = cols < num_experts

    # ---- load the routed logits once; the masked tail is -inf so exp() gives 0 there.
    row_base = logits_ptr + rows64[:, None] * stride_lt
    x = tl.load(
        row_base + cols[None, :] * stride_le,
        mask=row_ok[:, None] & col_ok[None, :],
        other=float("-inf"),
    ).to(tl.float32)
    row_max = tl.max(x, axis=1)
    # Rows past the end hold only -inf: keep their arithmetic finite (never stored).
    row_max = tl.where(row_ok, row_max, 0.0)
    e = tl.exp(x - row_max[:, None])

    # ---- routed picks: a [ROWS, KP] tile, columns >= K unused (KP = pow2 >= K).
    kcols = tl.arange(0, KP)
    if SELECT == 2:
        # Bitonic top-k over the packed keys: log-depth compare-exchange networks
        # instead of K sequential full-row reductions. Keys are unique, so the
        # network's order is the exact descending order with ties to the lower index.
        low = (BLOCK_E - cols).to(tl.int64)
        key = (e.to(tl.int32, bitcast=True).to(tl.int64) << 32) | low[None, :]
        top = tl.topk(key, KP)
        w_tile = (top >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        id_tile = (BLOCK_E - (top & 0xFFFF)).to(tl.int32)
    elif SELECT == 0:
        # e >= 0: its int32 bit pattern is monotonic in its value.
        low = (BLOCK_E - cols).to(tl.int64)
        key = (e.to(tl.int32, bitcast=True).to(tl.int64) << 32) | low[None, :]
        w_tile = tl.zeros((ROWS, KP), dtype=tl.float32)
        id_tile = tl.zeros((ROWS, KP), dtype=tl.int32)
        for j in tl.static_range(K):
            best = tl.max(key, axis=1)
            pick_col = (BLOCK_E - (best & 0xFFFF)).to(tl.int32)
            pick_val = (best >> 32).to(tl.int32).to(tl.float32, bitcast=True)
            w_tile = tl.where(kcols[None, :] == j, pick_val[:, None], w_tile)
            id_tile = tl.where(kcols[None, :] == j, pick_col[:, None], id_tile)
            key = tl.where(key == best[:, None], -1, key)
    else:
        cand = e
        w_tile = tl.zeros((ROWS, KP), dtype=tl.float32)
        id_tile = tl.zeros((ROWS, KP), dtype=tl.int32)
        for j in tl.static_range(K):
            pick_val = tl.max(cand, axis=1)
            pick_col = tl.min(tl.where(cand == pick_val[:, None], cols[None, :], BLOCK_E), axis=1)
            w_tile = tl.where(kcols[None, :] == j, pick_val[:, None], w_tile)
            id_tile = tl.where(kcols[None, :] == j, pick_col[:, None], id_tile)
            cand = tl.where(cols[None, :] == pick_col[:, None], -1.0, cand)

    routed = kcols < K
    total = tl.sum(e, axis=1)
    if RENORM:
        denom = tl.sum(tl.where(routed[None, :], w_tile, 0.0), axis=1)
    else:
        denom = total
    denom = tl.where(row_ok, denom, 1.0)
    w_tile = w_tile / denom[:, None]
    # NaN sum: the row has no softmax (NaN / +inf logit, or all -inf). The reference's
    # rule: NaN weights, ids 0 .. k-1 (NaN probabilities tie, lower index first).
    undefined = total != total
    w_tile = tl.where(undefined[:, None], total[:, None], w_tile)  # total is the NaN
    id_tile = tl.where(undefined[:, None], kcols[None, :], id_tile)
    if HAS_PAD:
        padded = tl.load(pad_ptr + rows64, mask=row_ok, other=0) != 0
        id_tile = tl.where(padded[:, None], -1, id_tile)

    out_row = rows64[:, None] * (K + S)
    out_mask = row_ok[:, None] & routed[None, :]
    tl.store(weights_ptr + out_row + kcols[None, :], w_tile, mask=out_mask)
    tl.store(ids_ptr + out_row + kcols[None, :], id_tile, mask=out_mask)

    # ---- shared slots: output column K + s gets id E + s and sigmoid(logit[E + s]).
    if S > 0:
        scols = tl.arange(0, SP)
        smask = row_ok[:, None] & (scols < S)[None, :]
        gate = tl.load(row_base + (num_experts + scols[None, :]) * stride_le, mask=smask, other=0.0)
        gate = gate.to(tl.float32)
        tl.store(weights_ptr + out_row + K + scols[None, :], 1.0 / (1.0 + tl.exp(-gate)), mask=smask)
        sids = (num_experts + scols[None, :]) + tl.zeros((ROWS, SP), dtype=tl.int32)
        if HAS_PAD:
            sids = tl.where(padded[:, None], -1, sids)
        tl.store(ids_ptr + out_row + K + scols[None, :], sids, mask=smask)


# --------------------------------------------------------------------------- launcher
#
# The first call of a specialisation goes through Triton's launcher; later calls of the
# same key launch the compiled kernel directly (direct_launch.py, the one module that
# touches Triton internals).

# (tokens class, experts, topk, shared, config items) -> launch parameters.
_LAUNCH: dict[tuple, tuple[int, int, int, int, int, int]] = {}
LAUNCHER = DirectLauncher()
_SELECT = {"packed": 0, "twopass": 1, "bitonic": 2}
# tl.topk is recent (present in Triton 3.6 and 3.9); without it the heuristic falls back
# to the two-pass pick and an explicit "bitonic" config is refused.
_HAS_TOPK = hasattr(tl, "topk")


def _launch_params(
    tokens: int, experts: int, topk: int, num_shared: int, config: Mapping[str, Any] | None
) -> tuple[int, int, int, int, int, int]:
    key = (heuristic_tokens_class(tokens), experts, topk, num_shared, tuple(config.items()) if config else ())
    params = _LAUNCH.get(key)
    if params is None:
        cfg = {**heuristic_config(tokens, experts), **(config or {})}
        if cfg["select"] == "bitonic" and not _HAS_TOPK:
            if config and config.get("select") == "bitonic":
                raise RuntimeError(f"select='bitonic' needs tl.topk, missing in Triton {triton.__version__}")
            cfg["select"] = "twopass"
        params = (
            int(cfg["rows"]),
            block_e(experts),
            max(2, next_power_of_two(topk)),
            max(2, next_power_of_two(num_shared)),
            _SELECT[cfg["select"]],
            int(cfg["num_warps"]),
        )
        _LAUNCH[key] = params
    return params


def moe_topk_softmax(
    gating_logits: torch.Tensor,
    topk: int,
    renormalize: bool = False,
    num_shared: int = 0,
    is_padding: torch.Tensor | None = None,
    *,
    config: Mapping[str, Any] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused routing; same contract as the reference (see ``reference.py``).

    gating_logits: [T, E + S] fp32/bf16/fp16, any strides. is_padding: optional [T]
    bool. Returns (weights fp32 [T, k + S], ids int32 [T, k + S]), both contiguous.
    ``config``: keys of ``triton_config.CONFIG_SPACE``; missing keys come from
    ``heuristic_config``.
    """
    tokens, width = gating_logits.shape
    experts = width - num_shared
    device = gating_logits.device
    weights = empty_output((tokens, topk + num_shared), torch.float32, device)
    ids = empty_output((tokens, topk + num_shared), torch.int32, device)
    if tokens == 0:
        return weights, ids
    renormalize = bool(renormalize)
    has_pad = is_padding is not None
    # One pointer argument either way: the mask as bytes, or an unread stand-in, so the
    # compiled signature (and the direct launcher's argument list) does not change.
    pad = (is_padding if is_padding.is_contiguous() else is_padding.contiguous()).view(torch.uint8) if has_pad else ids
    key = None
    # The interpreter (CPU tests) always takes the generic path.
    driver = LAUNCHER.driver() if device.type != "cpu" else None
    if driver is not None:
        device_index = driver[0]()
        stride_t, stride_e = gating_logits.stride()
        key = direct_key(
            stride_t, stride_e, tokens, experts, topk, num_shared, renormalize, config, gating_logits.dtype,
            (gating_logits.data_ptr(), weights.data_ptr(), ids.data_ptr(), pad.data_ptr()), device_index,
            has_pad,
        )
        if key is not None and key in LAUNCHER.entries:
            runtime_args = (gating_logits, weights, ids, pad, tokens, experts, stride_t, stride_e)
            LAUNCHER.launch(key, tokens, driver[1](device_index), runtime_args)
            return weights, ids
    rows, block, kp, sp, select, warps = _launch_params(tokens, experts, topk, num_shared, config)
    consts = (topk, num_shared, renormalize, rows, block, kp, sp, select, has_pad)
    compiled = _moe_topk_softmax_kernel[((tokens + rows - 1) // rows,)](
        gating_logits,
        weights,
        ids,
        pad,
        tokens,
        experts,
        gating_logits.stride(0),
        gating_logits.stride(1),
        K=topk,
        S=num_shared,
        RENORM=renormalize,
        ROWS=rows,
        BLOCK_E=block,
        KP=kp,
        SP=sp,
        SELECT=select,
        HAS_PAD=has_pad,
        num_warps=warps,
    )
    LAUNCHER.remember(key, compiled, rows, consts)
    return weights, ids
