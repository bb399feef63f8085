"""What ``moe_experts`` is besides its reference: features, argument checks, inputs,
tolerance, fake outputs, tuning bucket and roofline.

Signature (``reference.py``)::

    moe_experts(hidden [T, H], w13 [E+S, 2I, H], w2 [E+S, H, I], weights [T, k+S] fp32,
                ids [T, k+S] int32, activation="silu", num_shared=0) -> [T, H]

``num_shared`` (S) is what makes E and k recoverable from the shapes (w13 holds E + S
experts, ids k + S columns); strategies that run the shared experts apart from the
routed ones need it. Its default 0 means "every slot is routed".

Length (~410 lines): the spec contract has ten functions (``registry.SPEC_REQUIRED``);
each is short, kept in one file like every other op's spec.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import Comparison, FeatureSpec, Roofline
from kernmux.kernels.moe_experts.reference import moe_experts as reference  # noqa: F401 - part of the spec

OP_NAME = "moe_experts"
DOC = (
    "MoE experts after routing: per slot j, weights[t,j] * w2[e] @ (silu(gate) * up) with "
    "e = ids[t,j], summed over the k routed and S shared slots; fp32 semantics."
)

ACTIVATIONS = ("silu",)
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

FEATURE_SPECS = (
    FeatureSpec("tokens", "int", "T, rows of hidden", 7, minimum=0),
    FeatureSpec("experts", "int", "E, routed experts (w13 holds E + S)", 13, minimum=1),
    FeatureSpec("shared", "int", "S, shared experts (the last S slots, ids E..E+S-1)", 2, minimum=0),
    FeatureSpec("topk", "int", "k, routed slots per token (ids holds k + S columns)", 7, minimum=1),
    FeatureSpec("hidden", "int", "H, model width", 64, minimum=1),
    FeatureSpec("inter", "int", "I, expert intermediate width (w13 has 2I rows)", 40, minimum=1),
    FeatureSpec("dtype", "str", "dtype of hidden, w13 and w2", "bf16", choices=tuple(DTYPES)),
)

# The CPU acceptance grid (Triton in its interpreter): tokens 1 and an odd count, 13
# experts (not a power of two) with topk 7, no / two shared experts, inter 40 (not a
# multiple of 16 or 64), every dtype. GPU shapes are given on the command line.
SWEEP_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "tokens": (1, 7),
    "experts": (13,),
    "topk": (7,),
    "shared": (0, 2),
    "hidden": (64,),
    "inter": (40,),
    "dtype": ("fp32", "bf16", "fp16"),
}


# ----------------------------------------------------------------------- features


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(getattr(value, "shape", ()))


def features(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    activation: str = "silu",
    num_shared: int = 0,
) -> dict[str, Any]:
    """Shapes and dtype only (cheap). Never raises on malformed arguments: those get
    placeholder values (-1) here and a precise error from :func:`validate`."""
    h_shape, w_shape, w2_shape, id_shape = _shape(hidden), _shape(w13), _shape(w2), _shape(ids)
    shared = num_shared if isinstance(num_shared, int) and not isinstance(num_shared, bool) else -1
    tokens, hidden_size = h_shape if len(h_shape) == 2 else (-1, -1)
    slots = id_shape[1] if len(id_shape) == 2 else -1
    total_experts = w_shape[0] if len(w_shape) == 3 else -1
    inter = w2_shape[2] if len(w2_shape) == 3 else -1
    dtype = getattr(hidden, "dtype", None)
    device = getattr(hidden, "device", None)
    return {
        "tokens": int(tokens),
        "experts": int(total_experts) - shared if total_experts >= 0 and shared >= 0 else -1,
        "shared": shared,
        "topk": int(slots) - shared if slots >= 0 and shared >= 0 else -1,
        "hidden": int(hidden_size),
        "inter": int(inter),
        "dtype": _DTYPE_NAMES.get(dtype, str(dtype)),
        "device": getattr(device, "type", str(device)),
    }


# ----------------------------------------------------------------------- validation


def _tensor(name: str, value: Any, dims: int, layout: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor {layout}, got {type(value).__name__}")
    if value.dim() != dims:
        raise ValueError(f"{name}: expected a {dims}-D tensor {layout}, got shape {tuple(value.shape)}")
    return value


def validate(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    activation: str = "silu",
    num_shared: int = 0,
) -> None:
    """Raise TypeError/ValueError naming the argument, what was expected and what was got.

    Shapes, dtypes, devices and empty dimensions always; id values (in [0, E + S), the
    shared columns holding E..E+S-1) too, with one device sync, except while a CUDA
    graph is being captured. The dispatcher calls this once per new feature key, so an
    id error in a later call of the same shape is left to the kernels: the torch kernel
    raises, the GPU kernels never read out of bounds and return NaN rows for those tokens.
    """
    _tensor("hidden", hidden, 2, "[tokens, hidden]")
    _tensor("w13", w13, 3, "[experts + shared, 2 * inter, hidden]")
    _tensor("w2", w2, 3, "[experts + shared, hidden, inter]")
    _tensor("weights", weights, 2, "[tokens, topk + shared]")
    _tensor("ids", ids, 2, "[tokens, topk + shared]")
    if hidden.dtype not in _DTYPE_NAMES:
        raise TypeError(f"hidden: expected dtype bfloat16, float16 or float32, got {hidden.dtype}")
    for name, value in (("w13", w13), ("w2", w2)):
        if value.dtype != hidden.dtype:
            raise TypeError(
                f"{name}: expected hidden's dtype {hidden.dtype} (shared and routed experts share "
                f"one unquantized dtype), got {value.dtype}"
            )
    if weights.dtype != torch.float32:
        raise TypeError(f"weights: expected dtype float32, got {weights.dtype}")
    if ids.dtype != torch.int32:
        raise TypeError(f"ids: expected dtype int32, got {ids.dtype}")
    for name, value in (("w13", w13), ("w2", w2), ("weights", weights), ("ids", ids)):
        if value.device != hidden.device:
            raise ValueError(f"{name}: expected hidden's device {hidden.device}, got {value.device}")
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {list(ACTIVATIONS)}, got {activation!r}")
    if isinstance(num_shared, bool) or not isinstance(num_shared, int):
        raise TypeError(f"num_shared: expected an int, got {type(num_shared).__name__} {num_shared!r}")

    tokens, hidden_size = hidden.shape
    total_experts, two_inter, w13_hidden = w13.shape
    if hidden_size == 0:
        raise ValueError("hidden: expected a non-empty hidden dimension, got shape "
                         f"{tuple(hidden.shape)}")
    if total_experts == 0 or two_inter == 0:
        raise ValueError(f"w13: expected at least one expert and inter >= 1, got shape {tuple(w13.shape)}")
    if two_inter % 2:
        raise ValueError(f"w13: expected an even second dimension (gate and up rows), got {two_inter}")
    if w13_hidden != hidden_size:
        raise ValueError(f"w13: expected last dimension = hidden's {hidden_size}, got shape {tuple(w13.shape)}")
    inter = two_inter // 2
    if tuple(w2.shape) != (total_experts, hidden_size, inter):
        raise ValueError(
            f"w2: expected shape {(total_experts, hidden_size, inter)} from w13 {tuple(w13.shape)}, "
            f"got {tuple(w2.shape)}"
        )
    if ids.shape[0] != tokens or weights.shape[0] != tokens:
        raise ValueError(
            f"ids/weights: expected {tokens} rows (hidden's tokens), got ids {tuple(ids.shape)}, "
            f"weights {tuple(weights.shape)}"
        )
    if tuple(weights.shape) != tuple(ids.shape):
        raise ValueError(f"weights: expected ids' shape {tuple(ids.shape)}, got {tuple(weights.shape)}")
    slots = ids.shape[1]
    if not 0 <= num_shared < total_experts:
        raise ValueError(
            f"num_shared: expected 0 <= num_shared < {total_experts} (w13's experts; one routed "
            f"expert at least), got {num_shared}"
        )
    if slots - num_shared < 1:
        raise ValueError(
            f"ids: expected topk + num_shared columns with topk >= 1, got {slots} columns for "
            f"num_shared={num_shared}"
        )
    if tokens and not _capturing(hidden):
        _check_ids(ids, total_experts, num_shared)


def _capturing(tensor: torch.Tensor) -> bool:
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def _check_ids(ids: torch.Tensor, total_experts: int, num_shared: int) -> None:
    values = ids.long()
    bad = (values < 0) | (values >= total_experts)
    if bool(bad.any()):
        token, slot = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"ids: expected expert ids in [0, {total_experts}) (experts + shared), got "
            f"{int(values[token, slot])} at token {token} slot {slot}"
        )
    if num_shared:
        routed = ids.shape[1] - num_shared
        first_shared = total_experts - num_shared
        expected = torch.arange(first_shared, total_experts, device=ids.device).expand(ids.shape[0], num_shared)
        wrong = values[:, routed:] != expected
        if bool(wrong.any()):
            token, col = (int(i) for i in wrong.nonzero()[0])
            raise ValueError(
                f"ids: the last num_shared={num_shared} columns must hold the shared experts "
                f"{first_shared}..{total_experts - 1} in order; token {token} slot {routed + col} "
                f"holds {int(values[token, routed + col])}, expected {first_shared + col}"
            )


# ------------------------------------------------------------------------- inputs


def _randn(shape: tuple[int, ...], std: float, dtype: torch.dtype, gen: torch.Generator, device: Any) -> torch.Tensor:
    """N(0, std^2) drawn in ``dtype`` on ``device`` slab by slab (no fp32 copy of a
    multi-GB weight tensor)."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if out.numel() == 0:
        return out
    flat = out.view(shape[0], -1)
    rows = max(1, (1 << 26) // max(1, flat.shape[1]))
    for start in range(0, shape[0], rows):
        stop = min(shape[0], start + rows)
        flat[start:stop] = torch.randn(
            (stop - start, flat.shape[1]), generator=gen, device=device, dtype=torch.float32
        ).mul_(std).to(dtype)
    return out


def make_routing(tokens: int, experts: int, topk: int, shared: int, gen: torch.Generator, device: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights fp32 [T, k+S], ids int32 [T, k+S]): top-k of a softmax over N(0, 1)
    logits, renormalised over the k picks (distinct experts per token), then shared
    slot s with id E + s and weight sigmoid(N(0, 1))."""
    logits = torch.randn(tokens, experts, generator=gen, device=device)
    probs = torch.softmax(logits, dim=-1)
    top_w, top_ids = torch.topk(probs, topk, dim=-1)
    top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    shared_w = torch.sigmoid(torch.randn(tokens, shared, generator=gen, device=device))
    shared_ids = torch.arange(experts, experts + shared, device=device).expand(tokens, shared)
    weights = torch.cat([top_w, shared_w], dim=1).float().contiguous()
    ids = torch.cat([top_ids, shared_ids], dim=1).to(torch.int32).contiguous()
    return weights, ids


def make_inputs(features: Mapping[str, Any], device: Any, seed: int) -> tuple[tuple, dict]:
    """Fresh inputs at realistic scales: hidden ~ N(0, 1) (post-norm activations),
    w13 ~ N(0, 1/H), w2 ~ N(0, 1/I) (std 1/sqrt(fan_in), so every stage is O(1)),
    routing from :func:`make_routing`. Drawn on ``device`` from a generator seeded with
    ``seed``: the same seed gives the same inputs on the same device type."""
    tokens, experts = int(features["tokens"]), int(features["experts"])
    shared, topk = int(features["shared"]), int(features["topk"])
    hidden_size, inter = int(features["hidden"]), int(features["inter"])
    dtype = DTYPES[features["dtype"]]
    if topk > experts:
        raise ValueError(f"topk: make_inputs picks distinct routed experts, so topk <= experts = {experts}; got {topk}")
    gen = torch.Generator(device=device).manual_seed(int(seed))
    hidden = _randn((tokens, hidden_size), 1.0, dtype, gen, device)
    w13 = _randn((experts + shared, 2 * inter, hidden_size), hidden_size**-0.5, dtype, gen, device)
    w2 = _randn((experts + shared, hidden_size, inter), inter**-0.5, dtype, gen, device)
    weights, ids = make_routing(tokens, experts, topk, shared, gen, device)
    return (hidden, w13, w2, weights, ids), {"activation": "silu", "num_shared": shared}


def make_nonfinite_inputs(features: Mapping[str, Any], device: Any, seed: int) -> tuple[tuple, dict]:
    """:func:`make_inputs` with NaN planted where a kernel must carry it through: one
    element of token 0's hidden row (that whole output row must be NaN) and, from two
    tokens on, one gate weight of the expert in the last token's first slot (every
    token routed there must come out NaN)."""
    (hidden, w13, w2, weights, ids), kwargs = make_inputs(features, device, seed)
    tokens = hidden.shape[0]
    if tokens:
        hidden[0, hidden.shape[1] // 2] = float("nan")
    if tokens >= 2:
        expert = int(ids[-1, 0])
        w13[expert, 0, hidden.shape[1] - 1] = float("nan")
    return (hidden, w13, w2, weights, ids), kwargs


# ---------------------------------------------------------------------- tolerance

# Per dtype: largest per-row relative L2 error, and largest element error as a fraction
# of the row's RMS. The reference is fp32 math; a bf16 kernel rounds at about four
# places (gate/up, activation, each slot's output, the sum), each adding about one unit
# roundoff u (bf16 2^-9, fp16 2^-11) of relative error, so ~10u per row leaves margin
# while a dropped slot (>= 5% of a row at realistic routing weights) still fails. fp32
# kernels must compute in IEEE fp32 (TF32 alone gives ~5e-4 and fails).
ROW_RTOL = {"bf16": 2e-2, "fp16": 5e-3, "fp32": 1e-4}
ELEM_RTOL = {"bf16": 1e-1, "fp16": 2.5e-2, "fp32": 1e-3}


def compare(outputs: Any, ref_outputs: Any, features: Mapping[str, Any]) -> Comparison:
    """Row relative L2 error and element error (over the row RMS) within the dtype's
    bounds (``ROW_RTOL``/``ELEM_RTOL``); NaN exactly where the reference has NaN (never
    a finite value for a NaN, never a NaN for a finite value), infinities equal."""
    out, ref = outputs, ref_outputs
    dtype = DTYPES.get(features["dtype"])
    expected_shape = (int(features["tokens"]), int(features["hidden"]))
    if not isinstance(out, torch.Tensor):
        return Comparison(False, {}, f"expected a tensor, got {type(out).__name__}")
    if out.dtype != dtype or tuple(out.shape) != expected_shape:
        return Comparison(
            False, {}, f"output {tuple(out.shape)} {out.dtype}, expected {expected_shape} {dtype}"
        )
    got = out.detach().float()
    want = ref.detach().float().to(got.device)
    got_nan, want_nan = torch.isnan(got), torch.isnan(want)
    missing_nan = int((want_nan & ~got_nan).sum())
    extra_nan = int((got_nan & ~want_nan).sum())
    want_inf = torch.isinf(want)
    inf_mismatch = int((want_inf & (got != want)).sum()) + int((torch.isinf(got) & ~want_inf).sum())
    finite_rows = torch.isfinite(want).all(dim=1) & torch.isfinite(got).all(dim=1)
    g, w = got[finite_rows], want[finite_rows]
    metrics: dict[str, float] = {
        "nan_missing": missing_nan,
        "nan_extra": extra_nan,
        "inf_mismatch": inf_mismatch,
        "max_row_rel_err": 0.0,
        "mean_row_rel_err": 0.0,
        "max_elem_err": 0.0,
    }
    if g.numel():
        diff = g - w
        row_norm = w.norm(dim=1)
        # Floor for (near-)zero rows: a thousandth of the typical row norm.
        floor = max(float(row_norm.median()) * 1e-3, torch.finfo(torch.float32).tiny)
        row_rel = diff.norm(dim=1) / row_norm.clamp_min(floor)
        row_rms = (row_norm / math.sqrt(w.shape[1])).clamp_min(floor / math.sqrt(w.shape[1]))
        elem = (diff.abs() / row_rms.unsqueeze(1)).amax(dim=1)
        metrics["max_row_rel_err"] = float(row_rel.max())
        metrics["mean_row_rel_err"] = float(row_rel.mean())
        metrics["max_elem_err"] = float(elem.max())
    name = features["dtype"]
    if missing_nan:
        return Comparison(False, metrics, f"{missing_nan} element(s) finite where the reference is NaN")
    if extra_nan:
        return Comparison(False, metrics, f"{extra_nan} NaN element(s) where the reference is finite (unwritten or bad math)")
    if inf_mismatch:
        return Comparison(False, metrics, f"{inf_mismatch} infinite element(s) differ from the reference")
    if metrics["max_row_rel_err"] > ROW_RTOL[name]:
        return Comparison(False, metrics, f"row relative error {metrics['max_row_rel_err']:.3g} > {ROW_RTOL[name]:g} ({name})")
    if metrics["max_elem_err"] > ELEM_RTOL[name]:
        return Comparison(False, metrics, f"element error {metrics['max_elem_err']:.3g} of the row RMS > {ELEM_RTOL[name]:g} ({name})")
    return Comparison(True, metrics, "")


# -------------------------------------------------------------- compile & tuning


def fake(
    hidden: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    ids: torch.Tensor,
    activation: str = "silu",
    num_shared: int = 0,
) -> torch.Tensor:
    """An empty [T, H] output in hidden's dtype (meta implementation for torch.compile)."""
    return torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)


def next_power_of_two(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def bucket(features: Mapping[str, Any]) -> dict[str, Any]:
    """Tokens rounded up to a power of two; every other feature exact."""
    out = dict(features)
    out["tokens"] = next_power_of_two(int(features["tokens"]))
    return out


def expected_experts_hit(tokens: int, experts: int, topk: int, shared: int) -> float:
    """Distinct experts whose weights a call reads, expected under uniform routing: each
    token picks k of E routed experts at random, so a routed expert is missed by all T
    tokens with probability (1 - k/E)^T; the S shared experts are always hit (T >= 1).
    Never more than E + S."""
    if tokens <= 0:
        return 0.0
    routed = experts * (1.0 - (1.0 - min(topk, experts) / experts) ** tokens)
    return routed + shared


def roofline(features: Mapping[str, Any], platform: Platform) -> Roofline:
    """Bytes: the weights of the experts hit (:func:`expected_experts_hit` x 3HI
    elements: gate, up, down), hidden read and output written once, weights and ids
    read once. FLOPs: 2 T (k + S) 3 H I (gate, up and down GEMMs of every slot)."""
    tokens, experts = int(features["tokens"]), int(features["experts"])
    shared, topk = int(features["shared"]), int(features["topk"])
    hidden_size, inter = int(features["hidden"]), int(features["inter"])
    elem = torch.finfo(DTYPES[features["dtype"]]).bits // 8
    hit = expected_experts_hit(tokens, experts, topk, shared)
    weight_bytes = hit * 3 * hidden_size * inter * elem
    activation_bytes = 2 * tokens * hidden_size * elem + tokens * (topk + shared) * 8
    flops = 2.0 * tokens * (topk + shared) * 3 * hidden_size * inter
    return Roofline(bytes=float(weight_bytes + activation_bytes), flops=float(flops))
