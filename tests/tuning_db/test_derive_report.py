"""Deny rules derived from failure rows (lint-clean, with evidence) and the HTML report."""

from __future__ import annotations

import re

import pytest
import yaml

from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import REGISTRY
from kernmux.rules.lint import lint_files
from kernmux.rules.loader import load_rule_file
from kernmux.tuning_db.storage.records import TrialRecord
from kernmux.tuning_db.tuning.derive import derive_rules, rules_by_kernel
from kernmux.tuning_db.tuning.report import collect, write_report

CPU = Platform(vendor="cpu", arch="cpu", device="cpu", units=2, libs={"torch": "2.13.0"})
OP = "toy_attention"


def _trial(kernel, status="ok", p50=None, config=None, on=CPU, op=OP, error=None, metrics=None, **feats):
    features = {**REGISTRY.op(OP).default_features(), **feats}
    if status == "ok" and p50 is None:
        p50 = 10.0
    return TrialRecord.for_platform(
        on, op=op, kernel=kernel, config=config or {}, features=features, bucket=dict(features), status=status,
        p50_us=p50, p20_us=None, p80_us=None, reps=10 if p50 else None, metrics=metrics or {}, error=error,
    )


@pytest.fixture
def failures(store):
    store.record_many([
        _trial("torch", p50=50.0), _trial("torch", p50=60.0, batch=3),
        # chunked: fine for batch 1 and 2, crashes for batch 3.
        _trial("chunked", p50=20.0, batch=1, config={"block": 8}),
        _trial("chunked", p50=25.0, batch=2, config={"block": 8}),
        _trial("chunked", "crashed", batch=3, config={"block": 8}, error="process died with SIGSEGV"),
        # flaky: never worked.
        _trial("flaky", "error", batch=3, error="FlakyError: simulated launch failure for batch=3"),
        _trial("flaky", "numerics_failed", batch=4, metrics={"nan": 1.0}, error="NaN in output"),
        # wide: one config fails where another works: config-dependent, no deny rule.
        _trial("wide", p50=30.0, config={}),
        _trial("wide", "timeout", config={"x": 1}, error="no result within 5 s"),
        # an op this process does not know.
        _trial("torch", "crashed", op="ghost_op", error="boom"),
    ])
    return store


def test_derived_rules_are_lint_clean_and_carry_evidence(failures, tmp_path):
    text, count = derive_rules(failures)
    path = tmp_path / "derived.yaml"
    path.write_text(text)
    report = lint_files([path])
    assert report.ok, [p.text() for p in report.problems]
    assert count == 2 == report.rules
    assert rules_by_kernel(text) == {
        "chunked": ["db-deny-toy-attention-chunked-cpu"],
        "flaky": ["db-deny-toy-attention-flaky-cpu"],
    }
    doc = {r["id"]: r for r in yaml.safe_load(text)["rules"]}
    chunked = doc["db-deny-toy-attention-chunked-cpu"]
    # Only batch separates the crash from the ok trials.
    assert chunked["when"] == {"vendor": "cpu", "arch": "cpu", "device": "cpu", "batch": 3}
    assert "1 failed trial(s) of chunked (crashed x1) on cpu/cpu (cpu), 2 ok" in chunked["reason"]
    assert "SIGSEGV" in chunked["reason"] and "torch 2.13.0" in chunked["reason"]
    assert re.search(r"#rows=\d+$", chunked["link"])
    flaky = doc["db-deny-toy-attention-flaky-cpu"]
    assert flaky["when"]["batch"] == [3, 4] and flaky["when"]["heads"] == 8 and flaky["when"]["device"] == "cpu"
    assert "error x1, numerics_failed x1" in flaky["reason"] and "metrics e.g. nan=1.0" in flaky["reason"]
    assert "toy_attention/wide on cpu/cpu (cpu): failures share every feature value with ok trials" in text
    assert "ghost_op/torch on cpu/cpu (cpu): op not registered in this process" in text

    rules = {r.id: r for r in load_rule_file(path)}
    features = REGISTRY.op(OP).default_features()
    assert rules["db-deny-toy-attention-chunked-cpu"].matches({**features, "batch": 3}, CPU)
    assert not rules["db-deny-toy-attention-chunked-cpu"].matches({**features, "batch": 2}, CPU)
    assert not rules["db-deny-toy-attention-chunked-cpu"].matches(
        {**features, "batch": 3}, CPU.with_overrides({"vendor": "cuda", "arch": "sm_90"})
    )


def test_derive_for_one_op_and_for_no_failures(failures, tmp_path):
    text, count = derive_rules(failures, op="ghost_op")
    assert count == 0 and yaml.safe_load(text) == {"version": 1, "rules": []}
    from kernmux.tuning_db.storage.store import TuningStore

    with TuningStore(f"sqlite:///{tmp_path / 'empty.sqlite'}") as empty:
        text, count = derive_rules(empty)
    assert count == 0 and yaml.safe_load(text)["rules"] == []


def test_report_is_self_contained_html(failures, tmp_path):
    out = tmp_path / "report.html"
    assert write_report(failures, out) == 2  # toy_attention and ghost_op on one platform
    html = out.read_text()
    assert html.startswith("<!DOCTYPE html>")
    assert "<script" not in html and not re.search(r"(src|href)=", html)
    assert "<b>chunked</b><br>&times;2.00" in html  # batch=2: torch 50 us / chunked 25 us
    assert "<b>chunked</b><br>no torch" in html  # batch=1: torch not measured
    assert "<b>torch</b><br>&times;1.00" in html  # batch=3: chunked crashed there
    assert "failed: chunked: crashed x1" in html
    assert "no ok trial" in html  # ghost_op and flaky-only buckets


def test_report_sections_follow_platform_and_versions(sqlite_url):
    from kernmux.tuning_db.storage.store import TuningStore

    other = CPU.with_overrides(libs={"torch": "2.12.0"})
    with TuningStore(sqlite_url) as store:
        store.record_many([_trial("torch", p50=5.0), _trial("chunked", p50=2.0, on=other, config={"block": 4})])
        sections = collect(store)
    assert [s.versions for s in sections] == [{"torch": "2.12.0"}, {"torch": "2.13.0"}]
    [cell] = sections[0].cells
    assert cell.winner.kernel == "chunked" and cell.speedup is None
