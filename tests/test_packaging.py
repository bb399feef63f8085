"""Setting up tells the truth: the project metadata builds without the build backend's
warnings, and the Makefile installs the torch build the machine needs (the CPU build
where there is no GPU), Triton only for the test suite, with progress lines."""

from __future__ import annotations

import re
import subprocess
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_builds_without_setuptools_warnings():
    setuptools = pytest.importorskip("setuptools")
    if int(setuptools.__version__.split(".")[0]) < 77:
        pytest.skip(f"setuptools {setuptools.__version__} predates SPDX license strings (pyproject requires >=77)")
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any deprecation or config warning fails
        dist = apply_configuration(Distribution(), ROOT / "pyproject.toml")
    assert dist.metadata.license_expression == "Apache-2.0"
    extras = dist.metadata.provides_extras
    assert {"tuning", "postgres", "test", "triton"} <= set(extras)


def _dry_run(target: str, gpu: str, tmp_path: Path) -> str:
    proc = subprocess.run(["make", "-n", target, f"GPU_KIND={gpu}", f"VENV={tmp_path}/venv"], cwd=ROOT,
                          capture_output=True, text=True, check=True)
    return proc.stdout


@pytest.mark.skipif(subprocess.run(["which", "make"], capture_output=True).returncode != 0, reason="no make here")
def test_makefile_installs_the_cpu_build_of_torch_without_a_gpu(tmp_path):
    setup = _dry_run("setup", "cpu", tmp_path)
    readme = (ROOT / "README.md").read_text()
    index = re.search(r'TORCH_CPU_INDEX \?= (\S+)', (ROOT / "Makefile").read_text()).group(1)
    assert index == "https://download.pytorch.org/whl/cpu" and index in readme
    cpu_branch = setup[setup.index('echo "[setup] installing torch 2.13.0 (CPU build) ..."'):]
    assert '"torch==2.13.0+cpu" --index-url "https://download.pytorch.org/whl/cpu"' in cpu_branch
    assert "triton" not in setup.lower().replace("with triton", "")  # `make run` installs no Triton
    assert '-e ".[tuning,cpu]"' in setup  # the cpu extra (numba) only where there is no GPU
    assert setup.count("[setup]") >= 4  # progress lines
    dev = _dry_run("setup-dev", "cpu", tmp_path)
    assert 'if ! ' in dev and 'import triton' in dev and '"triton>=3.1"' in dev  # only when torch did not bring it


@pytest.mark.skipif(subprocess.run(["which", "make"], capture_output=True).returncode != 0, reason="no make here")
def test_makefile_keeps_an_installed_torch_and_uses_pypi_torch_with_cuda(tmp_path):
    setup = _dry_run("setup", "cuda", tmp_path)
    assert 'already installed: kept' in setup
    assert '[ "cuda" = cuda ]' in setup and 'install -q "torch==2.13.0";' in setup
    assert '-e ".[tuning]"' in setup and "numba" not in setup
