"""``rules derive`` writes rules no broader than the platform and device of their rows, and
escapes what a database row may hold (a newline in an op name) in its comments."""

from __future__ import annotations

import yaml

from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import REGISTRY
from kernmux.rules.lint import lint_files
from kernmux.rules.loader import load_rule_file
from kernmux.tuning_db.storage.models import Trial
from kernmux.tuning_db.storage.records import TrialRecord, normalize_record, stored_values
from kernmux.tuning_db.storage.store import TuningStore
from kernmux.tuning_db.tuning.derive import derive_rules

OP = "toy_attention"
CPU = Platform(vendor="cpu", arch="cpu", device="cpu", units=2, libs={"torch": "2.13.0"})
H100 = Platform(vendor="cuda", arch="sm_90", device="NVIDIA H100 80GB HBM3", units=132, libs={"torch": "2.13.0"})
H200 = H100.with_overrides({"device": "NVIDIA H200", "units": 132})


def _row(kernel: str, status: str, on: Platform, *, device: str, p50: float | None = None, **feats) -> TrialRecord:
    features = {**REGISTRY.op(OP).default_features(), "device": device, **feats}
    return TrialRecord.for_platform(
        on, op=OP, kernel=kernel, config={}, features=features, bucket=dict(features), status=status,
        p50_us=p50 if status == "ok" else None, p20_us=None, p80_us=None, reps=None, metrics={},
        error=None if status == "ok" else "boom",
    )


def test_rules_from_cpu_rows_never_deny_a_kernel_on_a_gpu(sqlite_url, tmp_path):
    with TuningStore(sqlite_url) as store:
        store.record_many([
            _row("flaky", "crashed", CPU, device="cpu"),
            # `kernmux tune --device cuda` on this CPU machine (an older kernmux recorded these).
            _row("chunked", "error", CPU, device="cuda"),
            _row("narrow", "error", CPU, device="cuda"),
        ])
        text, count = derive_rules(store)
    path = tmp_path / "derived.yaml"
    path.write_text(text)
    assert lint_files([path]).ok
    assert count == 1
    [rule] = load_rule_file(path)
    assert rule.action.kernels == ("flaky",)
    features = REGISTRY.op(OP).default_features()
    assert rule.matches({**features, "device": "cpu"}, CPU)
    for gpu in (H100, H200):
        for device in ("cpu", "cuda"):
            assert not rule.matches({**features, "device": device}, gpu)
    assert "toy_attention/chunked on cpu/cpu (cpu): measured with device=cuda on a machine without it" in text
    assert "toy_attention/narrow on cpu/cpu (cpu)" in text


def test_gpu_rules_name_the_device_and_cpu_tensors_on_a_gpu_are_not_derived(sqlite_url, tmp_path):
    with TuningStore(sqlite_url) as store:
        store.record_many([
            _row("flaky", "crashed", H100, device="cuda"),
            _row("chunked", "crashed", H100, device="cpu"),  # CPU tensors on the GPU machine
        ])
        text, count = derive_rules(store)
    path = tmp_path / "derived.yaml"
    path.write_text(text)
    assert lint_files([path]).ok and count == 1
    [rule] = load_rule_file(path)
    doc = yaml.safe_load(text)["rules"][0]
    assert doc["when"]["vendor"] == "cuda" and doc["when"]["arch"] == "sm_90"
    assert doc["when"]["device"] == "NVIDIA H100 80GB HBM3"
    features = {**REGISTRY.op(OP).default_features(), "device": "cuda"}
    assert rule.matches(features, H100) and not rule.matches(features, H200)
    assert "measured with device=cpu tensors on a cuda machine" in text


def test_a_newline_in_an_op_name_stays_inside_its_comment(sqlite_url):
    """Rows of an older database (validation now refuses such names) must not break the file."""
    with TuningStore(sqlite_url) as store:
        values = stored_values(normalize_record(_row("flaky", "crashed", CPU, device="cpu")))
        values.update(op="evil\nrules: []\n# op", kernel="k\u2028x", content_hash="e" * 64)
        with store.session_scope(write=True) as session:
            session.add(Trial(**values))
        text, count = derive_rules(store)
    assert count == 0
    assert yaml.safe_load(text) == {"version": 1, "rules": []}
    comments = [line for line in text.splitlines() if not line.startswith(("version:", "rules:"))]
    assert all(line.startswith("#") for line in comments), text
    assert "evil\\nrules: []\\n# op/k\\u2028x" in text
