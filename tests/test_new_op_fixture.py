"""A new op added as data: tests/op_fixture holds a third-party package (reference + spec
+ one kernel) and its dist-info with a ``kernmux.kernels`` entry point, nothing else. With
that folder on the path, and no edit anywhere in kernmux or the other tests, the op is
registered, listed by ``kernmux ops``, explained, verified by the generic parity test and
tuned on CPU into a database that explain then uses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.conftest import subprocess_pythonpath

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "op_fixture"
OP = "fixture_scaled_add"


def _run(args: list[str], tmp_path: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERNMUX_")}
    env["PYTHONPATH"] = subprocess_pythonpath(FIXTURE)
    env["KERNMUX_DB"] = f"sqlite:///{tmp_path}/tuning.sqlite"
    env["TRITON_INTERPRET"] = os.environ.get("TRITON_INTERPRET", "")
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _ok(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def test_not_known_without_its_package(tmp_path):
    from kernmux.dispatch.registry import REGISTRY

    assert OP not in {op.name for op in REGISTRY.all_ops()}


@pytest.mark.slow
def test_new_op_is_listed_explained_verified_and_tuned(tmp_path):
    ops = json.loads(_ok(_run(["-m", "kernmux", "ops", "--json"], tmp_path)))
    entry = next(op for op in ops["ops"] if op["op"] == OP)
    assert [(k["kernel"], k["available"]) for k in entry["kernels"]] == [("fused", True)]

    explained = json.loads(_ok(_run(["-m", "kernmux", "explain", OP, "n=1000", "--json"], tmp_path)))
    assert (explained["kernel"], explained["source"]) == ("fused", "priority")

    # The generic parity test picks the op up by itself (every declared sweep value).
    parity = _ok(_run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels/test_all_ops_parity.py",
                       "-k", OP], tmp_path))
    assert "3 passed" in parity, parity

    _ok(_run(["-m", "kernmux", "tune", OP, "n=1000", "--trials", "2", "--sampler", "grid", "--device", "cpu",
              "--baseline", "fused", "--timeout", "120"], tmp_path))
    tuned = json.loads(_ok(_run(["-m", "kernmux", "explain", OP, "n=1000", "--json"], tmp_path)))
    assert (tuned["kernel"], tuned["source"]) == ("fused", "tuning_db")
    assert tuned["config"]["chunk"] in (256, 4096)
