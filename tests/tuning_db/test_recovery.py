"""Trials of dead tuning processes are settled from the store; claims decide who measures;
connection errors are recognised through optuna's wrapping and retried for a window."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import time

import pytest

optuna = pytest.importorskip("optuna")

import sqlalchemy as sa  # noqa: E402
from optuna.trial import TrialState  # noqa: E402

from kernmux.tuning_db.storage.errors import TuningDBError  # noqa: E402
from kernmux.tuning_db.storage.retry import is_connection_error, retry, root_cause  # noqa: E402
from kernmux.tuning_db.storage.store import TuningStore  # noqa: E402
from kernmux.tuning_db.tuning.recovery import (  # noqa: E402
    Recovery,
    earlier_claim,
    local_process_gone,
    machine,
    process_start,
    this_owner,
)
from kernmux.tuning_db.tuning.study_storage import open_study_storage  # noqa: E402


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def storage(sqlite_url):
    TuningStore(sqlite_url).close()
    return open_study_storage(sqlite_url)


def _study(storage, name="s"):
    return optuna.create_study(study_name=name, storage=storage, direction="minimize")


def _running(study, *, owner=None, point="p"):
    trial = study.ask()
    if owner is not None:
        trial.set_user_attr("owner", owner)
    if point is not None:
        trial.set_user_attr("point", point)
    return trial


def _recovery(storage, stored=None, **kw):
    kw.setdefault("legacy_after_s", 1e9)
    return Recovery(storage, lambda name: (lambda number: (stored or {}).get(number)), heartbeat=False, **kw)


def _state(study, number):
    return study._storage.get_trial(study._storage.get_trial_id_from_study_id_trial_number(study._study_id, number))


def test_a_dead_local_owner_without_a_row_is_failed(storage):
    study = _study(storage)
    _running(study, owner={**machine(), "pid": _dead_pid(), "start": "1"})
    assert _recovery(storage).reclaim(study, study.get_trials(states=(TrialState.RUNNING,))) == 1
    trial = _state(study, 0)
    assert trial.state == TrialState.FAIL and "is gone" in trial.user_attrs["reclaimed"]


def test_a_dead_local_owner_with_a_row_is_told_the_stored_result(storage):
    study = _study(storage)
    _running(study, owner={**machine(), "pid": _dead_pid(), "start": "1"})
    _running(study, owner={**machine(), "pid": _dead_pid(), "start": "1"}, point="q")
    recovery = _recovery(storage, stored={0: ("ok", 12.5), 1: ("crashed", None)})
    assert recovery.reclaim(study, study.get_trials(states=(TrialState.RUNNING,))) == 2
    ok, crashed = _state(study, 0), _state(study, 1)
    assert ok.state == TrialState.COMPLETE and ok.value == 12.5 and ok.user_attrs["status"] == "ok"
    assert crashed.state == TrialState.PRUNED and crashed.user_attrs["status"] == "crashed"
    assert len(recovery.reclaimed) == 2
    # A second process settling the same trials finds them finished: nothing happens.
    assert _recovery(storage).reclaim(study, [ok, crashed]) == 0


def test_live_owners_and_young_unowned_trials_are_left_alone(storage):
    study = _study(storage)
    _running(study, owner=this_owner())
    _running(study, owner=None, point=None)  # between ask and owner, a moment ago
    assert _recovery(storage).reclaim(study, study.get_trials(states=(TrialState.RUNNING,))) == 0
    assert {t.state for t in study.get_trials()} == {TrialState.RUNNING}
    # An unowned trial older than the limit is dead.
    assert _recovery(storage, unowned_after_s=-1).reclaim(study, study.get_trials(states=(TrialState.RUNNING,))) == 1
    assert [t.state for t in study.get_trials()] == [TrialState.RUNNING, TrialState.FAIL]


def test_a_reused_pid_is_not_mistaken_for_the_owner():
    me = this_owner()
    assert local_process_gone(me) is False
    if process_start(os.getpid()) is None:
        pytest.skip("no /proc: process start times are unknown here")
    assert local_process_gone({**me, "start": "0"}) is True
    assert local_process_gone({**me, "host": "elsewhere"}) is None
    assert local_process_gone({**me, "pid": _dead_pid()}) is True


def test_a_remote_owner_is_judged_by_its_heartbeat(storage, sqlite_url):
    study = _study(storage)
    remote = {**machine(), "host": "another-host", "pid": 1}
    trial = _running(study, owner=remote)
    storage.record_heartbeat(trial._trial_id)
    recovery = _recovery(storage)
    assert recovery.reclaim(study, study.get_trials(states=(TrialState.RUNNING,))) == 0
    engine = sa.create_engine(sqlite_url)
    with engine.begin() as conn:  # the heartbeat stopped ten minutes ago
        conn.execute(sa.text("UPDATE trial_heartbeats SET heartbeat = :t"),
                     {"t": dt.datetime.utcnow() - dt.timedelta(minutes=10)})
    engine.dispose()
    assert recovery.reclaim(study, study.get_trials(states=(TrialState.RUNNING,))) == 1
    assert "heartbeat" in _state(study, 0).user_attrs["reclaimed"]


def test_the_first_claim_of_a_point_measures_it(storage):
    study = _study(storage)
    first = _running(study, owner=this_owner(), point="p")
    second = _running(study, owner=this_owner(), point="p")
    other = _running(study, owner=this_owner(), point="q")
    assert earlier_claim(study, first.number, "p") is None
    assert earlier_claim(study, second.number, "p").number == first.number
    assert earlier_claim(study, other.number, "q") is None


def test_a_claim_waits_for_a_lower_trial_still_choosing_its_point(storage):
    study = _study(storage)
    undecided = _running(study, owner=this_owner(), point=None)
    mine = _running(study, owner=this_owner(), point="p")
    start = time.monotonic()
    assert earlier_claim(study, mine.number, "p", wait_s=0.3) is None  # it never claims: proceed
    assert time.monotonic() - start >= 0.3
    study._storage.set_trial_user_attr(undecided._trial_id, "point", "p")
    assert earlier_claim(study, mine.number, "p").number == undecided.number


def _refused() -> Exception:
    """What optuna raises when PostgreSQL is down: its own error, the driver's inside."""
    driver = ConnectionRefusedError("connection to server at \"127.0.0.1\", port 1 failed: Connection refused")
    wrapped = sa.exc.OperationalError("SELECT 1", {}, driver)
    try:
        try:
            raise wrapped
        except sa.exc.OperationalError as e:
            raise optuna.exceptions.StorageInternalError(
                "An exception is raised during the commit. This typically happens due to invalid data "
                "in the commit, e.g. exceeding max length. ") from e
    except optuna.exceptions.StorageInternalError as e:
        return e


def test_connection_errors_are_found_under_optunas_wrapping():
    error = _refused()
    assert is_connection_error(error)
    assert "Connection refused" in root_cause(error) and "max length" not in root_cause(error)
    assert not is_connection_error(ValueError("invalid literal"))


def test_a_connection_is_retried_for_the_window_then_given_up():
    calls = []

    def flaky():
        calls.append(time.monotonic())
        if len(calls) < 4:
            raise _refused()
        return "back"

    assert retry(flaky, transient=is_connection_error, attempts=1, window_s=10) == "back" and len(calls) == 4
    start = time.monotonic()
    with pytest.raises(optuna.exceptions.StorageInternalError):
        retry(lambda: (_ for _ in ()).throw(_refused()), transient=is_connection_error, attempts=1, window_s=0.5)
    assert 0.5 <= time.monotonic() - start < 3


def test_the_study_storage_reports_the_real_cause(monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"postgresql+psycopg://kernmux@127.0.0.1:{port}/none"
    pytest.importorskip("psycopg")
    with pytest.raises(TuningDBError) as info:
        open_study_storage(url, reconnect_s=0.5)
    assert "Connection refused" in str(info.value) and "max length" not in str(info.value)
