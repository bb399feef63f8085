"""A stand-in ``vllm`` package written to a temporary directory for the plugin tests.

It has the module paths and function signatures of vLLM 0.32 at every hook point, with
small PyTorch bodies, plus modules that copy the hooked functions with ``from x import f``
(the copies the plugin must find). Nothing here imports the real vLLM.
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

ROUTER = "vllm.model_executor.layers.fused_moe.router"

FILES: dict[str, str] = {
    "vllm/__init__.py": '__version__ = "{version}"\n',
    "vllm/envs.py": "VLLM_BATCH_INVARIANT = False\n",
    "vllm/model_executor/__init__.py": "",
    "vllm/model_executor/layers/__init__.py": "",
    "vllm/model_executor/layers/fused_moe/__init__.py": "",
    "vllm/model_executor/layers/fused_moe/router/__init__.py": "",
    "vllm/model_executor/layers/fused_moe/router/fused_topk_router.py": """
        import os

        import torch

        CALLS = []
        # Stands in for get_forward_context().is_padding (None: no forward context).
        FORWARD_CONTEXT_PADDING = None

        def _get_padding_mask(num_tokens):
            # vLLM 0.32: envs.VLLM_MOE_SKIP_PADDING (default "1") and a forward context.
            if bool(int(os.getenv("VLLM_MOE_SKIP_PADDING", "1"))) and FORWARD_CONTEXT_PADDING is not None:
                return FORWARD_CONTEXT_PADDING[:num_tokens]
            return None

        def vllm_topk_softmax(topk_weights, topk_indices, token_expert_indices, gating_output, renormalize=False):
            CALLS.append("vllm_topk_softmax")
            probs = torch.softmax(gating_output.float(), dim=-1)
            w, i = torch.topk(probs, topk_indices.shape[1], dim=-1)
            if renormalize:
                w = w / w.sum(dim=-1, keepdim=True)
            topk_weights.copy_(w)
            topk_indices.copy_(i)
            mask = _get_padding_mask(topk_indices.shape[0])
            if mask is not None:
                topk_indices.masked_fill_(mask.view(-1, 1), -1)
            return topk_weights, topk_indices

        def dispatch_topk_softmax_func(use_rocm_aiter=False):
            return vllm_topk_softmax

        def fused_topk(hidden_states, gating_output, topk, renormalize, indices_type=None, scoring_func="softmax"):
            M = hidden_states.shape[0]
            w = torch.empty(M, topk, dtype=torch.float32)
            ids = torch.empty(M, topk, dtype=torch.int32 if indices_type is None else indices_type)
            tei = torch.empty(M, topk, dtype=torch.int32)
            fn = dispatch_topk_softmax_func(use_rocm_aiter=False)
            w, ids = fn(w, ids, tei, gating_output, renormalize)
            return w, ids, tei
    """,
    # A copy made at import time, like aiter_shared_routed_fused_moe_router.py.
    "vllm/model_executor/layers/fused_moe/router/shared_router.py": """
        from vllm.model_executor.layers.fused_moe.router.fused_topk_router import dispatch_topk_softmax_func
    """,
    "vllm/model_executor/layers/fused_moe/router/cpu_router.py": """
        import torch

        def _softmax_topk(router_logits, top_k, renormalize):
            vals, idx = torch.topk(router_logits, k=top_k, dim=-1, sorted=False)
            if renormalize:
                w = torch.softmax(vals, dim=-1)
            else:
                w = (vals - torch.logsumexp(router_logits, dim=-1, keepdim=True)).exp()
            return w.to(torch.float32), idx.to(torch.int32)

        class CPURouter:
            def __init__(self, top_k, renormalize):
                self.top_k, self.renormalize = top_k, renormalize

            def route(self, router_logits):
                return _softmax_topk(router_logits, self.top_k, self.renormalize)
    """,
    "vllm/model_executor/layers/fused_moe/router/cpu_user.py": """
        from vllm.model_executor.layers.fused_moe.router.cpu_router import _softmax_topk
    """,
    "vllm/model_executor/layers/fused_moe/oracle/__init__.py": "",
    # The unquantized MoE oracle (0.32/0.33 signature) and the method module's copy of it.
    "vllm/model_executor/layers/fused_moe/oracle/unquantized.py": """
        from tests.integrations.standin_moe_experts import select_unquantized_moe_backend as _select

        def select_unquantized_moe_backend(moe_config):
            return _select(moe_config)
    """,
    "vllm/model_executor/layers/fused_moe/unquantized_fused_moe_method.py": """
        from vllm.model_executor.layers.fused_moe.oracle.unquantized import select_unquantized_moe_backend
    """,
    # The MXFP4 linear kernel selection and a scheme's copy of it.
    "vllm/model_executor/kernels/__init__.py": "",
    "vllm/model_executor/kernels/linear/__init__.py": """
        from tests.integrations.standin_mxfp4_linear import make as _make

        globals().update({{k: v for k, v in vars(_make()).items() if not k.startswith("__")}})
    """,
    "vllm/model_executor/layers/quantization/__init__.py": "",
    "vllm/model_executor/layers/quantization/online_mxfp4.py": """
        from vllm.model_executor.kernels.linear import init_mxfp4_linear_kernel
    """,
    "vllm/utils/__init__.py": "",
    "vllm/utils/deep_gemm.py": """
        if "{version}".startswith("0.33"):
            def fp8_fp4_paged_mqa_logits(q, kv_cache, weights, context_lens, block_tables, schedule_metadata,
                                         max_model_len, indices=None):
                raise NotImplementedError("stand-in DeepGEMM (0.33: clean_logits removed)")
        else:
            def fp8_fp4_paged_mqa_logits(q, kv_cache, weights, context_lens, block_tables, schedule_metadata,
                                         max_model_len, clean_logits, indices=None):
                raise NotImplementedError("stand-in DeepGEMM")
    """,
    "vllm/model_executor/layers/sparse_attn_indexer.py": """
        from vllm.utils.deep_gemm import fp8_fp4_paged_mqa_logits
    """,
    "vllm/v1/__init__.py": "",
    "vllm/v1/attention/__init__.py": "",
    "vllm/v1/attention/ops/__init__.py": "",
    "vllm/v1/attention/ops/rocm_aiter_mla_sparse.py": """
        def rocm_fp8_paged_mqa_logits(q_fp8, kv_cache_fp8, weights, context_lens, block_tables,
                                      schedule_metadata, max_model_len, *, compress_ratio=1):
            raise NotImplementedError("stand-in AITER")
    """,
    "vllm/v1/attention/ops/flashmla.py": """
        AVAILABLE = {available}

        def _is_flashmla_available():
            return (True, None) if AVAILABLE else (False, "stand-in: no FlashMLA")

        def flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, head_dim_v, tile_scheduler_metadata,
                                   num_splits=None, softmax_scale=None, causal=False, is_fp8_kvcache=False,
                                   indices=None, attn_sink=None, extra_k_cache=None, extra_indices_in_kvcache=None,
                                   topk_length=None, extra_topk_length=None):
            raise NotImplementedError("stand-in FlashMLA")

        # The same object under another name (vLLM binds one stub to every entry point).
        flash_mla_sparse_fwd = flash_mla_with_kvcache
    """,
}


def write(root: Path, version: str = "0.32.0", flashmla: bool = True) -> Path:
    for rel, text in FILES.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).format(version=version, available=flashmla).lstrip())
    return root


def forget() -> None:
    """Drop every stand-in module so the next test imports fresh copies."""
    for name in [n for n in sys.modules if n == "vllm" or n.startswith("vllm.")]:
        del sys.modules[name]
