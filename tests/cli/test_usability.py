"""What a newcomer trips over, each a reproduction: silent mistakes become usage errors
(exit 2) with suggestions, tracebacks become one clear line, ``--json`` errors are JSON,
explain shows its evidence."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kernmux.dispatch.platform import current_platform
from tests.conftest import HAS_CUDA
import torch

from kernmux.cli.main import main

OP = "moe_topk_softmax"


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def _rule_file(tmp_path, action: str, when: str = "{tokens: '<64'}", rule_id: str = "my-rule"):
    path = tmp_path / f"{rule_id}.yaml"
    path.write_text(
        "version: 1\nrules:\n"
        f"  - id: {rule_id}\n    op: {OP}\n    when: {when}\n    {action}\n"
        f"    reason: because {rule_id} says so\n    link: https://example.org/{rule_id}\n"
    )
    return str(path)


# --------------------------------------------------------------------- explain evidence


@pytest.mark.parametrize(
    "action,role",
    [
        ("use: torch", "decided (rule level)"),
        ("prefer: [torch_compile, torch]", "decided (prefer level)"),
        ("deny: [torch_topk]", "filtered torch_topk"),
    ],
)
def test_explain_shows_action_reason_and_link_of_every_kind(capsys, tmp_path, action, role):
    """use, prefer, deny here; adapt in the next test (no CPU kernel of this op has a config)."""
    path = _rule_file(tmp_path, action)
    code, out, _ = run(capsys, "explain", OP, "tokens=8", "--rules", path)
    assert code == 0
    assert f"my-rule: {action.split(':')[0]}" in out and f"[{role}]" in out
    assert "reason: because my-rule says so" in out and "link:   https://example.org/my-rule" in out
    assert f"from:   {path}:3 (user)" in out
    code, out, _ = run(capsys, "explain", OP, "tokens=8", "--rules", path, "--json")
    rules = json.loads(out)["rules"]
    assert rules[0]["id"] == "my-rule" and rules[0]["reason"] == "because my-rule says so"
    assert rules[0]["link"] == "https://example.org/my-rule" and rules[0]["action"] == action.split(":")[0]
    assert rules[0]["role"] == role


def test_explain_lists_the_deciding_rule_first_and_adapt_with_its_evidence(capsys, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "version: 1\nrules:\n"
        "  - id: a-prefer\n    op: toy_attention\n    when: {heads: 8}\n    prefer: [chunked]\n"
        "    reason: prefer reason\n    link: https://example.org/p\n"
        "  - id: b-use\n    op: toy_attention\n    when: {heads: 8}\n    use: wide\n"
        "    reason: use reason\n    link: https://example.org/u\n"
        "  - id: c-adapt\n    op: toy_attention\n    when: {heads: 8}\n    adapt: {kernel: wide, pad_heads: 16}\n"
        "    reason: adapt reason\n    link: https://example.org/a\n"
    )
    code, out, _ = run(capsys, "explain", "toy_attention", "heads=8", "--rules", str(path), "--json")
    assert code == 0
    data = json.loads(out)
    assert [r["id"] for r in data["rules"]] == ["b-use", "c-adapt", "a-prefer"]
    assert data["rules"][1]["role"] == "adapted the chosen kernel" and data["rules"][1]["link"] == "https://example.org/a"
    code, text, _ = run(capsys, "explain", "toy_attention", "heads=8", "--rules", str(path))
    assert text.index("b-use: use wide") < text.index("c-adapt: adapt wide") < text.index("a-prefer: prefer")
    assert "reason: prefer reason" in text and "link:   https://example.org/p" in text


def test_explain_wording(capsys, tmp_path):
    code, out, _ = run(capsys, "explain", OP, "tokens=8", "--rules", _rule_file(tmp_path, "use: torch"))
    source = next(line for line in out.splitlines() if line.startswith("source:"))
    assert "rule: rule" not in source and source == "source:    rule level: rule my-rule (its reason and link below)"
    code, out, _ = run(capsys, "explain", OP, "--platform", "vendor=rocm", "--platform", "arch=gfx950")
    platform = next(line for line in out.splitlines() if line.startswith("platform:"))
    assert platform.startswith("platform:  rocm gfx950 [what-if]; libs:"), platform


def test_explain_without_features_uses_the_defaults_and_says_which(capsys):
    code, out, err = run(capsys, "explain", OP)
    assert code == 0 and "required" not in err
    assert "(defaults of moe_topk_softmax: tokens, experts, topk, shared, dtype, renormalize, padding;" in out
    code, out, _ = run(capsys, "explain", OP, "tokens=8", "--json")
    assert json.loads(out)["defaulted_features"] == ["experts", "topk", "shared", "dtype", "renormalize", "padding"]
    code, _, err = run(capsys, "explain")
    assert code == 2 and "FEATURE=VALUE" not in err.splitlines()[-1] and "op" in err.splitlines()[-1]


def test_features_after_options_are_features(capsys):
    code, out, _ = run(capsys, "explain", OP, "--json", "tokens=8", "experts=64")
    assert code == 0 and json.loads(out)["features"]["experts"] == 64
    code, _, err = run(capsys, "explain", OP, "--json", "--bogus")
    assert code == 2


# ---------------------------------------------------------------------- feature values


@pytest.mark.parametrize(
    "features,expected",
    [
        (["tokens=-3"], "feature 'tokens' must be >= 0, got -3"),
        (["topk=500", "experts=8"], "topk: expected 1 <= topk <= experts = 8, got 500"),
        (["experts=0"], "feature 'experts' must be >= 1, got 0"),
        (["shared=9"], "feature 'shared' must be one of"),
    ],
)
@pytest.mark.parametrize("command", ["explain", "verify", "bench", "tune"])
def test_feature_values_are_validated_like_the_python_api(capsys, command, features, expected):
    code, _, err = run(capsys, command, OP, *features)
    assert code == 2 and expected in err, err


def test_the_python_api_rejects_the_same_values():
    import kernmux

    with pytest.raises(ValueError, match="topk"):
        kernmux.ops.moe_topk_softmax(torch.randn(4, 8), 500)


# --------------------------------------------------------------------- names the user typed


@pytest.mark.parametrize(
    "argv",
    [
        ["db", "show", "--op", "moe_topk_sofmax"],
        ["db", "export", "--op", "moe_topk_sofmax"],
        ["db", "report", "--op", "moe_topk_sofmax", "-o", "{tmp}/r.html"],
        ["db", "prune", "--op", "moe_topk_sofmax", "--dry-run"],
        ["rules", "derive", "--op", "moe_topk_sofmax"],
    ],
)
def test_unknown_op_filter_is_a_usage_error_with_a_suggestion(capsys, tmp_path, argv):
    db = str(tmp_path / "t.sqlite")
    assert run(capsys, "db", "upgrade", "--db", db)[0] == 0
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, out, err = run(capsys, *argv, "--db", db)
    assert code == 2 and "unknown op 'moe_topk_sofmax'" in err and "did you mean 'moe_topk_softmax'" in err
    assert out == ""


def test_op_filter_accepts_an_op_the_database_holds(capsys, tmp_path):
    """An op of a plugin not imported here is still a name the database knows."""
    from kernmux.tuning_db.storage.records import TrialRecord
    from kernmux.tuning_db.storage.store import TuningStore
    from kernmux.dispatch.platform import current_platform

    db = str(tmp_path / "t.sqlite")
    with TuningStore(db) as store:
        store.record(TrialRecord.for_platform(
            current_platform(), op="plugin_op", kernel="k", config={}, features={"n": 1}, bucket={"n": 1},
            status="error", p50_us=None, p20_us=None, p80_us=None, reps=None, metrics={}, error="x"))
    code, out, _ = run(capsys, "db", "show", "--op", "plugin_op", "--rows", "5", "--db", db, "--json")
    assert code == 0 and json.loads(out)["latest"][0]["op"] == "plugin_op"


def test_unknown_lib_is_a_usage_error_with_a_suggestion(capsys):
    code, _, err = run(capsys, "explain", OP, "--lib", "aiter=0.1.12")
    assert code == 2 and "--lib aiter" in err and "did you mean 'amd-aiter'" in err
    assert run(capsys, "explain", OP, "--lib", "amd-aiter=0.1.12")[0] == 0
    assert run(capsys, "explain", OP, "--lib", "amd_aiter=0.1.12")[0] == 0  # a spelling of the same distribution
    assert run(capsys, "explain", OP, "--lib", "packaging=24.0")[0] == 0  # installed here


def test_a_lib_named_only_by_a_rule_is_known(capsys, tmp_path):
    path = _rule_file(tmp_path, "use: torch", when="{libs: {some-engine-lib: '>=1'}}")
    assert run(capsys, "explain", OP, "--rules", path, "--lib", "some-engine-lib=1.2")[0] == 0


@pytest.mark.parametrize(
    "force,expected",
    [
        ("moe_topk=triton", "KERNMUX_FORCE names unknown op 'moe_topk' (did you mean 'moe_topk_softmax'?)"),
        ("moe_topk_softmax=tritn", "has no kernel 'tritn' (did you mean 'triton'?)"),
        ("garbage", "KERNMUX_FORCE entry 'garbage' is not 'op=kernel'"),
    ],
)
def test_bad_force_is_a_usage_error(capsys, monkeypatch, force, expected):
    monkeypatch.setenv("KERNMUX_FORCE", force)
    code, _, err = run(capsys, "explain", OP)
    assert code == 2 and expected in err and "Traceback" not in err


def test_force_garbage_in_a_fresh_process_prints_no_traceback(tmp_path):
    import os

    env = {**os.environ, "KERNMUX_FORCE": "garbage", "KERNMUX_DB": f"sqlite:///{tmp_path}/absent.sqlite"}
    proc = subprocess.run([sys.executable, "-m", "kernmux", "explain", OP], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "KERNMUX_FORCE" in proc.stderr


@pytest.mark.parametrize(
    "platform,vendor",
    [(["arch=gfx950"], "rocm"), (["arch=sm_90"], "cuda"), (["arch=gfx942", "device=MI300X"], "rocm")],
)
def test_arch_alone_implies_the_vendor_and_says_so(capsys, platform, vendor):
    argv = [a for p in platform for a in ("--platform", p)]
    code, out, _ = run(capsys, "explain", OP, *argv, "--json")
    data = json.loads(out)
    assert code == 0 and data["platform"]["vendor"] == vendor
    if current_platform().vendor != vendor:  # on a host of that vendor nothing was implied
        assert f"implies vendor={vendor}" in " ".join(data["notes"])


def test_arch_and_vendor_that_disagree_or_an_unknown_arch(capsys):
    code, _, err = run(capsys, "explain", OP, "--platform", "vendor=cuda", "--platform", "arch=gfx950")
    assert code == 2 and "is a rocm arch" in err
    code, _, err = run(capsys, "explain", OP, "--platform", "arch=banana")
    assert code == 2 and "cannot tell the vendor" in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
@pytest.mark.parametrize("command", ["verify", "bench", "tune"])
def test_device_cuda_without_cuda_is_a_clear_error(capsys, command):
    code, _, err = run(capsys, command, OP, "tokens=1", "--device", "cuda")
    assert code == 2 and "--device cuda" in err and "use --device cpu" in err


def test_unknown_kernel_names_suggest(capsys):
    code, _, err = run(capsys, "bench", OP, "--kernels", "torch_topkk")
    assert code == 2 and "did you mean 'torch_topk'" in err
    code, _, err = run(capsys, "verify", OP, "--kernels", "trition")
    assert code == 2 and "did you mean 'triton'" in err


# ------------------------------------------------------------------------ --json errors


@pytest.mark.parametrize(
    "argv,code",
    [
        (["explain", "nope"], 2),
        (["explain", OP, "tokens=-3"], 2),
        (["explain", OP, "--lib", "aiter=1"], 2),
        (["verify", OP, "--kernels", "nope"], 2),
        (["bench", OP, "tokens=x"], 2),
        (["tune", "nope"], 2),
        (["ops", "--import", "no_such_module_xyz"], 2),
        (["rules", "lint", "--import", "no_such_module_xyz"], 2),
        (["db", "show", "--db", "{tmp}/missing.sqlite"], 1),
        (["db", "prune", "--status", "okay", "--db", "{tmp}/missing.sqlite"], 2),
        (["explain", OP, "--bogus-flag"], 2),
        pytest.param(["ceilings", "--db", "{tmp}/x.sqlite"], 1,
                     marks=pytest.mark.skipif(HAS_CUDA, reason="with a GPU there is a ceiling to measure")),
        (["db"], 2),
        ([], 2),
    ],
)
def test_json_errors_are_json(capsys, tmp_path, argv, code):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    got, out, err = run(capsys, *argv, "--json")
    assert got == code, (out, err)
    assert "usage:" not in out
    data = json.loads(out)  # exactly one JSON document on stdout
    if "error" in data and "code" in data:
        assert data["code"] == code and data["error"]
    else:  # a command whose own JSON carries the failure (ceilings on CPU: its note)
        assert argv[0] == "ceilings" and data["note"]


def test_unexpected_errors_are_one_line(capsys, monkeypatch):
    import kernmux.cli.ops as ops_cli

    def boom(args):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ops_cli, "run", boom)  # register() binds the module's run at parser build time
    monkeypatch.delenv("KERNMUX_TRACEBACK", raising=False)
    code, out, err = run(capsys, "ops")
    assert code == 1 and "RuntimeError: disk on fire" in err and "KERNMUX_TRACEBACK=1" in err and "Traceback" not in err
    monkeypatch.setenv("KERNMUX_TRACEBACK", "1")
    with pytest.raises(RuntimeError, match="disk on fire"):
        main(["ops"])
