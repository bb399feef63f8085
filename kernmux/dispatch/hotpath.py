"""The hot path: ``kernmux.ops.<op>(...)`` -> raw key -> one dict lookup -> cached callable.

For each op a small Python function with the reference's exact signature is generated
once. Its body builds a raw key from argument shapes/dtypes/devices and scalar values,
looks it up, and calls the cached callable. Everything else (validation, features,
rules, tuning database, transforms) happens on a miss, off the hot path.

If the chosen kernel raises, the dispatcher logs once, marks (kernel, feature key)
failed, resolves again (the next survivor) and calls it, so the caller still gets a
correct result.
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
    :mod:`kernmux.runtime` builds the process-wide dispatcher from the environment."""

    def __init__(
        self,
        *,
        registry: Registry = REGISTRY,
        platform: Platform | None = None,
        rules: RuleSet | Callable[[], RuleSet] = RuleSet(),
        tuning: TuningSource | TuningFactory | None = None,
        listeners: Sequence[Callable[[Decision], None]] = (),
    ) -> None:
        self.registry = registry
        self._platform = platform
        self._rules: Any = rules
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

    def decide(self, op_name: str, features: Mapping[str, Any]) -> Decision:
        """The (cached) decision for ``features``."""
        key = (op_name, feature_key(features))
        decision = self._decisions.get(key)
        if decision is None:
            with self._lock:
                decision = resolve(
                    op_name,
                    features,
                    self.platform,
                    self.rules,
                    tuning=self.tuning,
                    failed=self.failed.get(key),
                    registry=self.registry,
                )
                if self._tuning_note and not any("tuning" in n for n in decision.notes):
                    decision = _with_note(decision, self._tuning_note)
                self._forget_if_tuning_changed()
                self._decisions[key] = decision
            for listener in self.listeners:
                listener(decision)
        return decision

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


class OpEntry:
    """Miss handling and runtime fallback for one op (the generated function's helpers)."""

    def __init__(self, op: Op, dispatcher: Dispatcher):
        self.op = op
        self.dispatcher = dispatcher
        self.cache: dict[Any, Callable[..., Any]] = {}
        dispatcher.entry_caches.append(self.cache)
        # raw key -> (features, decision) so a failure can be attributed.
        self.keyinfo: dict[Any, tuple[dict[str, Any], Decision]] = {}
        self._warned: set[tuple[str, tuple]] = set()

    def miss(self, raw_key: Any, *args: Any) -> Any:
        self.op.validate(*args)
        features = self.op.features(*args)
        return self._call(raw_key, features, self.dispatcher.decide(self.op.name, features), args)

    def fail(self, raw_key: Any, fn: Callable[..., Any], error: Exception, *args: Any) -> Any:
        """The chosen kernel raised: log once, mark it failed for this key, call the next."""
        features, decision = self.keyinfo[raw_key]
        fkey = feature_key(features)
        if (decision.kernel, fkey) not in self._warned:
            self._warned.add((decision.kernel, fkey))
            log.warning(
                "kernmux: %s kernel %r raised %s: %s; marking it failed for %s and falling back",
                self.op.name, decision.kernel, type(error).__name__, error,
                ", ".join(f"{k}={v}" for k, v in features.items()),
            )
        self.dispatcher.mark_failed(self.op.name, features, decision.kernel, error)
        self.cache.pop(raw_key, None)
        try:
            next_decision = self.dispatcher.decide(self.op.name, features)
        except NoKernelError as e:
            raise e from error
        return self._call(raw_key, features, next_decision, args)

    def _call(self, raw_key: Any, features: dict[str, Any], decision: Decision, args: tuple) -> Any:
        """Build the decision's callable, call it, and cache it once it has worked."""
        fn = self.dispatcher.build(decision)
        self.keyinfo[raw_key] = (features, decision)
        try:
            out = fn(*args)
        except Exception as error:
            return self.fail(raw_key, fn, error, *args)
        self.cache[raw_key] = fn
        return out


def _is_optional_tensor(hint: Any) -> bool:
    return typing.get_origin(hint) is typing.Union and torch.Tensor in typing.get_args(hint)


def _key_expr(name: str, hint: Any) -> str:
    if hint is torch.Tensor:
        return f"{name}.shape, {name}.dtype, {name}.device"
    if _is_optional_tensor(hint):
        return f"None if {name} is None else ({name}.shape, {name}.dtype, {name}.device)"
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


def make_entry_function(
    op: Op,
    dispatcher: Dispatcher,
    custom_op: Callable[..., Any] | None = None,
    on_call: Callable[[str], None] | None = None,
) -> Callable[..., Any]:
    """Generate ``kernmux.ops.<op>`` with the reference's signature (see module doc)."""
    entry = OpEntry(op, dispatcher)
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
