"""Head transforms: make a kernel meet a head-count constraint without changing results.

Driven only by the op's :class:`HeadAxes` declaration, so no op is special-cased:

- ``split_heads: N`` runs chunks of at most N heads, each a complete call, and joins
  every per-head output (LSE included) the same way (concatenate along its axis, or sum
  for ops that reduce over heads);
- ``pad_heads: N`` grows the head axis to N (repeating existing heads for independent
  heads, zeros for weighted head sums), calls once and slices outputs back.

Callables here take the op's arguments positionally, in the reference's order.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch

from kernmux.dispatch.registry import HeadAxes, Op
from kernmux.dispatch.rule_model import TransformSpec


def parameter_names(op: Op) -> tuple[str, ...]:
    return tuple(inspect.signature(op.reference).parameters)


def _head_inputs(op: Op) -> list[tuple[int, int, str]]:
    """(position, axis, pad mode) of each head-carrying argument."""
    names = parameter_names(op)
    axes = op.head_axes
    assert axes is not None
    out = []
    for name, (axis, mode) in axes.inputs.items():
        if name not in names:
            raise ValueError(f"op {op.name}: head axis declared for unknown argument {name!r}")
        out.append((names.index(name), axis, mode))
    return out


def _head_count(args: Sequence[Any], head_inputs: list[tuple[int, int, str]], feature: str) -> int:
    for position, axis, _ in head_inputs:
        tensor = args[position]
        if isinstance(tensor, torch.Tensor):
            return tensor.shape[axis]
    raise ValueError(f"no head-carrying tensor among the arguments to count {feature!r}")


def _as_tuple(outputs: Any) -> tuple[tuple[Any, ...], bool]:
    if isinstance(outputs, (tuple, list)):
        return tuple(outputs), True
    return (outputs,), False


def transformed_head_counts(spec: TransformSpec, heads: int) -> list[int]:
    """Head counts the wrapped kernel will actually see (what ``supports()`` must accept):
    split into chunks of ``split_heads`` first, then each chunk padded to ``pad_heads``."""
    counts = {heads}
    if spec.split_heads is not None and heads > spec.split_heads:
        counts = {spec.split_heads}
        if heads % spec.split_heads:
            counts.add(heads % spec.split_heads)
    if spec.pad_heads is not None:
        counts = {max(c, spec.pad_heads) for c in counts}
    return sorted(counts)


def split_heads(fn: Callable[..., Any], op: Op, chunk: int) -> Callable[..., Any]:
    """Wrap ``fn`` to run chunks of at most ``chunk`` heads and join the outputs."""
    axes: HeadAxes = op.head_axes  # type: ignore[assignment]
    head_inputs = _head_inputs(op)

    def run(*args: Any) -> Any:
        heads = _head_count(args, head_inputs, axes.feature)
        if heads <= chunk:
            return fn(*args)
        pieces = []
        for start in range(0, heads, chunk):
            size = min(chunk, heads - start)
            chunk_args = list(args)
            for position, axis, _ in head_inputs:
                tensor = args[position]
                if isinstance(tensor, torch.Tensor):
                    # Each chunk is a complete, contiguous call (kernels may require it).
                    chunk_args[position] = tensor.narrow(axis, start, size).contiguous()
            pieces.append(_as_tuple(fn(*chunk_args)))
        is_tuple = pieces[0][1]
        joined = []
        for index in range(len(pieces[0][0])):
            parts = [p[0][index] for p in pieces]
            how = axes.outputs.get(index)
            if how is None:
                joined.append(parts[0])  # not per-head (identical across chunks)
            elif how == "sum":
                total = parts[0].clone()
                for part in parts[1:]:
                    total += part
                joined.append(total)
            else:
                joined.append(torch.cat(parts, dim=int(how)))
        return tuple(joined) if is_tuple else joined[0]

    run.__qualname__ = f"split_heads[{chunk}]({getattr(fn, '__qualname__', fn)})"
    return run


def pad_heads(fn: Callable[..., Any], op: Op, target: int) -> Callable[..., Any]:
    """Wrap ``fn`` to see at least ``target`` heads; outputs are sliced back."""
    axes: HeadAxes = op.head_axes  # type: ignore[assignment]
    head_inputs = _head_inputs(op)

    def run(*args: Any) -> Any:
        heads = _head_count(args, head_inputs, axes.feature)
        if heads >= target:
            return fn(*args)
        padded = list(args)
        for position, axis, mode in head_inputs:
            tensor = args[position]
            if not isinstance(tensor, torch.Tensor):
                continue
            if mode == "zero":
                shape = list(tensor.shape)
                shape[axis] = target - heads
                padded[position] = torch.cat([tensor, tensor.new_zeros(shape)], dim=axis)
            else:  # "tile": repeat the existing heads, then cut to target
                repeats = [1] * tensor.dim()
                repeats[axis] = -(-target // heads)
                padded[position] = tensor.repeat(*repeats).narrow(axis, 0, target).contiguous()
        outputs, is_tuple = _as_tuple(fn(*padded))
        sliced = []
        for index, out in enumerate(outputs):
            how = axes.outputs.get(index)
            if how is None or how == "sum":
                sliced.append(out)
            else:
                sliced.append(out.narrow(int(how), 0, heads))
        return tuple(sliced) if is_tuple else sliced[0]

    run.__qualname__ = f"pad_heads[{target}]({getattr(fn, '__qualname__', fn)})"
    return run


def apply_transform(fn: Callable[..., Any], op: Op, spec: TransformSpec | None) -> Callable[..., Any]:
    """Wrap ``fn`` with ``spec``: split outside, so each chunk is padded if it is short."""
    if not spec:
        return fn
    if op.head_axes is None:
        raise ValueError(f"op {op.name!r} declares no head axis; cannot apply {spec.text()}")
    if spec.pad_heads is not None:
        fn = pad_heads(fn, op, spec.pad_heads)
    if spec.split_heads is not None:
        fn = split_heads(fn, op, spec.split_heads)
    return fn
