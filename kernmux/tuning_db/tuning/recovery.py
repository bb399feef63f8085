"""Trials of dead tuning processes: noticed promptly, never counted, never lost.

A trial is RUNNING in optuna from ``ask`` to ``tell``. A tuning process killed in
between (``kill -9``, the OOM killer, a lost host) leaves it RUNNING for good: the search
would count it toward the budget and treat its point as taken, so a re-run could end
with a point never measured.

* Ownership: right after ``ask`` the process writes its identity as the trial's
  ``owner`` attribute (host, boot id, pid namespace, pid, process start time), then
  records optuna's heartbeat for it; while the trial runs, :class:`Heartbeat` records a
  heartbeat every few seconds.
* Judgement (:meth:`Recovery.why_dead`): a RUNNING trial is dead when its owner is on
  this machine and that process is gone (or its pid now belongs to a newer process), at
  once; when its heartbeat is older than the grace period (another host; optuna compares
  database-server times); when it has no owner and started more than ``unowned_after_s``
  ago (its process died between ``ask`` and the owner, a few milliseconds; such a trial
  has no point and never counted); or when its owner is on another host, it has no
  heartbeat and it started more than ``legacy_after_s`` ago (died before its first beat).
* Reclaim (:meth:`Recovery.reclaim`): a dead trial whose measurement reached the store
  (the row is written before the trial is told) is told that result; one without a row
  is marked FAIL, so its point counts as unmeasured again. Processes reclaiming the same
  trial at once are harmless: the first one wins, the others find it finished.
* Claims (:func:`earlier_claim`): a point is measured by the lowest-numbered trial that
  claims it; a process whose claim is not the first backs off (no second measurement
  when several processes, or the baseline forced in each, pick the same point).
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import os
import pathlib
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

log = logging.getLogger("kernmux")

# (status, p50 in us or None) of the row a trial stored, or None when it stored none.
Recorded = Callable[[int], "tuple[str, float | None] | None"]


# --------------------------------------------------------------------------- identity


def _read(path: str) -> str:
    try:
        return pathlib.Path(path).read_text().strip()
    except OSError:
        return ""


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux ``/proc``), or
    None when unknown: with the pid, it names one process even after pids are reused."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    fields = text.rsplit(")", 1)[-1].split()
    return fields[19] if len(fields) > 19 else None  # field 22 of stat(5)


@functools.lru_cache(maxsize=1)
def machine() -> dict[str, str]:
    """What makes two pids comparable: same host name, same boot, same pid namespace."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    return {"host": socket.gethostname(), "boot": _read("/proc/sys/kernel/random/boot_id"), "pidns": namespace}


def this_owner() -> dict[str, Any]:
    """The identity of this process, stored on the trials it runs."""
    return {**machine(), "pid": os.getpid(), "start": process_start(os.getpid())}


def local_process_gone(owner: Any) -> bool | None:
    """True when ``owner`` ran on this machine and is gone, False when it is alive, None
    when it is not on this machine (or the record is not an owner)."""
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
        return None
    if any(owner.get(key) != value for key, value in machine().items()):
        return None
    pid = owner["pid"]
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, owned by another user
    started = owner.get("start")
    now = process_start(pid)
    return started is not None and now is not None and now != started


# --------------------------------------------------------------------------- heartbeat


class Heartbeat:
    """Records optuna's heartbeat for the trial this process is running.

    One daemon thread per process; :meth:`watch` switches the trial (the first beat is
    recorded before it returns, so a trial with an owner always has a heartbeat). A beat
    that fails (the database restarting) is skipped, not retried."""

    def __init__(self, storage: Any, interval_s: float):
        self.storage = storage
        self.interval_s = interval_s
        self._trial_id: int | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kernmux-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self, trial_id: int) -> None:
        try:
            self.storage.record_heartbeat(trial_id)
        except Exception as e:  # the next beat may get through; the grace period covers gaps
            log.debug("kernmux: heartbeat of trial %s not recorded: %s", trial_id, e)

    def watch(self, trial_id: int | None) -> None:
        with self._lock:
            self._trial_id = trial_id
        if trial_id is not None:
            self._beat(trial_id)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            with self._lock:
                trial_id = self._trial_id
            if trial_id is not None:
                self._beat(trial_id)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# --------------------------------------------------------------------------- recovery


def stored_results(store: Any) -> Callable[[str], Recorded]:
    """study name -> (trial number -> (status, p50) of the row ``store`` holds for that
    trial, or None): what :class:`Recovery` tells a dead process's trial."""

    def for_study(name: str) -> Recorded:
        def lookup(number: int) -> tuple[str, float | None] | None:
            rows = store.rows(study=name, trial_number=number)
            return (rows[-1].status, rows[-1].p50_us) if rows else None

        return lookup

    return for_study


def trial_id(trial: Any) -> int:
    """optuna's storage id of a trial (``Trial`` and ``FrozenTrial`` both carry it)."""
    return trial._trial_id


def _age_s(trial: Any) -> float:
    start = trial.datetime_start
    if start is None:
        return 0.0
    if start.tzinfo is not None:  # optuna stores local naive times; be safe with aware ones
        start = start.astimezone().replace(tzinfo=None)
    return (dt.datetime.now() - start).total_seconds()


class Recovery:
    """Ownership, heartbeat and reclaim for one tuning process and one storage.

    storage: optuna's RDB storage (the backend, not the cached wrapper); recorded(study
    name) -> a function of the trial number giving the stored row's (status, p50), or
    None. legacy_after_s: age after which a RUNNING trial is dead whatever it says (no
    trial outlives its timeout); unowned_after_s: the same for a trial without owner."""

    def __init__(
        self,
        storage: Any,
        recorded: Callable[[str], Recorded],
        *,
        legacy_after_s: float,
        unowned_after_s: float = 60.0,
        heartbeat: bool = True,
    ):
        self.storage = storage
        self.recorded = recorded
        self.legacy_after_s = legacy_after_s
        self.unowned_after_s = unowned_after_s
        self.owner = this_owner()
        interval = getattr(storage, "heartbeat_interval", None) if heartbeat else None
        self.heartbeat = Heartbeat(storage, interval) if interval else None
        self.reclaimed: list[str] = []

    # -- this process's trials ------------------------------------------------------

    def claim(self, trial: Any) -> None:
        """Called right after ``ask``: the owner attribute, then the first heartbeat."""
        trial.set_user_attr("owner", self.owner)
        if self.heartbeat is not None:
            self.heartbeat.watch(trial_id(trial))

    def release(self) -> None:
        """Called after ``tell``."""
        if self.heartbeat is not None:
            self.heartbeat.watch(None)

    def close(self) -> None:
        if self.heartbeat is not None:
            self.heartbeat.close()

    # -- other processes' trials ----------------------------------------------------

    def _stale_ids(self, study: Any) -> set[int]:
        if not getattr(self.storage, "heartbeat_interval", None):
            return set()
        study_id = self.storage.get_study_id_from_name(study.study_name)
        return set(self.storage._get_stale_trial_ids(study_id))  # BaseHeartbeat's query

    def why_dead(self, trial: Any, stale: set[int] | None) -> str:
        """Why ``trial`` (RUNNING) belongs to a dead process, or "" if it may be alive.
        stale: optuna's heartbeat-stale trial ids (None: not queried yet)."""
        owner = trial.user_attrs.get("owner")
        gone = local_process_gone(owner)
        if gone:
            return f"its tuning process (pid {owner['pid']} on {owner['host']}) is gone"
        if gone is False:
            return ""
        if stale is not None and trial_id(trial) in stale:
            return "no heartbeat within the grace period (its tuning process died)"
        age = _age_s(trial)
        if owner is None and age > self.unowned_after_s:
            return f"running for {age:.0f} s without an owner (its tuning process died right after asking)"
        if age > self.legacy_after_s:
            return f"running for {age:.0f} s, longer than any trial may"
        return ""

    def reclaim(self, study: Any, running: Sequence[Any]) -> int:
        """Settle every dead trial among ``running``; returns how many were settled."""
        if not running:
            return 0
        remote = [t for t in running if local_process_gone(t.user_attrs.get("owner")) is None]
        stale = self._stale_ids(study) if remote else set()
        settled = 0
        for trial in running:
            why = self.why_dead(trial, stale)
            if why and self.settle(study, trial, why):
                settled += 1
        return settled

    def settle(self, study: Any, trial: Any, why: str) -> bool:
        """Tell ``trial`` what the store holds for it (or FAIL when nothing); False when
        another process settled it first."""
        from optuna.exceptions import UpdateFinishedTrialError
        from optuna.trial import TrialState

        result = self.recorded(study.study_name)(trial.number)
        tid = trial_id(trial)
        try:
            if result is None:
                self.storage.set_trial_user_attr(tid, "reclaimed", why)
                self.storage.set_trial_state_values(tid, state=TrialState.FAIL)
                what = "failed; its point will be measured again"
            else:
                status, value = result
                self.storage.set_trial_user_attr(tid, "status", status)
                self.storage.set_trial_user_attr(tid, "recovered", why)
                if status == "ok" and value is not None:
                    self.storage.set_trial_state_values(tid, state=TrialState.COMPLETE, values=[float(value)])
                else:
                    self.storage.set_trial_state_values(tid, state=TrialState.PRUNED)
                what = f"told its stored result ({status})"
        except UpdateFinishedTrialError:
            return False
        message = f"trial {trial.number} of {study.study_name}: {why}: {what}"
        self.reclaimed.append(message)
        log.warning("kernmux: %s", message)
        return True


def abandon(study: Any, trial: Any, error: BaseException, recovery: Any) -> None:
    """The evaluation of ``trial`` raised: settle it so it does not stay RUNNING.

    With a recovery the store decides (a row written before the error makes the trial
    COMPLETE/PRUNED, none makes it FAIL); when the database itself is unreachable the
    trial is left RUNNING for the next run's reclaim (telling would fail the same way)."""
    from optuna.trial import TrialState

    from kernmux.tuning_db.storage.errors import TuningDBError

    if isinstance(error, TuningDBError):
        return
    try:
        if recovery is None:
            study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
        else:
            recovery.settle(study, trial, f"its evaluation was interrupted ({type(error).__name__})")
            recovery.release()
    except Exception as e:  # the original error matters more
        log.warning("kernmux: trial %s left RUNNING (the next run reclaims it): %s: %s",
                    trial.number, type(e).__name__, e)


# --------------------------------------------------------------------------- claims


def earlier_claim(
    study: Any,
    number: int,
    key: str,
    *,
    wait_s: float = 2.0,
    unclaimed_after_s: float = 10.0,
) -> Any | None:
    """The lowest-numbered other trial claiming point ``key`` before trial ``number``, or
    None when ``number`` is the first claim (the one that measures).

    Lower-numbered trials still between ``ask`` and their claim are waited for (up to
    ``wait_s``; ones older than ``unclaimed_after_s`` are taken for dead), so two
    processes that pick the same point at the same moment agree on who measures it."""
    from optuna.trial import TrialState

    claims = (TrialState.RUNNING, TrialState.COMPLETE, TrialState.PRUNED)
    deadline = time.monotonic() + wait_s
    while True:
        pending = False
        for t in study.get_trials(deepcopy=False):
            if t.number >= number:
                continue
            attrs = t.user_attrs
            if "duplicate_of" in attrs or attrs.get("invalid"):
                continue
            if attrs.get("point") == key and t.state in claims:
                return t
            if t.state == TrialState.RUNNING and "point" not in attrs and _age_s(t) < unclaimed_after_s:
                pending = True
        if not pending or time.monotonic() > deadline:
            return None
        time.sleep(0.02)
