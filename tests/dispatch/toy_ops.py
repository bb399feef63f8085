"""Test-only ops for the engine: a small attention op with a head axis and an LSE output
(so transforms act on real semantics) and a weighted head-sum op (zero padding, "sum").

Registered into the global registry under names prefixed ``toy_`` with test-only kernels.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from kernmux.dispatch.outputs import empty_output
from kernmux.dispatch.registry import (
    REGISTRY,
    SUPPORTED,
    Comparison,
    FeatureSpec,
    HeadAxes,
    Op,
    Roofline,
    register_kernel,
    register_op,
    unsupported,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def toy_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sink: Optional[torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, H, D], k [B, N, D], v [B, N, Dv], sink [H] or None -> (o [B, H, Dv], lse [B, H]).

    Softmax attention of every head over the same N keys; the sink adds exp(sink[h]) to
    the denominator (o shrinks) but is excluded from the returned lse."""
    scores = torch.einsum("bhd,bnd->bhn", q.float(), k.float()) * scale
    lse = torch.logsumexp(scores, dim=-1)
    o = torch.einsum("bhn,bnd->bhd", torch.softmax(scores, dim=-1), v.float())
    if sink is not None:
        o = o / (1 + torch.exp(sink.float()[None, :] - lse))[..., None]
    return o.to(q.dtype), lse


def _features(q, k, v, sink, scale):
    return {
        "batch": q.shape[0],
        "heads": q.shape[1],
        "keys": k.shape[1],
        "dim": q.shape[2],
        "sink": sink is not None,
        "dtype": {v: k for k, v in DTYPES.items()}.get(q.dtype, str(q.dtype)),
        "device": q.device.type,
    }


def _validate(q, k, v, sink, scale):
    if not isinstance(q, torch.Tensor) or q.dim() != 3:
        raise ValueError(f"q: expected a 3-D tensor [B, H, D], got {getattr(q, 'shape', type(q).__name__)}")
    if q.dtype not in DTYPES.values():
        raise TypeError(f"q: expected dtype float32 or bfloat16, got {q.dtype}")
    if k.dim() != 3 or k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"k: expected [B={q.shape[0]}, N, D={q.shape[2]}], got {list(k.shape)}")
    if sink is not None and tuple(sink.shape) != (q.shape[1],):
        raise ValueError(f"sink: expected [H={q.shape[1]}], got {list(sink.shape)}")


def _make_inputs(features, device, seed):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    b, h, n, d = features["batch"], features["heads"], features["keys"], features["dim"]
    dtype = DTYPES[features["dtype"]]
    q = torch.randn(b, h, d, generator=gen).to(device=device, dtype=dtype)
    k = torch.randn(b, n, d, generator=gen).to(device=device, dtype=dtype)
    v = torch.randn(b, n, d, generator=gen).to(device=device, dtype=dtype)
    sink = torch.randn(h, generator=gen).to(device) if features["sink"] else None
    return (q, k, v, sink, 1 / math.sqrt(d)), {}


def _compare(out, ref, features):
    o, lse = out
    ro, rlse = ref
    if torch.isnan(o).any() or torch.isnan(lse).any():
        return Comparison(False, {"nan": 1.0}, "NaN in output")
    tol = 1e-5 if features["dtype"] == "fp32" else 2e-2
    err_o = (o.float() - ro.float()).abs().max().item()
    err_lse = (lse - rlse).abs().max().item()
    ok = err_o <= tol and err_lse <= 1e-4
    return Comparison(ok, {"max_abs_err_o": err_o, "max_abs_err_lse": err_lse}, "" if ok else "error above tolerance")


def _fake(q, k, v, sink, scale):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[2]), q.new_empty(q.shape[0], q.shape[1], dtype=torch.float32)


TOY_ATTENTION = Op(
    name="toy_attention",
    doc="Test-only attention with a head axis and an LSE output.",
    reference=toy_attention,
    feature_specs=(
        FeatureSpec("batch", "int", "batch", 2, minimum=1),
        FeatureSpec("heads", "int", "query heads", 8, minimum=1),
        FeatureSpec("keys", "int", "keys per query", 16, minimum=1),
        FeatureSpec("dim", "int", "head dim", 8, minimum=1),
        FeatureSpec("sink", "bool", "attention sink present", False),
        FeatureSpec("dtype", "str", "q/k/v dtype", "fp32", choices=("fp32", "bf16")),
    ),
    features=_features,
    validate=_validate,
    make_inputs=_make_inputs,
    compare=_compare,
    fake=_fake,
    bucket=lambda f: dict(f),
    roofline=lambda f, p: Roofline(bytes=4.0 * f["batch"] * (2 * f["keys"] * f["dim"] + 2 * f["heads"] * f["dim"]), flops=4.0 * f["batch"] * f["heads"] * f["keys"] * f["dim"]),
    head_axes=HeadAxes(inputs={"q": (1, "tile"), "sink": (0, "tile")}, outputs={0: 1, 1: 1}),
)


def chunked_attention(q, k, v, sink, scale, *, config):
    """Online-softmax over key blocks of config['block'] (a second real implementation)."""
    block = config["block"]
    qf = q.float()
    m = torch.full(q.shape[:2], -math.inf, device=q.device)
    s = torch.zeros(q.shape[:2], device=q.device)
    acc = torch.zeros(q.shape[0], q.shape[1], v.shape[2], device=q.device)
    for start in range(0, k.shape[1], block):
        scores = torch.einsum("bhd,bnd->bhn", qf, k[:, start:start + block].float()) * scale
        m_new = torch.maximum(m, scores.amax(-1))
        p = torch.exp(scores - m_new[..., None])
        alpha = torch.exp(m - m_new)
        s = s * alpha + p.sum(-1)
        acc = acc * alpha[..., None] + torch.einsum("bhn,bnd->bhd", p, v[:, start:start + block].float())
        m = m_new
    lse = m + torch.log(s)
    o = acc / s[..., None]
    if sink is not None:
        o = o / (1 + torch.exp(sink.float()[None, :] - lse))[..., None]
    out = empty_output(o.shape, q.dtype, q.device)
    out.copy_(o)
    return out, lse


def _heads_multiple_of_16(features, platform):
    if features["heads"] % 16:
        return unsupported(f"heads={features['heads']} is not a multiple of 16")
    return SUPPORTED


def _at_most_32_heads(features, platform):
    if features["heads"] > 32:
        return unsupported(f"heads={features['heads']} > 32")
    return SUPPORTED


class FlakyError(RuntimeError):
    pass


CALLS: dict[str, int] = {}


def flaky_attention(q, k, v, sink, scale):
    """Raises whenever the batch is 3 (a kernel bug on some inputs), else correct."""
    CALLS["flaky"] = CALLS.get("flaky", 0) + 1
    if q.shape[0] == 3:
        raise FlakyError("simulated launch failure for batch=3")
    return toy_attention(q, k, v, sink, scale)


def register() -> None:
    if "toy_attention" in REGISTRY.ops:
        return
    register_op(TOY_ATTENTION)
    register_kernel(op="toy_attention", name="torch", impl=toy_attention, priority=0, test_only=True)
    register_kernel(
        op="toy_attention", name="chunked", impl=chunked_attention, priority=10, test_only=True,
        config_space={"block": (4, 8, 16)}, default_config={"block": 8},
    )
    register_kernel(op="toy_attention", name="wide", impl=toy_attention, priority=15, supports=_heads_multiple_of_16, test_only=True)
    register_kernel(op="toy_attention", name="narrow", impl=toy_attention, priority=14, supports=_at_most_32_heads, test_only=True)
    register_kernel(op="toy_attention", name="flaky", impl=flaky_attention, priority=5, test_only=True)
    register_kernel(
        op="toy_attention", name="vendorlib", impl=toy_attention, priority=30, test_only=True,
        vendors=("rocm",), requires={"fake-vendor-lib": ">=1.2"},
    )
