"""Measured ceilings: the measurement's arithmetic (timing faked, on CPU), the cache per
device fingerprint (process, then tuning database), their storage, and the CLI.

No timing is asserted here: the fake timer returns fixed samples so the arithmetic is
checked exactly. ``test_timing_gpu.py`` measures for real on CUDA."""

from __future__ import annotations

import datetime as dt
import json
import math

import pytest
import sqlalchemy as sa

from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import Roofline
from kernmux.tuning_db.measurement import ceilings as ceilings_module
from kernmux.tuning_db.measurement.ceilings import Ceilings, device_ceilings, measure_ceilings
from kernmux.tuning_db.storage import migrations
from kernmux.tuning_db.storage.ceiling_store import CeilingRecord, ceiling_rows, latest_ceilings, record_ceilings
from kernmux.tuning_db.storage.store import TuningStore

GPU = Platform(vendor="cuda", arch="sm_90", device="NVIDIA H200", units=132, libs={"torch": "2.11.0"})
OTHER_GPU = Platform(vendor="cuda", arch="sm_100", device="NVIDIA B200", units=148, libs={"torch": "2.11.0"})
CPU = Platform(vendor="cpu", arch="cpu", device="cpu", units=2, libs={"torch": "2.11.0"})


class FakeTimer:
    """Calls ``fn`` as often as asked (so the copy and the matmul really run) and returns
    the next prepared list of per-call milliseconds."""

    __name__ = "fake"

    def __init__(self, *samples: list[float]):
        self.samples = list(samples)
        self.calls: list[int] = []

    def __call__(self, fn, reps):
        for _ in range(reps):
            fn()
        self.calls.append(reps)
        return self.samples.pop(0)


@pytest.fixture(autouse=True)
def _fresh_cache():
    ceilings_module.forget_cached()
    yield
    ceilings_module.forget_cached()


@pytest.fixture
def on_gpu(monkeypatch):
    """Pretend this process runs on GPU (the platform a measurement may be made for)."""
    monkeypatch.setattr(ceilings_module, "current_platform", lambda: GPU)
    return GPU


class CountingMeasure:
    def __init__(self, result=(4.27, 797.0, {"copy": {"median_ms": 1.0}})):
        self.result, self.calls = result, 0

    def __call__(self):
        self.calls += 1
        if isinstance(self.result, Exception):
            raise self.result
        return self.result


# --------------------------------------------------------------------------- measurement


def test_measurement_arithmetic_uses_the_medians():
    timer = FakeTimer([3.0, 1.0, 2.0, 100.0, 2.0], [0.5, 0.25, 0.75])
    bandwidth, tflops, method = measure_ceilings(
        "cpu", copy_bytes=1 << 20, copies=5, matmul_n=64, matmuls=3, warmup=1, timer=timer)
    assert timer.calls == [5, 3]
    assert bandwidth == pytest.approx(2 * (1 << 20) / 2.0e-3 / 1e12), "read + written over the median copy"
    assert tflops == pytest.approx(2 * 64**3 / 0.5e-3 / 1e12), "2 n^3 over the median matmul"
    assert method["copy"] == {"bytes": 1 << 20, "reps": 5, "median_ms": 2.0, "counted": "read + written"}
    assert method["matmul"]["n"] == 64 and method["matmul"]["median_ms"] == 0.5 and method["timer"] == "fake"


def test_a_cpu_has_no_gpu_ceiling_to_measure():
    with pytest.raises(ValueError, match="no GPU ceiling"):
        measure_ceilings("cpu")


@pytest.mark.parametrize("bad", [[], [0.0, 1.0], [float("nan")]])
def test_a_timer_without_positive_samples_is_an_error(bad):
    with pytest.raises(RuntimeError, match="copy"):
        measure_ceilings("cpu", copy_bytes=64, copies=len(bad), matmul_n=4, timer=FakeTimer(bad, [1.0]))


def test_roofline_floor_uses_the_larger_term():
    c = Ceilings(2.96, 699.0, "H100", "cuda:sm_90:x", dt.datetime(2026, 11, 22, tzinfo=dt.timezone.utc), "test")
    assert c.floor_us(Roofline(bytes=2.96e6, flops=0.0)) == pytest.approx(1.0)
    assert c.floor_us(Roofline(bytes=0.0, flops=699e6 * 3)) == pytest.approx(3.0)
    assert c.floor_us(Roofline(bytes=2.96e6, flops=699e6 * 3)) == pytest.approx(3.0)
    assert "2.96 TB/s" in c.describe() and "2026-11-22 00:00 UTC" in c.describe()


# --------------------------------------------------------------------------- lookup and cache


def test_cpu_gets_no_ceilings_and_nothing_is_measured(sqlite_url):
    measure = CountingMeasure()
    ceilings, why = device_ceilings(CPU, db_url=sqlite_url, measure=measure)
    assert ceilings is None and "no GPU" in why and measure.calls == 0


def test_measured_once_then_from_the_process_then_from_the_database(on_gpu, sqlite_url):
    measure = CountingMeasure()
    first, why = device_ceilings(GPU, db_url=sqlite_url, measure=measure)
    assert why == "" and measure.calls == 1
    assert (first.bandwidth_tbs, first.tflops, first.device) == (4.27, 797.0, "NVIDIA H200")
    assert first.fingerprint == GPU.fingerprint() and first.source.startswith("measured now, stored in")
    again, _ = device_ceilings(GPU, db_url=sqlite_url, measure=measure)
    assert again is first and measure.calls == 1, "the process cache answers"

    ceilings_module.forget_cached()  # a new process on the same machine
    stored, _ = device_ceilings(GPU, db_url=sqlite_url, measure=measure)
    assert measure.calls == 1, "the database answers"
    assert stored.source.startswith("tuning database") and "row 1" in stored.source
    assert (stored.bandwidth_tbs, stored.tflops, stored.measured_at) == (4.27, 797.0, first.measured_at)

    measure.result = (4.30, 800.0, {})
    fresh, _ = device_ceilings(GPU, db_url=sqlite_url, remeasure=True, measure=measure)
    assert measure.calls == 2 and fresh.bandwidth_tbs == 4.30 and "row 2" in fresh.source
    with TuningStore(sqlite_url) as store:
        assert [r.bandwidth_tbs for r in ceiling_rows(store)] == [4.27, 4.30]
        assert latest_ceilings(store, GPU.fingerprint()).bandwidth_tbs == 4.30


def test_a_database_that_cannot_take_them_falls_back_to_the_process(on_gpu, sqlite_url):
    engine = sa.create_engine(sqlite_url)
    with engine.connect() as conn:  # a database of an older kernmux: no ceilings table
        migrations.upgrade(conn, "0002_host_and_study_index")
        conn.commit()
    engine.dispose()
    measure = CountingMeasure()
    ceilings, why = device_ceilings(GPU, db_url=sqlite_url, measure=measure)
    assert why == "" and ceilings.bandwidth_tbs == 4.27
    assert ceilings.source.startswith("measured in this process; not stored: SchemaMismatchError")
    assert "kernmux db upgrade" in ceilings.source
    assert device_ceilings(GPU, db_url=sqlite_url, measure=measure)[0] is ceilings and measure.calls == 1


def test_a_failed_measurement_is_a_reason_not_a_number(on_gpu, sqlite_url):
    ceilings, why = device_ceilings(GPU, db_url=sqlite_url, measure=CountingMeasure(RuntimeError("out of memory")))
    assert ceilings is None and "failed" in why and "out of memory" in why


def test_another_device_is_never_measured_here_but_read_from_the_database(on_gpu, sqlite_url):
    measure = CountingMeasure()
    ceilings, why = device_ceilings(OTHER_GPU, db_url=sqlite_url, measure=measure)
    assert ceilings is None and "not the device here" in why and measure.calls == 0
    with TuningStore(sqlite_url) as store:
        record_ceilings(store, CeilingRecord(fingerprint=OTHER_GPU.fingerprint(), device="NVIDIA B200",
                                             bandwidth_tbs=7.0, tflops=2000.0))
    ceilings, _ = device_ceilings(OTHER_GPU, db_url=sqlite_url, measure=measure)
    assert ceilings.bandwidth_tbs == 7.0 and ceilings.device == "NVIDIA B200" and measure.calls == 0


# --------------------------------------------------------------------------- storage


def test_storage_round_trip(store):
    assert latest_ceilings(store, "cuda:sm_90:x") is None
    when = dt.datetime(2026, 11, 29, 5, 30, 1, 123456, tzinfo=dt.timezone.utc)
    first = record_ceilings(store, CeilingRecord(
        fingerprint="cuda:sm_90:x", device="NVIDIA H200", bandwidth_tbs=4.27, tflops=797.0,
        method={"copy": {"bytes": 2 << 30}}, platform={"vendor": "cuda"}, libs={"torch": "2.11.0"}, measured_at=when))
    assert first.id is not None and first.host
    record_ceilings(store, CeilingRecord(fingerprint="cuda:sm_100:y", device="B200", bandwidth_tbs=7.0, tflops=2000))
    got = latest_ceilings(store, "cuda:sm_90:x")
    assert got == first
    assert got.measured_at == when and got.method == {"copy": {"bytes": 2 << 30}} and got.libs == {"torch": "2.11.0"}
    assert [r.device for r in ceiling_rows(store)] == ["NVIDIA H200", "B200"]


@pytest.mark.parametrize("field, value", [("bandwidth_tbs", 0.0), ("tflops", -1.0), ("tflops", math.inf),
                                          ("bandwidth_tbs", True), ("fingerprint", "")])
def test_invalid_ceilings_are_refused(sqlite_url, field, value):
    fields = {**dict(fingerprint="cuda:sm_90:x", device="H200", bandwidth_tbs=4.0, tflops=700.0), field: value}
    with TuningStore(sqlite_url) as store:
        with pytest.raises(ValueError, match=field):
            record_ceilings(store, CeilingRecord(**fields))
        assert ceiling_rows(store) == []


# --------------------------------------------------------------------------- CLI


def _cli(capsys, *argv):
    from kernmux.cli.main import main

    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_on_cpu_says_there_is_no_gpu_ceiling(capsys, monkeypatch):
    monkeypatch.setattr(ceilings_module, "current_platform", lambda: CPU)
    monkeypatch.setattr("kernmux.dispatch.platform.current_platform", lambda: CPU)
    code, out, err = _cli(capsys, "ceilings")
    assert code == 1 and "no GPU" in err and "TB/s" not in out
    code, out, _ = _cli(capsys, "ceilings", "--json")
    data = json.loads(out)
    assert code == 1 and data["ceilings"] is None and "no GPU" in data["note"]


def test_cli_shows_measures_again_and_lists(capsys, monkeypatch, on_gpu, sqlite_url):
    monkeypatch.setattr("kernmux.dispatch.platform.current_platform", lambda: GPU)
    measure = CountingMeasure()
    monkeypatch.setattr(ceilings_module, "measure_ceilings", measure)
    code, out, _ = _cli(capsys, "ceilings", "--db", sqlite_url)
    assert code == 0 and "copy 4.27 TB/s, bf16 matmul 797 TFLOP/s measured on NVIDIA H200" in out
    assert "measured now, stored in" in out and measure.calls == 1
    code, out, _ = _cli(capsys, "ceilings", "--db", sqlite_url, "--json")
    assert json.loads(out)["ceilings"]["bandwidth_tbs"] == 4.27 and measure.calls == 1
    code, out, _ = _cli(capsys, "ceilings", "--db", sqlite_url, "--remeasure", "--all")
    assert code == 0 and measure.calls == 2 and out.count("NVIDIA H200 (") == 3  # the current line + 2 rows
