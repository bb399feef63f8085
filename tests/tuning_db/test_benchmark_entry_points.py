"""Every ``benchmarks/*.py`` entry point still imports, and every kernmux name it imports
(at the top or inside a function) exists: benchmarks run only on the GPU machine, so a
moved module must not be found missing there."""

from __future__ import annotations

import ast
import importlib
import os
import pathlib
import subprocess
import sys

import pytest
from tests.conftest import subprocess_pythonpath

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "benchmarks").glob("*.py"))


def _kernmux_imports(path: pathlib.Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name or None) of every ``import kernmux...``/``from kernmux... import``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "kernmux":
            found += [(node.lineno, node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "kernmux"]
    return found


def test_there_are_benchmarks():
    assert len(SCRIPTS) >= 5, SCRIPTS


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_kernmux_import_of_a_benchmark_resolves(script):
    imports = _kernmux_imports(script)
    assert imports, f"{script.name} imports nothing from kernmux"
    missing = []
    for line, module, name in imports:
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            missing.append(f"{script.name}:{line}: {module}: {e}")
            continue
        if name is not None and not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{script.name}:{line}: {module} has no {name}")
    assert not missing, "\n".join(missing)


def test_benchmark_modules_import():
    """Run each script's top level (not its ``__main__`` block) in one fresh interpreter."""
    code = (
        "import runpy, sys\n"
        "for path in sys.argv[1:]:\n"
        "    runpy.run_path(path, run_name='benchmark_import_check')\n"
        "print('ok')\n"
    )
    env = {**os.environ, "PYTHONPATH": subprocess_pythonpath()}
    if "TRITON_INTERPRET" not in env and not _has_cuda():
        env["TRITON_INTERPRET"] = "1"
    done = subprocess.run([sys.executable, "-c", code, *map(str, SCRIPTS)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()
