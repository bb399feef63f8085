"""indexer_logits through AITER: argument construction and gating (no AMD GPU here).

The AITER module is replaced by a stand-in (tests/kernels/stand_ins/) that reproduces
what the AITER wrappers do with their arguments; what runs on real MI300/MI355 hardware
stays unverified. Gating is checked through the resolver with the shipped rules.
CPU-only by nature (no ROCm here).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from kernmux.dispatch.outputs import poisoned_outputs
from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import REGISTRY
from kernmux.dispatch.resolver import resolve
from kernmux.kernels.indexer_logits import aiter as adapter
from kernmux.kernels.indexer_logits.reference import indexer_logits as reference
from kernmux.kernels.indexer_logits.spec import compare
from kernmux.rules.loader import load_rules

OP = "indexer_logits"
_STAND_IN = Path(__file__).parent / "stand_ins" / "indexer_aiter_pa_mqa_logits.py"


def _stand_in_module():
    spec = importlib.util.spec_from_file_location("indexer_aiter_pa_mqa_logits", _STAND_IN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


STAND_IN = _stand_in_module()


@pytest.fixture
def fake_aiter(monkeypatch):
    """Install a stand-in AITER of a given version; returns the module used."""

    def install(version: str = "0.1.12", flavour: str = "main", **options):
        options.setdefault("paged_stage1", flavour == "main" and version is not None and adapter.Version(version) >= adapter.STAGE1_PAGED_SINCE)
        module = STAND_IN.make_module(flavour, **options)
        monkeypatch.setattr(adapter, "load_module", lambda: module)
        monkeypatch.setattr(adapter, "lib_version", lambda dist: version if dist == "amd-aiter" else None)
        return module

    return install


def make(seed=0, **kw):
    feats = dict(batch=3, next_n=1, heads=32, head_dim=64, context=100, block_size=16, device="cpu")
    feats.update(kw)
    args, _ = REGISTRY.op(OP).make_inputs(feats, "cpu", seed)
    return feats, args


def run_aiter(args, config):
    full = REGISTRY.kernels_of(OP)["aiter"].full_config(config)
    with poisoned_outputs():
        return adapter.indexer_logits_aiter(*args, config=full)


def rocm(version: str | None = "0.1.12", arch: str = "gfx950") -> Platform:
    libs = {"torch": "2.9.0"}
    if version is not None:
        libs["amd-aiter"] = version
    return Platform(vendor="rocm", arch=arch, device="MI355X", units=256, libs=libs, what_if=True)


def decide(platform: Platform, **kw):
    feats = dict(batch=4, next_n=1, heads=64, head_dim=128, context=4096, block_size=64, device="cuda")
    feats.update(kw)
    return resolve(OP, feats, platform, load_rules(), force={})


# --------------------------------------------------------------------------- parity through the stand-in


@pytest.mark.parametrize("entry", ["stage1", "fused"])
@pytest.mark.parametrize("cache_layout", ["token", "page"])
@pytest.mark.parametrize("heads", [16, 32, 64])
@pytest.mark.parametrize("next_n", [1, 2])
@pytest.mark.parametrize("block_size", [16, 64])
def test_adapter_matches_reference(fake_aiter, entry, cache_layout, heads, next_n, block_size):
    fake_aiter("0.1.20")
    feats, args = make(seed=heads + next_n + block_size, heads=heads, next_n=next_n, block_size=block_size)
    # ChunkK=64 with context 100: the stage1 buffer must be padded to 128 columns.
    config = {"entry": entry, "layout": cache_layout, "ChunkQ": heads, "ChunkK": 64}
    got = run_aiter(args, config)
    result = compare(got, reference(*args), feats)
    assert result.passed, result.detail


def test_default_chunkq_divides_by_zero_and_the_rule_fixes_it(fake_aiter):
    """AITER's default ChunkQ=64 with 32 heads is ROCm/aiter#2563; the shipped rule's
    config makes the same call work."""
    fake_aiter("0.1.12")
    feats, args = make(heads=32)
    with pytest.raises(ZeroDivisionError):
        run_aiter(args, {})
    decision = decide(rocm("0.1.12"), heads=32, head_dim=64, block_size=16)
    assert decision.kernel == "aiter" and decision.config["ChunkQ"] == 32
    assert compare(run_aiter(args, dict(decision.config)), reference(*args), feats).passed


def test_v017_gets_no_chunkq_argument(fake_aiter):
    module = fake_aiter("0.1.7.post2.dev18", flavour="v017")
    feats, args = make(heads=64, next_n=2)
    assert compare(run_aiter(args, {}), reference(*args), feats).passed
    assert module.CALLS == [("stage1", {})]
    _, args16 = make(heads=16)
    with pytest.raises(AssertionError):  # 0.1.7 asserts heads % 32 == 0 (and reads e4m3fnuz) ...
        run_aiter(args16, {})
    for heads in (16, 64):  # ... so the rule keeps every such version away
        decision = decide(rocm("0.1.7.post2.dev18"), heads=heads)
        assert decision.kernel != "aiter"
        assert any(c.kernel == "aiter" and "aiter-indexer-before-0-1-7-post3" in c.reason for c in decision.candidates)


@pytest.mark.parametrize("version", ["0.1.7.post3", "0.1.7.post5", "0.1.8"])
def test_chunkq_is_passed_from_0_1_7_post3(fake_aiter, version):
    """stage1 takes ChunkQ/ChunkK from v0.1.7.post3: indexer with 32 heads gets ChunkQ=32."""
    module = fake_aiter(version)
    decision = decide(rocm(version), heads=32, head_dim=64, block_size=16)
    assert decision.kernel == "aiter" and decision.config["ChunkQ"] == 32
    assert "aiter-indexer-chunkq-heads" in dict(decision.rules)
    feats, args = make(heads=32)
    assert compare(run_aiter(args, dict(decision.config)), reference(*args), feats).passed
    assert module.CALLS[-1] == ("stage1", {"ChunkQ": 32, "ChunkK": 256})


def test_stage1_before_0_1_20_gets_the_token_layout(fake_aiter):
    """stage1 reads paged caches only from v0.1.20 (8abb3607e9): an older version gets the
    token layout whatever the config says; the stand-in asserts one token per page."""
    fake_aiter("0.1.19", paged_stage1=False)
    feats, args = make(heads=32, block_size=16)
    got = run_aiter(args, {"entry": "stage1", "layout": "page", "ChunkQ": 32, "ChunkK": 64})
    assert compare(got, reference(*args), feats).passed
    call = adapter.build_call(*args, config={"entry": "stage1", "layout": "page", "ChunkQ": 32, "ChunkK": 64}, aiter_version="0.1.19")
    assert call.args[1].shape[1] == 1 and any("token" in note for note in call.notes)


@pytest.mark.parametrize("entry", ["stage1", "fused"])
@pytest.mark.parametrize("next_n", [1, 2])
def test_nan_in_q_weights_and_scales_follows_the_reference(fake_aiter, entry, next_n):
    """AITER's relu (tl.maximum) turns NaN into 0 on the GPU, as the stand-in does; the
    adapter restores NaN for NaN in weights, k_scale and q, as the reference has it."""
    fake_aiter("0.1.20")
    feats = dict(batch=3, next_n=next_n, heads=32, head_dim=64, context=100, block_size=16, device="cpu")
    op = REGISTRY.op(OP)
    args, _ = op.make_nonfinite_inputs(feats, "cpu", 4)
    q = args[0].clone()
    q.view(torch.uint8)[2, 0, 5, 3] = 0x7F  # a NaN query value (e4m3fn), row 2 * next_n
    args = (q, *args[1:])
    expected = reference(*args)
    got = run_aiter(args, {"entry": entry, "ChunkQ": 32, "ChunkK": 64})
    result = compare(got, expected, feats)
    assert result.passed, result.detail
    assert result.metrics["nan"] > 0
    bare = STAND_IN.make_module("main")  # without the adapter's rule the NaN is lost
    call = adapter.build_call(*args, config={"entry": entry, "ChunkQ": 32, "ChunkK": 64, "layout": "token"}, aiter_version="0.1.20")
    assert not compare(call.run(bare), expected, feats).passed


# --------------------------------------------------------------------------- argument construction


def test_stage1_call_arguments():
    feats, args = make(heads=32, next_n=2, block_size=16, context=100)
    call = adapter.build_call(*args, config={"entry": "stage1", "ChunkQ": 32, "ChunkK": 64, "layout": "token"}, aiter_version="0.1.12")
    q, kv, weights, buffer, lens, table, max_context = call.args
    assert call.entry == "deepgemm_fp8_paged_mqa_logits_stage1"
    assert call.kwargs == {"ChunkQ": 32, "ChunkK": 64}
    assert kv.dtype == torch.uint8 and kv.shape[1:] == (1, 1, 64 + 4)
    assert buffer.shape == (32, 6, 128) and torch.isneginf(buffer).all()  # padded to whole chunks
    assert torch.isneginf(call.out).all() and call.out.shape == (6, 100)
    block_table = args[5]
    assert table.shape == (3, block_table.shape[1] * 16)
    assert torch.equal(table[:, 17], block_table[:, 1] * 16 + 1)  # page * block_size + slot
    assert any("packed" in note for note in call.notes)  # 16-token pages: token layout is a copy


def test_page_layout_passes_the_engine_buffer_without_copy():
    feats, args = make(block_size=64)
    call = adapter.build_call(*args, config={"entry": "fused", "ChunkK": 256, "layout": "page"}, aiter_version="0.1.21.post1")
    kv = call.args[1]
    assert kv.data_ptr() == args[1].data_ptr() and kv.shape == (args[1].shape[0], 64, 1, 68)
    assert call.kwargs == {"Preshuffle": False, "KVBlockSize": 64, "ChunkK": 256}
    assert call.args[5] is args[5] or torch.equal(call.args[5], args[5])
    assert not call.notes


def test_config_valid():
    valid = REGISTRY.kernels_of(OP)["aiter"].config_valid
    base = {"entry": "stage1", "ChunkQ": 64, "ChunkK": 256, "layout": "token"}
    f = dict(heads=64, block_size=64)
    assert valid(base, f)
    assert valid({**base, "ChunkQ": 16}, f)
    assert valid({**base, "ChunkQ": 128}, f)  # ChunkQ > heads: AITER's bug, left for the tuner to record
    assert not valid({**base, "ChunkQ": 64}, dict(heads=96, block_size=64))
    assert valid({**base, "layout": "page", "ChunkK": 64}, dict(heads=64, block_size=16))
    assert not valid({**base, "layout": "page", "ChunkK": 64}, dict(heads=64, block_size=48))


# --------------------------------------------------------------------------- gating


@pytest.mark.parametrize(
    "platform,feats,kernel,rule",
    [
        (rocm("0.1.12"), dict(heads=8), "torch", "aiter-indexer-heads-below-16"),
        (rocm("0.1.21.post1"), dict(heads=4, next_n=2), "torch", "aiter-indexer-heads-below-16"),
        (rocm("0.1.7.post2.dev18"), dict(heads=16), "torch", "aiter-indexer-before-0-1-7-post3"),
        (rocm("0.1.12"), dict(heads=64), "aiter", None),
        (rocm("0.1.7.post2.dev18"), dict(heads=64), "torch", "aiter-indexer-before-0-1-7-post3"),
        (rocm("0.1.7.post3"), dict(heads=8), "torch", "aiter-indexer-heads-below-16"),
        (rocm("0.1.7.post3"), dict(heads=64), "aiter", None),
    ],
    ids=["h8", "h4-0.1.21", "v017-h16", "h64", "v017-h64", "post3-h8", "post3-h64"],
)
def test_gating(platform, feats, kernel, rule):
    decision = decide(platform, **feats)
    assert decision.kernel == kernel
    if rule:
        aiter = next(c for c in decision.candidates if c.kernel == "aiter")
        assert aiter.status == "denied" and rule in aiter.reason


def test_chunkq_rule_sets_heads_for_16_to_63():
    for heads in (16, 32):
        decision = decide(rocm("0.1.12"), heads=heads)
        assert decision.kernel == "aiter" and decision.config["ChunkQ"] == heads
    assert decide(rocm("0.1.12"), heads=64).config["ChunkQ"] == 64  # AITER default, no rule


def test_no_sigfpe_rule_for_calls_without_preshuffle():
    """#5298 was reported for Preshuffle=True, WavePerEU=8; the adapter never preshuffles,
    so no rule pins ChunkK (a measured ChunkK=64 is allowed)."""
    decision = decide(rocm("0.1.21.post1"), heads=32, block_size=16)
    assert decision.kernel == "aiter" and decision.config["ChunkQ"] == 32
    assert not any("5298" in text or "sigfpe" in rid for rid, text in decision.rules)
    feats, args = make(heads=32, block_size=16)
    call = adapter.build_call(*args, config={"entry": "fused", "ChunkK": 64, "layout": "page"}, aiter_version="0.1.21.post1")
    assert call.kwargs["Preshuffle"] is False


@pytest.mark.parametrize(
    "platform,feats,reason",
    [
        (rocm("0.1.12", arch="gfx942"), dict(heads=64), "e4m3fnuz"),
        (rocm("0.1.12"), dict(heads=48), "power of two"),
        (rocm(None), dict(heads=64), "not installed"),
        (rocm("0.1.6"), dict(heads=64), "does not satisfy"),
    ],
    ids=["gfx942", "h48", "absent", "too-old"],
)
def test_aiter_structural_limits(platform, feats, reason):
    decision = decide(platform, **feats)
    aiter = next(c for c in decision.candidates if c.kernel == "aiter")
    assert decision.kernel != "aiter" and reason in aiter.reason
