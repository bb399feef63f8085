"""One tuning process per GPU: which GPUs ``kernmux tune --gpus`` uses and how each
process is pinned to its own.

Each process sees exactly one device (``CUDA_VISIBLE_DEVICES``), so every trial it runs
lands on that GPU, and it records the GPU's index as the host numbers it
(:data:`~kernmux.tuning_db.measurement.trial.GPU_INDEX_ENV`) in each row's platform. The
processes share one optuna study in the tuning database, so no point is measured twice;
rows from GPUs of another model have another platform fingerprint and never enter the
same decision.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from kernmux.tuning_db.measurement.trial import GPU_INDEX_ENV


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as the host numbers them (``CUDA_VISIBLE_DEVICES``
    entries when it is set, else 0..count-1)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d.strip() for d in visible.split(",") if d.strip()]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    except ImportError:
        return []


def parse_gpus(text: str, visible: Sequence[str]) -> tuple[str, ...]:
    """``"all"`` or a comma-separated list of GPU ids among ``visible``.

    Raises ValueError naming what is wrong: no GPU here, an id not visible, a repeat."""
    if not visible:
        raise ValueError("--gpus needs CUDA GPUs, and none is visible here (CUDA_VISIBLE_DEVICES, torch.cuda)")
    if text.strip().lower() == "all":
        return tuple(visible)
    wanted = [part.strip() for part in text.split(",") if part.strip()]
    if not wanted:
        raise ValueError(f"--gpus {text!r}: expected 'all' or GPU ids such as 0,1,2,3")
    unknown = [g for g in wanted if g not in visible]
    if unknown:
        raise ValueError(f"--gpus: GPU {', '.join(unknown)} not visible here; visible: {', '.join(visible)}")
    repeated = sorted({g for g in wanted if wanted.count(g) > 1})
    if repeated:
        raise ValueError(f"--gpus: GPU {', '.join(repeated)} listed twice (one tuning process per GPU)")
    return tuple(wanted)


def gpu_envs(gpus: Sequence[str]) -> list[dict[str, str]]:
    """The environment of each tuning process: its one GPU, and that GPU's index."""
    return [{"CUDA_VISIBLE_DEVICES": gpu, GPU_INDEX_ENV: gpu} for gpu in gpus]
