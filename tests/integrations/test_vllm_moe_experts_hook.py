"""The ``moe_experts.unquantized`` hook against stand-ins with vLLM 0.32/0.33's
signatures (tests/integrations/standin_moe_experts.py): which layers go to kernmux,
that every argument keeps its meaning (compared with vLLM's semantics on the same
inputs), and that everything else -- and any kernmux failure -- runs vLLM's path on
vLLM's own weight layout."""

from __future__ import annotations

import logging

import pytest
import torch

import kernmux.ops
from kernmux import stats
from kernmux.integrations.vllm_hooks import moe_experts as hook
from kernmux.integrations.vllm_hooks.base import HookRuntime
from tests.integrations import standin_moe_experts as vllm

E, K, H, I = 8, 2, 32, 16


@pytest.fixture(autouse=True)
def _torch_kernel(monkeypatch):
    # The hook's mapping is under test, not the kernels.
    monkeypatch.setenv("KERNMUX_FORCE", "moe_experts=torch")
    monkeypatch.setattr(hook, "_batch_invariant", lambda: None)  # no vllm.envs here
    monkeypatch.setattr(hook, "_platform_problem", lambda backend: None)  # nor vllm.platforms
    kernmux.ops.reset()
    stats.reset()
    yield
    kernmux.ops.reset()
    stats.reset()


def make_layer(seed: int = 0, dtype=torch.float32) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    layer = torch.nn.Module()
    layer.w13_weight = torch.nn.Parameter((torch.randn(E, 2 * I, H, generator=gen) * H**-0.5).to(dtype), requires_grad=False)
    layer.w2_weight = torch.nn.Parameter((torch.randn(E, H, I, generator=gen) * I**-0.5).to(dtype), requires_grad=False)
    layer.activation = vllm.MoEActivation.SILU
    return layer


def routing(tokens: int, k: int = K, seed: int = 1, ids_dtype=torch.int32):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=gen)[:k] for _ in range(tokens)]).to(ids_dtype)
    weights = torch.softmax(torch.randn(tokens, k, generator=gen), dim=-1)
    return weights, ids


def build(config: vllm.FusedMoEConfig, runtime: HookRuntime | None = None, layer=None):
    """What vLLM does: oracle -> experts instance -> process_weights_after_loading."""
    runtime = runtime or HookRuntime("moe_experts.unquantized", "moe_experts")
    select = hook.make_select(runtime, vllm.select_unquantized_moe_backend)
    backend, cls = select(moe_config=config)
    experts = cls(config)
    layer = layer if layer is not None else make_layer()
    experts.process_weights_after_loading(layer)
    return experts, layer, runtime


def call(experts, layer, hidden, weights, ids, **overrides):
    out = torch.full(hidden.shape, float("nan"), dtype=hidden.dtype)
    args = dict(
        output=out, hidden_states=hidden, w1=layer.w13_weight, w2=layer.w2_weight, topk_weights=weights,
        topk_ids=ids, activation=vllm.MoEActivation.SILU, global_num_experts=E, expert_map=None, a1q_scale=None,
        a2_scale=None, workspace13=torch.empty(0), workspace2=torch.empty(0), expert_tokens_meta=None,
        apply_router_weight_on_input=False,
    )
    args.update(overrides)
    assert tuple(args) == hook._APPLY_PARAMS
    result = experts.apply(*args.values())  # positionally, as vLLM's modular kernel passes keywords or not
    assert result is None
    return out


# --------------------------------------------------------------------------- selection


def test_expressible_layers_get_the_kernmux_subclass_of_vllms_class():
    for backend, base in (("cpu", vllm.CPUUnquantizedExperts), ("x86", vllm.X86CPUUnquantizedExperts),
                          ("triton", vllm.TritonExperts)):
        experts, _, _ = build(vllm.FusedMoEConfig(standin_backend=backend))
        assert type(experts).__mro__[1] is base and type(experts).__name__ == f"Kernmux{base.__name__}"
    # One class per vLLM class and hook.
    runtime = HookRuntime("h", "moe_experts")
    assert hook.experts_class(vllm.TritonExperts, runtime) is hook.experts_class(vllm.TritonExperts, runtime)


@pytest.mark.parametrize(
    "change, reason",
    [
        ({"standin_backend": "aiter"}, "ROCm AITER backend"),
        ({"activation": vllm.MoEActivation.GELU}, "activation gelu"),
        ({"is_act_and_mul": False}, "non-gated"),
        ({"has_bias": True}, "expert biases"),
        ({"is_lora_enabled": True}, "LoRA"),
        ({"swiglu_limit": 7.0}, "clamp"),
        ({"rocm_aiter_fmoe_enabled": True}, "AITER fused MoE"),
        ({"aiter_fmoe_shared_expert_enabled": True}, "fused shared experts"),
        ({"in_dtype": torch.float8_e4m3fn}, "dtype"),
        ({"moe_backend": "triton"}, "requested explicitly"),
        ({"moe_parallel_config": vllm.FusedMoEParallelConfig(use_ep=True)}, "expert parallelism"),
        ({"moe_parallel_config": vllm.FusedMoEParallelConfig(use_all2all_kernels=True)}, "all-to-all"),
    ],
)
def test_layers_the_op_cannot_express_keep_vllms_class(change, reason, caplog):
    config = vllm.FusedMoEConfig(**change)
    select = hook.make_select(HookRuntime("h", "moe_experts"), vllm.select_unquantized_moe_backend)
    with caplog.at_level(logging.INFO, logger="kernmux"):
        assert select(config) == vllm.select_unquantized_moe_backend(config)
        select(config)
    assert caplog.text.count("MoE experts stay on vLLM's") == 1 and reason in caplog.text


@pytest.mark.parametrize("moe_backend", ["auto", "humming", "marlin"])
def test_backends_that_mean_auto_for_unquantized_layers_are_served(moe_backend):
    assert hook.config_problem(vllm.UnquantizedMoeBackend.CPU, vllm.CPUUnquantizedExperts,
                               vllm.FusedMoEConfig(moe_backend=moe_backend)) is None


def test_a_config_vllm_changed_is_not_guessed():
    class Older:  # a FusedMoEConfig without the fields the hook reads
        activation = vllm.MoEActivation.SILU

    reason = hook.config_problem(vllm.UnquantizedMoeBackend.CPU, vllm.CPUUnquantizedExperts, Older())
    assert reason.startswith("cannot read the MoE config")


# --------------------------------------------------------------------------- meaning


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_computes_vllms_experts_through_kernmux(backend, tokens, dtype):
    config = vllm.FusedMoEConfig(standin_backend=backend, in_dtype=dtype)
    layer = make_layer(dtype=dtype)
    checkpoint = (layer.w13_weight.detach().clone(), layer.w2_weight.detach().clone())
    experts, layer, runtime = build(config, layer=layer)
    # The CPU class kept the checkpoint layout (vLLM's would have prepacked it).
    assert torch.equal(layer.w13_weight, checkpoint[0]) and torch.equal(layer.w2_weight, checkpoint[1])
    hidden = torch.randn(tokens, H, generator=torch.Generator().manual_seed(3)).to(dtype)
    weights, ids = routing(tokens)
    out = call(experts, layer, hidden, weights, ids)
    want = vllm.experts_output(hidden, *checkpoint, weights, ids)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(out, want, **tol)
    assert experts.calls == []  # vLLM's apply never ran
    assert stats.snapshot()["hooks"]["moe_experts.unquantized"] == {"kernmux": 1}
    assert [d["kernel"] for d in stats.snapshot()["decisions"] if d["op"] == "moe_experts"] == ["torch"]


def test_router_weight_on_input_is_not_applied_twice():
    """apply_router_weight_on_input (top-1): vLLM's prepare step scaled the hidden rows
    already; the experts must not weight again (vLLM's skip_weighted)."""
    experts, layer, _ = build(vllm.FusedMoEConfig(experts_per_token=1))
    _, ids = routing(6, k=1)
    weights = torch.sigmoid(torch.randn(6, 1, generator=torch.Generator().manual_seed(8)))  # Llama 4 style
    hidden = torch.randn(6, H, generator=torch.Generator().manual_seed(4)) * weights  # already scaled
    out = call(experts, layer, hidden, weights, ids, apply_router_weight_on_input=True)
    want = vllm.experts_output(hidden, layer.w13_weight, layer.w2_weight, weights, ids, skip_weighted=True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    wrong = vllm.experts_output(hidden, layer.w13_weight, layer.w2_weight, weights, ids)
    assert not torch.allclose(out, wrong, rtol=1e-3, atol=1e-4)


def test_padding_ids_skip_their_slot_and_int64_ids_are_read():
    """id -1 is vLLM's padding mask (skip the slot): it must add nothing."""
    experts, layer, _ = build(vllm.FusedMoEConfig())
    weights, ids = routing(5, ids_dtype=torch.int64)
    ids[1, 0] = -1
    ids[3] = -1  # a whole padded row: zeros
    hidden = torch.randn(5, H, generator=torch.Generator().manual_seed(5))
    out = call(experts, layer, hidden, weights, ids)
    want = vllm.experts_output(hidden, layer.w13_weight, layer.w2_weight, weights, ids)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(out[3], torch.zeros(H))


# --------------------------------------------------------------------------- vLLM's path


@pytest.mark.parametrize(
    "overrides, why",
    [
        ({"expert_map": torch.tensor([0, 1, 2, 3, 4, 5, 6, 7], dtype=torch.int32)}, "expert_map"),
        ({"a1q_scale": torch.ones(1)}, "a1q_scale"),
        ({"activation": vllm.MoEActivation.GELU}, "activation"),
    ],
)
@pytest.mark.parametrize("backend", ["cpu", "triton"])
def test_calls_with_arguments_the_op_does_not_model_run_vllms_apply_on_vllms_layout(overrides, why, backend):
    config = vllm.FusedMoEConfig(standin_backend=backend)
    experts, layer, _ = build(config)
    hidden = torch.randn(4, H, generator=torch.Generator().manual_seed(6))
    weights, ids = routing(4)
    before = vllm.CPUUnquantizedExperts.prepacked
    if why == "activation":  # the stand-in computes silu whatever it is told: compare the route only
        call(experts, layer, hidden, weights, ids, **overrides)
    else:
        out = call(experts, layer, hidden, weights, ids, **overrides)
        want = vllm.experts_output(hidden, layer.w13_weight, layer.w2_weight, weights, ids, overrides.get("expert_map"))
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert len(experts.calls) == 1
    if backend == "cpu":  # vLLM's prepacked copy was made for the call, once
        assert vllm.CPUUnquantizedExperts.prepacked == before + 1
        assert not torch.equal(experts.calls[0]["w1"], layer.w13_weight)
        call(experts, layer, hidden, weights, ids, **overrides)
        assert vllm.CPUUnquantizedExperts.prepacked == before + 1
    else:
        assert experts.calls[0]["w1"] is layer.w13_weight
    assert stats.snapshot()["hooks"]["moe_experts.unquantized"]["vllm"] >= 1
    assert not [d for d in stats.snapshot()["decisions"] if d["op"] == "moe_experts"]


@pytest.mark.parametrize(
    "attribute, value",
    [("post_gemm2_hook", lambda unfinalized, out: None), ("_lora_context", object())],
)
def test_per_instance_states_the_op_does_not_model_run_vllms_apply(attribute, value):
    experts, layer, _ = build(vllm.FusedMoEConfig(standin_backend="triton"))
    setattr(experts, attribute, value)
    call(experts, layer, torch.randn(2, H), *routing(2))
    assert len(experts.calls) == 1


def test_extra_id_columns_run_vllms_apply():
    """More id columns than the layer's top-k (fused shared-expert slots) -> vLLM."""
    experts, layer, _ = build(vllm.FusedMoEConfig(standin_backend="triton"))
    weights, ids = routing(3, k=K + 1)
    call(experts, layer, torch.randn(3, H), weights, ids)
    assert len(experts.calls) == 1


def test_weights_vllm_preprocessed_go_to_vllm_unchanged():
    """vLLM skips process_weights_after_loading for pre-processed (already prepacked)
    weights: only vLLM's kernel can read them."""
    runtime = HookRuntime("h", "moe_experts")
    _, cls = hook.make_select(runtime, vllm.select_unquantized_moe_backend)(vllm.FusedMoEConfig())
    experts = cls(vllm.FusedMoEConfig())
    layer = make_layer()
    vllm.CPUUnquantizedExperts.process_weights_after_loading(experts, layer)  # vLLM's own layout
    call(experts, layer, torch.randn(2, H), *routing(2))
    assert len(experts.calls) == 1 and experts.calls[0]["w1"] is layer.w13_weight


def test_kernmux_failure_falls_back_to_vllm_once_and_for_all(monkeypatch, caplog):
    experts, layer, runtime = build(vllm.FusedMoEConfig())

    def broken(*args):
        raise RuntimeError("no kernel")

    monkeypatch.setattr(kernmux.ops, "moe_experts", broken)
    hidden = torch.randn(3, H, generator=torch.Generator().manual_seed(7))
    weights, ids = routing(3)
    with caplog.at_level(logging.ERROR, logger="kernmux"):
        out = call(experts, layer, hidden, weights, ids)
        call(experts, layer, hidden, weights, ids)
    torch.testing.assert_close(out, vllm.experts_output(hidden, layer.w13_weight, layer.w2_weight, weights, ids),
                               rtol=1e-5, atol=1e-6)
    assert runtime.disabled and len(experts.calls) == 2
    assert caplog.text.count("disabled for this process") == 1
    # A layer built after the failure keeps vLLM's class.
    _, cls = hook.make_select(runtime, vllm.select_unquantized_moe_backend)(vllm.FusedMoEConfig())
    assert cls is vllm.CPUUnquantizedExperts


def test_vllm_kernels_weight_cache_takes_inference_tensors():
    """vLLM runs its forward pass under torch.inference_mode, where kernmux's self-check
    makes its inputs: the per-weight layout cache must key such tensors too (they have
    no version counter)."""
    from kernmux.kernels.moe_experts.weight_cache import converted

    with torch.inference_mode():
        weight = torch.randn(2, 4, 8)
        made = []
        first = converted(weight, "test-flip", lambda w: made.append(1) or w.flip(-1))
        again = converted(weight, "test-flip", lambda w: made.append(1) or w.flip(-1))
    assert weight.is_inference() and first is again and made == [1]


def test_triton_backend_is_served_on_cuda_and_rocm_only(monkeypatch):
    import sys
    import types

    monkeypatch.undo()  # the real _platform_problem
    for cuda_alike, expected in ((True, None), (False, "TRITON backend outside CUDA/ROCm")):
        platforms = types.ModuleType("vllm.platforms")
        platforms.current_platform = types.SimpleNamespace(is_cuda_alike=lambda v=cuda_alike: v)
        monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
        monkeypatch.setitem(sys.modules, "vllm.platforms", platforms)
        assert hook._platform_problem("TRITON") == expected
    assert hook._platform_problem("CPU") is None


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 33])
def test_triton_backend_layer_on_gpu_through_kernmuxs_own_choice(monkeypatch, tokens):
    """On a GPU, with no forced kernel: the layer vLLM gives TritonExperts is served by
    whatever kernmux chooses there (its Triton strategies by default), with vLLM's
    argument meaning -- int64 ids, padding ids -1 -- within the op's bf16 tolerance."""
    from kernmux.kernels.moe_experts import spec

    monkeypatch.delenv("KERNMUX_FORCE")
    kernmux.ops.reset()
    config = vllm.FusedMoEConfig(standin_backend="triton", in_dtype=torch.bfloat16)
    layer = make_layer(dtype=torch.bfloat16)
    experts, _, _ = build(config, layer=torch.nn.Module())
    w13, w2 = layer.w13_weight.data.cuda(), layer.w2_weight.data.cuda()
    hidden = torch.randn(tokens, H, generator=torch.Generator().manual_seed(9)).to(torch.bfloat16)
    weights, ids = routing(tokens, ids_dtype=torch.int64)
    ids[0, 1] = -1
    out = torch.full((tokens, H), float("nan"), dtype=torch.bfloat16, device="cuda")
    experts.apply(out, hidden.cuda(), w13, w2, weights.cuda(), ids.cuda(), vllm.MoEActivation.SILU, E, None, None,
                  None, torch.empty(0), torch.empty(0), None, False)
    want = vllm.experts_output(hidden.float(), w13.float().cpu(), w2.float().cpu(), weights, ids)
    features = {"tokens": tokens, "hidden": H, "dtype": "bf16"}
    verdict = spec.compare(out.cpu(), want, features)
    assert verdict.passed, (verdict.detail, verdict.metrics)
    assert experts.calls == []
