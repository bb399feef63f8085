"""``kernmux db upgrade`` from an installed copy: the migrations ship as package data.

The alembic script directory (``kernmux/tuning_db/storage/migrations``, its
``versions/*.py`` and ``script.py.mako``) is not a set of Python packages, so only
``[tool.setuptools.package-data]`` puts it into a wheel. This test installs the project
into a temporary directory and runs the CLI from there, away from the source tree.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

from kernmux.tuning_db.storage import migrations

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _python(site: pathlib.Path, cwd: pathlib.Path, *argv: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # The installed copy first; then what the environment had beyond this checkout (a
    # machine may carry the database extra outside site-packages), never the checkout.
    keep = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and pathlib.Path(p).resolve() != ROOT]
    env["PYTHONPATH"] = os.pathsep.join([str(site), *keep])
    return subprocess.run([sys.executable, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_db_upgrade_works_from_an_installed_layout(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "kernmux", src / "kernmux", ignore=shutil.ignore_patterns("__pycache__"))
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         "--quiet", "--target", str(site), str(src)],
        capture_output=True, text=True, timeout=600,
    )
    if build.returncode != 0 and "No module named pip" in build.stderr:
        pytest.skip("pip is not installed in this interpreter")
    assert build.returncode == 0, build.stderr[-2000:]
    shutil.rmtree(src)  # nothing may be read from the source copy any more
    work = tmp_path / "work"
    work.mkdir()

    where = _python(site, work, "-c", "import kernmux.tuning_db.storage.migrations as m; print(m.MIGRATIONS_DIR)")
    assert where.returncode == 0, where.stderr
    installed = pathlib.Path(where.stdout.strip())
    assert installed.is_relative_to(site), f"imported {installed}, not the installed copy"
    shipped = sorted(p.name for p in (installed / "versions").glob("*.py"))
    assert shipped == sorted(p.name for p in (migrations.MIGRATIONS_DIR / "versions").glob("*.py"))
    assert (installed / "script.py.mako").exists() and (installed / "env.py").exists()

    db = work / "tuning.sqlite"
    upgrade = _python(site, work, "-m", "kernmux", "db", "upgrade", "--db", str(db), "--json")
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    result = json.loads(upgrade.stdout)
    assert result["to"] == migrations.head_revision() and result["changed"] is True
    show = _python(site, work, "-m", "kernmux", "db", "show", "--db", str(db), "--json")
    assert show.returncode == 0 and json.loads(show.stdout)["schema"]["status"] == "current"
