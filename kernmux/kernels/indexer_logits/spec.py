"""What ``indexer_logits`` needs besides its reference: features, validation, inputs,
tolerance, fake outputs, tuning bucket and roofline.

Tolerance (``compare``): ``-inf`` and NaN exactly where the reference has them; every
other entry within ``1e-3 * max(|ref|, rms of the row's finite reference entries)``. The row scale
is there because the head sum is signed (weights of either sign): an entry may cancel to
near zero while every term is large, and an fp32-accumulating kernel is then exact only
relative to the terms, not to the sum. NaN or +inf never passes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import Comparison, FeatureSpec, HeadAxes, Roofline
from kernmux.kernels.indexer_logits.reference import indexer_logits as reference  # noqa: F401 - part of the spec

OP_NAME = "indexer_logits"
DOC = (
    "DeepSeek DSA indexer: paged fp8 MQA logits, sum_h w[i,h] * relu(q[i,h] . k_j * s_j), "
    "-inf outside the causal context"
)
# Padding with zero-weight heads adds exact zeros; chunks of heads sum.
HEAD_AXES = HeadAxes(inputs={"q": (2, "zero"), "weights": (1, "zero")}, outputs={0: "sum"}, feature="heads")

REL_TOL = 1e-3

FEATURE_SPECS = (
    FeatureSpec("batch", "int", "requests in the batch (B)", 2),
    FeatureSpec("next_n", "int", "queries per request (1 + speculative tokens)", 1),
    FeatureSpec("heads", "int", "indexer query heads (H)", 64, maximum=128),
    FeatureSpec("head_dim", "int", "indexer head size (D)", 128),
    FeatureSpec("context", "int", "max_context: output width, upper bound of context_lens", 1000),
    FeatureSpec("block_size", "int", "tokens per page of the key cache", 64),
)

SWEEP_DEFAULTS = {
    "heads": (8, 16, 32, 64),
    "next_n": (1, 2),
    "context": (1, 63, 1000),
    "block_size": (16, 64),
}


def _fp8():
    import torch

    return torch.float8_e4m3fn


def features(q, k_cache, k_scale, weights, context_lens, block_table, max_context) -> dict[str, Any]:
    """Shapes only (no device synchronisation)."""
    return {
        "batch": int(q.shape[0]),
        "next_n": int(q.shape[1]),
        "heads": int(q.shape[2]),
        "head_dim": int(q.shape[3]),
        "context": int(max_context),
        "block_size": int(k_cache.shape[1]),
        "device": q.device.type,
    }


def validate(q, k_cache, k_scale, weights, context_lens, block_table, max_context) -> None:
    """Shapes, dtypes and devices; raises ValueError/TypeError naming the argument.

    Values (context lengths within ``max_context`` and the block table, page ids within
    the cache) are not checked here: that would synchronise the device on every new
    shape. The reference checks them.
    """
    import torch

    named = {"q": q, "k_cache": k_cache, "k_scale": k_scale, "weights": weights, "context_lens": context_lens, "block_table": block_table}
    for name, value in named.items():
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"indexer_logits: {name} must be a torch.Tensor, got {type(value).__name__}")
    if not isinstance(max_context, int) or isinstance(max_context, bool) or max_context < 1:
        raise ValueError(f"indexer_logits: max_context must be a positive int, got {max_context!r}")
    expect_dtype = {"q": _fp8(), "k_cache": _fp8(), "k_scale": torch.float32, "weights": torch.float32, "context_lens": torch.int32, "block_table": torch.int32}
    for name, dtype in expect_dtype.items():
        if named[name].dtype != dtype:
            raise TypeError(f"indexer_logits: {name} must be {dtype}, got {named[name].dtype}")
    expect_dim = {"q": 4, "k_cache": 3, "k_scale": 2, "weights": 2, "context_lens": 1, "block_table": 2}
    for name, dim in expect_dim.items():
        if named[name].dim() != dim:
            raise ValueError(f"indexer_logits: {name} must be {dim}-D, got shape {tuple(named[name].shape)}")
    batch, next_n, heads, head_dim = q.shape
    num_blocks, block_size, k_dim = k_cache.shape
    if min(batch, next_n, heads, head_dim) < 1:
        raise ValueError(f"indexer_logits: q [B, next_n, H, D] must have no empty dimension, got {tuple(q.shape)}")
    if k_dim != head_dim:
        raise ValueError(f"indexer_logits: k_cache [num_blocks, block_size, D] must have D = q.shape[3] = {head_dim}, got {tuple(k_cache.shape)}")
    if num_blocks < 1 or block_size < 1:
        raise ValueError(f"indexer_logits: k_cache must hold at least one page of at least one token, got {tuple(k_cache.shape)}")
    if tuple(k_scale.shape) != (num_blocks, block_size):
        raise ValueError(f"indexer_logits: k_scale must be [num_blocks, block_size] = {[num_blocks, block_size]}, got {list(k_scale.shape)}")
    if tuple(weights.shape) != (batch * next_n, heads):
        raise ValueError(f"indexer_logits: weights must be [B*next_n, H] = {[batch * next_n, heads]}, got {list(weights.shape)}")
    if tuple(context_lens.shape) != (batch,):
        raise ValueError(f"indexer_logits: context_lens must be [B] = [{batch}], got {list(context_lens.shape)}")
    if block_table.shape[0] != batch or block_table.shape[1] < 1:
        raise ValueError(f"indexer_logits: block_table must be [B, max_blocks] with B = {batch}, max_blocks >= 1, got {list(block_table.shape)}")
    for name, value in named.items():
        if value.device != q.device:
            raise ValueError(f"indexer_logits: {name} is on {value.device}, q is on {q.device}; all tensors must share a device")


def make_inputs(feats: Mapping[str, Any], device: Any, seed: int) -> tuple[tuple, dict]:
    """Fresh random inputs. The key cache is a view of a page-fused uint8 buffer (the
    layout engines keep), pages are scattered over the cache in random order, context
    lengths differ per request (the longest equals ``context``), and every cache byte
    no request may read (unused pages, slots past a context) holds NaN, so a kernel
    that reads outside the context fails instead of passing by luck."""
    import torch

    from kernmux.kernels.indexer_logits.layout import split_page_layout

    batch, next_n, heads = feats["batch"], feats["next_n"], feats["heads"]
    head_dim, context, block_size = feats["head_dim"], feats["context"], feats["block_size"]
    gen = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, context + 1, (batch,), generator=gen)
    lens[int(torch.randint(0, batch, (1,), generator=gen))] = context
    max_blocks = -(-context // block_size) + 1  # one spare column that no context reaches
    pages_per_req = [-(-int(n) // block_size) for n in lens]
    spare = 2
    num_blocks = sum(pages_per_req) + spare
    order = torch.randperm(num_blocks, generator=gen)
    poison_page = int(order[-1])
    block_table = torch.full((batch, max_blocks), poison_page, dtype=torch.int32)
    used = 0
    for b, count in enumerate(pages_per_req):
        block_table[b, :count] = order[used : used + count].to(torch.int32)
        used += count

    keys = torch.randn(num_blocks, block_size, head_dim, generator=gen)
    amax = keys.abs().amax(dim=-1).clamp_min(1e-4)
    scales = amax / 448.0
    k_fp8 = (keys / scales[..., None]).to(_fp8())
    readable = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    for b, n in enumerate(lens.tolist()):
        for m in range(pages_per_req[b]):
            readable[int(block_table[b, m]), : min(block_size, n - m * block_size)] = True
    k_fp8.view(torch.uint8)[~readable] = 0x7F  # e4m3fn NaN
    scales[~readable] = float("nan")

    fused = torch.empty(num_blocks, block_size * (head_dim + 4), dtype=torch.uint8)
    fused[:, : block_size * head_dim] = k_fp8.view(torch.uint8).view(num_blocks, -1)
    fused[:, block_size * head_dim :] = scales.contiguous().view(torch.uint8).view(num_blocks, -1)
    k_cache, k_scale = split_page_layout(fused.view(num_blocks, block_size, 1, head_dim + 4).to(device), head_dim)

    q = torch.randn(batch, next_n, heads, head_dim, generator=gen).to(_fp8()).to(device)
    weights = (torch.randn(batch * next_n, heads, generator=gen) * heads**-0.5).to(device)
    context_lens = lens.to(torch.int32).to(device)
    return (q, k_cache, k_scale, weights, context_lens, block_table.to(device), context), {}


def make_nonfinite_inputs(feats: Mapping[str, Any], device: Any, seed: int) -> tuple[tuple, dict]:
    """:func:`make_inputs` with NaN planted where the reference defines the result: one
    weight of the first output row (the whole in-context row turns NaN) and the scale
    of an in-context position of the last request (that position turns NaN in each of
    its rows that reaches it). NaN fp8 bytes (q or keys) are not drawn here: Triton's
    interpreter decodes e4m3fn 0x7F as 480, so those cases run on the GPU only
    (tests/kernels/test_gpu_paths.py)."""
    args, kwargs = make_inputs(feats, device, seed)
    q, k_cache, k_scale, weights, context_lens, block_table, max_context = args
    weights = weights.clone()
    weights[0, weights.shape[1] // 2] = float("nan")
    batch, block_size = q.shape[0], k_cache.shape[1]
    ctx = int(context_lens[batch - 1])
    position = ctx // 2
    page = int(block_table[batch - 1, position // block_size])
    k_scale[page, position % block_size] = float("nan")  # a view of the fused buffer: set in place
    return (q, k_cache, k_scale, weights, context_lens, block_table, max_context), kwargs


def _as_tensor(outputs: Any):
    if isinstance(outputs, (tuple, list)):
        if len(outputs) != 1:
            raise ValueError(f"expected one output, got {len(outputs)}")
        return outputs[0]
    return outputs


def compare(outputs: Any, reference: Any, feats: Mapping[str, Any]) -> Comparison:
    """-inf pattern exact, NaN exactly where the reference has NaN (the op's NaN rule),
    other finite entries within REL_TOL of max(|ref|, row rms)."""
    import torch

    got, ref = _as_tensor(outputs), _as_tensor(reference)
    if tuple(got.shape) != tuple(ref.shape):
        return Comparison(False, {}, f"shape {tuple(got.shape)} != reference {tuple(ref.shape)}")
    if got.dtype != torch.float32:
        return Comparison(False, {}, f"dtype {got.dtype} != float32")
    got, ref = got.detach().to("cpu", torch.float64), ref.detach().to("cpu", torch.float64)
    got_nan, ref_nan = torch.isnan(got), torch.isnan(ref)
    nan_extra = int((got_nan & ~ref_nan).sum())
    nan_missing = int((ref_nan & ~got_nan).sum())
    ref_ninf = torch.isneginf(ref)
    inf_mismatch = int((torch.isneginf(got) != ref_ninf).sum())
    posinf = int(torch.isposinf(got).sum())
    finite = ~ref_ninf & ~ref_nan
    ref_f = torch.where(finite, ref, 0.0)
    count = finite.sum(dim=1, keepdim=True).clamp_min(1)
    row_rms = (ref_f.square().sum(dim=1, keepdim=True) / count).sqrt()
    scale = torch.maximum(ref_f.abs(), row_rms).clamp_min(torch.finfo(torch.float32).tiny)
    err = torch.where(finite & torch.isfinite(got), (got - ref_f).abs() / scale, 0.0)
    max_rel = float(err.max()) if err.numel() else 0.0
    metrics = {
        "max_rel_err": max_rel,
        "nan": float(got_nan.sum()),
        "nan_unexpected": float(nan_extra),
        "nan_missing": float(nan_missing),
        "posinf": float(posinf),
        "ninf_mismatch": float(inf_mismatch),
        "finite_entries": float(finite.sum()),
    }
    problems = []
    if nan_extra:
        problems.append(f"{nan_extra} NaN entries where the reference is finite")
    if nan_missing:
        problems.append(f"{nan_missing} entries not NaN where the reference is NaN (a NaN input turned into a number)")
    if posinf:
        problems.append(f"{posinf} +inf entries")
    if inf_mismatch:
        rows, cols = (torch.isneginf(got) != ref_ninf).nonzero()[0].tolist()
        problems.append(f"{inf_mismatch} entries differ in being -inf (first at row {rows}, position {cols})")
    if max_rel > REL_TOL or math.isnan(max_rel):
        row, col = divmod(int(err.argmax()), err.shape[1])
        problems.append(f"max relative error {max_rel:.3g} > {REL_TOL} at row {row}, position {col} (got {float(got[row, col]):.6g}, ref {float(ref[row, col]):.6g})")
    return Comparison(not problems, metrics, "; ".join(problems))


def fake(q, k_cache, k_scale, weights, context_lens, block_table, max_context):
    import torch

    return torch.empty((q.shape[0] * q.shape[1], max_context), dtype=torch.float32, device=q.device)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def bucket(feats: Mapping[str, Any]) -> dict[str, Any]:
    """Batch and context rounded up to powers of two; the rest exact."""
    out = dict(feats)
    out["batch"] = _pow2_ceil(feats["batch"])
    out["context"] = _pow2_ceil(feats["context"])
    return out


def roofline(feats: Mapping[str, Any], platform: Platform) -> Roofline:
    """Every request at full ``context``: keys + scales read once, q/weights/table read,
    logits written. FLOPs: the q.k products plus relu/scale/weighted sum."""
    batch, next_n, heads = feats["batch"], feats["next_n"], feats["heads"]
    head_dim, context, block_size = feats["head_dim"], feats["context"], feats["block_size"]
    rows = batch * next_n
    keys = batch * context * (head_dim + 4)
    table = batch * (-(-context // block_size)) * 4 + batch * 4
    small = rows * heads * (head_dim + 4)
    out = rows * context * 4
    flops = 2.0 * rows * heads * head_dim * context + 4.0 * rows * heads * context
    return Roofline(bytes=float(keys + table + small + out), flops=flops)
