"""The composition root: wires rules, the tuning source and statistics into dispatchers.

The core (:mod:`kernmux.dispatch`) opens nothing itself; this module is the one place
that turns the environment into the objects it is handed:

- rules: the ``--rules`` files, then ``KERNMUX_RULES``, then the shipped files
  (:func:`kernmux.rules.loader.load_rules`), loaded on first use;
- tuning: the database at ``--db`` / ``KERNMUX_DB`` / the default SQLite file, opened
  read-only on first use (:func:`kernmux.tuning_db.storage.source.open_tuning_source`); a
  missing database or missing database extra is a note in explain, never an error, and
  so is a database that cannot be written (self-check verdicts then stay in the process);
- statistics: one INFO log line per new decision and, when ``KERNMUX_STATS_PATH`` is set,
  per-problem call counters (:mod:`kernmux.stats`);
- self-check: ``KERNMUX_SELF_CHECK`` (auto | always | off), verdicts read from and written
  to the tuning database (:mod:`kernmux.tuning_db.measurement.verdicts`), or kept in the
  process when the database support is not installed.

``kernmux.ops``, the CLI and the vLLM plugin all get their dispatcher here.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

from kernmux.dispatch.hotpath import Dispatcher, feature_key
from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import REGISTRY, Registry
from kernmux.dispatch.resolver import Decision

log = logging.getLogger("kernmux")

_DEFAULT: Dispatcher | None = None
_DEFAULT_LOCK = threading.Lock()


def rules_factory(rule_files: Sequence[str] = (), registry: Registry = REGISTRY) -> Callable[[], Any]:
    """A factory loading ``rule_files`` + ``KERNMUX_RULES`` + shipped rules when called."""

    def load() -> Any:
        from kernmux.rules.loader import load_rules

        return load_rules(tuple(rule_files), registry=registry)

    return load


def tuning_factory(db_url: str | None = None) -> Callable[[], tuple[Any, str]]:
    """A factory opening the tuning source at ``db_url`` (None: ``KERNMUX_DB`` or the
    default database) when called; returns (source or None, why there is none)."""

    def open_() -> tuple[Any, str]:
        try:
            from kernmux.tuning_db.storage.source import open_tuning_source
        except ImportError as e:
            why = (f"tuning database support not installed ({e.name}); install the 'tuning' extra: "
                   "pip install -e '.[tuning]' in the kernmux clone")
            if db_url or os.environ.get("KERNMUX_DB"):
                _warn_once(f"kernmux: KERNMUX_DB/--db is set but ignored: {why}; decisions fall back to rules and priorities")
            return None, why
        source, note = open_tuning_source(db_url)
        reason = getattr(getattr(source, "store", None), "read_only_reason", "")
        if source is not None and reason:
            note = (f"tuning database {source.url} is read-only ({reason}): its rows are used; "
                    f"self-check results stay in this process")
        return source, note

    return open_


_WARNED: set[str] = set()


def _missing_tuning_libs() -> list[str]:
    """The tuning database's libraries that cannot be imported here."""
    import importlib.util

    missing = []
    for name in ("sqlalchemy", "alembic"):
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):
            missing.append(name)
    return missing


def _warn_once(message: str) -> None:
    """A logger warning, once per process and message (a database that cannot be used
    must not pass silently, nor flood an engine's log)."""
    if message not in _WARNED:
        _WARNED.add(message)
        log.warning("%s", message)


def make_dispatcher(
    *,
    platform: Platform | None = None,
    rule_files: Sequence[str] = (),
    db_url: str | None = None,
    use_tuning_db: bool = True,
    registry: Registry = REGISTRY,
    report: bool = False,
    run_self_checks: bool = True,
) -> Dispatcher:
    """A dispatcher over the configured rules and tuning database.

    report: log each new decision and keep it for the statistics dump (the process-wide
    dispatcher does; what-if dispatchers of ``explain`` do not).
    run_self_checks: check a chosen kernel before its first use (the process-wide
    dispatcher); False: only read recorded verdicts (``explain``)."""
    dispatcher = Dispatcher(
        registry=registry,
        platform=platform,
        rules=rules_factory(rule_files, registry),
        tuning=tuning_factory(db_url) if use_tuning_db else None,
        listeners=(report_decision,) if report else (),
    )
    dispatcher.selfcheck = self_check(dispatcher, db_url if use_tuning_db else None, run_self_checks,
                                      use_tuning_db, registry)
    return dispatcher


def self_check(dispatcher: Dispatcher, db_url: str | None, run: bool, use_db: bool, registry: Registry) -> Any:
    """The dispatcher's self-check: mode from ``KERNMUX_SELF_CHECK``, verdicts in the
    tuning database when its support is installed."""
    from kernmux.dispatch.selfcheck import SelfCheck, mode_from_env

    try:
        mode = mode_from_env()
    except ValueError as e:
        log.warning("kernmux: %s; using auto", e)
        mode = "auto"
    store = None
    if use_db and mode != "off":
        missing = _missing_tuning_libs()
        try:
            if missing:  # the verdict module imports lazily: check what writing needs
                raise ImportError(name=missing[0])
            from kernmux.tuning_db.measurement.verdicts import DatabaseVerdicts
        except ImportError as e:
            log.info("kernmux: self-check verdicts kept in this process (%s not installed)", e.name)
        else:
            store = DatabaseVerdicts(lambda: dispatcher.tuning, db_url, registry)
    return SelfCheck(mode, store, run=run)


def default_dispatcher() -> Dispatcher:
    """The process-wide dispatcher (rules from KERNMUX_RULES + shipped, DB from KERNMUX_DB)."""
    global _DEFAULT
    if _DEFAULT is None:
        with _DEFAULT_LOCK:
            if _DEFAULT is None:
                _DEFAULT = make_dispatcher(report=True)
    return _DEFAULT


def reset_default_dispatcher() -> None:
    """Forget the process-wide dispatcher (tests; after changing rules or the database)."""
    global _DEFAULT
    with _DEFAULT_LOCK:
        _DEFAULT = None


def report_decision(decision: Decision) -> None:
    """One INFO log line per new decision, kept for the stats dump (KERNMUX_STATS_PATH)."""
    from kernmux.stats import record_dispatch

    kernel = decision.kernel + (f"+{decision.transform.text()}" if decision.transform else "")
    source = decision.source
    if decision.rule:
        source += f":{decision.rule}"
    elif decision.row_id is not None:
        source += f":row {decision.row_id}"
    record_dispatch(decision.op, feature_key(decision.features), kernel, source)


def problem_counter() -> Callable[[str, Any], Any] | None:
    """Per-problem call counter when KERNMUX_STATS_PATH is set (zero cost otherwise):
    :func:`kernmux.stats.problem_counter`, handed to the hot path."""
    if not os.environ.get("KERNMUX_STATS_PATH"):
        return None
    from kernmux.stats import problem_counter as counter

    return counter
