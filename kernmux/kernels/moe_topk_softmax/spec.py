"""What ``moe_topk_softmax`` is besides its reference: features, argument checks, inputs,
tolerance, fake outputs, tuning bucket and roofline."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch

from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import Comparison, FeatureSpec, Roofline
from kernmux.kernels.moe_topk_softmax.reference import moe_topk_softmax as reference  # noqa: F401 - part of the spec

OP_NAME = "moe_topk_softmax"
DOC = (
    "MoE routing: softmax over routed experts (fp32), top-k with ties to the lower "
    "index, optional renormalisation, shared-expert slots E+s weighted sigmoid(logit)."
)

MAX_SHARED = 8

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}

FEATURE_SPECS = (
    FeatureSpec("tokens", "int", "T, rows of gating_logits", 7, minimum=0),
    FeatureSpec("experts", "int", "E, routed experts (columns minus num_shared)", 160, minimum=1),
    FeatureSpec("topk", "int", "k, routed experts picked per token", 6, minimum=1),
    FeatureSpec("shared", "int", "S, shared-expert gate columns appended as slots", 0,
                choices=tuple(range(MAX_SHARED + 1))),
    FeatureSpec("dtype", "str", "dtype of gating_logits", "bf16", choices=tuple(DTYPES)),
    FeatureSpec("renormalize", "bool", "renormalise the k routed weights to sum 1", False),
    FeatureSpec("padding", "bool", "an is_padding mask is given (padded rows get id -1)", False),
)

# The acceptance grid: tokens 1 and odd, two non-power-of-two expert counts (160 and
# 288 > 256), both shared settings, every dtype, both renormalisation modes.
SWEEP_DEFAULTS: dict[str, tuple[Any, ...]] = {
    "tokens": (1, 7),
    "experts": (160, 288),
    "topk": (6, 8),
    "shared": (0, 2),
    "dtype": ("fp32", "bf16", "fp16"),
    "renormalize": (False, True),
}


def features(
    gating_logits: torch.Tensor, topk: int, renormalize: bool = False, num_shared: int = 0,
    is_padding: Optional[torch.Tensor] = None,
) -> dict[str, Any]:
    """Shapes and flags only (cheap). Never raises on malformed arguments: those get
    placeholder values here and a precise error from :func:`validate`."""
    shape = tuple(getattr(gating_logits, "shape", ()))
    tokens, width = shape if len(shape) == 2 else (-1, -1)
    dtype = getattr(gating_logits, "dtype", None)
    device = getattr(gating_logits, "device", None)
    return {
        "tokens": int(tokens),
        "experts": int(width) - num_shared if width >= 0 and isinstance(num_shared, int) else -1,
        "topk": topk,
        "shared": num_shared,
        "dtype": _DTYPE_NAMES.get(dtype, str(dtype)),
        "renormalize": renormalize,
        "padding": is_padding is not None,
        "device": getattr(device, "type", str(device)),
    }


def check_features(features: Mapping[str, Any]) -> None:
    """What :func:`validate` rejects beyond each feature's own bounds: topk > experts."""
    if features["topk"] > features["experts"]:
        raise ValueError(f"topk: expected 1 <= topk <= experts = {features['experts']}, got {features['topk']}")


def _check_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__} {value!r}")


def validate(
    gating_logits: torch.Tensor, topk: int, renormalize: bool = False, num_shared: int = 0,
    is_padding: Optional[torch.Tensor] = None,
) -> None:
    """Raise TypeError/ValueError naming the argument, what was expected and what was got.

    Zero tokens are a valid call (an engine's empty batch: empty outputs); a zero-width
    logits tensor is not (no routed expert)."""
    if not isinstance(gating_logits, torch.Tensor):
        raise TypeError(f"gating_logits: expected a torch.Tensor, got {type(gating_logits).__name__}")
    if gating_logits.dim() != 2:
        raise ValueError(
            "gating_logits: expected a 2-D tensor [tokens, experts + num_shared], "
            f"got shape {tuple(gating_logits.shape)}"
        )
    if gating_logits.dtype not in _DTYPE_NAMES:
        raise TypeError(
            f"gating_logits: expected dtype float32, bfloat16 or float16, got {gating_logits.dtype}"
        )
    _check_int("topk", topk)
    _check_int("num_shared", num_shared)
    if not isinstance(renormalize, bool):
        raise TypeError(f"renormalize: expected a bool, got {type(renormalize).__name__} {renormalize!r}")
    if not 0 <= num_shared <= MAX_SHARED:
        raise ValueError(f"num_shared: expected 0 <= num_shared <= {MAX_SHARED}, got {num_shared}")
    width = gating_logits.shape[1]
    experts = width - num_shared
    if experts < 1:
        raise ValueError(
            f"gating_logits: expected at least num_shared + 1 = {num_shared + 1} columns "
            f"(one routed expert), got {width}"
        )
    if not 1 <= topk <= experts:
        raise ValueError(f"topk: expected 1 <= topk <= experts = {experts}, got {topk}")
    if is_padding is not None:
        if not isinstance(is_padding, torch.Tensor):
            raise TypeError(f"is_padding: expected a torch.Tensor or None, got {type(is_padding).__name__}")
        if is_padding.dtype != torch.bool:
            raise TypeError(f"is_padding: expected dtype torch.bool, got {is_padding.dtype}")
        if tuple(is_padding.shape) != (gating_logits.shape[0],):
            raise ValueError(
                f"is_padding: expected shape [tokens] = [{gating_logits.shape[0]}], got {list(is_padding.shape)}"
            )
        if is_padding.device != gating_logits.device:
            raise ValueError(f"is_padding: expected device {gating_logits.device} (gating_logits'), got {is_padding.device}")


# ---------------------------------------------------------------------------- inputs


def _tie_free_grid() -> torch.Tensor:
    """Every bfloat16 value v with 1/16 <= |v| < 8 (1792 values), ascending.

    All are exact in fp16 and fp32 too, so a draw from this grid means the same numbers
    in every dtype. Neighbours differ by at least 2^-11, which keeps their exp() apart in
    fp32: distinct grid values never tie after the softmax.
    """
    mantissas = torch.arange(128, 256, dtype=torch.float64)
    positive = torch.cat([mantissas * 2.0 ** (exp - 7) for exp in range(-4, 3)])
    return torch.cat([-positive.flip(0), positive]).to(torch.float32)


_GRID = _tie_free_grid()


def make_inputs(features: Mapping[str, Any], device: Any, seed: int) -> tuple[tuple, dict]:
    """Fresh logits without ties among the routed experts of a row.

    Each row holds E distinct values from :func:`_tie_free_grid` (one random subset per
    call, a fresh random permutation per row); shared-gate columns are N(0, 1). With
    ``padding``, an ``is_padding`` mask marks about a third of the rows (the last one
    always, the first never, when there are two or more).
    """
    tokens, experts = int(features["tokens"]), int(features["experts"])
    shared, topk = int(features["shared"]), int(features["topk"])
    dtype = DTYPES[features["dtype"]]
    if experts > _GRID.numel():
        raise ValueError(f"experts: make_inputs draws tie-free rows for at most {_GRID.numel()} experts")
    gen = torch.Generator().manual_seed(int(seed))
    subset = _GRID[torch.randperm(_GRID.numel(), generator=gen)[:experts]]
    order = torch.rand(tokens, experts, generator=gen).argsort(dim=1)
    routed = subset[order]
    gates = torch.randn(tokens, shared, generator=gen)
    logits = torch.cat([routed, gates], dim=1).to(dtype).to(device)
    kwargs: dict[str, Any] = {"renormalize": bool(features["renormalize"]), "num_shared": shared}
    if features.get("padding", False):
        pad = torch.rand(tokens, generator=gen) < 0.3
        if tokens >= 2:
            pad[0], pad[-1] = False, True
        kwargs["is_padding"] = pad.to(device)
    return (logits, topk), kwargs


def make_nonfinite_inputs(features: Mapping[str, Any], device: Any, seed: int) -> tuple[tuple, dict]:
    """:func:`make_inputs` with non-finite logits planted, one case per row (as many
    rows as there are; the rest stay finite): a NaN routed logit, a +inf routed logit,
    all routed logits -inf (these three rows have NaN weights and ids 0..k-1), half the
    routed logits -inf (a finite answer: they rank last with probability 0), a NaN
    shared gate and an infinite shared gate (sigmoid 0 or 1)."""
    (logits, topk), kwargs = make_inputs(features, device, seed)
    tokens, experts, shared = int(features["tokens"]), int(features["experts"]), int(features["shared"])
    gen = torch.Generator().manual_seed(int(seed) + 1)
    cols = torch.randint(0, experts, (2,), generator=gen).tolist()
    nan, inf = float("nan"), float("inf")
    logits = logits.clone()
    cases = [
        lambda row: row[cols[0]].fill_(nan),
        lambda row: row[cols[1]].fill_(inf),
        lambda row: row[:experts].fill_(-inf),
        lambda row: row[: experts // 2].fill_(-inf),
    ]
    if shared:
        cases.append(lambda row: row[experts].fill_(nan))
        cases.append(lambda row: row[experts + shared - 1].fill_(-inf if shared == 1 else inf))
    for index, plant in enumerate(cases[:tokens]):
        plant(logits[index])
    return (logits, topk), kwargs


# ------------------------------------------------------------------------ tolerance

WEIGHT_RTOL = 1e-5


def compare(outputs: Any, ref_outputs: Any, features: Mapping[str, Any]) -> Comparison:
    """Ids identical to the reference's; weights within 1e-5 relative; a NaN weight
    passes only where the reference has one (the op's non-finite rule), and a finite
    weight where the reference has NaN fails."""
    weights, ids = outputs
    ref_w, ref_ids = ref_outputs
    expected_shape = (int(features["tokens"]), int(features["topk"]) + int(features["shared"]))
    problems = []
    if weights.dtype != torch.float32 or ids.dtype != torch.int32:
        problems.append(f"dtypes (weights {weights.dtype}, ids {ids.dtype}), expected float32/int32")
    if tuple(weights.shape) != expected_shape or tuple(ids.shape) != expected_shape:
        problems.append(
            f"shapes (weights {tuple(weights.shape)}, ids {tuple(ids.shape)}), expected {expected_shape}"
        )
    if problems:
        return Comparison(False, {}, "; ".join(problems))
    w = weights.detach().double().cpu()
    rw = ref_w.detach().double().cpu()
    got_ids = ids.detach().cpu().long()
    want_ids = ref_ids.detach().cpu().long()
    got_nan, want_nan = torch.isnan(w), torch.isnan(rw)
    extra_nan = int((got_nan & ~want_nan).sum())
    missing_nan = int((want_nan & ~got_nan).sum())
    mismatched = got_ids != want_ids
    id_mismatches = int(mismatched.sum())
    both = ~got_nan & ~want_nan
    denom = rw.abs().clamp_min(torch.finfo(torch.float32).tiny)
    rel = torch.where(both, (w - rw).abs() / denom, torch.zeros_like(w))
    rel = rel.nan_to_num(nan=float("inf"))  # inf - inf
    max_rel = float(rel.max()) if rel.numel() else 0.0
    metrics = {
        "max_rel_err": max_rel,
        "id_mismatches": id_mismatches,
        "nan_weights": int(got_nan.sum()),
        "nan_unexpected": extra_nan,
        "nan_missing": missing_nan,
    }
    if extra_nan:
        return Comparison(False, metrics, f"{extra_nan} NaN weight(s) where the reference is finite (unwritten output or bad math)")
    if missing_nan:
        return Comparison(False, metrics, f"{missing_nan} finite weight(s) where the reference is NaN (a NaN input turned into a finite answer)")
    if id_mismatches:
        row, col = (int(i) for i in mismatched.nonzero()[0])
        return Comparison(
            False,
            metrics,
            f"{id_mismatches} id(s) differ from the reference; first at token {row} slot {col}: "
            f"got {int(got_ids[row, col])}, expected {int(want_ids[row, col])}",
        )
    if max_rel > WEIGHT_RTOL:
        return Comparison(False, metrics, f"weights: max relative error {max_rel:.3g} > {WEIGHT_RTOL:g}")
    return Comparison(True, metrics, "")


# ----------------------------------------------------------------- compile & tuning


def fake(
    gating_logits: torch.Tensor, topk: int, renormalize: bool = False, num_shared: int = 0,
    is_padding: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Empty outputs with the real shapes/dtypes (meta implementation for torch.compile)."""
    tokens = gating_logits.shape[0]
    shape = (tokens, topk + num_shared)
    device = gating_logits.device
    return (
        torch.empty(shape, dtype=torch.float32, device=device),
        torch.empty(shape, dtype=torch.int32, device=device),
    )


def _next_power_of_two(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def bucket(features: Mapping[str, Any]) -> dict[str, Any]:
    """Tokens rounded up to a power of two; every other feature exact."""
    out = dict(features)
    out["tokens"] = _next_power_of_two(int(features["tokens"]))
    return out


def roofline(features: Mapping[str, Any], platform: Platform) -> Roofline:
    """Bytes: logits read once, weights + ids written once. FLOPs (approximate): per
    routed logit a subtract, an exp, an add and one compare per pick; 4 per shared gate."""
    tokens, experts = int(features["tokens"]), int(features["experts"])
    topk, shared = int(features["topk"]), int(features["shared"])
    elem = torch.finfo(DTYPES[features["dtype"]]).bits // 8
    bytes_moved = tokens * (experts + shared) * elem + tokens * (topk + shared) * 8
    flops = tokens * (experts * (3 + topk) + 4 * shared)
    return Roofline(bytes=float(bytes_moved), flops=float(flops))
