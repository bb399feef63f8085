"""A deliberately wrong third-party kernel: ``moe_topk_softmax`` answered with the ids of
the k *smallest* logits, at a priority above every in-tree kernel, registered through
the ``kernmux.kernels`` entry point of the dist-info beside this package. Each call
appends a line to the file named by ``KMX_WRONG_KERNEL_LOG`` so a test can count calls.
tests/dispatch/test_selfcheck_wrong_kernel.py checks it never answers a caller."""

from __future__ import annotations

import os


def wrong_topk(gating_logits, topk, renormalize=False, num_shared=0, is_padding=None):
    import torch

    log = os.environ.get("KMX_WRONG_KERNEL_LOG")
    if log:
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
    from kernmux.kernels.moe_topk_softmax.reference import moe_topk_softmax

    weights, ids = moe_topk_softmax(gating_logits, topk, renormalize, num_shared, is_padding)
    routed = gating_logits[:, : gating_logits.shape[1] - num_shared].float()
    ids[:, :topk] = torch.topk(-routed, topk, dim=-1).indices.to(torch.int32)
    return weights, ids


def register() -> None:
    from kernmux.dispatch.registry import register_kernel

    register_kernel(op="moe_topk_softmax", name="wrong", impl=wrong_topk, priority=1000,
                    doc="fast and wrong (a test fixture)")
