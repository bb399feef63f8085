"""Register each op as a ``torch.library`` custom op (``torch.ops.kernmux.<op>``).

torch.compile then sees one opaque node with a fake (meta) implementation instead of
tracing into the dispatcher, so ``fullgraph=True`` holds, and CUDA-graph capture records
only the kernel the dispatcher chose at run time.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any

import torch

from kernmux.dispatch.registry import Op

_REGISTERED: dict[str, Any] = {}


def register_custom_op(op: Op, eager: Callable[..., Any]) -> Any:
    """``torch.ops.kernmux.<op>``: its eager implementation calls ``eager`` (the hot
    path), its fake implementation is ``op.fake``. Idempotent per process."""
    if op.name in _REGISTERED:
        return _REGISTERED[op.name]
    signature = inspect.signature(op.reference)
    hints = typing.get_type_hints(op.reference)
    names = list(signature.parameters)

    def impl(*args: Any) -> Any:
        out = eager(*args)
        # Outputs of a custom op must not alias its inputs.
        if isinstance(out, tuple):
            return tuple(_no_alias(o, args) for o in out)
        return _no_alias(out, args)

    # Give the function the reference's annotated signature so torch infers the schema.
    impl.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p.replace(annotation=hints.get(n, p.annotation)) for n, p in signature.parameters.items()],
        return_annotation=hints.get("return", signature.return_annotation),
    )
    impl.__annotations__ = {n: hints[n] for n in names if n in hints}
    impl.__annotations__["return"] = hints.get("return")
    impl.__name__ = op.name
    custom = torch.library.custom_op(f"kernmux::{op.name}", mutates_args=())(impl)
    custom.register_fake(op.fake)
    _REGISTERED[op.name] = custom
    return custom


def _no_alias(out: Any, args: tuple) -> Any:
    if isinstance(out, torch.Tensor):
        for arg in args:
            if isinstance(arg, torch.Tensor) and out.untyped_storage().data_ptr() == arg.untyped_storage().data_ptr() and out.numel():
                return out.clone()
    return out
