"""A tuning database that cannot be written is still read: by ``db show/export/report``,
``explain``, ``rules derive`` and ``kernmux.ops``; writes to it fail with a clear error.

What the tests prove, and how:

* ``test_read_only_directory_and_file``: the database file is 0444 in a 0555 directory
  and the commands run in a forked child that really cannot write there. The test
  process is often root, which bypasses file permissions, so the child then drops to
  the ``nobody`` user (``os.setuid``) after importing what it needs; run as a normal
  user, the permissions apply as they are. The kernel enforces them (EACCES), as a
  read-only mount would (EROFS): SQLite can neither write the file nor create its
  ``-wal``/``-shm`` files beside it, so the database (in WAL mode) is opened with
  ``immutable=1``. The test checks that nothing in the directory changed.
* ``test_read_only_url``: ``?mode=ro`` / ``?immutable=1`` in the URL make SQLite itself
  refuse writes, for any user (root included): reading works, writing fails cleanly.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from kernmux.cli.main import main
from kernmux.dispatch.platform import current_platform
from kernmux.dispatch.registry import REGISTRY
from kernmux.tuning_db.storage.errors import TuningDBError
from kernmux.tuning_db.storage.records import TrialRecord
from kernmux.tuning_db.storage.store import TuningStore
from kernmux.tuning_db.tuning.export import write_export
from tests.conftest import subprocess_pythonpath

REPO = pathlib.Path(__file__).resolve().parents[2]
OP = "toy_attention"
NOBODY = 65534


def _fill(url: str) -> dict[str, Any]:
    """Rows making ``chunked`` with block 4 the tuned choice for the op's default
    features on this machine (the default config is 8: the config proves the row was
    used), plus a crash of ``flaky`` for ``rules derive``."""
    op = REGISTRY.op(OP)
    features = op.default_features()
    common = dict(features=features, bucket=dict(op.bucket(features)), metrics={}, p20_us=None, p80_us=None)
    platform = current_platform()
    with TuningStore(url) as store:
        store.record(TrialRecord.for_platform(platform, op=OP, kernel="torch", config={}, status="ok",
                                              p50_us=50.0, reps=10, error=None, **common))
        row = store.record(TrialRecord.for_platform(platform, op=OP, kernel="chunked", config={"block": 4},
                                                    status="ok", p50_us=20.0, reps=10, error=None, **common))
        store.record(TrialRecord.for_platform(platform, op=OP, kernel="flaky", config={}, status="crashed",
                                              p50_us=None, reps=None, error="SIGSEGV", **common))
    return {"features": features, "row": row}


def _snapshot(directory: pathlib.Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir())}


@contextlib.contextmanager
def _world_readable_dir() -> Iterator[pathlib.Path]:
    """A directory every user can reach (pytest's tmp_path is private to its owner)."""
    root = pathlib.Path(tempfile.mkdtemp(prefix="kernmux-ro-"))
    root.chmod(0o755)
    try:
        yield root
    finally:
        for path in [root, *root.rglob("*")]:
            with contextlib.suppress(OSError):
                path.chmod(0o755 if path.is_dir() else 0o644)
        shutil.rmtree(root, ignore_errors=True)


def _run_unprivileged(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a forked child that cannot write what its user may not write (as
    root: the child becomes ``nobody`` first). Returns its JSON result; raises with the
    child's traceback if it failed."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            if os.geteuid() == 0:
                os.setgroups([])
                os.setgid(NOBODY)
                os.setuid(NOBODY)
            payload = {"ok": True, "result": fn()}
        except BaseException as e:
            payload = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        try:
            with os.fdopen(write_end, "w") as out:
                json.dump(payload, out, default=str)
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end) as inp:
        data = inp.read()
    os.waitpid(pid, 0)
    payload = json.loads(data)
    if not payload["ok"]:
        raise AssertionError(f"child failed: {payload['error']}\n{payload['traceback']}")
    return payload["result"]


def _cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def test_read_only_directory_and_file(monkeypatch):
    import torch

    import kernmux.ops  # noqa: F401  (imported before the child loses access to site-packages)
    from kernmux.dispatch import torch_op  # noqa: F401
    from kernmux.runtime import default_dispatcher, reset_default_dispatcher

    for name in ("db", "explain", "rules"):  # subcommand modules and what they import lazily
        __import__(f"kernmux.cli.{name}")
    for name in ("source", "store"):
        __import__(f"kernmux.tuning_db.storage.{name}")
    for name in ("export", "report", "derive"):
        __import__(f"kernmux.tuning_db.tuning.{name}")
    __import__("kernmux.tuning_db.measurement.verdicts")
    __import__("kernmux.rules.loader")
    __import__("kernmux.rules.lint")

    with _world_readable_dir() as root:
        directory = root / "shipped"
        directory.mkdir()
        db = directory / "tuning.sqlite"
        url = f"sqlite:///{db}"
        filled = _fill(url)
        export_file = root / "rows.json"
        with TuningStore(url) as store:
            write_export(store, export_file)
        export_file.chmod(0o644)
        db.chmod(0o444)
        directory.chmod(0o555)
        before = _snapshot(directory)
        assert set(before) == {"tuning.sqlite"}, "the database was closed cleanly (no -wal/-shm left)"
        monkeypatch.setenv("KERNMUX_DB", url)
        reset_default_dispatcher()
        op = REGISTRY.op(OP)
        args, kwargs = op.make_inputs(filled["features"], "cpu", 0)
        expected = [t.tolist() for t in op.reference(*args, **kwargs)]

        def reads() -> dict[str, Any]:
            out = {
                "show": _cli("db", "show", "--db", url),
                "show_json": _cli("db", "show", "--db", url, "--json"),
                "export": _cli("db", "export", "--db", url),
                "report": _cli("db", "report", "--db", url, "-o", os.devnull),
                "explain": _cli("explain", OP, "device=cpu", "--db", url, "--json"),
                "derive": _cli("rules", "derive", "--db", url),
                "import": _cli("db", "import", str(export_file), "--db", url),
                "upgrade": _cli("db", "upgrade", "--db", url),
            }
            got = getattr(kernmux.ops, OP)(*args, **kwargs)
            decision = default_dispatcher().decide(OP, filled["features"])
            out["ops"] = {
                "matches": all(torch.allclose(g.float(), torch.tensor(e).float(), atol=1e-5)
                               for g, e in zip(got, expected)),
                "decision": decision.as_dict(),
            }
            out["can_write"] = os.access(db, os.W_OK) or os.access(directory, os.W_OK)
            try:
                TuningStore(url).close()
                out["writable_open"] = "opened"
            except TuningDBError as e:
                out["writable_open"] = str(e)
            return out

        result = _run_unprivileged(reads)
        after = _snapshot(directory)
        reset_default_dispatcher()

    assert result["can_write"] is False, "the child could write: the test would prove nothing"
    assert after == before, "reading changed the directory"
    code, out, err = result["show"]
    assert code == 0, err
    assert "read-only:" in out and "immutable=1" in out and "rows:     3" in out
    code, out, _ = result["show_json"]
    assert code == 0 and json.loads(out)["rows"] == 3 and json.loads(out)["access"].startswith("read-only")
    code, out, _ = result["export"]
    assert code == 0 and len(json.loads(out)["rows"]) == 3
    assert result["report"][0] == 0, result["report"][2]
    code, out, err = result["explain"]
    assert code == 0, err
    decision = json.loads(out)
    assert (decision["source"], decision["kernel"], decision["config"]) == ("tuning_db", "chunked", {"block": 4})
    assert decision["tuning_row"] == filled["row"]
    assert any("read-only" in note for note in decision["notes"]), decision["notes"]
    code, out, err = result["derive"]
    if torch.cuda.is_available():
        # A CPU-tensor failure on a GPU machine is not derived (a rule's device is the
        # platform's: the deny would hit GPU tensors too); the output says so.
        assert code == 0 and "rules: []" in out and "would also hit GPU tensors" in out, out + err
    else:
        assert code == 0 and "deny: [flaky]" in out, err
    code, out, err = result["import"]
    assert code == 1 and "read-only" in err and "Traceback" not in out + err
    code, _, err = result["upgrade"]
    assert code == 1 and "read-only" in err
    ops = result["ops"]
    assert ops["matches"], "kernmux.ops gave a wrong answer"
    assert ops["decision"]["source"] == "tuning_db" and ops["decision"]["config"] == {"block": 4}
    assert "read-only" in result["writable_open"]


@pytest.mark.parametrize("option", ["mode=ro", "immutable=1"])
def test_read_only_url(option, tmp_path):
    db = tmp_path / "tuning.sqlite"
    _fill(f"sqlite:///{db}")
    before = _snapshot(tmp_path)
    url = f"sqlite:///{db}?{option}"
    env = {**os.environ, "PYTHONPATH": subprocess_pythonpath(), "PYTHONDONTWRITEBYTECODE": "1"}

    def cli(*argv: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "kernmux", *argv], capture_output=True, text=True,
                              env=env, timeout=120)

    show = cli("db", "show", "--db", url)
    assert show.returncode == 0 and "read-only: the URL opens it read-only" in show.stdout, show.stderr
    code, out, err = _cli("explain", OP, "device=cpu", "--db", url, "--json")  # in-process: the test op is registered here
    assert code == 0 and json.loads(out)["kernel"] == "chunked", err
    export = tmp_path / "rows.json"
    assert cli("db", "export", "--db", str(db), "-o", str(export)).returncode == 0
    before = _snapshot(tmp_path)
    imported = cli("db", "import", str(export), "--db", url)
    assert imported.returncode == 1
    assert "opened read-only" in imported.stderr and "Traceback" not in imported.stderr
    assert _snapshot(tmp_path) == before or option == "mode=ro"  # mode=ro may create -wal/-shm
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before["tuning.sqlite"]
    with TuningStore(f"sqlite:///{db}", read_only=True) as store:
        assert store.count() == 3


def test_a_read_only_store_refuses_writes(sqlite_url, make_trial):
    with TuningStore(sqlite_url) as store:
        store.record(make_trial())
    with TuningStore(sqlite_url, read_only=True) as store:
        assert store.access_note().startswith("writable (opened read-only")
        with pytest.raises(TuningDBError, match="opened read-only"):
            store.record(make_trial(p50_us=3.0))
        with pytest.raises(TuningDBError, match="opened read-only"):
            store.upgrade()
        assert store.count() == 1


def test_read_only_postgresql_sessions_refuse_writes(pg_url, make_trial):
    with TuningStore(pg_url) as store:
        store.record(make_trial())
    with TuningStore(pg_url, read_only=True) as store:
        assert store.count() == 1
        import sqlalchemy as sa

        with pytest.raises(TuningDBError, match="read-only transaction"):
            with store.session_scope() as session:  # a reading session that tries to write
                session.execute(sa.text("DELETE FROM kernmux_trials"))
    with TuningStore(pg_url) as store:
        assert store.count() == 1


def test_read_only_open_of_a_missing_file_creates_nothing(tmp_path):
    path = tmp_path / "absent.sqlite"
    with pytest.raises(TuningDBError, match="no tuning database"):
        TuningStore(f"sqlite:///{path}", read_only=True)
    assert not path.exists()
