"""Installed without the ``tuning`` extra (no sqlalchemy, alembic, optuna): commands that
need the database say which extra to install; a set ``KERNMUX_DB`` is not silently
ignored by the runtime. Each case runs in a fresh process where those libraries cannot
be imported."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

BLOCK = "import sys; sys.modules.update({m: None for m in ('sqlalchemy', 'alembic', 'optuna')})\n"


def _python(code: str, tmp_path, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k not in ("KERNMUX_DB", "KERNMUX_RULES", "KERNMUX_FORCE")}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", BLOCK + textwrap.dedent(code)], capture_output=True, text=True,
                          env=environ, cwd=tmp_path, timeout=300)


@pytest.mark.parametrize(
    "argv",
    [
        ["tune", "moe_topk_softmax", "tokens=1"],
        ["db", "show"],
        ["db", "prune", "--noisy", "--dry-run"],
        ["rules", "derive"],
    ],
)
def test_commands_needing_the_database_name_the_extra(tmp_path, argv):
    proc = _python(f"from kernmux.cli.main import main; sys.exit(main({argv!r}))", tmp_path,
                   KERNMUX_DB=f"sqlite:///{tmp_path}/t.sqlite")
    assert proc.returncode == 1, proc.stderr
    assert "needs the 'tuning' extra" in proc.stderr and "pip install -e '.[tuning]'" in proc.stderr
    assert "Traceback" not in proc.stderr and "ModuleNotFoundError" not in proc.stderr


def test_runtime_warns_once_when_kernmux_db_is_set(tmp_path):
    code = """
        import logging, torch
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        import kernmux
        from kernmux.runtime import make_dispatcher
        for tokens in (4, 5):
            kernmux.ops.moe_topk_softmax(torch.randn(tokens, 16), 2)
        make_dispatcher().decide("moe_topk_softmax", {**kernmux.REGISTRY.op("moe_topk_softmax").default_features()})
    """
    proc = _python(code.replace("kernmux.REGISTRY", "__import__('kernmux.dispatch.registry', fromlist=['x']).REGISTRY"),
                   tmp_path, KERNMUX_DB=f"sqlite:///{tmp_path}/t.sqlite")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("WARNING") and "KERNMUX_DB" in line]
    assert len(warnings) == 1, proc.stderr
    assert "ignored" in warnings[0] and "'tuning' extra" in warnings[0]


def test_no_warning_when_no_database_was_asked_for(tmp_path):
    code = """
        import logging, torch
        logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
        import kernmux
        kernmux.ops.moe_topk_softmax(torch.randn(4, 16), 2)
    """
    proc = _python(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "WARNING" not in proc.stderr
