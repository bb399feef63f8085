"""``kernmux tune``: search kernel x config for each feature set and record every trial.

For each feature set: build the search space (:mod:`kernmux.tuning_db.tuning.search`), open or
resume its optuna study in the *same database* as the tuning store (optuna's RDB
storage, its own tables beside the ``kernmux_`` ones), then run the ask/tell loop in
one or more tuning processes. Each measurement is one trial in a worker subprocess
(:mod:`kernmux.tuning_db.measurement.worker`): numerics gate, then timing. Every trial — failures
included — becomes a store row carrying the study name and trial number.

Sharing: ``workers=N`` starts N tuning processes on this host (with CUDA, one GPU each
through ``CUDA_VISIBLE_DEVICES``); several hosts pointing at one PostgreSQL URL join the
same studies, since a study's name depends only on the op, the features, the platform
fingerprint, the sampler and the search space. A re-run resumes: the trial budget
counts the measurements already in the study.

Faults: the schema (kernmux's and optuna's) is created once, under a lock, before any
tuning process starts; a SQLite file with damaged pages is refused before anything is
written into it; a trial's row is stored before optuna is told, and trials of tuning
processes that died are settled from the store (:mod:`~kernmux.tuning_db.tuning.recovery`);
a database that restarts is waited for (:mod:`~kernmux.tuning_db.tuning.study_storage`).

Length (~410 lines): plans, settings, the per-process loop and the process pool of one
command; search, recovery, study storage and GPU assignment are their own modules.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import queue as queue_module
import traceback
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from kernmux.dispatch.platform import Platform, current_platform
from kernmux.dispatch.registry import REGISTRY
from kernmux.tuning_db.storage.paths import default_url, normalize_url, persistence_problem
from kernmux.tuning_db.storage.retry import reconnect_window_s
from kernmux.tuning_db.tuning.search import (
    Evaluation,
    Point,
    SearchSpace,
    build_space,
    make_sampler,
    restrict,
    run_search,
)
from kernmux.tuning_db.tuning.results import BucketResult, summarize
from kernmux.tuning_db.tuning.study_storage import load_study as _load_study
from kernmux.tuning_db.tuning.gpus import gpu_envs
from kernmux.tuning_db.tuning.study_storage import open_study_storage, schema_lock

__all__ = ["BucketResult", "Plan", "TuneError", "TuneSettings", "open_study_storage", "tune"]

log = logging.getLogger("kernmux")

Progress = Callable[[dict[str, Any]], None]


class TuneError(RuntimeError):
    """The tuning run itself failed (not a kernel: kernel failures are rows)."""


@dataclass(frozen=True)
class TuneSettings:
    """How to tune one op.

    kernels: restrict the search to these kernels (None: every available one).
    trials: measurements per feature set, counted over the whole study (re-runs resume).
    sampler: "tpe" (seeded, default) or "grid" (every valid point, random order).
    url: database URL shared by the store and the optuna studies (None: KERNMUX_DB or
        the default SQLite file).
    workers: tuning processes on this host (one per GPU with CUDA).
    timeout_s: limit of one trial (compilation + numerics gate + timing).
    warmup_ms / rep_ms / cuda_graph: the timing budget handed to ``measure``.
    isolate: run trials in a worker subprocess (False: in the tuning process; only for
        kernels known to be safe).
    imports: modules every process imports first (e.g. one registering test-only ops).
    baseline: kernel measured first in every study so a speed-up is always known.
    startup_trials: TPE's random start (None: a default scaled to the space).
    fixed: kernel -> {param: value}: search only that kernel's sub-space (benchmarks).
    gpus: one tuning process per listed GPU, each pinned to it (``--gpus``); overrides
        ``workers``.
    """

    op: str
    kernels: tuple[str, ...] | None = None
    trials: int = 30
    sampler: str = "tpe"
    seed: int = 0
    url: str | None = None
    workers: int = 1
    timeout_s: float = 120.0
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    cuda_graph: bool | None = None  # None: per problem (graph replay when launch-bound)
    isolate: bool = True
    imports: tuple[str, ...] = ()
    baseline: str | None = "torch"
    startup_trials: int | None = None
    fixed: Mapping[str, Mapping[str, Any]] | None = None
    gpus: tuple[str, ...] = ()


@dataclass(frozen=True)
class Plan:
    """One feature set to tune: its space and study name."""

    features: dict[str, Any]
    bucket: dict[str, Any]
    space: SearchSpace
    study: str


# --------------------------------------------------------------------------- storage


def _legacy_after_s(settings: TuneSettings) -> float:
    """A trial cannot run longer than its timeout (+ a worker start + a database
    restart): an older RUNNING trial is dead whatever its owner says."""
    return 2 * settings.timeout_s + 600


def study_name(op: str, features: Mapping[str, Any], platform: Platform, sampler: str, space: SearchSpace) -> str:
    """A name that only a compatible run shares: same op, features, GPU, sampler, space."""
    feats = ",".join(f"{k}={features[k]}" for k in sorted(features))
    return f"kernmux/{op}/{feats}/{platform.fingerprint()}/{sampler}/{space.digest()}"


# --------------------------------------------------------------------------- planning


def make_plans(settings: TuneSettings, feature_sets: Sequence[Mapping[str, Any]], platform: Platform) -> list[Plan]:
    """Search space and study name of each feature set (no database access)."""
    from kernmux.dispatch.registry import REGISTRY

    op = REGISTRY.op(settings.op)
    plans = []
    for features in feature_sets:
        features = dict(features)
        space = build_space(settings.op, features, platform, settings.kernels)
        if settings.fixed:
            space = restrict(space, settings.fixed)
        name = study_name(settings.op, features, platform, settings.sampler, space)
        plans.append(Plan(features, dict(op.bucket(features)), space, name))
    return plans


def _device_for(features: Mapping[str, Any]) -> str:
    return "cuda" if features.get("device") == "cuda" else "cpu"


def _missing_device(plans: Sequence[Plan]) -> str:
    """Why the device the plans measure on is not here ("" when it is): tuning it would
    only record an error row per point (which ``rules derive`` would turn into denies)."""
    if not any(_device_for(p.features) == "cuda" for p in plans):
        return ""
    import torch

    if torch.cuda.is_available():
        return ""
    return ("device cuda requested, but this machine has no usable CUDA/ROCm device "
            "(torch.cuda.is_available() is False); tune with --device cpu or on a GPU machine")


def _agent_envs(settings: TuneSettings, plans: Sequence[Plan]) -> list[dict[str, str]]:
    """Environment of each tuning process: one GPU each when tuning CUDA features, or
    the GPUs named by ``settings.gpus`` whatever the features."""
    if settings.gpus:
        return gpu_envs(settings.gpus)
    envs: list[dict[str, str]] = [{} for _ in range(settings.workers)]
    if not any(_device_for(p.features) == "cuda" for p in plans):
        return envs
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        devices = [d.strip() for d in visible.split(",") if d.strip()]
    else:
        import torch

        devices = [str(i) for i in range(torch.cuda.device_count())]
    if devices:
        for i, env in enumerate(envs):
            env["CUDA_VISIBLE_DEVICES"] = devices[i % len(devices)]
    return envs


# --------------------------------------------------------------------------- agent


def run_agent(
    settings: TuneSettings,
    plans: Sequence[Plan],
    index: int,
    progress: Progress | None = None,
) -> None:
    """One tuning process: for each plan, join its study and measure until the budget."""
    import importlib

    from kernmux.tuning_db.measurement.trial import TrialSpec
    from kernmux.tuning_db.measurement.worker import InProcessRunner, TrialWorker
    from kernmux.tuning_db.storage.store import TuningStore
    from kernmux.tuning_db.tuning.recovery import Recovery, stored_results

    for module in settings.imports:
        importlib.import_module(module)
    url = settings.url
    store = TuningStore(url, reconnect_window_s=reconnect_window_s())
    storage = open_study_storage(store.url)
    recovery = Recovery(storage, stored_results(store), legacy_after_s=_legacy_after_s(settings))
    runner_cls = TrialWorker if settings.isolate else InProcessRunner
    with runner_cls(imports=settings.imports) as runner, contextlib.closing(recovery):
        for plan in plans:
            if not plan.space.points:
                continue
            sampler = make_sampler(
                settings.sampler, settings.seed + 7919 * index, len(plan.space), settings.startup_trials
            )
            study = _load_study(plan.study, storage, sampler)
            device = _device_for(plan.features)

            def evaluate(point: Point, number: int, plan: Plan = plan, device: str = device) -> Evaluation:
                spec = TrialSpec(
                    op=settings.op, kernel=point.kernel, features=plan.features, config=point.config_dict,
                    device=device, seed=settings.seed * 1_000_003 + number,
                    warmup_ms=settings.warmup_ms, rep_ms=settings.rep_ms, cuda_graph=settings.cuda_graph,
                    study=plan.study, trial_number=number,
                )
                record = runner.run(spec, settings.timeout_s)
                row_id = store.record(record)
                if progress is not None:
                    progress({
                        "event": "trial", "agent": index, "study": plan.study, "features": plan.features,
                        "trial": number, "kernel": point.kernel, "config": point.config_dict,
                        "status": record.status, "p50_us": record.p50_us, "row_id": row_id,
                        "error": (record.error or "").splitlines()[0][:200] if record.error else None,
                    })
                return Evaluation(record.status, record.p50_us, record.error or "")

            stats = run_search(
                study, plan.space, evaluate, budget=settings.trials, grid=settings.sampler == "grid",
                seed=settings.seed + 104729 * index, first=first_points(settings, plan.space, plan.features), recovery=recovery,
            )
            if progress is not None:
                progress({"event": "study_done", "agent": index, "study": plan.study, "stats": asdict(stats)})
    store.close()


def first_points(settings: TuneSettings, space: Any, features: Mapping[str, Any] | None = None) -> list[Any]:
    """Points measured before any sampled one: the baseline kernel, then each kernel's
    default config where it is a point of the space (a shape-heuristic default resolved
    for ``features`` first, see ``Kernel.default_for``). A small budget then never ends
    on a sampled config slower than what the kernel does untuned, which is what the
    dispatcher would run without the tuning database."""
    first = []
    if settings.baseline and settings.baseline in space.kernels:
        first += [p for p in space.points if p.kernel == settings.baseline][:1]
    for name in space.kernels:
        if name == settings.baseline:
            continue
        kernel = REGISTRY.kernels_of(settings.op)[name]
        default = kernel.full_config(None)
        if features is not None:
            try:
                default = kernel.resolved_default(features)
            except Exception as e:  # a third-party heuristic that fails costs its head start, not the tune
                log.warning("kernmux tune: default_for of %s/%s failed: %s: %s", settings.op, name, type(e).__name__, e)
        first += [p for p in space.points if p.kernel == name and p.config_dict == default][:1]
    return first


def _agent_main(settings: TuneSettings, plans: list[Plan], index: int, env: dict[str, str], events: Any) -> None:
    from kernmux.tuning_db.measurement.worker import die_with_parent

    die_with_parent()  # a killed ``kernmux tune`` takes its tuning processes with it
    os.environ.update(env)
    try:
        run_agent(settings, plans, index, events.put)
    except BaseException as e:
        events.put({"event": "agent_error", "agent": index, "error": f"{type(e).__name__}: {e}",
                    "traceback": traceback.format_exc()})
        raise SystemExit(1) from None


def _run_agents(settings: TuneSettings, plans: list[Plan], progress: Progress | None) -> list[str]:
    """Start ``settings.workers`` tuning processes and relay their events; their errors."""
    ctx = multiprocessing.get_context("spawn")
    events = ctx.Queue()
    procs = [
        ctx.Process(target=_agent_main, args=(settings, plans, i, env, events), name=f"kernmux-tune-{i}")
        for i, env in enumerate(_agent_envs(settings, plans))
    ]
    for proc in procs:
        proc.start()
    errors: list[str] = []

    def relay(event: dict[str, Any]) -> None:
        if event.get("event") == "agent_error":
            errors.append(f"tuning process {event['agent']}: {event['error']}\n{event.get('traceback', '')}")
        if progress is not None:
            progress(event)

    try:
        while any(p.is_alive() for p in procs):
            try:
                relay(events.get(timeout=0.2))
            except queue_module.Empty:
                pass
        while True:
            try:
                relay(events.get(timeout=0.2))
            except queue_module.Empty:
                break
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
    for proc in procs:
        if proc.exitcode != 0 and not any(e.startswith(f"tuning process {procs.index(proc)}:") for e in errors):
            errors.append(f"tuning process {procs.index(proc)} exited with code {proc.exitcode}")
    return errors


# --------------------------------------------------------------------------- driver


def prepare(settings: TuneSettings, plans: Sequence[Plan]) -> str:
    """Everything before the tuning processes start; returns the database URL.

    Refuse a SQLite file with damaged pages; then, under the schema lock (tunes started
    together must not race): create the store schema and optuna's tables, create every
    study, and settle trials left RUNNING by tuning processes that died."""
    from optuna.trial import TrialState

    from kernmux.tuning_db.storage.errors import TuningDBError
    from kernmux.tuning_db.storage.paths import sqlite_path
    from kernmux.tuning_db.storage.store import TuningStore
    from kernmux.tuning_db.tuning.recovery import Recovery, stored_results

    url = normalize_url(settings.url) if settings.url else default_url()
    path = sqlite_path(url)
    if path is not None and path.exists():
        with TuningStore(url, create=False, check=False, read_only=True) as existing:
            damage = existing.damage()
        if damage:
            raise TuningDBError(
                f"tuning database {path} is damaged (SQLite quick_check: {damage[:500]}); nothing was "
                f"written into it. Restore it from a copy, or save what is readable with `kernmux db "
                f"export` and import that into a new database"
            )
    with schema_lock(url), TuningStore(url, reconnect_window_s=reconnect_window_s()) as store:
        store.check_writable()
        storage = open_study_storage(store.url)
        recovery = Recovery(storage, stored_results(store), legacy_after_s=_legacy_after_s(settings), heartbeat=False)
        for plan in plans:
            if not plan.space.points:
                continue
            study = _load_study(plan.study, storage, make_sampler(settings.sampler, settings.seed, len(plan.space)))
            recovery.reclaim(study, study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)))
        return store.url


def tune(
    settings: TuneSettings,
    feature_sets: Sequence[Mapping[str, Any]],
    progress: Progress | None = None,
    platform: Platform | None = None,
) -> list[BucketResult]:
    """Tune ``settings.op`` for every feature set; returns one result per feature set.

    progress(event): called with {"event": "plan"|"trial"|"study_done", ...} dicts."""
    import importlib

    if settings.gpus:
        settings = _replace(settings, workers=len(settings.gpus))
    if settings.workers < 1:
        raise ValueError(f"workers must be >= 1, got {settings.workers}")
    if settings.trials < 1:
        raise ValueError(f"trials must be >= 1, got {settings.trials}")
    problem = persistence_problem(normalize_url(settings.url) if settings.url else default_url())
    if problem:
        raise ValueError(problem)
    for module in settings.imports:
        importlib.import_module(module)
    platform = platform or current_platform()
    plans = make_plans(settings, feature_sets, platform)
    missing = _missing_device(plans)
    if missing:
        raise ValueError(missing)
    url = prepare(settings, plans)
    settings = _replace(settings, url=url)
    if progress is not None:
        for plan in plans:
            progress({"event": "plan", "study": plan.study, "features": plan.features, "points": len(plan.space),
                      "budget": min(settings.trials, len(plan.space)), "skipped": dict(plan.space.skipped)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if settings.workers == 1 and not settings.gpus:  # a pinned GPU needs its own process
            run_agent(settings, plans, 0, progress)
            errors: list[str] = []
        else:
            errors = _run_agents(settings, plans, progress)
    if errors:
        raise TuneError("; ".join(errors))
    return summarize(settings, plans, platform)


def _replace(settings: TuneSettings, **changes: Any) -> TuneSettings:
    import dataclasses

    return dataclasses.replace(settings, **changes)
