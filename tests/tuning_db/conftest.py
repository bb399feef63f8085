"""Fixtures for tuning-database tests: a temporary SQLite file and a real PostgreSQL.

* ``sqlite_url``: a fresh SQLite file per test.
* ``pg_server`` (session): a PostgreSQL server started by this fixture on 127.0.0.1
  from Debian's binaries (``/usr/lib/postgresql/*/bin`` or PATH), run as the
  ``postgres`` user when the tests run as root, stopped at session end.
  ``scripts/ci_postgres.sh`` installs the binaries. Without them the PostgreSQL cases
  are skipped, unless ``KERNMUX_REQUIRE_POSTGRES=1`` or ``CI=true`` makes that a failure.
* ``pg_url``: a fresh database on that server per test, dropped afterwards.
* ``own_pg_server``: a PostgreSQL server for one test only (it may stop and restart it).
* ``store_url``: parametrized over ``["sqlite", "postgresql"]``.
* ``make_trial``: a factory of valid :class:`TrialRecord` s (keyword overrides).
"""

from __future__ import annotations

import glob
import itertools
import os
import pathlib
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterator
from typing import Any

import pytest

PG_USER = "kernmux"
TEST_DATABASE = "kernmux_test"
_DB_COUNTER = itertools.count()


# --------------------------------------------------------------------------- PostgreSQL


def _find_pg_bin() -> pathlib.Path | None:
    """Directory holding initdb/pg_ctl: the newest /usr/lib/postgresql/N/bin, else PATH."""
    def version(path: str) -> int:
        try:
            return int(pathlib.Path(path).parent.name)
        except ValueError:
            return -1

    for candidate in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True):
        if (pathlib.Path(candidate) / "initdb").exists() and (pathlib.Path(candidate) / "pg_ctl").exists():
            return pathlib.Path(candidate)
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return pathlib.Path(initdb).resolve().parent
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PostgresServer:
    """A throwaway PostgreSQL cluster in a temporary directory (trust auth, 127.0.0.1)."""

    def __init__(self, bindir: pathlib.Path):
        self.bindir = bindir
        self.root = pathlib.Path(tempfile.mkdtemp(prefix="kernmux-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            # PostgreSQL refuses to run as root: run its binaries as "postgres".
            import pwd

            try:
                account = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root and no 'postgres' user to run PostgreSQL as") from None
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]

    def _run(self, *args: str) -> None:
        subprocess.run([*self.prefix, *args], check=True, capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", PG_USER,
            "--auth=trust", "--encoding=UTF8", "--no-sync",
        )
        self._options = " ".join([
            f"-p {self.port}", "-c listen_addresses=127.0.0.1",
            f"-c unix_socket_directories={self.root}",
            # A test server: durability off for speed.
            "-c fsync=off", "-c synchronous_commit=off", "-c full_page_writes=off",
            "-c max_connections=200",
        ])
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"),
            "-o", self._options, "-w", "-t", "60", "start",
        )

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str, database: str = "postgres") -> None:
        import psycopg

        with psycopg.connect(host="127.0.0.1", port=self.port, user=PG_USER, dbname=database, autocommit=True) as conn:
            conn.execute(sql)

    def halt(self) -> None:
        """Stop the server, keeping its data (``resume`` starts it again on the same port)."""
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop")

    def resume(self) -> None:
        self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.root / "log"),
                  "-o", self._options, "-w", "-t", "60", "start")

    def stop(self) -> None:
        try:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        except subprocess.CalledProcessError:
            pass  # already stopped (a test halted it)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def log_tail(self) -> str:
        try:
            return (self.root / "log").read_text()[-4000:]
        except OSError:
            return ""


def _started_server() -> PostgresServer:
    """A started throwaway server, or a skip/failure saying why there is none."""
    # CI (CI=true) installs the binaries with scripts/ci_postgres.sh: never skip there.
    required = os.environ.get("KERNMUX_REQUIRE_POSTGRES") == "1" or os.environ.get("CI") == "true"
    bindir = _find_pg_bin()
    if bindir is None:
        message = "PostgreSQL binaries (initdb, pg_ctl) not found; run scripts/ci_postgres.sh"
        if required:
            pytest.fail(message + " (required: KERNMUX_REQUIRE_POSTGRES=1 or CI=true)")
        pytest.skip(message)
    pytest.importorskip("psycopg", reason="psycopg not installed (pip install 'kernmux[postgres]')")
    server = PostgresServer(bindir)
    try:
        server.start()
    except (subprocess.CalledProcessError, RuntimeError) as e:
        detail = getattr(e, "stderr", "") or ""
        server.stop()
        pytest.fail(f"could not start PostgreSQL from {bindir}: {e}\n{detail}\n{server.log_tail()}")
    server.admin(f"CREATE DATABASE {TEST_DATABASE}")
    return server


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresServer]:
    server = _started_server()
    yield server
    server.stop()


@pytest.fixture
def own_pg_server() -> Iterator[PostgresServer]:
    """A server of this test's own: stopping it mid-test disturbs no other test."""
    server = _started_server()
    yield server
    server.stop()


@pytest.fixture
def pg_url(pg_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty PostgreSQL schema for one test, first on the connection's search_path.

    A schema (milliseconds) rather than a database (half a second) per test; the URL
    is an ordinary one with ``options=-csearch_path=...``, as a deployment using a
    dedicated schema would have."""
    name = f"kmtest_{os.getpid()}_{next(_DB_COUNTER)}"
    pg_server.admin(f"CREATE SCHEMA {name}", database=TEST_DATABASE)
    yield pg_server.url(TEST_DATABASE) + f"?options=-csearch_path%3D{name}"
    pg_server.admin(f"DROP SCHEMA IF EXISTS {name} CASCADE", database=TEST_DATABASE)


# --------------------------------------------------------------------------- SQLite / both


@pytest.fixture
def sqlite_url(tmp_path: pathlib.Path) -> str:
    return f"sqlite:///{tmp_path / 'tuning.sqlite'}"


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request: pytest.FixtureRequest) -> str:
    """One database URL per backend: every test using it runs on SQLite and PostgreSQL."""
    if request.param == "sqlite":
        return request.getfixturevalue("sqlite_url")
    return request.getfixturevalue("pg_url")


@pytest.fixture
def store(store_url: str) -> Iterator[Any]:
    from kernmux.tuning_db.storage.store import TuningStore

    s = TuningStore(store_url)
    yield s
    s.close()


# --------------------------------------------------------------------------- records


@pytest.fixture
def platform() -> Any:
    """A fixed what-if platform (independent of this machine)."""
    from kernmux.dispatch.platform import Platform

    return Platform(
        vendor="cuda", arch="sm_90", device="NVIDIA H100 80GB HBM3", units=132,
        libs={"torch": "2.9.0", "triton": "3.5.0", "vllm": "0.11.0"},
    )


@pytest.fixture
def make_trial(platform: Any) -> Callable[..., Any]:
    """make_trial(**overrides) -> TrialRecord: an ok triton trial on ``platform``."""
    from kernmux.tuning_db.storage.records import TrialRecord

    def make(*, on: Any = None, **overrides: Any) -> TrialRecord:
        fields: dict[str, Any] = dict(
            op="moe_topk_softmax", kernel="triton", config={"BLOCK": 64, "num_warps": 4},
            features={"tokens": 13, "experts": 64, "topk": 2, "dtype": "bf16", "device": "cuda"},
            bucket={"tokens": 16, "experts": 64, "topk": 2, "dtype": "bf16"},
            status="ok", p50_us=10.0, p20_us=9.5, p80_us=10.5, reps=100,
            metrics={"max_abs_err": 0.0}, error=None, study=None, trial_number=None,
        )
        fields.update(overrides)
        return TrialRecord.for_platform(on or platform, requires=("vllm",) if fields["kernel"] == "vllm" else (), **fields)

    return make
