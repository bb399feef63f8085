"""Measured per-GPU ceilings: the denominators of "fraction of roofline".

Datasheet peaks are not reachable; a kernel is judged against what the machine was seen
to do: a large device-to-device copy (bytes read + written) and a large bf16 matmul.
Each entry names where and when it was measured. A device with no entry gets no
fraction (never a guessed one).
"""

from __future__ import annotations

from dataclasses import dataclass

from kernmux.dispatch.registry import Roofline


@dataclass(frozen=True)
class Ceilings:
    """Measured memory bandwidth (TB/s, read + write) and dense bf16 rate (TFLOP/s)."""

    device_match: str  # case-insensitive substring of the device name
    bandwidth_tbs: float
    tflops: float
    source: str

    def floor_us(self, roofline: Roofline) -> float:
        """The larger of bytes/bandwidth and flops/rate, in microseconds."""
        return roofline.floor_us(self.bandwidth_tbs, self.tflops)


# Most specific first: the first entry whose ``device_match`` occurs in the name wins.
MEASURED: tuple[Ceilings, ...] = (
    Ceilings(
        device_match="H100",
        bandwidth_tbs=2.96,
        tflops=699.0,
        source=(
            "notes/performance.md: H100 80GB HBM3, torch 2.11.0+cu130, 2026-11-22: "
            "device-to-device copy 2.96 TB/s, bf16 8192^3 matmul 699 TFLOP/s"
        ),
    ),
)


def ceilings_for(device_name: str) -> Ceilings | None:
    """Measured ceilings for a device name (``Platform.device``), or None if unknown."""
    lowered = device_name.lower()
    for entry in MEASURED:
        if entry.device_match.lower() in lowered:
            return entry
    return None
