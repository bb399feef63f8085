"""``kernmux.ops.<op>(...)``: the functions an inference engine calls.

Each attribute is generated on first access (see :mod:`kernmux.dispatch.hotpath`) and
then cached as a plain module attribute, so later accesses cost nothing. The op is also
registered as ``torch.ops.kernmux.<op>`` for torch.compile. The dispatcher behind them is
the process-wide one from :mod:`kernmux.runtime`.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

_LOCK = threading.RLock()


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    from kernmux.dispatch.hotpath import make_entry_function
    from kernmux.dispatch.registry import REGISTRY, UnknownOpError
    from kernmux.dispatch.torch_op import register_custom_op
    from kernmux.runtime import default_dispatcher, problem_counter

    try:
        op = REGISTRY.op(name)
    except UnknownOpError as e:
        raise AttributeError(str(e)) from None
    module = sys.modules[__name__]
    with _LOCK:  # concurrent first calls build one entry (and one custom op)
        fn = module.__dict__.get(name)
        if fn is not None:
            return fn
        # The custom op's eager body looks the entry up by name, so reset() is honoured.
        custom = register_custom_op(op, lambda *args: getattr(module, name)(*args))
        fn = make_entry_function(op, default_dispatcher(), custom_op=custom, counter=problem_counter())
        globals()[name] = fn
    return fn


def __dir__() -> list[str]:
    from kernmux.dispatch.registry import REGISTRY

    return sorted(op.name for op in REGISTRY.all_ops())


def reset() -> None:
    """Forget generated entries and cached decisions (tests; after changing rules)."""
    from kernmux.dispatch.registry import REGISTRY
    from kernmux.runtime import reset_default_dispatcher

    with _LOCK:
        for op in list(REGISTRY.ops):
            globals().pop(op, None)
        reset_default_dispatcher()
