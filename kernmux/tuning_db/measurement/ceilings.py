"""Measured ceilings of the GPU at hand: the denominators of "fraction of roofline".

Datasheet peaks are not reachable, and another GPU's numbers are not this one's: a
kernel is judged against what this device was seen to do.

* copy bandwidth: a large device-to-device copy (2 GiB, 20 copies after a warm-up,
  CUDA events around each, median); bandwidth = (bytes read + bytes written) / time;
* matmul rate: a bf16 ``n x n @ n x n`` matmul on random data (n = 8192, warm-up, 20
  timed, median); rate = 2 n^3 / time.

:func:`device_ceilings` measures on first need and caches per platform fingerprint: in
the tuning database (table ``kernmux_ceilings``, so a machine measures once) and in
this process (for a database that is absent, older, read-only or not installed). Each
:class:`Ceilings` says where it came from and when it was measured. On CPU there is no
GPU ceiling: no number is given, never a guessed one.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import statistics
import threading
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from kernmux.dispatch.platform import Platform, current_platform
from kernmux.dispatch.registry import Roofline

log = logging.getLogger("kernmux")

COPY_BYTES = 2 << 30  # 2 GiB copied: far beyond any L2, each copy ~1 ms on HBM3
COPIES = 20
MATMUL_N = 8192
MATMULS = 20
WARMUP = 3

# timer(fn, reps) -> the per-call times of ``reps`` calls of ``fn``, in milliseconds.
Timer = Callable[[Callable[[], Any], int], list[float]]


@dataclass(frozen=True)
class Ceilings:
    """A device's measured copy bandwidth (TB/s, read + write) and bf16 rate (TFLOP/s).

    device/fingerprint: the GPU measured (``Platform.device`` / ``Platform.fingerprint()``).
    measured_at: when (UTC). source: where these numbers came from just now ("measured
    now, stored in <db>", "tuning database <db>, row N", "measured in this process; not
    stored: <why>"). method: the sizes, repetitions and medians behind them.
    """

    bandwidth_tbs: float
    tflops: float
    device: str
    fingerprint: str
    measured_at: dt.datetime
    source: str
    method: Mapping[str, Any] = field(default_factory=dict)

    def floor_us(self, roofline: Roofline) -> float:
        """The larger of bytes/bandwidth and flops/rate, in microseconds."""
        return roofline.floor_us(self.bandwidth_tbs, self.tflops)

    def describe(self) -> str:
        """One line for people: the numbers, the device, when, and where they came from."""
        when = self.measured_at.astimezone(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return (f"copy {self.bandwidth_tbs:.3g} TB/s, bf16 matmul {self.tflops:.4g} TFLOP/s "
                f"measured on {self.device} at {when} ({self.source})")

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["measured_at"] = self.measured_at.isoformat()
        out["method"] = dict(self.method)
        return out


# --------------------------------------------------------------------------- measuring


def cuda_event_times_ms(fn: Callable[[], Any], reps: int) -> list[float]:
    """Per-call milliseconds of ``reps`` calls of ``fn``, each bracketed by CUDA events."""
    import torch

    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for i in range(reps):
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def _median_ms(samples: list[float], what: str) -> float:
    if not samples or any(not (s > 0) for s in samples):
        raise RuntimeError(f"{what}: timer returned non-positive or no samples: {samples[:5]}")
    return statistics.median(samples)


def measure_ceilings(
    device: str = "cuda",
    *,
    copy_bytes: int = COPY_BYTES,
    copies: int = COPIES,
    matmul_n: int = MATMUL_N,
    matmuls: int = MATMULS,
    warmup: int = WARMUP,
    timer: Timer | None = None,
) -> tuple[float, float, dict[str, Any]]:
    """Measure (copy TB/s, bf16 TFLOP/s, method) on ``device``.

    timer: how calls are timed (default CUDA events; tests pass a fake one, which is
    also the only way to run this on CPU: a CPU has no GPU ceiling to measure)."""
    import torch

    if timer is None:
        if not str(device).startswith("cuda") or not torch.cuda.is_available():
            raise ValueError(f"no GPU ceiling to measure on {device!r} (a CUDA or ROCm GPU is needed)")
        timer = cuda_event_times_ms
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)

    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)

    def copy() -> None:
        dst.copy_(src)

    for _ in range(warmup):
        copy()
    sync()
    copy_ms = _median_ms(timer(copy, copies), "copy")
    del src, dst

    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(matmul_n, matmul_n, generator=gen, device=device, dtype=torch.bfloat16)
    b = torch.randn(matmul_n, matmul_n, generator=gen, device=device, dtype=torch.bfloat16)
    out = torch.empty(matmul_n, matmul_n, device=device, dtype=torch.bfloat16)

    def matmul() -> None:
        torch.matmul(a, b, out=out)

    for _ in range(warmup):
        matmul()
    sync()
    matmul_ms = _median_ms(timer(matmul, matmuls), "matmul")
    del a, b, out
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()  # give the 4 GiB back to the kernels measured next

    bandwidth_tbs = 2 * copy_bytes / (copy_ms * 1e-3) / 1e12
    tflops = 2 * matmul_n**3 / (matmul_ms * 1e-3) / 1e12
    method = {
        "copy": {"bytes": copy_bytes, "reps": copies, "median_ms": copy_ms, "counted": "read + written"},
        "matmul": {"n": matmul_n, "dtype": "bf16", "reps": matmuls, "median_ms": matmul_ms, "data": "randn"},
        "warmup": warmup,
        "timer": getattr(timer, "__name__", "custom"),
    }
    return bandwidth_tbs, tflops, method


# --------------------------------------------------------------------------- caching


_CACHE: dict[str, Ceilings] = {}
_LOCK = threading.Lock()


def forget_cached() -> None:
    """Drop this process's cache (tests; after moving to another device)."""
    with _LOCK:
        _CACHE.clear()


def _libs(platform: Platform) -> dict[str, Any]:
    import torch

    return {"torch": platform.libs.get("torch"), "cuda": torch.version.cuda, "hip": getattr(torch.version, "hip", None)}


def _open_store(db_url: str | None) -> Any:
    from kernmux.tuning_db.storage.store import TuningStore

    return TuningStore(db_url)


def _from_db(db_url: str | None, fingerprint: str) -> tuple[Ceilings | None, str]:
    """The stored ceilings of ``fingerprint`` (or None) and why the database was not usable."""
    try:
        from kernmux.tuning_db.storage.ceiling_store import latest_ceilings

        store = _open_store(db_url)
    except Exception as e:  # absent extra, bad URL, older schema: fall back to measuring
        return None, f"{type(e).__name__}: {e}"
    with store:
        try:
            row = latest_ceilings(store, fingerprint)
        except Exception as e:
            return None, f"{type(e).__name__}: {e}"
        if row is None:
            return None, ""
        return Ceilings(
            bandwidth_tbs=row.bandwidth_tbs, tflops=row.tflops, device=row.device, fingerprint=row.fingerprint,
            measured_at=row.measured_at, source=f"tuning database {store.display_url}, row {row.id}",
            method=row.method,
        ), ""


def _to_db(db_url: str | None, ceilings: Ceilings, platform: Platform) -> tuple[str, str]:
    """Store ``ceilings``: (where, "") on success, ("", why not) otherwise."""
    try:
        from kernmux.tuning_db.storage.ceiling_store import CeilingRecord, record_ceilings

        with _open_store(db_url) as store:
            hw = {k: v for k, v in platform.as_dict().items() if k != "libs"}
            row = record_ceilings(store, CeilingRecord(
                fingerprint=ceilings.fingerprint, device=ceilings.device, bandwidth_tbs=ceilings.bandwidth_tbs,
                tflops=ceilings.tflops, method=dict(ceilings.method), platform=hw, libs=_libs(platform),
                measured_at=ceilings.measured_at,
            ))
            return f"{store.display_url}, row {row.id}", ""
    except Exception as e:
        return "", f"{type(e).__name__}: {e}"


def device_ceilings(
    platform: Platform | None = None,
    *,
    db_url: str | None = None,
    use_db: bool = True,
    remeasure: bool = False,
    measure: Callable[[], tuple[float, float, dict[str, Any]]] | None = None,
) -> tuple[Ceilings | None, str]:
    """This device's ceilings and, when there are none, why (``(None, reason)``).

    Looked up in this process's cache, then the tuning database at ``db_url`` (None:
    ``KERNMUX_DB`` or the default file); measured when neither has them (or with
    ``remeasure``), then stored in both. Only the platform this process runs on is
    measured; for another platform the database is the only source. ``measure()``
    replaces the measurement (tests). Never raises: a failed measurement is a reason."""
    here = current_platform()
    platform = platform or here
    if platform.vendor == "cpu":
        return None, "no GPU here (cpu): there is no GPU ceiling"
    fingerprint = platform.fingerprint()
    db_problem = ""
    if not remeasure:
        with _LOCK:
            cached = _CACHE.get(fingerprint)
        if cached is not None:
            return cached, ""
        if use_db:
            stored, db_problem = _from_db(db_url, fingerprint)
            if stored is not None:
                with _LOCK:
                    _CACHE[fingerprint] = stored
                return stored, ""
    if fingerprint != here.fingerprint():
        why = f"not measured for {platform.device} ({fingerprint}), and it is not the device here"
        return None, why + (f"; tuning database: {db_problem}" if db_problem else "")
    try:
        bandwidth, tflops, method = (measure or measure_ceilings)()
    except Exception as e:
        log.warning("kernmux: measuring the ceilings of %s failed: %s", platform.device, e)
        return None, f"measuring the ceilings of {platform.device} failed: {type(e).__name__}: {e}"
    measured = Ceilings(
        bandwidth_tbs=bandwidth, tflops=tflops, device=platform.device, fingerprint=fingerprint,
        measured_at=dt.datetime.now(dt.timezone.utc), source="measured now", method=method,
    )
    where, why_not = _to_db(db_url, measured, platform) if use_db else ("", "no database asked for")
    source = f"measured now, stored in {where}" if where else f"measured in this process; not stored: {why_not}"
    measured = dataclasses.replace(measured, source=source)
    with _LOCK:
        _CACHE[fingerprint] = measured
    return measured, ""
