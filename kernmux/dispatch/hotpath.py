"""The hot path: ``kernmux.ops.<op>(...)`` -> raw key -> one dict lookup -> cached callable.

For each op a small Python function with the reference's exact signature is generated
once. Its body builds a raw key, looks it up, and calls the cached callable. Everything
else (validation, features, rules, tuning database, transforms) happens on a miss, off
the hot path. The raw key holds everything validation and the kernels depend on: per
tensor its shape, strides, dtype and device; int, bool and str arguments by value; float
arguments by type only (a scale that changes every call must not add a cache entry).
The cache is bounded (:data:`MAX_CACHED_KEYS`).

If the chosen kernel raises, the next survivor is tried on the same call. Only when
another kernel then succeeds is the first marked failed for that feature key (logged
once); when the next survivor fails the same way, the call was bad, not the kernel: the
caller gets the original error and nothing is marked.
"""

from __future__ import annotations

import inspect
import logging
import threading
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from kernmux.dispatch.platform import Platform, current_platform
from kernmux.dispatch.registry import REGISTRY, Op, Registry
from kernmux.dispatch.resolver import Decision, NoKernelError, resolve
from kernmux.dispatch.rule_model import RuleSet
from kernmux.dispatch.selfcheck import SelfCheck
from kernmux.dispatch.transforms import apply_transform
from kernmux.dispatch.tuning import TuningSource

log = logging.getLogger("kernmux")


def feature_key(features: Mapping[str, Any]) -> tuple:
    return tuple(sorted(features.items()))


# What a dispatcher is handed for the tuning level: a source, nothing, or a factory
# called once on first use returning (source or None, a note saying why there is none).
TuningFactory = Callable[[], "tuple[TuningSource | None, str]"]


class Dispatcher:
    """Decisions and runtime failures for one process (or one what-if configuration).

    The core opens no file and no database: it is handed its inputs.
    rules: a :class:`RuleSet`, or a factory returning one (called on first use, so a
        process that never dispatches never reads rule files).
    tuning: a tuning source, None (no tuning level), or a :data:`TuningFactory`.
    listeners: called with each new decision (statistics, logging).
    selfcheck: checks a chosen kernel against the reference before its first use
        (:mod:`kernmux.dispatch.selfcheck`); None: no checks.
    :mod:`kernmux.runtime` builds the process-wide dispatcher from the environment."""

    def __init__(
        self,
        *,
        registry: Registry = REGISTRY,
        platform: Platform | None = None,
        rules: RuleSet | Callable[[], RuleSet] = RuleSet(),
        tuning: TuningSource | TuningFactory | None = None,
        listeners: Sequence[Callable[[Decision], None]] = (),
        selfcheck: SelfCheck | None = None,
    ) -> None:
        self.registry = registry
        self._platform = platform
        self._rules: Any = rules
        self.selfcheck = selfcheck
        # (op, bucket) -> kernel -> why its self-check failed there.
        self.check_failed: dict[tuple[str, str], dict[str, str]] = {}
        self._tuning: Any = tuning
        self._tuning_opened = not _is_factory(tuning)
        self._tuning_note = ""
        self._decisions: dict[tuple[str, tuple], Decision] = {}
        self.failed: dict[tuple[str, tuple], dict[str, str]] = {}
        self._lock = threading.RLock()
        self.listeners: list[Callable[[Decision], None]] = list(listeners)
        # Raw-key caches of the entry functions built on this dispatcher (cleared when
        # the tuning database changed, so new measurements reach later calls).
        self.entry_caches: list[dict] = []
        self._tuning_generation: Any = None

    @property
    def platform(self) -> Platform:
        if self._platform is None:
            self._platform = current_platform()
        return self._platform

    @property
    def rules(self) -> RuleSet:
        if not isinstance(self._rules, RuleSet):
            with self._lock:
                if not isinstance(self._rules, RuleSet):
                    self._rules = self._rules()
        return self._rules

    @property
    def tuning(self) -> TuningSource | None:
        if not self._tuning_opened:
            with self._lock:
                if not self._tuning_opened:
                    self._tuning, self._tuning_note = self._tuning()
                    self._tuning_opened = True
        return self._tuning or None

    def decide(
        self, op_name: str, features: Mapping[str, Any], *, exclude: Mapping[str, BaseException] | None = None
    ) -> Decision:
        """The (cached) decision for ``features``. With ``exclude`` (kernels that raised on
        the call in hand) a tentative decision without them, neither cached nor reported."""
        key = (op_name, feature_key(features))
        if exclude:
            failed = {**self.failed.get(key, {}), **{k: f"{type(e).__name__}: {e}" for k, e in exclude.items()}}
            return resolve(op_name, features, self.platform, self.rules, tuning=self.tuning, failed=failed,
                           registry=self.registry)
        decision = self._decisions.get(key)
        if decision is None:
            with self._lock:
                decision = self._resolve_checked(op_name, features, key)
                if self._tuning_note and not any("tuning" in n for n in decision.notes):
                    decision = _with_note(decision, self._tuning_note)
                self._forget_if_tuning_changed()
                self._decisions[key] = decision
            for listener in self.listeners:
                listener(decision)
        return decision

    def _resolve_checked(self, op_name: str, features: Mapping[str, Any], key: tuple) -> Decision:
        """Resolve, then self-check the choice; a failing kernel is dropped for the bucket
        and the next survivor is resolved and checked in turn."""
        bucket_id = (op_name, feature_key(self.registry.op(op_name).bucket(features)))
        while True:
            failed = {**self.check_failed.get(bucket_id, {}), **self.failed.get(key, {})}
            decision = resolve(op_name, features, self.platform, self.rules, tuning=self.tuning,
                               failed=failed, registry=self.registry)
            if self.selfcheck is None:
                return decision
            verdict, note = self.selfcheck.verdict(decision, self.registry, self.platform)
            if verdict is None or verdict.passed:
                return _with_note(decision, note) if note else decision
            self.check_failed.setdefault(bucket_id, {})[decision.kernel] = verdict.text()

    def _forget_if_tuning_changed(self) -> None:
        """On a miss, if the tuning source reloaded since the last miss, drop cached
        decisions: hits never touch the database, misses pick up new rows."""
        generation = getattr(self._tuning or None, "generation", None)
        if generation is None:
            return
        if self._tuning_generation is not None and generation != self._tuning_generation:
            self._decisions.clear()
            for cache in self.entry_caches:
                cache.clear()
        self._tuning_generation = generation

    def explain(self, op_name: str, features: Mapping[str, Any]) -> Decision:
        return self.decide(op_name, features)

    def build(self, decision: Decision) -> Callable[..., Any]:
        """The callable for a decision: kernel bound to its config, wrapped in transforms."""
        op = self.registry.op(decision.op)
        kernel = self.registry.kernels_of(decision.op)[decision.kernel]
        return apply_transform(kernel.bind(decision.config), op, decision.transform)

    def mark_failed(self, op_name: str, features: Mapping[str, Any], kernel: str, error: BaseException) -> None:
        key = (op_name, feature_key(features))
        with self._lock:
            self.failed.setdefault(key, {})[kernel] = f"{type(error).__name__}: {error}"
            self._decisions.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._decisions.clear()


def _is_factory(tuning: Any) -> bool:
    return callable(tuning) and not hasattr(tuning, "lookup")


def _with_note(decision: Decision, note: str) -> Decision:
    import dataclasses

    return dataclasses.replace(decision, notes=decision.notes + (note,))


# --------------------------------------------------------------------------- entries


# Raw keys cached per op; past this the cache starts over (an engine sweeping many
# shapes re-resolves; decisions themselves stay cached in the dispatcher).
MAX_CACHED_KEYS = 4096


class OpEntry:
    """Miss handling and runtime fallback for one op (the generated function's helpers).

    counter(op, features) -> an object with an int ``n``: per-problem call counts
    (statistics). A miss counts itself; a hit is counted by the cached callable, which
    is then a closure incrementing that object (no key hashing on the hit path)."""

    def __init__(self, op: Op, dispatcher: Dispatcher, counter: Callable[[str, Mapping[str, Any]], Any] | None = None):
        self.op = op
        self.dispatcher = dispatcher
        self.counter = counter
        self.counted: Callable[[Callable[..., Any], Any], Callable[..., Any]] | None = None  # set by make_entry_function
        self.cache: dict[Any, Callable[..., Any]] = {}
        dispatcher.entry_caches.append(self.cache)
        # raw key -> (features, decision) so a failure can be attributed.
        self.keyinfo: dict[Any, tuple[dict[str, Any], Decision]] = {}
        self._warned: set[tuple[str, tuple]] = set()

    def miss(self, raw_key: Any, *args: Any) -> Any:
        self.op.validate(*args)
        features = self.op.features(*args)
        if self.counter is not None:
            self.counter(self.op.name, features).n += 1
        decision = self.dispatcher.decide(self.op.name, features)
        fn = self.dispatcher.build(decision)
        try:
            out = fn(*args)
        except Exception as error:
            return self._recover(raw_key, features, decision, error, args)
        self._remember(raw_key, features, decision, fn)
        return out

    def fail(self, raw_key: Any, fn: Callable[..., Any], error: Exception, *args: Any) -> Any:
        """The cached kernel raised on a hit: try the others (see the module docstring)."""
        info = self.keyinfo.get(raw_key)
        if info is None:  # the cache was reset meanwhile: treat it as a miss
            raise error
        return self._recover(raw_key, info[0], info[1], error, args)

    def _recover(self, raw_key: Any, features: dict[str, Any], decision: Decision, error: Exception, args: tuple) -> Any:
        """``decision.kernel`` raised ``error``: call the next survivors in order. The first
        success marks the kernels that raised before it failed and is cached; a survivor
        failing with the same exception type means the call itself is bad: re-raise the
        original error, mark nothing."""
        raised = {decision.kernel: error}
        while True:
            try:
                nxt = self.dispatcher.decide(self.op.name, features, exclude=raised)
            except NoKernelError:
                raise error from None
            fn = self.dispatcher.build(nxt)
            try:
                out = fn(*args)
            except Exception as again:
                if type(again) is type(error):
                    raise error from None
                raised[nxt.kernel] = again
                continue
            for kernel, exc in raised.items():
                self._warn(kernel, features, exc, nxt.kernel)
                self.dispatcher.mark_failed(self.op.name, features, kernel, exc)
            self._remember(raw_key, features, self.dispatcher.decide(self.op.name, features), fn)
            return out

    def _warn(self, kernel: str, features: Mapping[str, Any], error: BaseException, used: str) -> None:
        fkey = feature_key(features)
        if (kernel, fkey) not in self._warned:
            self._warned.add((kernel, fkey))
            log.warning(
                "kernmux: %s kernel %r raised %s: %s; %r succeeded on the same call, so %r is marked failed for %s",
                self.op.name, kernel, type(error).__name__, error, used, kernel,
                ", ".join(f"{k}={v}" for k, v in features.items()),
            )

    def _remember(self, raw_key: Any, features: dict[str, Any], decision: Decision, fn: Callable[..., Any]) -> None:
        if len(self.cache) >= MAX_CACHED_KEYS:
            self.cache.clear()
            self.keyinfo.clear()
        self.keyinfo[raw_key] = (features, decision)
        if self.counter is not None and self.counted is not None:
            fn = self.counted(fn, self.counter(self.op.name, features))
        self.cache[raw_key] = fn


def _is_optional_tensor(hint: Any) -> bool:
    return typing.get_origin(hint) is typing.Union and torch.Tensor in typing.get_args(hint)


def _key_expr(name: str, hint: Any) -> str:
    """The raw-key part of one argument (see the module docstring)."""
    tensor = f"{name}.shape, {name}.stride(), {name}.dtype, {name}.get_device()"
    if hint is torch.Tensor:
        return tensor
    if _is_optional_tensor(hint):
        return f"None if {name} is None else ({tensor})"
    if hint is float:
        return f"{name}.__class__"
    return name


_TEMPLATE = '''
def {name}({params}):
    if _compiling():
        return _custom({call})
{count}    _k = ({key},)
    _fn = _get(_k)
    if _fn is None:
        return _miss(_k, {call})
    try:
        return _fn({call})
    except Exception as _e:
        return _fail(_k, _fn, _e, {call})
'''

# With per-problem statistics the cached callable counts its own calls: one closure
# call with the op's exact parameters (cheaper than a counter keyed by op name).
_COUNTED_TEMPLATE = '''
def _counted(_kmx_fn, _kmx_cell):
    def counted({call}):
        _kmx_cell.n += 1
        return _kmx_fn({call})
    counted.__wrapped__ = _kmx_fn
    return counted
'''


def make_entry_function(
    op: Op,
    dispatcher: Dispatcher,
    custom_op: Callable[..., Any] | None = None,
    on_call: Callable[[str], None] | None = None,
    counter: Callable[[str, Mapping[str, Any]], Any] | None = None,
) -> Callable[..., Any]:
    """Generate ``kernmux.ops.<op>`` with the reference's signature (see module doc).

    on_call(op): called on every call (a per-op counter); counter: per-problem call
    counts (see :class:`OpEntry`)."""
    entry = OpEntry(op, dispatcher, counter)
    signature = inspect.signature(op.reference)
    hints = typing.get_type_hints(op.reference)
    names = list(signature.parameters)
    params, namespace = [], {}
    for index, (pname, param) in enumerate(signature.parameters.items()):
        if param.kind not in (param.POSITIONAL_OR_KEYWORD, param.POSITIONAL_ONLY):
            raise TypeError(f"op {op.name}: reference parameter {pname!r} must be positional-or-keyword")
        if param.default is inspect.Parameter.empty:
            params.append(pname)
        else:
            namespace[f"_default{index}"] = param.default
            params.append(f"{pname}=_default{index}")
    source = _TEMPLATE.format(
        name=op.name,
        params=", ".join(params),
        call=", ".join(names),
        key=", ".join(_key_expr(n, hints.get(n)) for n in names),
        count=f"    _on_call({op.name!r})\n" if on_call is not None else "",
    )
    namespace.update(
        _compiling=torch.compiler.is_compiling,
        _custom=custom_op if custom_op is not None else _not_compilable(op.name),
        _get=entry.cache.get,
        _miss=entry.miss,
        _fail=entry.fail,
        _on_call=on_call,
    )
    exec(compile(source, f"<kernmux.ops.{op.name}>", "exec"), namespace)
    if counter is not None:
        exec(compile(_COUNTED_TEMPLATE.format(call=", ".join(names)), f"<kernmux.ops.{op.name} counted>", "exec"), namespace)
        entry.counted = namespace["_counted"]
    fn = namespace[op.name]
    fn.__doc__ = op.doc or op.reference.__doc__
    fn.__module__ = "kernmux.ops"
    fn.__signature__ = signature  # type: ignore[attr-defined]
    fn.__annotations__ = dict(getattr(op.reference, "__annotations__", {}))
    fn.kernmux_entry = entry  # type: ignore[attr-defined]
    return fn


def _not_compilable(name: str) -> Callable[..., Any]:
    def fail(*args: Any) -> Any:
        raise RuntimeError(f"kernmux op {name} has no torch.library registration")

    return fail
