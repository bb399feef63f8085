"""Side-by-side timings of an op's kernels, with the fraction of roofline reached.

Each (feature set, kernel) is one trial (:func:`kernmux.tuning_db.measurement.trial.run_trial`):
fresh inputs, the numerics gate, then the shared timing routine — so a wrong kernel
shows as ``numerics_failed`` instead of a fast time. The roofline floor is
``op.roofline(features, platform)`` over the ceilings measured on this GPU
(:func:`kernmux.tuning_db.measurement.ceilings.device_ceilings`: measured on first
need, kept in the tuning database); on CPU, or when they cannot be measured, no
fraction is given.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from kernmux.dispatch.platform import Platform, current_platform
from kernmux.dispatch.registry import REGISTRY
from kernmux.tuning_db.measurement.ceilings import Ceilings, device_ceilings


@dataclass(frozen=True)
class BenchRow:
    """One kernel on one feature set. Times in microseconds.

    floor_us: roofline floor on this GPU's measured ceilings (None without them).
    fraction: floor_us / p50_us (1.0 = at the roofline).
    achieved_tbs / achieved_tflops: roofline bytes and flops over the p50 time.
    """

    features: dict[str, Any]
    kernel: str
    config: dict[str, Any]
    status: str
    p50_us: float | None
    p20_us: float | None
    p80_us: float | None
    reps: int | None
    bytes: float | None
    flops: float | None
    floor_us: float | None
    fraction: float | None
    achieved_tbs: float | None
    achieved_tflops: float | None
    error: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def bench_kernels(op: str, features: Mapping[str, Any], kernels: Sequence[str] | None) -> list[str]:
    """Kernels to show: the named ones, else every non-test kernel of the op."""
    registered = REGISTRY.kernels_of(op)
    if kernels:
        unknown = [k for k in kernels if k not in registered]
        if unknown:
            raise ValueError(f"op {op!r} has no kernel(s) {unknown}; known: {sorted(registered)}")
        return list(kernels)
    all_test = all(k.test_only for k in registered.values())
    return sorted(name for name, k in registered.items() if all_test or not k.test_only)


def bench(
    op: str,
    feature_sets: Sequence[Mapping[str, Any]],
    kernels: Sequence[str] | None = None,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    cuda_graph: bool = False,
    seed: int = 0,
    isolate: bool = False,
    timeout_s: float = 300.0,
    platform: Platform | None = None,
    ceilings: Ceilings | None = None,
    find_ceilings: bool = True,
    db_url: str | None = None,
    imports: Sequence[str] = (),
) -> tuple[list[BenchRow], Ceilings | None]:
    """Time every kernel on every feature set; returns rows and the ceilings used.

    ceilings: the roofline denominators to use; when None and ``find_ceilings``, the
    device's are looked up or measured (:func:`device_ceilings`, cached in the tuning
    database at ``db_url``) if any feature set runs on CUDA. imports: modules the
    isolated worker imports first (ones registering the kernels named)."""
    from kernmux.tuning_db.measurement.trial import TrialSpec
    from kernmux.tuning_db.measurement.worker import InProcessRunner, TrialWorker

    platform = platform or current_platform()
    the_op = REGISTRY.op(op)
    on_gpu = any(features.get("device") == "cuda" for features in feature_sets)
    if ceilings is None and find_ceilings and on_gpu:
        ceilings, _ = device_ceilings(platform, db_url=db_url)
    rows = []
    runner = TrialWorker(imports=imports) if isolate else InProcessRunner()
    with runner:
        for index, features in enumerate(feature_sets):
            features = dict(features)
            device = "cuda" if features.get("device") == "cuda" else "cpu"
            roofline = the_op.roofline(features, platform)
            floor = ceilings.floor_us(roofline) if ceilings is not None and device == "cuda" else None
            for name in bench_kernels(op, features, kernels):
                spec = TrialSpec(op=op, kernel=name, features=features, device=device, seed=seed + index,
                                 warmup_ms=warmup_ms, rep_ms=rep_ms, cuda_graph=cuda_graph)
                record = runner.run(spec, timeout_s)
                p50 = record.p50_us if record.status == "ok" else None
                rows.append(BenchRow(
                    features=features, kernel=name, config=dict(record.config), status=record.status,
                    p50_us=p50, p20_us=record.p20_us, p80_us=record.p80_us, reps=record.reps,
                    bytes=roofline.bytes, flops=roofline.flops, floor_us=floor,
                    fraction=(floor / p50) if floor is not None and p50 else None,
                    achieved_tbs=(roofline.bytes / (p50 * 1e6)) if p50 else None,
                    achieved_tflops=(roofline.flops / (p50 * 1e6)) if p50 else None,
                    error=record.error,
                ))
    return rows, ceilings
