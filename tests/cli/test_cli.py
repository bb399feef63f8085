"""The CLI: exit codes, --json, what-if explain, lazy imports."""

import json
import subprocess
import sys

from kernmux.cli.main import main


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_help_does_not_import_torch():
    code = "import sys; from kernmux.cli.main import build_parser; build_parser().format_help(); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    proc = subprocess.run([sys.executable, "-m", "kernmux", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "explain" in proc.stdout


def test_explain_what_if_json(capsys):
    code, out, _ = run(
        capsys, "explain", "toy_attention", "heads=16", "--platform", "vendor=rocm", "--platform", "arch=gfx950",
        "--lib", "fake-vendor-lib=1.4", "--json",
    )
    assert code == 0
    data = json.loads(out)
    for field in ("op", "kernel", "config", "transform", "source", "rules", "candidates"):
        assert field in data
    assert data["kernel"] == "vendorlib" and data["source"] == "priority"
    assert {"kernel", "status", "reason"} <= set(data["candidates"][0])
    assert data["platform"]["vendor"] == "rocm"


def test_explain_text_and_rules_flag(capsys, tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\nrules:\n  - id: my-rule\n    op: toy_attention\n    when: {heads: 8}\n    adapt: {kernel: wide, pad_heads: 16}\n    reason: wide needs 16\n    link: https://example.org/x\n")
    code, out, _ = run(capsys, "explain", "toy_attention", "heads=8", "--rules", str(path))
    assert code == 0
    assert "kernel:    wide  (pad_heads=16)" in out and "my-rule" in out


def test_unknown_op_lists_known(capsys):
    code, _, err = run(capsys, "explain", "nope")
    assert code == 2 and "known ops" in err and "toy_attention" in err


def test_unknown_feature_lists_features(capsys):
    code, _, err = run(capsys, "explain", "toy_attention", "tokens=3")
    assert code == 2 and "features: batch, heads" in err


def test_bad_platform_and_lib(capsys):
    assert run(capsys, "explain", "toy_attention", "--platform", "vendor=intel", "--platform", "arch=x")[0] == 2
    assert run(capsys, "explain", "toy_attention", "--lib", "torch=banana")[0] == 2
    assert run(capsys, "explain", "toy_attention", "--platform", "color=red")[0] == 2


def test_invalid_user_rules_exit_1(capsys, tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("version: 1\nrules:\n  - id: x\n")
    code, _, err = run(capsys, "explain", "toy_attention", "--rules", str(path))
    assert code == 1 and f"{path}:3" in err


def test_verify_toy_kernels(capsys):
    code, out, _ = run(capsys, "verify", "toy_attention", "heads=8,16", "sink=true,false", "--kernels", "torch,chunked,wide", "--seed", "3", "--json")
    data = json.loads(out)
    assert code == 0, data
    statuses = {(r["kernel"], r["features"]["heads"]): r["status"] for r in data["results"]}
    assert statuses[("wide", 8)] == "unsupported" and statuses[("wide", 16)] == "pass"
    assert statuses[("chunked", 8)] == "pass"


def test_verify_nonfinite_skips_ops_without_nonfinite_inputs(capsys, monkeypatch):
    import dataclasses

    from kernmux.dispatch.registry import REGISTRY

    op = REGISTRY.op("toy_attention")
    if getattr(op, "make_nonfinite_inputs", None) is not None:  # an Op field that may be set
        monkeypatch.setitem(REGISTRY.ops, "toy_attention", dataclasses.replace(op, make_nonfinite_inputs=None))
    code, out, _ = run(capsys, "verify", "toy_attention", "--kernels", "torch", "--seed", "1", "--nonfinite", "--json")
    data = json.loads(out)
    assert code == 1 and data["ran"] == 0, "nothing could run: a failed check, never a pass"
    assert {r["status"] for r in data["results"]} == {"unsupported"}
    assert all("make_nonfinite_inputs" in r["detail"] for r in data["results"])


def test_ops_lists_real_ops_json(capsys):
    code, out, _ = run(capsys, "ops", "--json")
    assert code == 0
    data = json.loads(out)
    assert "platform" in data and isinstance(data["ops"], list)


def test_verify_sweeps_op_default_grid(capsys, monkeypatch):
    """No features given: the op's declared sweep_defaults grid is verified."""
    from kernmux.dispatch.registry import REGISTRY

    op = REGISTRY.op("toy_attention")
    import dataclasses

    patched = dataclasses.replace(op, sweep_defaults={"heads": (4, 8), "sink": (False, True)})
    monkeypatch.setitem(REGISTRY.ops, "toy_attention", patched)
    code, out, _ = run(capsys, "verify", "toy_attention", "--kernels", "torch", "--seed", "1", "--json")
    data = json.loads(out)
    assert code == 0 and len(data["results"]) == 4
    code, out, _ = run(capsys, "verify", "toy_attention", "heads=16", "--kernels", "torch", "--seed", "1", "--json")
    assert {r["features"]["heads"] for r in json.loads(out)["results"]} == {16}
