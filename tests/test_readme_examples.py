"""The README's examples run as written: the rule example lints (and reuses no shipped id),
and "Add your own kernel" — its module and its pyproject snippet, copied out of the README
— works through ``--import`` and through the ``kernmux.kernels`` entry point."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import yaml
from tests.conftest import subprocess_pythonpath

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = re.compile(r"<!-- example: (?P<path>\S+) -->\n```\w*\n(?P<body>.*?)\n```", re.S)


def examples() -> dict[str, str]:
    return {m["path"]: m["body"] + "\n" for m in EXAMPLE.finditer((ROOT / "README.md").read_text())}


def test_the_readme_has_its_examples():
    assert {"rules.yaml", "my_kernels/topk.py", "my_kernels/pyproject.toml"} <= set(examples())


def test_rule_example_lints_and_reuses_no_shipped_id(tmp_path):
    from kernmux.rules.lint import lint_files

    path = tmp_path / "rules.yaml"
    path.write_text(examples()["rules.yaml"])
    report = lint_files([path])
    assert report.ok, [p.text() for p in report.problems]
    shipped = {rule["id"] for f in (ROOT / "kernmux/rules/shipped").glob("*.yaml")
               for rule in yaml.safe_load(f.read_text())["rules"]}
    ids = {rule["id"] for rule in yaml.safe_load(path.read_text())["rules"]}
    assert ids and not ids & shipped


def _package(tmp_path: Path) -> Path:
    """The example package as the README describes it: my_kernels/{__init__,topk}.py."""
    blocks = examples()
    pkg = tmp_path / "src"
    (pkg / "my_kernels").mkdir(parents=True)
    (pkg / "my_kernels" / "__init__.py").write_text("")
    (pkg / "my_kernels" / "topk.py").write_text(blocks["my_kernels/topk.py"])
    (pkg / "pyproject.toml").write_text(blocks["my_kernels/pyproject.toml"])
    return pkg


def _drive(tmp_path: Path, paths: list[Path], commands: list[list[str]], **env: str) -> list[dict]:
    """Run ``kernmux`` commands in one fresh process; (exit code, stdout) of each."""
    script = textwrap.dedent(f"""
        import contextlib, io, json, os, sys
        from kernmux.cli.main import main
        results = []
        for argv in {commands!r}:
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                code = main(argv)
            results.append({{"argv": argv, "code": code, "out": out.getvalue()}})
        sys.__stdout__.write("RESULTS" + json.dumps(results))
    """)
    environ = {k: v for k, v in os.environ.items() if not k.startswith("KERNMUX_")}
    environ.update(env)
    environ["KERNMUX_DB"] = f"sqlite:///{tmp_path}/t.sqlite"
    environ["PYTHONPATH"] = subprocess_pythonpath(*paths)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=environ,
                          cwd=tmp_path, timeout=600)
    assert proc.returncode == 0 and "RESULTS" in proc.stdout, proc.stderr[-3000:]
    return json.loads(proc.stdout.split("RESULTS", 1)[1])


def test_add_your_own_kernel_with_import(tmp_path):
    pkg = _package(tmp_path)
    rules = tmp_path / "prefer.yaml"
    rules.write_text("version: 1\nrules:\n  - id: prefer-mine\n    op: moe_topk_softmax\n    prefer: [my_sorted]\n"
                     "    reason: try it\n    link: https://example.org\n")
    imp = ["--import", "my_kernels.topk"]
    [lint_without] = _drive(tmp_path, [pkg], [["rules", "lint", str(rules), "--json"]])  # the module not imported
    assert lint_without["code"] == 1 and "my_sorted" in lint_without["out"]
    results = _drive(tmp_path, [pkg], [
        ["verify", "moe_topk_softmax", "tokens=7", "experts=160,288", *imp, "--kernels", "my_sorted", "--device", "cpu", "--json"],
        ["explain", "moe_topk_softmax", "tokens=9", "device=cpu", *imp, "--rules", str(rules), "--json"],
        ["bench", "moe_topk_softmax", "tokens=8", "device=cpu", *imp, "--kernels", "my_sorted", "--rep-ms", "5", "--warmup-ms", "1", "--json"],
        ["tune", "moe_topk_softmax", "tokens=8", *imp, "--kernels", "torch,my_sorted", "--trials", "2", "--in-process",
         "--rep-ms", "5", "--warmup-ms", "1", "--device", "cpu", "--json"],
        ["rules", "lint", str(rules), *imp, "--json"],
        ["ops", *imp, "--json"],
    ])
    verify, explain, bench, tune, lint, ops = results
    assert verify["code"] == 0 and json.loads(verify["out"])["failed"] == 0 and json.loads(verify["out"])["ran"] > 0
    decision = json.loads(explain["out"])
    assert explain["code"] == 0 and decision["kernel"] == "my_sorted" and decision["rule"] == "prefer-mine"
    assert bench["code"] == 0 and json.loads(bench["out"])["rows"][0]["status"] == "ok"
    assert tune["code"] == 0 and json.loads(tune["out"])["results"][0]["rows"] == 2
    assert lint["code"] == 0, lint["out"]
    kernels = {k["kernel"] for op in json.loads(ops["out"])["ops"] if op["op"] == "moe_topk_softmax" for k in op["kernels"]}
    assert "my_sorted" in kernels


def test_add_your_own_kernel_with_the_entry_point(tmp_path):
    """What ``pip install -e .`` of the README's pyproject puts on the path: the package
    and a dist-info with its entry points (written here from the README's snippet)."""
    pkg = _package(tmp_path)
    project = tomllib.loads((pkg / "pyproject.toml").read_text())["project"]
    dist = pkg / f"{project['name'].replace('-', '_')}-{project['version']}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {project['name']}\nVersion: {project['version']}\n")
    group = project["entry-points"]["kernmux.kernels"]
    (dist / "entry_points.txt").write_text("[kernmux.kernels]\n" + "".join(f"{k} = {v}\n" for k, v in group.items()))
    results = _drive(tmp_path, [pkg], [
        ["ops", "--json"],
        ["explain", "moe_topk_softmax", "device=cpu", "--json"],
    ], KERNMUX_FORCE="moe_topk_softmax=my_sorted")
    ops, explain = results
    data = json.loads(ops["out"])
    assert not data["plugin_errors"], data["plugin_errors"]
    kernels = {k["kernel"] for op in data["ops"] if op["op"] == "moe_topk_softmax" for k in op["kernels"]}
    assert "my_sorted" in kernels
    assert explain["code"] == 0 and json.loads(explain["out"])["kernel"] == "my_sorted"
