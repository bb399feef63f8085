"""A deliberately wrong kernel, registered at high priority through the ``kernmux.kernels``
entry-point group (tests/wrong_kernel_fixture), is never used to answer a call: the result
equals the reference, explain shows the self-check failure, the database holds the record,
and a second process does not check again."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import subprocess_pythonpath

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "wrong_kernel_fixture"

CALL = """
import json, torch, kernmux
from kernmux.kernels.moe_topk_softmax.reference import moe_topk_softmax as reference
g = torch.Generator().manual_seed(int(__import__("sys").argv[1]))
logits = torch.randn(7, 160, generator=g)
w, ids = kernmux.ops.moe_topk_softmax(logits, 6, True, 0)
rw, rids = reference(logits, 6, True, 0)
print(json.dumps({"equal": bool(torch.equal(ids, rids) and torch.allclose(w, rw))}))
"""


def _env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KERNMUX_")}
    env.update(
        PYTHONPATH=subprocess_pythonpath(FIXTURE),
        KERNMUX_DB=f"sqlite:///{tmp_path}/tuning.sqlite",
        KMX_WRONG_KERNEL_LOG=str(tmp_path / "calls.log"),
        TRITON_INTERPRET="0",  # CPU: torch is the in-tree kernel; the wrong one outranks it
    )
    return env


def _run(args, env):
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def _calls(tmp_path: Path) -> int:
    log = tmp_path / "calls.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.mark.slow
def test_wrong_kernel_never_answers(tmp_path):
    env = _env(tmp_path)
    first = json.loads(_run(["-c", CALL, "1"], env).strip().splitlines()[-1])
    assert first["equal"]
    assert _calls(tmp_path) == 1  # once, inside the self-check

    explained = json.loads(_run(["-m", "kernmux", "explain", "moe_topk_softmax", "tokens=7", "experts=160",
                                 "topk=6", "renormalize=true", "dtype=fp32", "--json"], env))
    wrong = next(c for c in explained["candidates"] if c["kernel"] == "wrong")
    assert wrong["status"] == "failed" and wrong["reason"].startswith("self-check failed (row ")
    assert "id_mismatches" in wrong["reason"]
    assert explained["kernel"] != "wrong"

    shown = json.loads(_run(["-m", "kernmux", "db", "show", "--rows", "20", "--json"], env))
    records = shown["latest"]
    assert any(r["kernel"] == "wrong" and r["status"] == "numerics_failed" for r in records), records

    second = json.loads(_run(["-c", CALL, "2"], env).strip().splitlines()[-1])
    assert second["equal"]
    assert _calls(tmp_path) == 1  # the second process read the record: no check, no call
