"""The vLLM plugin against a stand-in vllm package: version gate, hook selection,
rebinding (imported copies, modules imported later), idempotency, never raising."""

from __future__ import annotations

import importlib
import logging
import sys

import pytest
import torch

import kernmux.ops
from kernmux import stats
from kernmux.integrations import vllm as plugin
from kernmux.integrations.vllm_hooks import moe_topk
from tests.integrations import standin_vllm
from tests.integrations.standin_vllm import ROUTER

ALL_HOOKS = {
    "moe_topk.fused", "moe_topk.cpu", "moe_experts.unquantized", "indexer.deep_gemm", "indexer.rocm",
    "sparse_mla.flashmla", "mxfp4_linear.kernel",
}


@pytest.fixture
def standin(tmp_path, monkeypatch):
    """Returns make(version="0.32.0", flashmla=True) writing a stand-in vllm on sys.path."""

    def make(version: str = "0.32.0", flashmla: bool = True):
        standin_vllm.write(tmp_path, version, flashmla)
        monkeypatch.syspath_prepend(str(tmp_path))
        importlib.invalidate_caches()
        return tmp_path

    monkeypatch.setenv("KERNMUX_FORCE", "moe_topk_softmax=torch,indexer_logits=torch,sparse_mla_decode=torch")
    monkeypatch.delenv("KERNMUX_VLLM_HOOKS", raising=False)
    standin_vllm.forget()
    plugin.unregister()
    stats.reset()
    kernmux.ops.reset()
    yield make
    plugin.unregister()
    standin_vllm.forget()
    stats.reset()
    kernmux.ops.reset()


# --------------------------------------------------------------------------- version gate


@pytest.mark.parametrize(
    "version, series",
    [
        ("0.32.0", "0.32"),
        ("0.32.0+cpu", "0.32"),
        ("0.32.5", "0.32"),
        ("0.33.0rc1", "0.33"),
        ("0.33.2.dev14+gabcdef", "0.33"),
        ("0.31.9", None),
        ("0.34.0", None),
        ("1.0.0", None),
        ("0", None),
        ("not-a-version", None),
    ],
)
def test_supported_series(version, series):
    assert plugin.supported_series(version) == series


def test_every_supported_version_has_the_moe_hooks():
    assert set(plugin.SUPPORTED_VERSIONS) >= {"0.32", "0.33"}
    for specs in plugin.SUPPORTED_VERSIONS.values():
        names = [s.name for s in specs]
        assert len(names) == len(set(names))
        assert {"moe_topk.fused", "moe_topk.cpu"} <= set(names)


@pytest.mark.parametrize("version", ["0.31.2", "0.34.0", "1.2.0"])
def test_unsupported_version_logs_and_installs_nothing(standin, caplog, version):
    standin(version)
    import vllm  # noqa: F401  (vLLM is imported when it calls its plugins)
    from vllm.model_executor.layers.fused_moe.router import fused_topk_router as ftr

    original = ftr.dispatch_topk_softmax_func
    with caplog.at_level(logging.WARNING, logger="kernmux"):
        plugin.register()
    state = plugin.state()
    assert state["status"] == "unsupported" and state["hooks"] == {}
    assert f"vLLM {version} is not supported" in caplog.text and "0.32.x, 0.33.x" in caplog.text
    assert ftr.dispatch_topk_softmax_func is original


# --------------------------------------------------------------------------- selection


@pytest.mark.parametrize(
    "setting, chosen, unknown",
    [
        (None, ALL_HOOKS, []),
        ("", ALL_HOOKS, []),
        ("moe_topk.cpu", {"moe_topk.cpu"}, []),
        ("moe_topk.cpu, moe_topk.fused", {"moe_topk.cpu", "moe_topk.fused"}, []),
        ("-indexer.rocm,-sparse_mla.flashmla", ALL_HOOKS - {"indexer.rocm", "sparse_mla.flashmla"}, []),
        ("none", set(), []),
        ("moe_topk.cpu,typo", {"moe_topk.cpu"}, ["typo"]),
    ],
)
def test_select_hooks(setting, chosen, unknown):
    selected, bad = plugin.select_hooks(plugin.SUPPORTED_VERSIONS["0.32"], setting)
    assert {s.name for s in selected} == chosen
    assert bad == unknown


# --------------------------------------------------------------------------- rebinding


def test_register_rebinds_imported_copies_and_later_imports(standin):
    standin()
    import vllm  # noqa: F401
    ftr = importlib.import_module(f"{ROUTER}.fused_topk_router")
    shared = importlib.import_module(f"{ROUTER}.shared_router")  # holds a copy already
    original = ftr.dispatch_topk_softmax_func
    assert f"{ROUTER}.cpu_router" not in sys.modules

    plugin.register()
    state = plugin.state()
    assert state["status"] == "active" and state["register_calls"] == 1
    fused = state["hooks"]["moe_topk.fused"]
    assert fused["status"] == "installed"
    assert sorted(fused["bindings"]) == sorted(
        [f"{ROUTER}.fused_topk_router.dispatch_topk_softmax_func", f"{ROUTER}.shared_router.dispatch_topk_softmax_func"]
    )
    assert ftr.dispatch_topk_softmax_func is shared.dispatch_topk_softmax_func is not original
    assert ftr.dispatch_topk_softmax_func.__wrapped__ is original
    assert state["hooks"]["moe_topk.cpu"]["status"] == "pending"

    # Imported after register(): hooked right after its code ran, so the copy taken
    # by cpu_user is the replacement too.
    cpu_user = importlib.import_module(f"{ROUTER}.cpu_user")
    cpu_router = sys.modules[f"{ROUTER}.cpu_router"]
    assert cpu_router._softmax_topk is cpu_user._softmax_topk
    assert getattr(cpu_router._softmax_topk, "__kernmux_hook__", None) == "moe_topk.cpu"
    assert plugin.state()["hooks"]["moe_topk.cpu"]["status"] == "installed"

    # The stand-in's own callers now reach kernmux.
    torch.manual_seed(0)
    logits = torch.randn(5, 8)
    ref_w, ref_ids = kernmux.ops.moe_topk_softmax(logits, 2, False)
    w, ids, tei = ftr.fused_topk(torch.zeros(5, 16), logits, 2, False)
    assert torch.equal(ids, ref_ids) and torch.allclose(w, ref_w)
    assert torch.equal(tei, torch.arange(10, dtype=torch.int32).view(2, 5).t())
    w, ids = cpu_router.CPURouter(2, False).route(logits)
    assert torch.equal(ids, ref_ids) and torch.allclose(w, ref_w)
    assert w.is_contiguous() and ids.is_contiguous()
    assert stats.snapshot()["hooks"]["moe_topk.fused"]["kernmux"] == 1
    assert stats.snapshot()["hooks"]["moe_topk.cpu"]["kernmux"] == 1
    assert sys.modules[f"{ROUTER}.fused_topk_router"].CALLS == []  # vLLM's kernel never ran

    plugin.unregister()
    assert ftr.dispatch_topk_softmax_func is original and shared.dispatch_topk_softmax_func is original
    assert not hasattr(cpu_router._softmax_topk, "__kernmux_hook__")


def test_register_hooks_the_moe_oracle_and_mxfp4_selection_with_their_copies(standin):
    standin()
    import vllm  # noqa: F401

    oracle = importlib.import_module("vllm.model_executor.layers.fused_moe.oracle.unquantized")
    method = importlib.import_module("vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method")
    original = oracle.select_unquantized_moe_backend
    plugin.register()
    hooks = plugin.state()["hooks"]
    assert hooks["moe_experts.unquantized"]["status"] == "installed"
    assert sorted(hooks["moe_experts.unquantized"]["bindings"]) == [
        "vllm.model_executor.layers.fused_moe.oracle.unquantized.select_unquantized_moe_backend",
        "vllm.model_executor.layers.fused_moe.unquantized_fused_moe_method.select_unquantized_moe_backend",
    ]
    assert method.select_unquantized_moe_backend is oracle.select_unquantized_moe_backend is not original
    assert hooks["mxfp4_linear.kernel"]["status"] == "pending"

    # Imported later: the scheme's copy is the replacement.
    scheme = importlib.import_module("vllm.model_executor.layers.quantization.online_mxfp4")
    linear = sys.modules["vllm.model_executor.kernels.linear"]
    assert scheme.init_mxfp4_linear_kernel is linear.init_mxfp4_linear_kernel
    assert linear.init_mxfp4_linear_kernel.__kernmux_hook__ == "mxfp4_linear.kernel"
    assert plugin.state()["hooks"]["mxfp4_linear.kernel"]["status"] == "installed"

    from tests.integrations import standin_moe_experts as moe

    backend, cls = method.select_unquantized_moe_backend(moe.FusedMoEConfig())
    assert backend is moe.UnquantizedMoeBackend.CPU and cls.__name__ == "KernmuxCPUUnquantizedExperts"

    plugin.unregister()
    assert method.select_unquantized_moe_backend is original is oracle.select_unquantized_moe_backend


@pytest.mark.parametrize("skip_padding", ["1", "0", None])
def test_fused_hook_keeps_the_padding_mask(standin, monkeypatch, skip_padding):
    """VLLM_MOE_SKIP_PADDING defaults to on: padded rows get id -1 through kernmux exactly
    as through vLLM's own top-k; with it off, no row is masked. The hook is installed
    either way (it used to be skipped when the variable was set, and to drop the mask
    when it was unset)."""
    if skip_padding is None:
        monkeypatch.delenv("VLLM_MOE_SKIP_PADDING", raising=False)
    else:
        monkeypatch.setenv("VLLM_MOE_SKIP_PADDING", skip_padding)
    standin()
    import vllm  # noqa: F401
    ftr = importlib.import_module(f"{ROUTER}.fused_topk_router")
    ftr.FORWARD_CONTEXT_PADDING = torch.tensor([False, False, True, False, True, True, True])
    torch.manual_seed(1)
    logits = torch.randn(5, 8)
    expected = ftr.fused_topk(torch.zeros(5, 16), logits, 2, True)  # vLLM's own answer
    plugin.register()
    assert plugin.state()["hooks"]["moe_topk.fused"]["status"] == "installed"
    got = ftr.fused_topk(torch.zeros(5, 16), logits, 2, True)
    assert torch.equal(got[1], expected[1]) and torch.allclose(got[0], expected[0])
    masked = skip_padding != "0"
    assert bool((got[1][[2, 4]] == -1).all()) is masked and (got[1][[0, 1, 3]] >= 0).all()
    assert stats.snapshot()["hooks"]["moe_topk.fused"]["kernmux"] == 1


def test_register_is_idempotent(standin):
    standin()
    import vllm  # noqa: F401

    ftr = importlib.import_module(f"{ROUTER}.fused_topk_router")
    plugin.register()
    first = ftr.dispatch_topk_softmax_func
    bindings = plugin.state()["hooks"]["moe_topk.fused"]["bindings"]
    plugin.register()
    plugin.register()
    state = plugin.state()
    assert state["register_calls"] == 3
    assert ftr.dispatch_topk_softmax_func is first
    assert not hasattr(first.__wrapped__, "__kernmux_hook__")  # never wrapped twice
    assert state["hooks"]["moe_topk.fused"]["bindings"] == bindings


def test_hook_selection_from_environment(standin, monkeypatch):
    standin()
    import vllm  # noqa: F401

    ftr = importlib.import_module(f"{ROUTER}.fused_topk_router")
    original = ftr.dispatch_topk_softmax_func
    monkeypatch.setenv("KERNMUX_VLLM_HOOKS", "moe_topk.cpu")
    plugin.register()
    assert set(plugin.state()["hooks"]) == {"moe_topk.cpu"}
    assert ftr.dispatch_topk_softmax_func is original


def test_signature_mismatch_skips_the_hook(standin, caplog):
    root = standin()
    path = root / "vllm/model_executor/layers/fused_moe/router/cpu_router.py"
    path.write_text(path.read_text().replace("def _softmax_topk(router_logits, top_k, renormalize)",
                                             "def _softmax_topk(logits, k, renormalize, bias)"))
    import vllm  # noqa: F401

    cpu_router = importlib.import_module(f"{ROUTER}.cpu_router")
    original = cpu_router._softmax_topk
    with caplog.at_level(logging.INFO, logger="kernmux"):
        plugin.register()
    hook = plugin.state()["hooks"]["moe_topk.cpu"]
    assert hook["status"] == "skipped" and "does not start with parameters" in hook["reason"]
    assert cpu_router._softmax_topk is original
    assert "moe_topk.cpu not installed" in caplog.text


def test_flashmla_stub_is_not_hooked(standin):
    standin(flashmla=False)
    import vllm  # noqa: F401

    flashmla = importlib.import_module("vllm.v1.attention.ops.flashmla")
    original = flashmla.flash_mla_with_kvcache
    plugin.register()
    hook = plugin.state()["hooks"]["sparse_mla.flashmla"]
    assert hook["status"] == "skipped" and "FlashMLA is not available" in hook["reason"]
    assert flashmla.flash_mla_with_kvcache is original


def test_alias_of_the_same_object_under_another_name_is_left_alone(standin):
    standin()
    import vllm  # noqa: F401

    flashmla = importlib.import_module("vllm.v1.attention.ops.flashmla")
    original = flashmla.flash_mla_sparse_fwd
    plugin.register()
    assert plugin.state()["hooks"]["sparse_mla.flashmla"]["status"] == "installed"
    assert flashmla.flash_mla_with_kvcache is not original
    assert flashmla.flash_mla_sparse_fwd is original


# --------------------------------------------------------------------------- never raises


def test_malformed_rules_disable_kernmux(standin, tmp_path, monkeypatch, caplog):
    standin()
    bad = tmp_path / "bad_rules.yaml"
    bad.write_text("version: 1\nrules:\n  - id: [unclosed\n")
    monkeypatch.setenv("KERNMUX_RULES", str(bad))
    kernmux.ops.reset()
    import vllm  # noqa: F401

    ftr = importlib.import_module(f"{ROUTER}.fused_topk_router")
    original = ftr.dispatch_topk_softmax_func
    with caplog.at_level(logging.ERROR, logger="kernmux"):
        plugin.register()  # must not raise
    state = plugin.state()
    assert state["status"] == "config-error" and str(bad) in state["reason"]
    assert state["hooks"] == {}
    assert ftr.dispatch_topk_softmax_func is original
    assert "vLLM runs its own kernels" in caplog.text


def test_internal_error_is_logged_not_raised(standin, monkeypatch, caplog):
    standin()
    import vllm  # noqa: F401

    def boom():
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(plugin, "_check_configuration", boom)
    with caplog.at_level(logging.ERROR, logger="kernmux"):
        plugin.register()
    assert plugin.state()["status"] == "error"
    assert "broken on purpose" in caplog.text


def test_runtime_failure_falls_back_to_vllm_once(standin, monkeypatch, caplog):
    standin()
    import vllm  # noqa: F401

    ftr = importlib.import_module(f"{ROUTER}.fused_topk_router")
    plugin.register()

    class Broken:
        def moe_topk_softmax(self, *args):
            raise RuntimeError("no kernel at all")

    monkeypatch.setattr(moe_topk, "ops_module", lambda: Broken())
    logits = torch.randn(4, 8)
    with caplog.at_level(logging.ERROR, logger="kernmux"):
        w1, ids1, _ = ftr.fused_topk(torch.zeros(4, 16), logits, 2, True)
        w2, ids2, _ = ftr.fused_topk(torch.zeros(4, 16), logits, 2, True)
    probs = torch.softmax(logits, dim=-1)
    ref_w, ref_ids = torch.topk(probs, 2, dim=-1)
    assert torch.equal(ids1, ref_ids.int()) and torch.equal(ids2, ref_ids.int())
    assert torch.allclose(w1, ref_w / ref_w.sum(-1, keepdim=True))
    assert ftr.CALLS == ["vllm_topk_softmax", "vllm_topk_softmax"]
    assert caplog.text.count("moe_topk.fused disabled") == 1
    assert plugin.state()["hooks"]["moe_topk.fused"]["disabled_after_error"]
    # The second call never reaches the hook: the factory hands out vLLM's function.
    assert stats.snapshot()["hooks"]["moe_topk.fused"] == {"fallback": 1}
