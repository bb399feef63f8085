"""Precedence, filters, explain trace and errors of the resolver (toy_attention op)."""

import pytest

from kernmux.dispatch.resolver import PRECEDENCE, NoKernelError, parse_force, resolve
from kernmux.rules.loader import parse_rules_text
from kernmux.dispatch.rule_model import RuleSet

FEATS = {"batch": 2, "heads": 16, "keys": 16, "dim": 8, "sink": False, "dtype": "fp32", "device": "cpu"}


def rules(text: str) -> RuleSet:
    return RuleSet(tuple(parse_rules_text("version: 1\nrules:\n" + text, "test.yaml")))


def status(decision, kernel):
    return next(c for c in decision.candidates if c.kernel == kernel)


def test_precedence_is_one_table():
    assert [level.name for level in PRECEDENCE] == ["force", "rule", "tuning_db", "prefer", "priority"]


def test_default_priority_and_trace(cpu_platform):
    d = resolve("toy_attention", FEATS, cpu_platform, RuleSet(), force={})
    assert d.kernel == "wide" and d.source == "priority"
    assert status(d, "wide").status == "chosen"
    assert status(d, "vendorlib").status == "unavailable"
    assert "rocm" in status(d, "vendorlib").reason
    assert d.fallbacks[0] == "narrow"  # next by priority


def test_unsupported_reason(cpu_platform):
    d = resolve("toy_attention", {**FEATS, "heads": 12}, cpu_platform, RuleSet(), force={})
    assert status(d, "wide").status == "unsupported"
    assert "not a multiple of 16" in status(d, "wide").reason
    assert d.kernel == "narrow"


def test_use_rule_beats_priority_and_reports_rule(cpu_platform):
    rs = rules("""
  - id: use-chunked-small
    op: toy_attention
    when: {heads: "<=16", dtype: fp32}
    use: {kernel: chunked, config: {block: 4}}
    reason: test
    link: https://example.org/x
""")
    d = resolve("toy_attention", FEATS, cpu_platform, rs, force={})
    assert (d.kernel, d.source, d.rule, d.config["block"]) == ("chunked", "rule", "use-chunked-small", 4)
    assert ("use-chunked-small", "use-chunked-small: use chunked (config={'block': 4})") in d.rules
    d2 = resolve("toy_attention", {**FEATS, "heads": 32}, cpu_platform, rs, force={})
    assert d2.kernel == "wide" and not d2.rules


def test_deny_filters_and_force_is_still_filtered(cpu_platform):
    rs = rules("""
  - id: deny-wide
    op: toy_attention
    deny: [wide]
    reason: broken
    link: https://example.org/x
""")
    d = resolve("toy_attention", FEATS, cpu_platform, rs, force={"toy_attention": "wide"})
    assert status(d, "wide").status == "denied" and "deny-wide" in status(d, "wide").reason
    assert d.kernel == "narrow"
    assert any("KERNMUX_FORCE" in n for n in d.notes)
    d2 = resolve("toy_attention", FEATS, cpu_platform, RuleSet(), force={"toy_attention": "torch"})
    assert (d2.kernel, d2.source) == ("torch", "force")


def test_prefer_merges_and_use_skips_dead_kernel(cpu_platform):
    rs = rules("""
  - id: use-vendor
    op: toy_attention
    use: vendorlib
    reason: r
    link: https://example.org/x
  - id: prefer-a
    op: toy_attention
    prefer: [flaky, torch]
    reason: r
    link: https://example.org/x
  - id: prefer-b
    op: toy_attention
    prefer: [chunked]
    reason: r
    link: https://example.org/x
""")
    d = resolve("toy_attention", FEATS, cpu_platform, rs, force={})
    assert (d.kernel, d.source, d.rule) == ("flaky", "prefer", "prefer-a")
    assert d.fallbacks[:2] == ("torch", "chunked")
    assert any("use-vendor" in n for n in d.notes)


def test_what_if_vendor_and_lib_versions(rocm_platform):
    rs = rules("""
  - id: vendor-old-deny
    op: toy_attention
    when: {vendor: rocm, libs: {fake-vendor-lib: "<1.3"}}
    deny: [vendorlib]
    reason: r
    link: https://example.org/x
""")
    d = resolve("toy_attention", FEATS, rocm_platform, rs, force={})
    assert d.kernel == "vendorlib"
    old = rocm_platform.with_overrides(libs={"fake-vendor-lib": "1.2.5"})
    assert resolve("toy_attention", FEATS, old, rs, force={}).kernel == "wide"
    gone = rocm_platform.with_overrides(libs={"fake-vendor-lib": None})
    d3 = resolve("toy_attention", FEATS, gone, rs, force={})
    assert status(d3, "vendorlib").reason == "fake-vendor-lib not installed"


def test_adapt_attaches_transform_and_supports_sees_transformed_heads(cpu_platform):
    rs = rules("""
  - id: wide-pad
    op: toy_attention
    when: {heads: "<16"}
    adapt: {kernel: wide, pad_heads: 16}
    reason: wide needs 16 heads
    link: https://example.org/x
  - id: narrow-split
    op: toy_attention
    when: {heads: ">32"}
    adapt: {kernel: narrow, split_heads: 32}
    reason: narrow handles at most 32
    link: https://example.org/x
""")
    d = resolve("toy_attention", {**FEATS, "heads": 8}, cpu_platform, rs, force={})
    assert d.kernel == "wide" and d.transform.pad_heads == 16
    d2 = resolve("toy_attention", {**FEATS, "heads": 72}, cpu_platform, rs, force={})
    # wide does not support 72 (not multiple of 16); narrow with split 32 sees 32 and 8.
    assert d2.kernel == "narrow" and d2.transform.split_heads == 32
    assert "split_heads=32" in status(d2, "narrow").reason


def test_tuning_level_between_rules_and_prefer(cpu_platform):
    from kernmux.dispatch.tuning import TuningPick

    class Source:
        def lookup(self, op, bucket, platform, allowed):
            assert "torch" in allowed
            return TuningPick("chunked", {"block": 16}, row_id=42, detail="row 42"), ["1 row from another platform ignored"]

    d = resolve("toy_attention", FEATS, cpu_platform, RuleSet(), tuning=Source(), force={})
    assert (d.kernel, d.source, d.row_id, d.config["block"]) == ("chunked", "tuning_db", 42, 16)
    assert "1 row from another platform ignored" in d.notes


def test_no_survivor_names_every_candidate(cpu_platform):
    rs = rules("""
  - id: deny-all
    op: toy_attention
    deny: [torch, chunked, flaky, wide, narrow]
    reason: r
    link: https://example.org/x
""")
    with pytest.raises(NoKernelError) as info:
        resolve("toy_attention", {**FEATS, "heads": 48}, cpu_platform, rs, force={})
    text = str(info.value)
    for name in ("torch", "chunked", "flaky", "wide", "narrow", "vendorlib"):
        assert name in text
    assert "denied by rule deny-all" in text
    assert "vendorlib unavailable: runs on rocm" in text


def test_failed_kernels_are_filtered(cpu_platform):
    d = resolve("toy_attention", FEATS, cpu_platform, RuleSet(), failed={"wide": "RuntimeError: x"}, force={})
    assert status(d, "wide").status == "failed" and d.kernel == "narrow"


def test_parse_force():
    assert parse_force("a=b, c=d") == {"a": "b", "c": "d"}
    with pytest.raises(ValueError, match="op=kernel"):
        parse_force("oops")


def test_adapt_config_overrides_tuned_config(cpu_platform):
    """A safety pin in an adapt rule beats a tuning row's config for the same key."""
    from kernmux.dispatch.tuning import TuningPick

    class Source:
        def lookup(self, op, bucket, platform, allowed):
            return TuningPick("chunked", {"block": 16}, row_id=7, detail="row 7"), []

    rs = rules("""
  - id: pin-block
    op: toy_attention
    adapt: {kernel: chunked, config: {block: 4}}
    reason: larger blocks crash
    link: https://example.org/x
""")
    d = resolve("toy_attention", FEATS, cpu_platform, rs, tuning=Source(), force={})
    assert (d.kernel, d.source, d.config["block"]) == ("chunked", "tuning_db", 4)
    assert any("pin-block override tuning_db config for block" in n for n in d.notes)
