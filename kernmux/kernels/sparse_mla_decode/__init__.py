"""sparse_mla_decode: DeepSeek sparse MLA decode (V3.2 / V4), one latent KV head.

Kernels: ``torch`` (the fp32 reference), ``triton`` (split over the selected slots with an
LSE combine; bf16 and fp8 KV), ``aiter`` (``aiter.mla.mla_decode_fwd`` in persistent mode
with ``return_lse``; unverified on AMD hardware here). Every kernel checks index
ranges first under ``KERNMUX_CHECK_VALUES=1`` (``checks.py``). Semantics, argument shapes and the
fp8 byte layout: ``reference.py`` and ``fp8.py``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import SUPPORTED, Support, register_kernel, register_op, unsupported
from kernmux.kernels.sparse_mla_decode import spec
from kernmux.kernels.sparse_mla_decode.config import CONFIG_SPACE, DEFAULT_CONFIG, triton_shape_reason
from kernmux.kernels.sparse_mla_decode.reference import sparse_mla_decode as reference



def triton_supports(feats: Mapping[str, Any], platform: Platform) -> Support:
    if feats["device"] == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return unsupported("inputs on cpu: Triton needs a GPU (or TRITON_INTERPRET=1)")
    if feats["device"] not in ("cpu", "cuda"):
        return unsupported(f"device {feats['device']!r} not handled")
    reason = triton_shape_reason(feats["d_qk"], feats["d_v"], feats["kv_dtype"])
    return unsupported(reason) if reason else SUPPORTED


AITER_ARCHS = ("gfx942", "gfx950")


def aiter_supports(feats: Mapping[str, Any], platform: Platform) -> Support:
    if feats["device"] != "cuda":  # ROCm tensors report device type "cuda"
        return unsupported(f"inputs on {feats['device']}, AITER needs a ROCm GPU")
    if platform.arch not in AITER_ARCHS:
        return unsupported(f"arch {platform.arch}: mla_decode_fwd persistent fp8 kernels exist for {'/'.join(AITER_ARCHS)}")
    # (gfx942 with LSE from v0.1.12: denied by rule aiter-mla-gfx942-no-lse-kernel.)
    if feats["d_v"] != 512 or feats["d_qk"] not in (512, 576):
        return unsupported(f"d_qk={feats['d_qk']}, d_v={feats['d_v']}: the ASM kernels take d_v 512 with d_qk 576 or 512")
    if feats["heads"] % 16:
        # get_mla_metadata_info_v1 asserts num_head_qo % 16 (% 8 from v0.1.12) and no kernel
        # exists below 8 heads; the shipped rules pad smaller head counts to 16.
        return unsupported(f"heads={feats['heads']}: needs a multiple of 16 (pad_heads: 16 below 16)")
    return SUPPORTED


def aiter_probe(platform: Platform) -> Support:
    """The installed AITER exposes the persistent-mode entry points the adapter calls."""
    import aiter
    import aiter.mla

    missing = [n for n in ("get_mla_metadata_info_v1", "get_mla_metadata_v1") if not hasattr(aiter, n)]
    if not hasattr(aiter.mla, "mla_decode_fwd"):
        missing.append("mla.mla_decode_fwd")
    return unsupported(f"aiter lacks {', '.join(missing)}") if missing else SUPPORTED


OP_SPEC = register_op(spec)
OP = OP_SPEC.name

register_kernel(
    op=OP,
    name="torch",
    impl=reference,
    priority=0,
    doc="PyTorch reference: gathers (and dequantises) the selected rows, fp32 bmm + logsumexp",
)

register_kernel(
    op=OP,
    name="triton",
    impl="kernmux.kernels.sparse_mla_decode.triton:sparse_mla_decode_triton",
    requires={"triton": ">=3.0"},
    vendors=("cuda", "cpu"),
    supports=triton_supports,
    config_space=CONFIG_SPACE,
    default_config=DEFAULT_CONFIG,
    priority=20,
    doc="Triton split-K decode: rows gathered from the paged cache once per head group, LSE combine; bf16 and fp8 KV",
)

register_kernel(
    op=OP,
    name="aiter",
    impl="kernmux.kernels.sparse_mla_decode.aiter:sparse_mla_decode_aiter",
    requires={"amd-aiter": ""},
    vendors=("rocm",),
    supports=aiter_supports,
    probe=aiter_probe,
    # Below triton like every adapter never run here (on ROCm triton is unavailable, so
    # AITER still wins over the torch reference there).
    priority=10,
    doc="aiter.mla.mla_decode_fwd, persistent mode, return_lse, fp8 q/kv; scopes merged and sink applied here (unverified on AMD)",
)
