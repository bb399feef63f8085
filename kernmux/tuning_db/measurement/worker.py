"""Run trials in a worker subprocess so that a bad kernel costs one trial, not the sweep.

A :class:`TrialWorker` owns one child process (multiprocessing "spawn" context: a fresh
interpreter, no inherited CUDA state) that runs trials one after another over a pipe.
The parent waits for each result with a timeout:

- no answer in time (a hang)            -> the child is killed, status ``timeout``;
- the pipe closes (os.abort, segfault)  -> status ``crashed`` with the signal/exit code;
- the kernel raised                      -> status ``error`` (recorded by the child);
- after an error the CUDA context no longer works (illegal memory access is sticky)
                                         -> status ``crashed``; the child exits.

The next trial after a death starts a fresh child; a healthy child is reused (start-up,
imports and compiled kernels are paid once). This module imports nothing heavy at the
top: the child sets its environment (``CUDA_VISIBLE_DEVICES``) before torch is imported.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kernmux.tuning_db.measurement.trial import TrialSpec
    from kernmux.tuning_db.storage.records import TrialRecord

_CTX = multiprocessing.get_context("spawn")


def _signal_name(exitcode: int | None) -> str:
    if exitcode is None:
        return "still running"
    if exitcode < 0:
        try:
            return f"{signal.Signals(-exitcode).name} (exit code {exitcode})"
        except ValueError:
            return f"signal {-exitcode} (exit code {exitcode})"
    return f"exit code {exitcode}"


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent dies (``PR_SET_PDEATHSIG``).

    A ``kill -9`` of ``kernmux tune`` must not leave a worker measuring (and holding a
    GPU) for up to a trial's timeout. Elsewhere this is a no-op: a worker then notices
    its parent is gone when its pipe closes."""
    import sys

    if not sys.platform.startswith("linux"):
        return
    import ctypes

    parent = multiprocessing.parent_process()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent is not None and parent.pid is not None and os.getppid() != parent.pid:
        os._exit(1)  # the parent died before the request took effect


def _serve(conn: Any, imports: Sequence[str], env: Mapping[str, str]) -> None:
    """Child main loop: import, say ready, then run trials until told to stop."""
    die_with_parent()
    os.environ.update(env)
    import faulthandler

    faulthandler.enable()  # a segfault prints the Python stack to stderr
    try:
        import importlib

        for module in imports:
            importlib.import_module(module)
        from kernmux.dispatch.platform import current_platform
        from kernmux.tuning_db.measurement.trial import base_record, cuda_context_broken, run_trial

        platform = current_platform()
    except BaseException as e:  # report why the worker cannot start, then exit
        conn.send(("fatal", f"{type(e).__name__}: {e}\n{traceback.format_exc()[-1500:]}"))
        conn.close()
        return
    conn.send(("ready", os.getpid()))
    while True:
        try:
            kind, spec = conn.recv()
        except (EOFError, OSError):
            return  # the parent went away
        if kind == "stop":
            return
        record = run_trial(spec, platform)
        broken = cuda_context_broken(spec.device) if record.status != "ok" else ""
        if broken:
            record = base_record(
                spec, platform, status="crashed", metrics=record.metrics,
                error=f"CUDA context unusable after the trial: {broken}\nfirst error: {record.error}",
            )
        conn.send(("result", record))
        if broken:
            conn.close()
            os._exit(3)  # never reuse a poisoned context


class TrialWorker:
    """A reusable trial subprocess.

    imports: modules the child imports first (e.g. a module registering test-only ops;
        in-tree ops and entry-point plugins load by themselves).
    env: environment variables set in the child before anything is imported
        (``CUDA_VISIBLE_DEVICES`` to pin it to one GPU).
    start_timeout_s: how long importing torch and the op modules may take.
    """

    def __init__(
        self,
        *,
        imports: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        start_timeout_s: float = 300.0,
    ) -> None:
        self.imports = tuple(imports)
        self.env = dict(env or {})
        self.start_timeout_s = start_timeout_s
        self.starts = 0  # child processes started so far (1 + number of replacements)
        self._proc: Any = None
        self._conn: Any = None

    # ------------------------------------------------------------------ lifecycle

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.is_alive() else None

    def _start(self) -> str:
        """Start a child; "" when it is ready, else why it could not start."""
        parent_conn, child_conn = _CTX.Pipe()
        proc = _CTX.Process(
            target=_serve, args=(child_conn, self.imports, self.env), name="kernmux-trial-worker"
        )
        proc.start()
        child_conn.close()
        self._proc, self._conn = proc, parent_conn
        self.starts += 1
        if not parent_conn.poll(self.start_timeout_s):
            self._kill()
            return f"worker did not start within {self.start_timeout_s:.0f} s"
        try:
            kind, payload = parent_conn.recv()
        except (EOFError, OSError):
            proc.join(5)
            reason = _signal_name(proc.exitcode)
            self._forget()
            return f"worker died while starting: {reason}"
        if kind != "ready":
            self._kill()
            return f"worker failed to start: {payload}"
        return ""

    def _kill(self) -> None:
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(10)
        self._forget()

    def _forget(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._proc, self._conn = None, None

    def close(self) -> None:
        """Ask the child to exit (kill it if it does not)."""
        if self._proc is None:
            return
        try:
            self._conn.send(("stop", None))
            self._proc.join(10)
        except (OSError, ValueError):
            pass
        self._kill()

    def __enter__(self) -> TrialWorker:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ trials

    def run(self, spec: TrialSpec, timeout_s: float) -> TrialRecord:
        """Run ``spec`` in the child; always returns a record (never raises for kernel faults).

        timeout_s: wall-clock limit of the trial itself (child start-up not included);
            it covers compilation, the numerics gate and timing."""
        from kernmux.tuning_db.measurement.trial import base_record

        if self._proc is None or not self._proc.is_alive():
            self._forget()
            problem = self._start()
            if problem:
                return base_record(spec, status="error", error=problem)
        started = time.monotonic()
        try:
            self._conn.send(("trial", spec))
        except (OSError, ValueError) as e:
            self._kill()
            return base_record(spec, status="crashed", error=f"worker unreachable: {e}")
        if not self._conn.poll(timeout_s):
            self._kill()
            return base_record(
                spec, status="timeout",
                error=f"no result within {timeout_s:g} s; worker killed and replaced",
            )
        try:
            kind, record = self._conn.recv()
        except (EOFError, OSError):
            self._proc.join(10)
            reason = _signal_name(self._proc.exitcode)
            self._forget()
            return base_record(
                spec, status="crashed",
                error=f"worker process died after {time.monotonic() - started:.1f} s: {reason}",
            )
        if kind != "result":  # protocol error: treat the child as broken
            self._kill()
            return base_record(spec, status="crashed", error=f"unexpected worker message {kind!r}")
        if not self._proc.is_alive() or record.status == "crashed":
            self._proc.join(10)
            self._forget()
        return record


class InProcessRunner:
    """The same interface as :class:`TrialWorker`, running trials in this process.

    No isolation: for debugging and for kernels known to be safe (tests of the search)."""

    starts = 0
    pid = None

    def __init__(self, *, imports: Sequence[str] = (), env: Mapping[str, str] | None = None, **_: Any):
        import importlib

        for module in imports:
            importlib.import_module(module)

    def run(self, spec: TrialSpec, timeout_s: float) -> TrialRecord:
        from kernmux.tuning_db.measurement.trial import run_trial

        return run_trial(spec)

    def close(self) -> None:
        pass

    def __enter__(self) -> InProcessRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
