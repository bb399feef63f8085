"""sparse_mla_decode: reference semantics, fp8 layout, validation, value checks, NaN
rules, tolerance, the Triton kernel, the parity harness and the head transforms.

Kernel tests run on the ``device`` fixture (the GPU when present, else CPU with Triton's
interpreter); tests of the reference's math against a float64 loop, the fp8 codec,
validation and the comparison are CPU-only by nature."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from kernmux.dispatch.outputs import poisoned_outputs
from kernmux.dispatch.registry import REGISTRY
from kernmux.dispatch.verify import verify_kernel
from kernmux.kernels.sparse_mla_decode import parity, spec
from kernmux.kernels.sparse_mla_decode.compare import compare
from kernmux.kernels.sparse_mla_decode.fp8 import dequantize_rows, fp8_row_bytes, quantize_kv
from kernmux.kernels.sparse_mla_decode.inputs import build_inputs
from kernmux.kernels.sparse_mla_decode.reference import sparse_mla_decode as reference

OP = "sparse_mla_decode"
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def feats(**kw):
    base = REGISTRY.op(OP).default_features(kw.pop("device", "cpu"))
    base.update(batch=4, heads=4, topk=40, extra_topk=0, sink=False)
    base.update(kw)
    return base


def inputs(seed=0, **kw):
    return REGISTRY.op(OP).make_inputs(feats(**kw), "cpu", seed)


# --------------------------------------------------------------------------- reference


def _naive(q, caches, index_sets, sm_scale, d_v, sink):
    """Per (query, head) in float64, one scope at a time, merged with the LSE formula."""
    batch, s_q, heads, d_qk = q.shape
    o = torch.zeros(batch, s_q, heads, d_v, dtype=torch.float64)
    lse = torch.full((batch, s_q, heads), float("inf"), dtype=torch.float64)
    for b in range(batch):
        for t in range(s_q):
            for h in range(heads):
                parts = []
                for cache, idx in zip(caches, index_sets):
                    rows = [int(i) for i in idx[b, t] if i >= 0]
                    if not rows:
                        parts.append((None, float("-inf")))
                        continue
                    block = cache.shape[1]
                    kv = torch.stack([cache[i // block, i % block] for i in rows])
                    kv = dequantize_rows(kv, d_qk, d_v).double() if cache.dtype == torch.uint8 else kv.double()
                    s = kv @ q[b, t, h].double() * sm_scale
                    part_lse = torch.logsumexp(s, 0).item()
                    parts.append((torch.softmax(s, 0) @ kv[:, :d_v], part_lse))
                total = -math.inf
                for _, part_lse in parts:
                    total = max(total, part_lse) if total == -math.inf else float(torch.logaddexp(torch.tensor(total), torch.tensor(part_lse)))
                if total == -math.inf:
                    continue
                out = sum(math.exp(pl - total) * po for po, pl in parts if po is not None)
                if sink is not None:
                    out = out / (1.0 + math.exp(float(sink[h]) - total))
                o[b, t, h] = out
                lse[b, t, h] = total
    return o, lse


@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8"])
@pytest.mark.parametrize("extra_topk", [0, 24])
@pytest.mark.parametrize("sink", [False, True])
def test_reference_matches_per_scope_lse_merge(kv_dtype, extra_topk, sink):
    (q, kv, idx, scale, d_v), kw = inputs(seed=11, kv_dtype=kv_dtype, extra_topk=extra_topk, sink=sink, qlen=2, batch=3, heads=3)
    o, lse = reference(q, kv, idx, scale, d_v, **kw)
    caches, index_sets = [kv], [idx]
    if extra_topk:
        caches.append(kw["extra_kv_cache"])
        index_sets.append(kw["extra_indices"])
    want_o, want_lse = _naive(q, caches, index_sets, scale, d_v, kw["attn_sink"])
    assert torch.equal(torch.isinf(lse), torch.isinf(want_lse))
    finite = torch.isfinite(want_lse)
    torch.testing.assert_close(lse[finite].double(), want_lse[finite], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(o.double(), want_o.to(torch.bfloat16).double(), rtol=1e-2, atol=1e-2)


def test_reference_empty_queries_and_nan_slots():
    (q, kv, idx, scale, d_v), kw = inputs(seed=3, extra_topk=16, sink=True)
    # the generated caches hold NaN in unreferenced slots, slot 0 among them
    assert torch.isnan(kv[0]).all() and torch.isnan(kw["extra_kv_cache"][0]).all()
    o, lse = reference(q, kv, idx, scale, d_v, **kw)
    empty = (idx < 0).all(-1) & (kw["extra_indices"] < 0).all(-1)  # [B, s_q]
    assert empty.any() and (~empty).any()
    assert torch.isposinf(lse[empty]).all() and (o[empty] == 0).all()
    assert torch.isfinite(lse[~empty]).all() and not torch.isnan(o).any()


def test_reference_only_second_scope():
    (q, kv, idx, scale, d_v), kw = inputs(seed=4, extra_topk=16)
    # make_inputs leaves query 0 with no main-scope slot and query 1 with no second-scope slot
    assert (idx[0, 0] < 0).all() and (kw["extra_indices"][1, 0] < 0).all()
    o, lse = reference(q, kv, idx, scale, d_v, **kw)
    only_extra = reference(q[:1], kw["extra_kv_cache"], kw["extra_indices"][:1], scale, d_v)
    torch.testing.assert_close(lse[:1], only_extra[1])
    torch.testing.assert_close(o[:1], only_extra[0])


# --------------------------------------------------------------------------- fp8 layout


@pytest.mark.parametrize("d_qk,d_v,row", [(576, 512, 656), (512, 512, 528), (640, 512, 784)])
def test_fp8_row_bytes(d_qk, d_v, row):
    assert fp8_row_bytes(d_qk, d_v) == row


def test_fp8_layout_round_trip():
    torch.manual_seed(0)
    kv = (torch.randn(3, 8, 576) * torch.tensor([0.01, 1.0, 30.0]).view(3, 1, 1)).to(torch.bfloat16)
    packed = quantize_kv(kv, 512, pad_block=1)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 8, 656)
    assert packed.stride() == (9 * 656, 656, 1)  # one padding row per block
    scales = packed[..., 512:528].contiguous().view(torch.float32)
    assert torch.equal(scales, torch.exp2(torch.log2(scales).round()))  # powers of two
    rope = packed[..., 528:].contiguous().view(torch.bfloat16)
    assert torch.equal(rope, kv[..., 512:])  # rope kept bit-exact
    back = dequantize_rows(packed, 576, 512)
    latent = kv[..., :512].float()
    # e4m3: 3 mantissa bits -> relative error <= 2^-4 per element (tile amax at 448)
    err = (back[..., :512] - latent).abs() / latent.abs().amax(-1, keepdim=True)
    assert err.max() < 2**-4
    # dequantised values are exact in bf16 and survive a second quantisation unchanged
    assert torch.equal(back.to(torch.bfloat16).float(), back)
    assert torch.equal(dequantize_rows(quantize_kv(back.to(torch.bfloat16), 512), 576, 512), back)


def test_fp8_needs_d_v_multiple_of_128():
    with pytest.raises(ValueError, match="multiple of 128"):
        fp8_row_bytes(576, 500)


# --------------------------------------------------------------------------- op contract


def test_features_bucket_roofline():
    args, kw = inputs(seed=0, extra_topk=24, sink=True, kv_dtype="fp8", batch=3, topk=40)
    got = spec.features(*args, **kw)
    assert got == feats(extra_topk=24, sink=True, kv_dtype="fp8", batch=3, topk=40)
    assert spec.bucket(got) == {**{k: v for k, v in got.items() if k != "device"}, "batch": 4, "topk": 64, "extra_topk": 32}
    roof = spec.roofline(feats(batch=32, heads=64, topk=2048), None)
    # notes/performance.md: B=32 bandwidth floor ~26 us at 2.96 TB/s (rows + q/o)
    assert 25.0 < roof.bytes / 2.96e6 < 28.0
    assert roof.flops == 2 * 32 * 64 * 2048 * (576 + 512)


@pytest.mark.parametrize(
    "mutate,exc,match",
    [
        (lambda a, k: (a[0].float(), *a[1:]), TypeError, "q dtype"),
        (lambda a, k: (a[0], a[1][..., :-1], *a[2:]), ValueError, "kv_cache row"),
        (lambda a, k: (a[0], a[1], a[2].long(), *a[3:]), TypeError, "indices dtype"),
        (lambda a, k: (a[0], a[1], a[2][:, :, :0], *a[3:]), ValueError, "indices shape"),
        (lambda a, k: (*a[:4], 600), ValueError, "d_v"),
    ],
)
def test_validate_names_the_argument(mutate, exc, match):
    args, kw = inputs()
    spec.validate(*args, **kw)
    with pytest.raises(exc, match=match):
        spec.validate(*mutate(args, kw), **kw)


def test_validate_scopes_and_sink():
    args, kw = inputs(extra_topk=8, sink=True)
    with pytest.raises(ValueError, match="both given or both None"):
        spec.validate(*args, **{**kw, "extra_indices": None})
    with pytest.raises(ValueError, match="attn_sink shape"):
        spec.validate(*args, **{**kw, "attn_sink": kw["attn_sink"][:-1]})
    fp8_args, _ = inputs(kv_dtype="fp8")
    with pytest.raises(TypeError, match="extra_kv_cache dtype"):
        spec.validate(*args, **{**kw, "extra_kv_cache": fp8_args[1]})
    bad = quantize_kv(torch.zeros(2, 4, 576, dtype=torch.bfloat16), 512)[..., :-4]
    with pytest.raises(ValueError, match="fp8 row bytes"):
        spec.validate(args[0], bad, *args[2:])


@pytest.mark.parametrize("kv_dtype", ["bf16", "fp8"])
def test_validate_rejects_empty_caches_and_dims(kv_dtype):
    """An empty cache used to reach the Triton kernel (a segfault): now a ValueError
    naming the argument."""
    args, kw = inputs(kv_dtype=kv_dtype, extra_topk=8)
    q, kv, idx = args[:3]
    for empty in (kv[:0], kv[:, :0]):
        with pytest.raises(ValueError, match="kv_cache shape"):
            spec.validate(q, empty, *args[2:], **kw)
    with pytest.raises(ValueError, match="extra_kv_cache shape"):
        spec.validate(*args, **{**kw, "extra_kv_cache": kw["extra_kv_cache"][:0]})
    for dim in range(4):
        narrow = q.narrow(dim, 0, 0)
        with pytest.raises(ValueError, match="q shape"):
            spec.validate(narrow, *args[1:], **kw)


def test_empty_kv_cache_through_kernmux_ops_is_a_value_error(device):
    import kernmux.ops

    args, kw = REGISTRY.op(OP).make_inputs(feats(), device, 1)
    with pytest.raises(ValueError, match="kv_cache"):
        kernmux.ops.sparse_mla_decode(args[0], args[1][:0], *args[2:], **kw)


@pytest.mark.parametrize("kernel", ["torch", pytest.param("triton", marks=needs_triton)])
def test_index_range_check_is_opt_in(device, kernel, monkeypatch):
    """KERNMUX_CHECK_VALUES=1: an index past the cache is a ValueError naming the entry,
    from every kernel, before any gather."""
    args, kw = REGISTRY.op(OP).make_inputs(feats(extra_topk=8), device, 2)
    slots = args[1].shape[0] * args[1].shape[1]
    bad = args[2].clone()
    bad[1, 0, 3] = slots
    fn = REGISTRY.kernels_of(OP)[kernel].bind(None)
    monkeypatch.setenv("KERNMUX_CHECK_VALUES", "1")
    with pytest.raises(ValueError, match=r"indices\[1, 0, 3\] = %d" % slots):
        fn(args[0], args[1], bad, *args[3:], **kw)
    extra = kw["extra_indices"].clone()
    extra[0, 0, 0] = 10**6
    with pytest.raises(ValueError, match="extra_indices"):
        fn(*args, **{**kw, "extra_indices": extra})
    fn(*args, **kw)  # valid inputs pass the check


NAN_CASES = [
    (dict(heads=16, topk=64, extra_topk=16, sink=True, batch=3), {}),
    (dict(heads=16, topk=64, extra_topk=16, sink=True, batch=3), {"SPLITS": 3, "N_BLOCK": 16}),
    (dict(heads=5, topk=50, sink=True, kv_dtype="fp8", batch=4), {"FP8_MODE": 0, "SPLITS": 2}),
    (dict(heads=5, topk=50, kv_dtype="fp8", batch=4, extra_topk=16), {"FP8_MODE": 1}),
    (dict(heads=5, topk=50, sink=True, kv_dtype="fp8", batch=4), {"FP8_MODE": 2, "SPLITS": 1}),
    (dict(heads=64, topk=50, extra_topk=16, sink=True, batch=3), {"LAYOUT": 2, "SPLITS": 2}),
    (dict(heads=20, topk=45, extra_topk=16, qlen=2, batch=2), {"LAYOUT": 3, "SPLITS": 3}),
]


@pytest.mark.parametrize("kernel", ["torch", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("case,config", NAN_CASES)
def test_nan_inputs_give_nan_rows(device, kernel, case, config):
    """NaN in q, in a selected row (latent, fp8 scale, rope) or in the sink: the reference
    makes those rows NaN and so must every kernel (Triton used to return o = 0 and
    lse = +inf there, "no valid slot"). Queries without a valid slot stay o = 0, +inf."""
    op = REGISTRY.op(OP)
    f = feats(device=device, **case)
    args, kw = op.make_nonfinite_inputs(f, device, 21)
    expected = op.reference(*args, **kw)
    with poisoned_outputs():
        got = REGISTRY.kernels_of(OP)[kernel].bind(config if kernel == "triton" else None)(*op.positional(args, kw))
    result = op.compare(got, expected, f)
    assert result.passed, (result.detail, result.metrics)
    assert result.metrics["nan_rows_expected"] > 0 and result.metrics["rows_empty"] > 0


def test_reference_nan_rules():
    args, kw = inputs(seed=3, heads=4, extra_topk=8, sink=True)
    q, kv, idx = args[0].clone(), args[1].clone(), args[2]
    flat = idx.view(-1, idx.shape[-1])
    query = next(i for i in range(flat.shape[0]) if (flat[i] >= 0).any())
    q.view(-1, 4, q.shape[-1])[query, 2, 0] = float("nan")
    o, lse = reference(q, kv, *args[2:], **kw)
    o, lse = o.view(-1, 4, o.shape[-1]), lse.view(-1, 4)
    assert torch.isnan(lse[query, 2]) and torch.isnan(o[query, 2]).all()
    assert torch.isfinite(lse[query, [0, 1, 3]]).all()  # other heads untouched
    sink = kw["attn_sink"].clone()
    sink[1] = float("nan")
    o, lse = reference(*args, **{**kw, "attn_sink": sink})
    valid = torch.isfinite(lse)
    assert torch.isnan(o[..., 1, :][valid[..., 1]]).all() and not torch.isnan(lse).any()
    assert (o[~valid] == 0).all()  # rows without a valid slot stay exactly zero


def test_compare_catches_nan_wrong_empty_rows_and_noise():
    args, kw = inputs(seed=5, extra_topk=8)
    ref = reference(*args, **kw)
    assert compare(ref, ref, feats()).passed
    o, lse = ref[0].clone(), ref[1].clone()
    empty = torch.isposinf(lse)
    valid_b, valid_t, valid_h = torch.nonzero(~empty)[0]
    o[valid_b, valid_t, valid_h, 0] = float("nan")
    assert not compare((o, lse), ref, feats()).passed
    # the reverse: the reference's NaN row reported as finite (or as "no valid slot")
    nan_ref = (ref[0].clone(), ref[1].clone())
    nan_ref[0][valid_b, valid_t, valid_h] = float("nan")
    nan_ref[1][valid_b, valid_t, valid_h] = float("nan")
    result = compare(ref, nan_ref, feats())
    assert not result.passed and "finite where the reference is NaN" in result.detail
    assert compare(nan_ref, nan_ref, feats()).passed
    lse2 = lse.clone()
    lse2[empty] = 0.0
    result = compare((ref[0], lse2), ref, feats())
    assert not result.passed and "without a valid slot" in result.detail
    noisy = (ref[0].float() + 0.2 * ref[0].float().std() * torch.randn_like(ref[0].float())).to(torch.bfloat16)
    result = compare((noisy, lse), ref, feats())
    assert not result.passed and result.metrics["cos_mean"] < 0.999
    for key in ("cos_min", "cos_mean", "cos_max", "rel_err", "lse_max_abs_err", "norm_dev_mean", "norm_dev_max"):
        assert key in result.metrics
    # a 5% magnitude error keeps every cosine at 1: the norm check must catch it
    scaled = compare(((ref[0].float() * 1.05).to(torch.bfloat16), lse), ref, feats())
    assert scaled.metrics["cos_min"] > 0.9999 and not scaled.passed and "row norms" in scaled.detail


# --------------------------------------------------------------------------- triton


TRITON_CASES = [
    # (features, config) -- odd heads/topk, both scopes, sink, fp8 modes, splits, MTP, V4
    (dict(heads=7, topk=37), {}),
    (dict(heads=16, topk=64, extra_topk=24, sink=True), {"SPLITS": 3, "N_BLOCK": 16}),
    (dict(heads=20, topk=45, extra_topk=16, qlen=2, batch=2), {"SPLITS": 1}),
    (dict(heads=5, topk=50, extra_topk=16, sink=True, kv_dtype="fp8"), {"FP8_MODE": 0, "SPLITS": 2}),
    (dict(heads=5, topk=50, kv_dtype="fp8"), {"FP8_MODE": 1}),
    (dict(heads=5, topk=50, extra_topk=16, sink=True, kv_dtype="fp8"), {"FP8_MODE": 2, "SPLITS": 1}),
    (dict(heads=6, topk=33, d_qk=512, extra_topk=8, sink=True), {"H_BLOCK": 32}),
    # two-warpgroup layouts: the one-tile body (64-head programs over fewer heads, both
    # scopes, fp8 rows, no rope tail, one split) and the four-tile body with S split
    (dict(heads=40, topk=37), {"LAYOUT": 2}),
    (dict(heads=64, topk=50, extra_topk=16, sink=True, batch=2), {"LAYOUT": 2, "SPLITS": 2}),
    (dict(heads=5, topk=50, extra_topk=16, sink=True, kv_dtype="fp8"), {"LAYOUT": 2, "SPLITS": 1}),
    (dict(heads=6, topk=33, d_qk=512, extra_topk=8, sink=True), {"LAYOUT": 2, "N_BLOCK": 16}),
    (dict(heads=20, topk=45, extra_topk=16, qlen=2, batch=2), {"LAYOUT": 3, "SPLITS": 3}),
    (dict(heads=7, topk=40, kv_dtype="fp8"), {"LAYOUT": 3}),
]


@needs_triton
@pytest.mark.parametrize("case,config", TRITON_CASES)
def test_triton_matches_reference(device, case, config):
    result = verify_kernel(OP, "triton", feats(device=device, **case), seed=sum(map(ord, str(case))), config=config)
    assert result.status == "pass", (result.detail, result.metrics)
    assert result.metrics["rows_empty"] > 0  # empty queries were exercised and exact


@needs_triton
def test_triton_non_contiguous_q_and_padded_blocks(device):
    from kernmux.kernels.sparse_mla_decode.triton import sparse_mla_decode_triton

    (q, kv, idx, scale, d_v), kw = REGISTRY.op(OP).make_inputs(feats(heads=4, kv_dtype="fp8", extra_topk=8), device, 8)
    assert not kv.is_contiguous()  # fp8 caches come with a padded block stride
    wide = torch.zeros(q.shape[0], q.shape[1], 2 * q.shape[2], q.shape[3], dtype=q.dtype, device=device)
    wide[:, :, ::2] = q
    q_strided = wide[:, :, ::2]
    assert not q_strided.is_contiguous()
    ref = reference(q, kv, idx, scale, d_v, **kw)
    with poisoned_outputs():
        got = sparse_mla_decode_triton(q_strided, kv, idx, scale, d_v, **kw, config={"SPLITS": 2})
    assert compare(got, ref, feats(heads=4, kv_dtype="fp8", extra_topk=8)).passed


@needs_triton
def test_triton_layout_resolution():
    """The two-warpgroup layouts fix 64 heads on 8 warps; the automatic choice takes them
    for many (query, head) rows only; the wide layout's automatic split count stays
    within one wave of programs (the CPU counts as 4 units)."""
    from kernmux.kernels.sparse_mla_decode.config import LAYOUT_SPLIT_S, LAYOUT_TILES, LAYOUT_WIDE
    from kernmux.kernels.sparse_mla_decode.triton import resolve_config

    cpu = torch.device("cpu")
    forced = resolve_config({"LAYOUT": LAYOUT_SPLIT_S, "H_BLOCK": 16, "num_warps": 4}, 64, 32, 2048, cpu)
    assert (forced["H_BLOCK"], forced["num_warps"], forced["LAYOUT"]) == (64, 8, LAYOUT_SPLIT_S)
    assert resolve_config({}, 64, 8, 2048, cpu, "fp8")["LAYOUT"] == LAYOUT_WIDE
    assert resolve_config({}, 128, 128, 2048, cpu)["LAYOUT"] == LAYOUT_SPLIT_S
    assert resolve_config({}, 16, 128, 2048, cpu)["LAYOUT"] == LAYOUT_TILES
    assert resolve_config({}, 64, 1, 2048, cpu)["LAYOUT"] == LAYOUT_TILES
    # given tiles that are not the automatic ones keep the four-tile body
    assert resolve_config({"H_BLOCK": 32}, 64, 32, 2048, cpu)["LAYOUT"] == LAYOUT_TILES
    # 3 programs on 4 units: the wide layout keeps one wave (1 split), the others fill it (2)
    assert resolve_config({"LAYOUT": LAYOUT_WIDE}, 64, 3, 2048, cpu)["SPLITS"] == 1
    assert resolve_config({"LAYOUT": LAYOUT_SPLIT_S}, 64, 3, 2048, cpu)["SPLITS"] == 2


def test_triton_supports(monkeypatch):
    from kernmux.dispatch.platform import Platform

    kernel = REGISTRY.kernels_of(OP)["triton"]
    plat = Platform(vendor="cuda", arch="sm_90", device="H100", units=132)
    gpu = dict(device="cuda")
    assert kernel.check(feats(**gpu), plat).ok
    assert kernel.check(feats(d_v=256, d_qk=320, **gpu), plat).ok
    assert "d_v=500" in kernel.check(feats(d_v=500, **gpu), plat).reason
    assert "fp8 KV needs d_v = 512" in kernel.check(feats(kv_dtype="fp8", d_v=256, d_qk=320, **gpu), plat).reason
    assert "d_qk - d_v = 40" in kernel.check(feats(d_qk=552, **gpu), plat).reason
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernel.check(feats(), plat).ok
    monkeypatch.delenv("TRITON_INTERPRET")
    assert "TRITON_INTERPRET" in kernel.check(feats(), plat).reason


# --------------------------------------------------------------------------- parity + transforms


@needs_triton
def test_parity_seed_grid(device):
    """The seed's table (h_q 64/32/16 x one/two scopes x sink) at toy sizes, both kernels."""
    base = feats(batch=4, topk=20, device=device)
    rows = parity.parity_rows(parity.labelled_seed_grid(base, extra_topk=8), ["torch", "triton"], seed=1)
    assert len(rows) == 24 and all(r.passed for r in rows), [(r.label, r.kernel, r.detail) for r in rows if not r.passed]
    assert all(r.cos_mean > 0.999 and r.cos_min > 0.99 for r in rows)
    table = parity.format_parity(rows)
    assert "TP2 h_q=64 two scopes (+8) sink" in table and table.count("PASS") == 24


@needs_triton
def test_parity_extended_shapes(device):
    base = feats(batch=2, topk=20, device=device)
    rows = parity.parity_rows(parity.extended_grid(base, extra_topk=8), ["triton"], seed=2)
    labels = {r.label for r in rows}
    assert any("h_q=8" in label for label in labels) and any("h_q=128" in label for label in labels)
    assert any("topk=17" in label for label in labels) and any("d_qk=512" in label for label in labels)
    assert all(r.passed for r in rows), [(r.label, r.detail) for r in rows if not r.passed]


def test_transforms_exact_on_the_reference(device):
    """Bit-exact on CPU; on a GPU the wrapped reference calls must stay within tolerance
    (cuBLAS may pick other reduction orders for other head counts)."""
    rows = parity.transform_rows(feats(batch=3, topk=24, device=device), device=device, seed=5, extra_topk=8)
    assert {r.transform for r in rows} == {"split_heads=32", "pad_heads=16", "pad_heads=16, split_heads=32"}
    if device == "cpu":
        assert all(r.exact and r.close for r in rows), [(r.label, r.detail) for r in rows if not r.exact]
    else:
        assert all(r.close for r in rows), [(r.label, r.detail) for r in rows if not r.close]


def test_parity_flags_a_wrong_kernel():
    """The harness is not a rubber stamp: a kernel that ignores the sink fails it."""
    from kernmux.dispatch.registry import Kernel

    def no_sink(q, kv, idx, scale, d_v, extra_kv_cache=None, extra_indices=None, attn_sink=None):
        return reference(q, kv, idx, scale, d_v, extra_kv_cache, extra_indices, None)

    kernels = REGISTRY.kernels[OP]
    kernels["test_no_sink"] = Kernel(op=OP, name="test_no_sink", impl=no_sink, test_only=True)
    try:
        grid = [("sink", feats(sink=True, topk=64)), ("no sink", feats(sink=False, topk=64))]
        rows = {r.label: r for r in parity.parity_rows(grid, ["test_no_sink"], seed=3)}
        assert rows["no sink"].passed and not rows["sink"].passed
    finally:
        kernels.pop("test_no_sink")


def test_build_inputs_without_invalid_entries():
    (q, kv, idx, scale, d_v), kw = build_inputs(feats(extra_topk=8), "cpu", 0, invalid=False)
    assert (idx >= 0).all() and (kw["extra_indices"] >= 0).all()
    # slots are distinct within a query and never the NaN blocks
    flat = idx.view(-1, idx.shape[-1])
    assert all(len(set(row.tolist())) == row.numel() for row in flat)
    block = kv.shape[1]
    assert ((idx // block) != 0).all() and ((idx // block) != kv.shape[0] - 1).all()
