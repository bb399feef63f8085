"""The ``mxfp4_linear.kernel`` hook against a stand-in of vLLM's MXFP4 linear kernel
selection (tests/integrations/standin_mxfp4_linear.py): kernmux's ``mxfp4_linear``
decision -- made by a what-if dispatcher for the platform the stand-in pretends to be
-- picks the vLLM class that runs the same kernel; a kernel vLLM does not have, a
precision class the layer does not declare, a class vLLM would not run here, or the
user's own choice leave vLLM's kernel in place."""

from __future__ import annotations

import logging
import sys

import pytest
import torch

from kernmux import stats
from kernmux.dispatch.platform import Platform
from kernmux.integrations.vllm_hooks import mxfp4_linear as hook
from kernmux.integrations.vllm_hooks.base import HookRuntime
from kernmux.runtime import make_dispatcher
from tests.integrations import standin_mxfp4_linear as vllm

ALLOW_W4A4 = """\
version: 1
rules:
  - id: allow-w4a4-mxfp4
    op: mxfp4_linear
    allow_precision: [W4A4]
    reason: the checkpoint quantizes activations to MXFP4
    link: https://huggingface.co/amd
"""


def cuda(arch="sm_90"):
    libs = {"torch": "2.11.0", "triton": "3.6.0", "vllm": "0.33.0"}
    return Platform(vendor="cuda", arch=arch, device="NVIDIA H200", units=132, libs=libs, what_if=True)


def rocm(arch="gfx950"):
    libs = {"torch": "2.9.0", "amd-aiter": "0.1.20", "vllm": "0.33.0"}
    return Platform(vendor="rocm", arch=arch, device="MI355X", units=256, libs=libs, what_if=True)


@pytest.fixture(autouse=True)
def _clean(monkeypatch):
    monkeypatch.delenv("KERNMUX_FORCE", raising=False)
    monkeypatch.delenv(hook.TOKENS_ENV, raising=False)
    stats.reset()
    yield
    stats.reset()


@pytest.fixture
def setup(monkeypatch, tmp_path):
    """make(platform_enum, kernmux_platform, version="0.32", rules=(), linear_backend="auto")
    -> (hooked init_mxfp4_linear_kernel, stand-in module, runtime, decided features)."""

    def make(enum, platform, version="0.32", rules=(), linear_backend="auto"):
        module = vllm.make(enum, version=version, linear_backend=linear_backend)
        monkeypatch.setitem(sys.modules, module.__name__, module)
        files = []
        for i, text in enumerate(rules):
            path = tmp_path / f"rules{i}.yaml"
            path.write_text(text)
            files.append(str(path))
        dispatcher = make_dispatcher(platform=platform, rule_files=files, use_tuning_db=False, run_self_checks=False)
        seen = []

        def decide(features):
            seen.append(dict(features))
            # The layer's weights live on the GPU there (CPU tensors here).
            return dispatcher.decide(hook.OP, {**features, "device": "cuda"})

        monkeypatch.setattr(hook, "decide", decide)
        runtime = HookRuntime("mxfp4_linear.kernel", hook.OP)
        return hook.make_init_kernel(runtime, module.init_mxfp4_linear_kernel), module, runtime, seen

    return make


def mxfp4_layer(n=256, k=512, dtype=torch.bfloat16, bias=False):
    layer = torch.nn.Module()
    layer.weight = torch.nn.Parameter(torch.zeros(n, k // 2, dtype=torch.uint8), requires_grad=False)
    layer.weight_scale = torch.nn.Parameter(torch.full((n, k // 32), 127, dtype=torch.uint8), requires_grad=False)
    layer.bias = torch.nn.Parameter(torch.zeros(n, dtype=dtype), requires_grad=False) if bias else None
    layer.params_dtype = dtype
    layer.prefix = "model.layers.0.mlp.down_proj"
    return layer


def run(init, activation_quant_key=None, layer=None):
    kernel = init(activation_quant_key=activation_quant_key)
    layer = layer if layer is not None else mxfp4_layer()
    kernel.process_weights_after_loading(layer)
    return kernel, layer


# --------------------------------------------------------------------------- driven


@pytest.mark.parametrize("version", ["0.32", "0.33"])
def test_sm90_w4a16_layer_runs_marlin_where_kernmux_chooses_it(setup, version, caplog):
    """sm_90 + vLLM: kernmux's shipped rule prefers marlin; vLLM's own list would also
    land on Marlin (FlashInfer needs W4A4), so the choice agrees."""
    init, module, runtime, seen = setup(vllm.PlatformEnum.CUDA, cuda(), version=version)
    with caplog.at_level(logging.INFO, logger="kernmux"):
        kernel, layer = run(init)
    assert type(kernel.kernel).__name__ == "MarlinMxFp4LinearKernel" and kernel.kernel is kernel.vllm_kernel
    assert kernel.kernel.prepared == [layer]
    assert kernel.apply_weights(layer, "x", "b") == ("MarlinMxFp4LinearKernel", "x", "b")
    assert seen == [{"tokens": hook.DEFAULT_TOKENS, "n": 256, "k": 512, "dtype": "bf16", "bias": False, "device": "cpu"}]
    assert "is vLLM's choice too" in caplog.text
    assert stats.snapshot()["hooks"]["mxfp4_linear.kernel"] == {"kernmux": 1}


def test_kernmux_decision_replaces_vllms_choice_with_the_class_running_it(setup, monkeypatch, caplog):
    """vLLM would take Marlin (first in its CUDA list for weight-only layers); kernmux
    chose dequantize-then-cuBLAS: EmulationMxfp4LinearKernel runs that computation."""
    monkeypatch.setenv("KERNMUX_FORCE", "mxfp4_linear=dequant_cublas")
    init, module, runtime, seen = setup(vllm.PlatformEnum.CUDA, cuda())
    monkeypatch.setenv(hook.TOKENS_ENV, "4096")
    with caplog.at_level(logging.INFO, logger="kernmux"):
        kernel, layer = run(init, layer=mxfp4_layer(n=64, k=1024, dtype=torch.float16, bias=True))
    assert type(kernel.vllm_kernel).__name__ == "MarlinMxFp4LinearKernel"
    assert type(kernel.kernel).__name__ == "EmulationMxfp4LinearKernel"
    assert kernel.kernel.prepared == [layer] and kernel.vllm_kernel.prepared == []  # weights prepared once, for the one that runs
    assert kernel.kernel.config is kernel.vllm_kernel.config
    assert kernel.config is kernel.kernel.config  # other attributes are the running kernel's
    assert kernel.apply_weights(layer, "x")[0] == "EmulationMxfp4LinearKernel"
    assert seen[0] == {"tokens": 4096, "n": 64, "k": 1024, "dtype": "fp16", "bias": True, "device": "cpu"}
    assert "EmulationMxfp4LinearKernel instead of vLLM's MarlinMxFp4LinearKernel" in caplog.text
    # Decided once per layer: a second weight processing (a reload) keeps it.
    kernel.process_weights_after_loading(layer)
    assert len(seen) == 1 and len(kernel.kernel.prepared) == 2


def test_w4a4_layer_on_gfx950_runs_aiter_when_a_rule_allows_w4a4(setup):
    init, module, runtime, _ = setup(vllm.PlatformEnum.ROCM, rocm(), rules=(ALLOW_W4A4,))
    kernel, _ = run(init, activation_quant_key=vllm.kMxfp4Dynamic)
    assert type(kernel.kernel).__name__ == "AiterMxfp4LinearKernel"


# --------------------------------------------------------------------------- vLLM's choice stays


@pytest.mark.parametrize("force, why", [
    ("triton", "no Triton MXFP4 linear kernel"),
    ("torch", "no float32 MXFP4 linear kernel"),
])
def test_kernels_vllm_does_not_have_leave_vllms_choice(setup, monkeypatch, caplog, force, why):
    monkeypatch.setenv("KERNMUX_FORCE", f"mxfp4_linear={force}")
    init, *_ = setup(vllm.PlatformEnum.CUDA, cuda())
    with caplog.at_level(logging.INFO, logger="kernmux"):
        kernel, layer = run(init)
    assert kernel.kernel is kernel.vllm_kernel and kernel.kernel.prepared == [layer]
    assert f"kernmux chose {force}" in caplog.text and why in caplog.text
    assert stats.snapshot()["hooks"]["mxfp4_linear.kernel"] == {"vllm": 1}


def test_precision_class_of_the_layer_is_kept(setup, monkeypatch, caplog):
    """A W4A4 layer (activations quantized by the checkpoint) never moves to a W4A16
    kernel, and a weight-only layer never to a W4A4 one."""
    monkeypatch.setenv("KERNMUX_FORCE", "mxfp4_linear=dequant_cublas")
    init, *_ = setup(vllm.PlatformEnum.CUDA, cuda())
    with caplog.at_level(logging.INFO, logger="kernmux"):
        kernel, _ = run(init, activation_quant_key=vllm.kMxfp4Dynamic)
    assert type(kernel.kernel).__name__ == "FlashInferMxFp4LinearKernel"  # vLLM's W4A4 choice
    assert "but the layer's config is W4A4" in caplog.text

    monkeypatch.delenv("KERNMUX_FORCE")
    init, *_ = setup(vllm.PlatformEnum.ROCM, rocm(), rules=(ALLOW_W4A4,))
    with caplog.at_level(logging.INFO, logger="kernmux"):
        kernel, _ = run(init, activation_quant_key=None)  # kernmux: aiter (W4A4) allowed by the rule
    assert type(kernel.kernel).__name__ == "EmulationMxfp4LinearKernel"  # vLLM's weight-only choice on ROCm
    assert "kernmux chose aiter (W4A4) but the layer's config is W4A16" in caplog.text


@pytest.mark.parametrize("version", ["0.32", "0.33"])
def test_a_class_vllm_would_not_run_here_is_not_forced_in(setup, monkeypatch, caplog, version):
    monkeypatch.setenv("KERNMUX_FORCE", "mxfp4_linear=dequant_cublas")
    init, module, *_ = setup(vllm.PlatformEnum.CUDA, cuda(), version=version)
    module.EmulationMxfp4LinearKernel.HAS_QUARK = False
    try:
        with caplog.at_level(logging.INFO, logger="kernmux"):
            kernel, _ = run(init)
    finally:
        module.EmulationMxfp4LinearKernel.HAS_QUARK = True
    assert type(kernel.kernel).__name__ == "MarlinMxFp4LinearKernel"
    assert "amd-quark package not available" in caplog.text

    module.envs.VLLM_DISABLED_KERNELS = ["EmulationMxfp4LinearKernel"]
    with caplog.at_level(logging.INFO, logger="kernmux"):
        kernel, _ = run(init)
    assert type(kernel.kernel).__name__ == "MarlinMxFp4LinearKernel"
    assert "is in VLLM_DISABLED_KERNELS" in caplog.text


def test_users_linear_backend_and_batch_invariance_stand(setup, caplog, monkeypatch):
    monkeypatch.setenv("KERNMUX_FORCE", "mxfp4_linear=dequant_cublas")
    init, module, _, seen = setup(vllm.PlatformEnum.CUDA, cuda(), linear_backend="marlin")
    with caplog.at_level(logging.INFO, logger="kernmux"):
        kernel, _ = run(init)
    assert type(kernel.kernel).__name__ == "MarlinMxFp4LinearKernel" and seen == []
    assert "--linear-backend 'marlin' chosen by the user" in caplog.text

    init, module, _, seen = setup(vllm.PlatformEnum.CUDA, cuda())
    module.envs.VLLM_BATCH_INVARIANT = True
    kernel, _ = run(init)
    assert type(kernel.kernel).__name__ == "MarlinMxFp4LinearKernel" and seen == []


@pytest.mark.parametrize("layer_change, why", [
    ({"dtype": torch.float32}, "the op takes bf16/fp16"),
])
def test_layers_outside_the_op_keep_vllms_kernel(setup, caplog, layer_change, why):
    init, *_ = setup(vllm.PlatformEnum.CUDA, cuda())
    with caplog.at_level(logging.INFO, logger="kernmux"):
        kernel, _ = run(init, layer=mxfp4_layer(**layer_change))
    assert kernel.kernel is kernel.vllm_kernel and why in caplog.text


def test_vllms_own_failure_is_vllms_and_kernmux_failure_keeps_vllms_kernel(setup, monkeypatch, caplog):
    init, module, runtime, _ = setup(vllm.PlatformEnum.CPU, cuda())
    with pytest.raises(ValueError, match="Failed to find a kernel"):
        init()  # no MXFP4 linear kernel on vLLM's CPU platform: vLLM's error, unchanged

    init, module, runtime, _ = setup(vllm.PlatformEnum.CUDA, cuda())

    def broken(features):
        raise RuntimeError("database on fire")

    monkeypatch.setattr(hook, "decide", broken)
    with caplog.at_level(logging.ERROR, logger="kernmux"):
        kernel, layer = run(init)
    assert kernel.kernel is kernel.vllm_kernel and kernel.kernel.prepared == [layer]
    assert runtime.disabled and "disabled for this process" in caplog.text
    assert type(init()) is module.MarlinMxFp4LinearKernel  # later layers: vLLM's selection, untouched


def test_decision_tokens_setting(monkeypatch, caplog):
    assert hook.decision_tokens() == hook.DEFAULT_TOKENS
    monkeypatch.setenv(hook.TOKENS_ENV, "256")
    assert hook.decision_tokens() == 256
    monkeypatch.setenv(hook.TOKENS_ENV, "many")
    with caplog.at_level(logging.WARNING, logger="kernmux"):
        assert hook.decision_tokens() == hook.DEFAULT_TOKENS
    assert "not a positive integer" in caplog.text
