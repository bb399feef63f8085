"""mxfp4_linear's AITER (W4A4) and Marlin adapters, and the decisions around them.

Neither AITER nor a CUDA vLLM can run here: the adapters are checked against stand-in
modules (tests/kernels/stand_ins/aiter_mxfp4.py, marlin_fp4.py) that reproduce the
entry points' signatures and the checks they make; what runs on MI355 / NVIDIA hardware
stays unverified. Decisions are checked through ``resolve()`` with the shipped rules.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
from pathlib import Path

import pytest
import torch

from kernmux.dispatch.outputs import poisoned_outputs
from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import REGISTRY
from kernmux.dispatch.resolver import resolve
from kernmux.dispatch.rule_model import RuleSet
from kernmux.dispatch.tuning import TuningPick
from kernmux.dispatch.verify import verify_kernel
from kernmux.kernels.mxfp4_linear import aiter as aiter_adapter
from kernmux.kernels.mxfp4_linear import marlin as marlin_adapter
from kernmux.kernels.mxfp4_linear import spec
from kernmux.kernels.mxfp4_linear.formats import quantize_mxfp4, unpack_e2m1
from kernmux.kernels.mxfp4_linear.reference import mxfp4_linear as reference
from kernmux.kernels.mxfp4_linear.reference import mxfp4_linear_w4a4
from kernmux.rules.loader import load_rules, parse_rules_text

OP = "mxfp4_linear"
STAND_INS = Path(__file__).parent / "stand_ins"
ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("KERNMUX_VLLM_VENV", ROOT / ".cache" / "vllm-venv")) / "bin" / "python"


def _load(name: str):
    module_spec = importlib.util.spec_from_file_location(name, STAND_INS / f"{name}.py")
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


AITER = _load("aiter_mxfp4")
MARLIN = _load("marlin_fp4")

ALLOW_W4A4 = """version: 1
rules:
  - id: allow-w4a4-mxfp4
    op: mxfp4_linear
    allow_precision: [W4A4]
    reason: the checkpoint was quantized with dynamic MXFP4 activations
    link: https://example.org/checkpoint
"""


def feats(**kw):
    base = dict(tokens=5, n=40, k=256, dtype="bf16", bias=False, device="cpu")
    base.update(kw)
    return base


def rules(*extra: str) -> RuleSet:
    shipped = load_rules()
    users = tuple(rule for text in extra for rule in parse_rules_text(text, "user.yaml"))
    return RuleSet(users + shipped.rules)


def rocm(arch="gfx950", aiter="0.1.20"):
    libs = {"torch": "2.9.0"}
    if aiter is not None:
        libs["amd-aiter"] = aiter
    return Platform(vendor="rocm", arch=arch, device="MI355X", units=256, libs=libs, what_if=True)


def cuda(arch="sm_90", vllm="0.33.0"):
    libs = {"torch": "2.11.0", "triton": "3.6.0"}
    if vllm is not None:
        libs["vllm"] = vllm
    return Platform(vendor="cuda", arch=arch, device="NVIDIA H200", units=132, libs=libs, what_if=True)


def candidate(decision, kernel):
    return next(c for c in decision.candidates if c.kernel == kernel)


# --------------------------------------------------------------------------- AITER


@pytest.fixture
def fake_aiter(monkeypatch):
    module = AITER.make_module()
    monkeypatch.setattr(aiter_adapter, "load_functions", lambda: (module.gemm_afp4wfp4, module.dynamic_mxfp4_quant))
    return module


def test_even_rule_matches_aiters_quantizer_bit_for_bit():
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(64, 1024, generator=gen) * torch.exp2(torch.randint(-40, 40, (64, 1), generator=gen).float())
    grid = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0])
    x[0, :32] = torch.cat([grid, -grid])  # every tie of the E2M1 grid, amax 7 (mantissa 1.75)
    x[1, :32] = 0.0
    x[2, :32] = torch.cat([grid * 0.9, grid * 1.1])
    x = x.bfloat16().float()
    codes, scales = AITER.aiter_quant_op(x)
    packed, ours = quantize_mxfp4(x, "even")
    assert torch.equal(ours, scales)
    assert torch.equal(unpack_e2m1(packed), codes.long())


@pytest.mark.parametrize("dtype, bias", [("bf16", False), ("bf16", True), ("fp16", True)])
def test_aiter_adapter_is_w4a4_exact_and_not_w4a16(fake_aiter, dtype, bias):
    f = feats(dtype=dtype, bias=bias, tokens=7, k=1024)
    result = verify_kernel(OP, "aiter", f, seed=11, check_support=False)
    assert result.status == "pass", (result.detail, result.metrics)
    call = fake_aiter.calls[-1]
    assert (call["M"], call["N"], call["K"]) == (7, 40, 1024) and call["config"] is None
    assert call["x_scales_stride"] == (1, 7)  # the transposed view AITER returns, passed as is
    # Judged as the op's W4A16 class, the same output fails: the classes really differ.
    (x, w, s, b), _ = spec.make_inputs(f, "cpu", 11)
    with poisoned_outputs():
        got = aiter_adapter.mxfp4_linear_aiter(x, w, s, b)
    assert spec.compare(got, mxfp4_linear_w4a4(x, w, s, b), f).passed
    assert not spec.compare(got, reference(x, w, s, b), f).passed


def test_aiter_is_a_w4a4_kernel():
    assert REGISTRY.kernels_of(OP)["aiter"].precision == "W4A4"
    assert all(k.precision == "W4A16" for name, k in REGISTRY.kernels_of(OP).items() if name != "aiter")
    assert REGISTRY.op(OP).reference_for("W4A4") is mxfp4_linear_w4a4


def test_gfx950_without_a_w4a4_rule_is_not_aiter():
    d = resolve(OP, feats(device="cuda"), rocm(), rules(), force={})
    assert d.kernel != "aiter" and d.precision == "W4A16"
    aiter = candidate(d, "aiter")
    assert aiter.status == "denied" and aiter.precision == "W4A4"
    assert "add a rule with allow_precision" in aiter.reason


def test_gfx950_with_a_user_w4a4_rule_is_aiter():
    d = resolve(OP, feats(device="cuda"), rocm(), rules(ALLOW_W4A4), force={})
    assert (d.kernel, d.precision, d.precision_rule) == ("aiter", "W4A4", "allow-w4a4-mxfp4")
    assert d.as_dict()["precision"] == "W4A4"
    from kernmux.cli.explain import render

    assert "precision: W4A4 (coarser than the op's reference class W4A16; allowed by rule allow-w4a4-mxfp4)" in render(d)


@pytest.mark.parametrize(
    "platform, k, status, why",
    [
        (rocm("gfx942"), 4096, "unsupported", "gfx950/gfx1250 only"),
        (rocm("gfx1250", "0.1.11"), 4096, "denied", "aiter-fp4-gfx1250-needs-0-1-12"),
        (rocm("gfx950", "0.1.11"), 4128, "denied", "aiter-fp4-unaligned-k-before-0-1-12"),
        (rocm("gfx950", "0.1.11"), 4096, "chosen", ""),
        (rocm("gfx950", "0.1.12"), 4128, "chosen", ""),
        (rocm("gfx1250", "0.1.12"), 2880, "chosen", ""),
        (rocm("gfx950", "0.1.4"), 4096, "unavailable", "amd-aiter 0.1.4 does not satisfy >=0.1.5"),
    ],
)
def test_aiter_gates_with_w4a4_allowed(platform, k, status, why):
    d = resolve(OP, feats(device="cuda", k=k), platform, rules(ALLOW_W4A4), force={})
    aiter = candidate(d, "aiter")
    assert aiter.status == status and why in aiter.reason, aiter


def test_fewer_tokens_do_not_change_the_precision_filter():
    for tokens in (1, 4096):
        d = resolve(OP, feats(device="cuda", tokens=tokens), rocm(), rules(), force={"mxfp4_linear": "aiter"})
        assert d.kernel != "aiter" and any("KERNMUX_FORCE" in note for note in d.notes)


# --------------------------------------------------------------------------- Marlin


@pytest.fixture
def fake_marlin(monkeypatch):
    module = MARLIN.make_module()
    monkeypatch.setattr(marlin_adapter, "load_module", lambda: module)
    marlin_adapter.clear_cache()
    yield module
    marlin_adapter.clear_cache()


@pytest.mark.parametrize("dtype, bias", [("bf16", False), ("bf16", True), ("fp16", True)])
def test_marlin_adapter_through_the_stand_in(fake_marlin, dtype, bias):
    f = feats(dtype=dtype, bias=bias, tokens=3, n=48, k=512)
    result = verify_kernel(OP, "marlin", f, seed=5, check_support=False)
    assert result.status == "pass", (result.detail, result.metrics)
    call = fake_marlin.calls[-1]
    assert call == {"size_n": 48, "size_k": 512, "bias": bias, "workspace": None}


def test_marlin_prepares_once_and_again_after_an_in_place_change(fake_marlin):
    f = feats(bias=True)
    (x, w, s, b), _ = spec.make_inputs(f, "cpu", 1)
    w_before, b_before = w.clone(), b.clone()
    first = marlin_adapter.mxfp4_linear_marlin(x, w, s, b)
    second = marlin_adapter.mxfp4_linear_marlin(x, w, s, b)
    assert len(fake_marlin.prepared) == 1 and torch.equal(first, second)
    assert torch.equal(w, w_before) and torch.equal(b, b_before)  # the caller's tensors are untouched
    w[0, 0] ^= 0x11
    changed = marlin_adapter.mxfp4_linear_marlin(x, w, s, b)
    assert len(fake_marlin.prepared) == 2
    assert spec.compare(changed, reference(x, w, s, b), f).passed
    b32 = b.float()
    assert spec.compare(marlin_adapter.mxfp4_linear_marlin(x, w, s, b32), reference(x, w, s, b32), f).passed
    assert len(fake_marlin.prepared) == 3


def test_marlin_probe_reports_unsupported_gpus(monkeypatch):
    monkeypatch.setattr(marlin_adapter, "load_module", lambda: MARLIN.make_module(supported=False))
    assert marlin_adapter.probe() == (False, "vLLM's is_fp4_marlin_supported() is False on this GPU")


@pytest.mark.parametrize(
    "platform, kernel, marlin_status",
    [
        (cuda("sm_90", "0.33.0"), "marlin", "chosen"),
        (cuda("sm_80", "0.32.0"), "marlin", "chosen"),
        # 5 rows: the decode kernel supports them, the shipped rule prefers the GEMM from 3
        (cuda("sm_90", None), "triton", "unavailable"),
        (cuda("sm_90", "0.31.0"), "triton", "unavailable"),
        (cuda("sm_75", "0.33.0"), "dequant_cublas", "unsupported"),
        (cuda("sm_100", "0.33.0"), "triton", "allowed"),
    ],
)
def test_marlin_rule_and_gates(platform, kernel, marlin_status):
    d = resolve(OP, feats(device="cuda"), platform, rules(), force={})
    assert d.kernel == kernel and candidate(d, "marlin").status == marlin_status


class _ByTokens:
    """A tuning source that measured triton fastest up to 64 rows, dequant_cublas above."""

    def lookup(self, op, bucket, platform, allowed):
        kernel = "triton" if bucket["tokens"] <= 64 else "dequant_cublas"
        return TuningPick(kernel=kernel, config={}, row_id=bucket["tokens"], detail="fastest validated"), []


def test_sm90_with_a_measured_database_takes_the_tuned_kernel_per_bucket():
    for tokens, kernel in ((1, "triton"), (16, "triton"), (65, "dequant_cublas"), (4097, "dequant_cublas")):
        d = resolve(OP, feats(device="cuda", tokens=tokens), cuda(), rules(), tuning=_ByTokens(), force={})
        assert (d.kernel, d.source) == (kernel, "tuning_db")
        assert d.row_id == spec.bucket(feats(tokens=tokens))["tokens"]


# --------------------------------------------------------------------------- the real vLLM


@pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"vLLM venv absent ({VLLM_PYTHON.parent.parent}); create it with scripts/vllm_env.sh")
def test_stand_in_signatures_are_vllms():
    code = (
        "import inspect, importlib\n"
        f"m = importlib.import_module({marlin_adapter.MODULE!r})\n"
        "for name in ('prepare_fp4_layer_for_marlin', 'apply_fp4_marlin_linear'):\n"
        "    print(name, inspect.signature(getattr(m, name)))\n"
        "print('is_fp4_marlin_supported', callable(m.is_fp4_marlin_supported))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KERNMUX_", "PYTHONPATH"))}
    env.update(VLLM_TARGET_DEVICE="cpu")
    proc = subprocess.run([str(VLLM_PYTHON), "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = dict(line.split(" ", 1) for line in proc.stdout.strip().splitlines() if " " in line)
    for name, signature in MARLIN.SIGNATURES.items():
        assert lines[name] == signature, (name, lines[name])
    assert lines["is_fp4_marlin_supported"] == "True"
