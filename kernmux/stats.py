"""What kernmux dispatched in this process, so a user can see an engine really uses it.

Events, all cheap enough for the hot path:

* per problem (op + full features) a :class:`ProblemCount`: created on a dispatch-cache
  miss (:func:`problem_counter`), then incremented by the cached callable on every hit
  (:mod:`kernmux.dispatch.hotpath` wraps it when statistics are on: one attribute
  increment in a closure, no hashing of the call's key on the hit path);
* ``record_call(op)`` — one call counted per op only (kept for callers outside the
  dispatcher);
* ``record_dispatch(op, key, kernel, source)`` — a *new* decision (a dispatch-cache
  miss): logged once as one INFO line on the ``kernmux`` logger and kept for the dump.

Engine integrations add ``record_hook(hook, outcome)`` (e.g. ``vllm.fused_topk`` /
``kernmux`` or ``fallback``) and ``set_info(name, value)`` (what was installed).

When ``KERNMUX_STATS_PATH`` is set, each process writes a JSON dump when it exits (and
after every new decision, so a process killed at shutdown still leaves its decisions):

* a directory (existing, or a path ending in ``/``): ``<dir>/kernmux-stats-<pid>.json``;
* a path containing ``{pid}``: formatted with the process id;
* any other path: written as given (one process; several would overwrite each other).

Dump format (``version`` 2; version 1 had no ``problems``)::

    {"version": 2, "pid": 123, "argv0": "...", "written_at": 1732290000.0,
     "calls": {"moe_topk_softmax": 96},
     "problems": [{"op": "moe_topk_softmax", "features": {"tokens": 7, ...}, "calls": 90}, ...],
     "decisions": [{"op": "moe_topk_softmax", "key": [...], "kernel": "triton",
                    "source": "rule:...", "at": 1732290000.0}],
     "hooks": {"vllm.fused_topk": {"kernmux": 96, "fallback": 0}},
     "info": {"vllm.version": "0.32.0", "vllm.hooks": [...]}}

``problems`` lists every problem the process ran through ``kernmux.ops``, most-called
first: what ``kernmux tune --from-stats`` tunes. ``calls`` per op is their sum plus any
``record_call`` counts. Counts are plain increments: concurrent hits from several threads
may lose a few (statistics, not accounting).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("kernmux")

STATS_ENV = "KERNMUX_STATS_PATH"
FORMAT_VERSION = 2

# Plain dicts mutated in place: the hot path pays one lookup and one store.
_calls: dict[str, int] = {}
_hooks: dict[str, dict[str, int]] = {}
_decisions: list[dict[str, Any]] = []
_info: dict[str, Any] = {}
_problems: dict[tuple[str, tuple], ProblemCount] = {}
_lock = threading.Lock()
_exit_hooked_pid: int | None = None


class ProblemCount:
    """Calls of one problem: ``op`` with these exact ``features``; ``n`` is incremented in
    place by the hot path."""

    __slots__ = ("op", "features", "n")

    def __init__(self, op: str, features: Mapping[str, Any]):
        self.op = op
        self.features = dict(features)
        self.n = 0


def problem_counter(op: str, features: Mapping[str, Any]) -> ProblemCount:
    """The counter of (op, features), created on first use (a dispatch-cache miss: off
    the hot path). Several raw keys (e.g. strides) share the features' one counter."""
    key = (op, tuple(sorted(features.items())))
    counter = _problems.get(key)
    if counter is None:
        with _lock:
            counter = _problems.get(key)
            if counter is None:
                counter = _problems[key] = ProblemCount(op, _jsonable(dict(features)))
        _ensure_exit_dump()
    return counter


def record_call(op: str) -> None:
    """Count one call of ``kernmux.ops.<op>`` (hot path: a dict increment)."""
    _calls[op] = _calls.get(op, 0) + 1


def record_dispatch(op: str, key: tuple, kernel: str, source: str) -> None:
    """Note a new decision for ``(op, key)``: one log line, kept for the dump.

    key: the dispatcher's feature key (a tuple of hashable values).
    kernel: the chosen kernel's name (with its transform, if any, e.g. "aiter+split_heads=32").
    source: which precedence level decided ("force", "rule:<id>", "tuning-db:<row>",
        "prefer", "priority", "retry-after-failure", ...).
    """
    entry = {"op": op, "key": _jsonable(key), "kernel": kernel, "source": source, "at": time.time()}
    with _lock:
        _decisions.append(entry)
    log.info("kernmux: %s %s -> %s (%s)", op, _format_key(key), kernel, source)
    _ensure_exit_dump()
    if os.environ.get(STATS_ENV):
        # Decisions are rare; writing now means a process killed at shutdown still
        # leaves a record of what it chose.
        dump()


def record_hook(hook: str, outcome: str) -> None:
    """Count one pass through an engine hook; outcome e.g. "kernmux" or "fallback"."""
    counters = _hooks.get(hook)
    if counters is None:
        counters = _hooks.setdefault(hook, {})
    counters[outcome] = counters.get(outcome, 0) + 1


def set_info(name: str, value: Any) -> None:
    """Attach a fact to the dump (e.g. the engine version and the hooks installed)."""
    with _lock:
        _info[name] = _jsonable(value)
    _ensure_exit_dump()


def snapshot() -> dict[str, Any]:
    """The current statistics as a JSON-serialisable dict (the dump's content)."""
    with _lock:
        problems = [
            {"op": c.op, "features": dict(c.features), "calls": c.n}
            for c in sorted(_problems.values(), key=lambda c: (-c.n, c.op, json.dumps(c.features, sort_keys=True, default=str)))
        ]
        calls = dict(_calls)
        for problem in problems:
            calls[problem["op"]] = calls.get(problem["op"], 0) + problem["calls"]
        return {
            "version": FORMAT_VERSION,
            "pid": os.getpid(),
            "argv0": sys.argv[0] if sys.argv else "",
            "written_at": time.time(),
            "calls": calls,
            "problems": problems,
            "decisions": [dict(d) for d in _decisions],
            "hooks": {name: dict(c) for name, c in _hooks.items()},
            "info": dict(_info),
        }


def stats_path(pid: int | None = None) -> str | None:
    """Where this process's dump goes (None when ``KERNMUX_STATS_PATH`` is unset)."""
    raw = os.environ.get(STATS_ENV)
    if not raw:
        return None
    pid = os.getpid() if pid is None else pid
    if "{pid}" in raw:
        return raw.replace("{pid}", str(pid))
    if raw.endswith(os.sep) or os.path.isdir(raw):
        return os.path.join(raw, f"kernmux-stats-{pid}.json")
    return raw


def dump(path: str | None = None) -> str | None:
    """Write the statistics as JSON (atomically); returns the path or None.

    Never raises: observability must not take the engine down."""
    target = path or stats_path()
    if not target:
        return None
    try:
        parent = os.path.dirname(target)
        if parent:
            os.makedirs(parent, exist_ok=True)
        tmp = f"{target}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(snapshot(), f, indent=1, sort_keys=True)
        os.replace(tmp, target)
        return target
    except Exception as e:  # pragma: no cover - disk full, read-only dir, ...
        log.warning("kernmux: could not write stats to %s: %s", target, e)
        return None


def reset() -> None:
    """Forget everything (tests)."""
    with _lock:
        _calls.clear()
        _problems.clear()
        _hooks.clear()
        _decisions.clear()
        _info.clear()


def _dump_at_exit() -> None:
    # A forked child inherits the parent's atexit list: only dump for this process.
    if _exit_hooked_pid == os.getpid():
        dump()


def _ensure_exit_dump() -> None:
    """Arrange a dump when this process exits (once per process, forks included).

    ``atexit`` covers ordinary exits and spawned children; forked multiprocessing
    children leave through ``os._exit`` after running multiprocessing's own exit
    finalizers, so one is registered there too."""
    global _exit_hooked_pid
    pid = os.getpid()
    if _exit_hooked_pid == pid or not os.environ.get(STATS_ENV):
        return
    with _lock:
        if _exit_hooked_pid == pid:
            return
        _exit_hooked_pid = pid
    atexit.register(_dump_at_exit)
    try:
        from multiprocessing import util

        util.Finalize(None, _dump_at_exit, exitpriority=-100)
    except Exception:  # pragma: no cover - multiprocessing unavailable
        pass


def _format_key(key: Any) -> str:
    if isinstance(key, tuple) and all(isinstance(k, tuple) and len(k) == 2 for k in key):
        return " ".join(f"{k}={v}" for k, v in key)
    return str(key)


def _jsonable(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return str(value)
