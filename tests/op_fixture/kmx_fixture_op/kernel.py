"""The fixture op's one kernel: fp32 fused multiply-add over chunks of ``chunk`` elements."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from kernmux.dispatch.outputs import empty_output


def scaled_add(x: torch.Tensor, y: torch.Tensor, alpha: float, *, config: Mapping[str, Any]) -> torch.Tensor:
    out = empty_output(tuple(x.shape), x.dtype, x.device)
    step = int(config["chunk"])
    for start in range(0, x.shape[0], step):
        stop = min(start + step, x.shape[0])
        out[start:stop] = torch.addcmul(y[start:stop].float(), x[start:stop].float(), torch.tensor(alpha)).to(x.dtype)
    return out
