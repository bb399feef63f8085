"""vLLM adapter for ``moe_topk_softmax``: vLLM's compiled ``_moe_C::topk_softmax``.

The op writes its outputs in place and its schema grew over releases (vLLM
``csrc/moe/torch_bindings.cpp`` and ``vllm/_custom_ops.py``)::

    topk_softmax(Tensor! topk_weights, Tensor! topk_indices, Tensor! token_expert_indices,
                 Tensor gating_output)                                   # early releases
    ... , bool renormalize)                                              # later
    ... , bool renormalize, Tensor? bias)                                # later still
    ... , bool renormalize, Tensor? e_score_correction_bias, Tensor? is_padding)

So the call is built from the schema of the installed build, never from a guessed
version: the four tensors positionally, ``renormalize`` by keyword where the schema has
it (else the k weights are renormalised here), the op's padding mask as ``is_padding``
where the schema has it (else the ids of padded rows are set to -1 here: the same
result, vLLM PR #48979), ``None`` for other optional tensors without a default, defaults
for the rest. The op knows nothing of shared experts: those slots are appended here
(sigmoid + copy), and the routed columns are passed as their own contiguous tensor,
because the kernel derives the row length from the tensor's last dimension.

vLLM's kernel clamps NaN/inf probabilities to 0 ("to prevent duplicate expert IDs
downstream"), which would turn a NaN input into finite weights; the reference's rule
(NaN weights, ids 0..k-1) is restored after the call (``postprocess.apply_reference_rules``).
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass
from typing import Any

import torch

from kernmux.dispatch.outputs import empty_output
from kernmux.kernels.moe_topk_softmax.postprocess import apply_reference_rules

OP_NAME = "_moe_C::topk_softmax"
# Extension modules that register the _moe_C namespace, newest layout last; importing
# vllm._custom_ops (which loads every extension of the platform) is the fallback.
_EXTENSION_MODULES = ("vllm._moe_C", "vllm._moe_C_stable_libtorch")


def _registered() -> bool:
    return hasattr(torch.ops._moe_C, "topk_softmax")


@functools.lru_cache(maxsize=1)
def load_op() -> Any:
    """``torch.ops._moe_C.topk_softmax``, importing vLLM's extension if needed.

    Raises ImportError (with every attempt's reason) when no installed module provides it."""
    errors = []
    if not _registered():
        for name in (*_EXTENSION_MODULES, "vllm._custom_ops"):
            try:
                importlib.import_module(name)
            except Exception as e:  # a missing or broken extension is a reason, recorded
                errors.append(f"{name}: {type(e).__name__}: {e}")
                continue
            if _registered():
                break
    if not _registered():
        raise ImportError(f"no module registers {OP_NAME} ({'; '.join(errors) or 'not found'})")
    return torch.ops._moe_C.topk_softmax


@dataclass(frozen=True)
class CallPlan:
    """How to call the installed schema after its four tensor arguments (by keyword)."""

    passes_renormalize: bool
    none_args: tuple[str, ...] = ()  # optional tensors without a default: passed None
    passes_padding: bool = False  # the schema has ``is_padding`` (vLLM >= PR #48979)

    def kwargs(self, renormalize: bool, is_padding: Any = None) -> dict[str, Any]:
        if not self.passes_renormalize:
            return {}
        out: dict[str, Any] = {"renormalize": bool(renormalize), **{name: None for name in self.none_args}}
        if self.passes_padding:
            out["is_padding"] = is_padding
        return out


def plan_from_schema(schema: Any) -> CallPlan:
    """Read a ``torch._C.FunctionSchema`` of topk_softmax into a :class:`CallPlan`.

    Arguments with defaults keep them; optional ones without a default get None. Raises
    ValueError for a schema this adapter cannot fill (a required argument it does not
    know), so the probe reports it instead of the call failing later."""
    args = list(schema.arguments)
    if len(args) < 4:
        raise ValueError(f"{OP_NAME} schema has {len(args)} arguments, expected >= 4: {schema}")
    rest = args[4:]
    if not rest:
        return CallPlan(passes_renormalize=False)
    if rest[0].name != "renormalize":
        raise ValueError(f"{OP_NAME}: fifth argument is {rest[0].name!r}, expected 'renormalize': {schema}")
    none_args = []
    passes_padding = False
    for arg in rest[1:]:
        if arg.name == "is_padding" and arg.type.kind() == "OptionalType":
            passes_padding = True
            continue
        if arg.has_default_value():
            continue
        if arg.type.kind() != "OptionalType":
            raise ValueError(f"{OP_NAME}: required argument {arg.name!r} unknown to this adapter: {schema}")
        none_args.append(arg.name)
    return CallPlan(passes_renormalize=True, none_args=tuple(none_args), passes_padding=passes_padding)


@functools.lru_cache(maxsize=1)
def call_plan() -> CallPlan:
    return plan_from_schema(load_op().default._schema)


def has_kernel_for(device_type: str) -> bool:
    """Whether the loaded op has a kernel for tensors of ``device_type`` ("cuda"/"cpu").
    ROCm builds register under the CUDA dispatch key as well."""
    key = "CPU" if device_type == "cpu" else "CUDA"
    load_op()
    return bool(torch._C._dispatch_has_kernel_for_dispatch_key(OP_NAME, key))


def moe_topk_softmax(
    gating_logits: torch.Tensor,
    topk: int,
    renormalize: bool = False,
    num_shared: int = 0,
    is_padding: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Routing through vLLM's op; same contract as the reference (``reference.py``)."""
    op, plan = load_op(), call_plan()
    tokens, width = gating_logits.shape
    experts = width - num_shared
    device = gating_logits.device
    routed_logits = gating_logits[:, :experts] if num_shared else gating_logits
    if not routed_logits.is_contiguous():
        routed_logits = routed_logits.contiguous()
    weights = empty_output((tokens, topk + num_shared), torch.float32, device)
    ids = empty_output((tokens, topk + num_shared), torch.int32, device)
    # vLLM's op writes whole [T, k] rows: contiguous buffers of its own when there are shared slots.
    routed_w = torch.empty((tokens, topk), dtype=torch.float32, device=device) if num_shared else weights
    routed_ids = torch.empty((tokens, topk), dtype=torch.int32, device=device) if num_shared else ids
    token_expert_indices = torch.empty((tokens, topk), dtype=torch.int32, device=device)
    op(routed_w, routed_ids, token_expert_indices, routed_logits, **plan.kwargs(renormalize, is_padding))
    if renormalize and not plan.passes_renormalize:
        routed_w.div_(routed_w.sum(dim=-1, keepdim=True))
    if num_shared:
        weights[:, :topk] = routed_w
        ids[:, :topk] = routed_ids
        weights[:, topk:] = torch.sigmoid(gating_logits[:, experts:].float())
        ids[:, topk:] = torch.arange(experts, experts + num_shared, dtype=torch.int32, device=device)
    apply_reference_rules(gating_logits, experts, topk, weights, ids, is_padding)
    return weights, ids
