"""Training sweeps and held-out shape ranges of ``benchmarks/decision_quality.py``, per op.

Each op has a training sweep (what ``tune`` measures) and ranges from which held-out
shapes are drawn (seeded, at run time; never a training shape). The full training sweeps
step the bucketed features by 4x (tokens 1, 4, 16, ...), the quick ones by 8x, so held-out
shapes land both in tuned buckets and in buckets between them, where a decision borrows
from the nearest tuned bucket (or falls to priority when none is within
``KERNMUX_NEAREST_MAX``). Ranges follow real models:

- ``moe_topk_softmax``: router logits of Qwen3-30B-A3B (128 experts, top-8), DeepSeek-V2
  (160, top-6) and DeepSeek-V3 (256, top-8), bf16, renormalized; 1..16384 tokens.
- ``indexer_logits``: the DeepSeek-V3.2 indexer (64 heads of 128, fp8 keys, 64-token
  pages); 1..128 requests, contexts 512..32768, one or two queries per request (MTP).
- ``sparse_mla_decode``: DeepSeek-V3.2 sparse MLA decode (top-2048, d_qk 576, d_v 512,
  bf16 cache); 1..256 requests, 16..128 heads per rank (TP 8..1).
- ``moe_experts``: Qwen3-30B-A3B experts (H 2048, I 768, 128 experts, top-8) and
  DeepSeek-V2-Lite's (H 2048, I 1408, 64 experts, top-6, 2 shared); 1..8192 tokens.
- ``mxfp4_linear``: gpt-oss-120b attention projections (qkv: N 5120, K 2880; o: N 2880,
  K 4096), with bias; 1..8192 tokens.

``smoke``: tiny CPU shapes for the Triton interpreter (one op, seconds per candidate).
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kernmux.dispatch.registry import REGISTRY

MODES = ("smoke", "quick", "full")
# --quick: three ops in about four minutes of GPU time.
QUICK_OPS = ("moe_topk_softmax", "indexer_logits", "sparse_mla_decode")
FULL_OPS = ("moe_topk_softmax", "indexer_logits", "sparse_mla_decode", "moe_experts", "mxfp4_linear")
SMOKE_OPS = ("moe_topk_softmax",)


@dataclass(frozen=True)
class OpPlan:
    """What to tune and where to test one op.

    train: the training sweep (features without ``device``).
    draw(rng): one held-out shape (features without ``device``).
    kernels: kernels to tune and time (None: every available one).
    held_out: how many held-out shapes to draw by default.
    trials: tuning budget per training shape (measurements)."""

    op: str
    train: tuple[Mapping[str, Any], ...]
    draw: Callable[[random.Random], dict[str, Any]]
    kernels: tuple[str, ...] | None = None
    held_out: int = 8
    trials: int = 30
    notes: tuple[str, ...] = field(default_factory=tuple)


def log_uniform(rng: random.Random, lo: int, hi: int) -> int:
    """An integer in [lo, hi], uniform in log2 (as many 1..2 as 1024..2048)."""
    return max(lo, min(hi, round(2 ** rng.uniform(math.log2(lo), math.log2(hi)))))


def _grid(fixed: Mapping[str, Any], **axes: Sequence[Any]) -> tuple[dict[str, Any], ...]:
    names = list(axes)
    out = []
    for values in itertools.product(*(axes[n] for n in names)):
        feats = dict(fixed)
        for name, value in zip(names, values):
            if isinstance(value, Mapping):  # a model: several features at once
                feats.update(value)
            else:
                feats[name] = value
        out.append(feats)
    return tuple(out)


# ----------------------------------------------------------------------- per op

TOPK_FIXED = {"shared": 0, "dtype": "bf16", "renormalize": True, "padding": False}
TOPK_MODELS = ({"experts": 128, "topk": 8}, {"experts": 160, "topk": 6}, {"experts": 256, "topk": 8})

INDEXER_FIXED = {"heads": 64, "head_dim": 128, "block_size": 64}

MLA_FIXED = {"qlen": 1, "topk": 2048, "extra_topk": 0, "d_qk": 576, "d_v": 512, "kv_dtype": "bf16", "sink": False}

EXPERTS_MODELS = (
    {"experts": 128, "topk": 8, "shared": 0, "hidden": 2048, "inter": 768},   # Qwen3-30B-A3B
    {"experts": 64, "topk": 6, "shared": 2, "hidden": 2048, "inter": 1408},   # DeepSeek-V2-Lite
)
MXFP4_SHAPES = ({"n": 5120, "k": 2880}, {"n": 2880, "k": 4096})  # gpt-oss-120b qkv, o


def _topk(mode: str) -> OpPlan:
    if mode == "smoke":
        fixed = {"experts": 8, "topk": 2, "shared": 0, "dtype": "fp32", "renormalize": False, "padding": False}
        return OpPlan("moe_topk_softmax", _grid(fixed, tokens=(1, 16)),
                      lambda rng: {**fixed, "tokens": rng.randint(2, 12)},
                      kernels=("torch", "triton"), held_out=3, trials=3)
    if mode == "quick":
        model = {"experts": 256, "topk": 8}
        return OpPlan("moe_topk_softmax", _grid({**TOPK_FIXED, **model}, tokens=(1, 8, 64, 512, 4096)),
                      lambda rng: {**TOPK_FIXED, **rng.choice(TOPK_MODELS[1:]), "tokens": log_uniform(rng, 1, 8192)},
                      kernels=("torch", "triton"), held_out=4, trials=6,
                      notes=("torch_compile left out: it compiles for seconds per new shape",))
    return OpPlan("moe_topk_softmax",
                  _grid(TOPK_FIXED, model=(TOPK_MODELS[0], TOPK_MODELS[2]), tokens=(1, 4, 16, 64, 256, 1024, 4096, 16384)),
                  lambda rng: {**TOPK_FIXED, **rng.choice(TOPK_MODELS), "tokens": log_uniform(rng, 1, 16384)},
                  held_out=12, trials=30)


def _indexer(mode: str) -> OpPlan:
    if mode == "quick":
        return OpPlan("indexer_logits", _grid({**INDEXER_FIXED, "next_n": 1}, batch=(1, 8, 64), context=(1024, 8192)),
                      lambda rng: {**INDEXER_FIXED, "next_n": rng.choice((1, 2)), "batch": log_uniform(rng, 1, 128),
                                   "context": log_uniform(rng, 512, 16384)},
                      held_out=4, trials=6)
    return OpPlan("indexer_logits", _grid({**INDEXER_FIXED, "next_n": 1}, batch=(1, 4, 16, 64), context=(1024, 4096, 16384)),
                  lambda rng: {**INDEXER_FIXED, "next_n": rng.choice((1, 2)), "batch": log_uniform(rng, 1, 128),
                               "context": log_uniform(rng, 512, 32768)},
                  held_out=12, trials=30)


def _mla(mode: str) -> OpPlan:
    if mode == "quick":
        return OpPlan("sparse_mla_decode", _grid(MLA_FIXED, batch=(1, 8, 64), heads=(16, 128)),
                      lambda rng: {**MLA_FIXED, "batch": log_uniform(rng, 1, 128), "heads": rng.choice((16, 32, 64, 128))},
                      held_out=4, trials=6)
    return OpPlan("sparse_mla_decode", _grid(MLA_FIXED, batch=(1, 4, 16, 64, 256), heads=(16, 64, 128)),
                  lambda rng: {**MLA_FIXED, "batch": log_uniform(rng, 1, 256), "heads": rng.choice((16, 32, 64, 128))},
                  held_out=12, trials=30)


def _experts(mode: str) -> OpPlan:
    return OpPlan("moe_experts",
                  _grid({"dtype": "bf16"}, model=EXPERTS_MODELS, tokens=(1, 8, 64, 512, 4096)),
                  lambda rng: {"dtype": "bf16", **rng.choice(EXPERTS_MODELS), "tokens": log_uniform(rng, 1, 8192)},
                  held_out=10, trials=30)


def _mxfp4(mode: str) -> OpPlan:
    return OpPlan("mxfp4_linear",
                  _grid({"dtype": "bf16", "bias": True}, shape=MXFP4_SHAPES, tokens=(1, 8, 64, 512, 4096)),
                  lambda rng: {"dtype": "bf16", "bias": True, **rng.choice(MXFP4_SHAPES), "tokens": log_uniform(rng, 1, 8192)},
                  held_out=10, trials=30)


PLANS: dict[str, Callable[[str], OpPlan]] = {
    "moe_topk_softmax": _topk,
    "indexer_logits": _indexer,
    "sparse_mla_decode": _mla,
    "moe_experts": _experts,
    "mxfp4_linear": _mxfp4,
}


def default_ops(mode: str) -> tuple[str, ...]:
    """The ops a mode benchmarks by default (those registered in this installation)."""
    names = {"smoke": SMOKE_OPS, "quick": QUICK_OPS, "full": FULL_OPS}[mode]
    known = {op.name for op in REGISTRY.all_ops()}
    return tuple(n for n in names if n in known)


def plan_for(op: str, mode: str) -> OpPlan:
    if op not in PLANS:
        raise SystemExit(f"no decision-quality plan for op {op!r}; plans: {', '.join(PLANS)}")
    if mode == "smoke" and op not in SMOKE_OPS:
        raise SystemExit(f"--smoke covers {', '.join(SMOKE_OPS)} only")
    return PLANS[op](mode)


def draw_held_out(plan: OpPlan, seed: int, count: int, *, attempts: int = 10_000) -> list[dict[str, Any]]:
    """``count`` distinct shapes from ``plan.draw``, none equal to a training shape, from a
    generator seeded by (seed, op): the same seed gives the same shapes on any machine."""
    rng = random.Random(f"{seed}:{plan.op}")
    train = {_key(f) for f in plan.train}
    shapes: list[dict[str, Any]] = []
    seen: set[str] = set()
    for _ in range(attempts):
        if len(shapes) == count:
            break
        feats = plan.draw(rng)
        key = _key(feats)
        if key in train or key in seen:
            continue
        seen.add(key)
        shapes.append(feats)
    return shapes


def _key(feats: Mapping[str, Any]) -> str:
    return repr(sorted(feats.items()))
