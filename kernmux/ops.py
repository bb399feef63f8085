"""``kernmux.ops.<op>(...)``: the functions an inference engine calls.

Each attribute is generated on first access (see :mod:`kernmux.dispatch.hotpath`) and
then cached as a plain module attribute, so later accesses cost nothing. The op is also
registered as ``torch.ops.kernmux.<op>`` for torch.compile.
"""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):
        raise AttributeError(name)
    from kernmux.dispatch.hotpath import default_dispatcher, make_entry_function, stats_hook
    from kernmux.dispatch.registry import REGISTRY, UnknownOpError
    from kernmux.dispatch.torch_op import register_custom_op

    try:
        op = REGISTRY.op(name)
    except UnknownOpError as e:
        raise AttributeError(str(e)) from None
    import sys

    module = sys.modules[__name__]
    # The custom op's eager body looks the entry up by name, so reset() is honoured.
    custom = register_custom_op(op, lambda *args: getattr(module, name)(*args))
    fn = make_entry_function(op, default_dispatcher(), custom_op=custom, on_call=stats_hook())
    globals()[name] = fn
    return fn


def __dir__() -> list[str]:
    from kernmux.dispatch.registry import REGISTRY

    return sorted(op.name for op in REGISTRY.all_ops())


def reset() -> None:
    """Forget generated entries and cached decisions (tests; after changing rules)."""
    import kernmux.dispatch.hotpath as hotpath
    from kernmux.dispatch.registry import REGISTRY

    for op in list(REGISTRY.ops):
        globals().pop(op, None)
    hotpath._DEFAULT = None
