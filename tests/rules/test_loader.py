"""Rule files: every malformation gives file:line and what was expected; good files load."""

import textwrap

import pytest

from kernmux.cli.main import main
from kernmux.dispatch.platform import Platform
from kernmux.dispatch.registry import REGISTRY
from kernmux.rules.loader import (
    RuleError,
    check_rule_file,
    load_rule_file,
    load_rules,
    parse_rules_text,
)
from kernmux.rules.source import safe_string, show

GOOD_RULE = """
  - id: ok-rule
    op: toy_attention
    when: {heads: 64, vendor: rocm}
    use: chunked
    reason: r
    link: https://example.org/x
"""

# (name, file text, line the error must name, words the message must contain)
MALFORMED = [
    ("yaml-syntax", "version: 1\nrules:\n  - id: a\n    op: [unclosed\n", 5, "YAML syntax error"),
    ("unknown-op", "version: 1\nrules:\n  - id: a\n    op: nope\n    use: torch\n    reason: r\n    link: l\n", 4, "unknown op 'nope'"),
    ("unknown-kernel", "version: 1\nrules:\n  - id: a\n    op: toy_attention\n    use: cuda_magic\n    reason: r\n    link: l\n", 5, "unknown kernel 'cuda_magic'"),
    ("unknown-feature", "version: 1\nrules:\n  - id: a\n    op: toy_attention\n    when: {tokens: 4}\n    use: torch\n    reason: r\n    link: l\n", 5, "unknown condition key 'tokens'"),
    ("unknown-platform-key", "version: 1\nrules:\n  - id: a\n    op: toy_attention\n    when:\n      gpu_model: mi355\n    use: torch\n    reason: r\n    link: l\n", 6, "unknown condition key 'gpu_model'"),
    ("bad-comparator", "version: 1\nrules:\n  - id: a\n    op: toy_attention\n    when:\n      heads: '=>16'\n    use: torch\n    reason: r\n    link: l\n", 6, "bad comparator"),
    ("bad-pep440", "version: 1\nrules:\n  - id: a\n    op: toy_attention\n    when:\n      libs: {amd-aiter: 'about 0.1'}\n    use: torch\n    reason: r\n    link: l\n", 6, "not a PEP 440 specifier"),
    ("duplicate-id", "version: 1\nrules:\n  - id: a\n    op: toy_attention\n    use: torch\n    reason: r\n    link: l\n  - id: a\n    op: toy_attention\n    use: chunked\n    reason: r\n    link: l\n", 8, "duplicate rule id 'a'"),
    ("two-actions", "version: 1\nrules:\n  - id: a\n    op: toy_attention\n    use: torch\n    deny: [chunked]\n    reason: r\n    link: l\n", 6, "expected exactly one"),
    ("no-action", "version: 1\nrules:\n  - id: a\n    op: toy_attention\n    reason: r\n    link: l\n", 3, "has no action"),
    ("wrong-type", "version: 1\nrules:\n  - id: a\n    op: toy_attention\n    when:\n      heads: true\n    use: torch\n    reason: r\n    link: l\n", 6, "expects an integer"),
    ("unknown-top-level-key", "version: 1\nrulez: []\n", 2, "unknown top-level key 'rulez'"),
    ("bad-version", "version: 7\nrules: []\n", 1, "unsupported version 7"),
    ("id-not-kebab", "version: 1\nrules:\n  - id: Bad_Id\n    op: toy_attention\n    use: torch\n    reason: r\n    link: l\n", 3, "kebab-case"),
    ("missing-reason", "version: 1\nrules:\n  - id: a\n    op: toy_attention\n    use: torch\n    link: l\n", 3, "missing 'reason'"),
    ("unknown-rule-key", "version: 1\nrules:\n  - id: a\n    op: toy_attention\n    use: torch\n    reason: r\n    link: l\n    because: x\n", 8, "unknown rule key 'because'"),
    ("transform-on-deny", "version: 1\nrules:\n  - id: a\n    op: toy_attention\n    deny: [torch]\n    split_heads: 2\n    reason: r\n    link: l\n", 6, "only allowed with 'use' or 'adapt'"),
    ("split-not-positive", "version: 1\nrules:\n  - id: a\n    op: toy_attention\n    adapt: {kernel: wide, split_heads: 0}\n    reason: r\n    link: l\n", 5, "positive integer"),
    ("rules-not-list", "version: 1\nrules: {a: 1}\n", 2, "'rules' must be a list"),
    ("comparator-on-string", "version: 1\nrules:\n  - id: a\n    op: toy_attention\n    when: {dtype: '<bf16'}\n    use: torch\n    reason: r\n    link: l\n", 5, "only applies to integers"),
    ("unknown-vendor", "version: 1\nrules:\n  - id: a\n    op: toy_attention\n    when: {vendor: intel}\n    use: torch\n    reason: r\n    link: l\n", 5, "unknown vendor 'intel'"),
]


@pytest.mark.parametrize("name,text,line,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_file_names_file_line(tmp_path, name, text, line, words):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    with pytest.raises(RuleError) as info:
        load_rule_file(path)
    assert info.value.location == f"{path}:{line}", str(info.value)
    assert words in info.value.message


@pytest.mark.parametrize("name,text,line,words", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_lint_cli_exits_1_without_traceback(tmp_path, capsys, name, text, line, words):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    assert main(["rules", "lint", str(path)]) == 1
    out = capsys.readouterr()
    assert f"{path}:{line}: error:" in out.out and words in out.out
    assert "Traceback" not in out.out + out.err


def test_condition_forms(tmp_path):
    text = "version: 1\nrules:\n" + textwrap.dedent("""\
      - id: forms
        op: toy_attention
        when:
          heads: "16..64"
          batch: "!=3"
          keys: ">=8"
          dim: [8, 16]
          dtype: bf16
          sink: true
          arch: [gfx942, gfx950]
          units: ">100"
          libs: {fake-vendor-lib: ">=1.0,<2", absent-lib: null}
        use: torch
        reason: r
        link: https://example.org/x
    """)
    text = "version: 1\nrules:\n" + textwrap.indent(text.split("rules:\n", 1)[1], "  ")
    (rule,) = parse_rules_text(text, "forms.yaml")
    plat = Platform(vendor="rocm", arch="gfx950", device="x", units=256, libs={"fake-vendor-lib": "1.5"})
    feats = {"heads": 32, "batch": 2, "keys": 8, "dim": 16, "dtype": "bf16", "sink": True, "device": "cuda"}
    assert rule.matches(feats, plat)
    for change in ({"heads": 65}, {"batch": 3}, {"keys": 7}, {"dim": 4}, {"dtype": "fp32"}, {"sink": False}):
        assert not rule.matches({**feats, **change}, plat), change
    assert not rule.matches(feats, plat.with_overrides({"arch": "gfx90a"}))
    assert not rule.matches(feats, plat.with_overrides({"units": "64"}))
    assert not rule.matches(feats, plat.with_overrides(libs={"fake-vendor-lib": "2.0"}))
    assert not rule.matches(feats, plat.with_overrides(libs={"absent-lib": "1.0"}))
    assert rule.first_mismatch({**feats, "heads": 8}, plat).key == "heads"


def test_layering_user_before_shipped(tmp_path, monkeypatch):
    a = tmp_path / "a.yaml"
    b = tmp_path / "b.yaml"
    a.write_text("version: 1\nrules:\n  - id: from-env\n    op: toy_attention\n    use: torch\n    reason: r\n    link: l\n")
    b.write_text("version: 1\nrules:\n  - id: from-flag\n    op: toy_attention\n    use: chunked\n    reason: r\n    link: l\n")
    monkeypatch.setenv("KERNMUX_RULES", str(a))
    ruleset = load_rules([b])
    ids = [r.id for r in ruleset.rules]
    assert ids[:2] == ["from-flag", "from-env"]
    assert all(r.layer == "user" for r in ruleset.rules[:2])
    assert all(r.layer == "shipped" for r in ruleset.rules[2:])


def test_dollar_feature_config(tmp_path):
    (rule,) = parse_rules_text(
        "version: 1\nrules:\n  - id: a\n    op: toy_attention\n    adapt: {kernel: chunked, config: {block: $heads}}\n    reason: r\n    link: l\n",
        "x.yaml",
    )
    assert rule.action.resolved_config({"heads": 16}) == {"block": 16}
    with pytest.raises(RuleError, match="unknown feature"):
        parse_rules_text(
            "version: 1\nrules:\n  - id: a\n    op: toy_attention\n    adapt: {kernel: chunked, config: {block: $nope}}\n    reason: r\n    link: l\n",
            "x.yaml",
        )


def test_multiple_of_conditions():
    text = (
        "version: 1\nrules:\n  - id: a\n    op: toy_attention\n    when: {heads: '%16', dim: '!%32'}\n"
        "    use: torch\n    reason: r\n    link: l\n"
    )
    (rule,) = parse_rules_text(text, "m.yaml")
    plat = Platform()
    assert rule.matches({"heads": 32, "dim": 16}, plat)
    assert not rule.matches({"heads": 24, "dim": 16}, plat)
    assert not rule.matches({"heads": 32, "dim": 64}, plat)
    with pytest.raises(RuleError, match="only applies to integers"):
        parse_rules_text(text.replace("dim: '!%32'", "dtype: '%2'"), "m.yaml")
    with pytest.raises(RuleError, match="bad comparator"):
        parse_rules_text(text.replace("'%16'", "'%x'"), "m.yaml")


# --------------------------------------------------------------------------- checked values


def one_rule(body: str, op: str = "toy_attention") -> str:
    return f"version: 1\nrules:\n  - id: a\n    op: {op}\n{body}    reason: r\n    link: l\n"


# (name, rule body, line the error must name, words the message must contain)
BAD_VALUES = [
    ("config-unknown-key", "    adapt: {kernel: chunked, config: {blok: 8}}\n", 5, "unknown config key 'blok'"),
    ("config-value-outside-space", "    adapt: {kernel: chunked, config: {block: 0}}\n", 5, "block=0 is not in the config space of kernel 'chunked'"),
    ("config-negative", "    adapt: {kernel: chunked, config: {block: -3}}\n", 5, "block=-3 is not in"),
    ("config-bool-is-not-int", "    adapt: {kernel: chunked, config: {block: true}}\n", 5, "block=True is not in"),
    ("config-set", "    adapt: {kernel: chunked, config: {block: !!set {4, 8}}}\n", 5, "must be a single value, got a set"),
    ("config-list", "    use: chunked\n    config: {block: [4, 8]}\n", 6, "must be a single value, got a list"),
    ("config-date", "    adapt: {kernel: chunked, config: {block: 2024-01-02}}\n", 5, "must be a number, string or bool, got date"),
    ("config-on-kernel-without-space", "    adapt: {kernel: wide, config: {block: 8}}\n", 5, "kernel 'wide' of toy_attention takes no config"),
    ("pad-beyond-ceiling", "    adapt: {kernel: wide, pad_heads: 1000000}\n", 5, "'pad_heads': 1000000 is more than 1024"),
    ("split-beyond-ceiling", "    use: wide\n    split_heads: 5000\n", 6, "'split_heads': 5000 is more than 1024"),
    ("dist-empty", "    when: {libs: {'': '>=1'}}\n    use: torch\n", 5, "is not a distribution name"),
    ("dist-impossible", "    when: {libs: {'amd aiter!': '>=1'}}\n    use: torch\n", 5, "is not a distribution name"),
    ("dist-not-normalised", "    when: {libs: {Amd_Aiter: '>=1'}}\n    use: torch\n", 5, "PEP 503 normalised form, 'amd-aiter'"),
    ("specifier-huge-version", "    when: {libs: {amd-aiter: '>=1" + "0" * 5000 + "'}}\n    use: torch\n", 5, "expected at most 200"),
    ("range-huge-int", "    when: {heads: '1.." + "9" * 5000 + "'}\n    use: torch\n", 5, "expected at most 30 digits"),
    ("multiple-huge-int", "    when: {heads: '%" + "9" * 5000 + "'}\n    use: torch\n", 5, "expected at most 30 digits"),
    ("compare-huge-int", "    when: {heads: '>=" + "9" * 5000 + "'}\n    use: torch\n", 5, "expected at most 30 digits"),
    ("yaml-huge-int", "    when: {heads: " + "9" * 5000 + "}\n    use: torch\n", 5, "integer literal of 5000 digits"),
    ("timestamp-out-of-range", "    when: {dtype: 2024-13-45}\n    use: torch\n", 5, "cannot read '2024-13-45'"),
    # libyaml refuses the escape itself; PyYAML's pure-Python parser builds the surrogate
    ("lone-surrogate-in-reason", "    use: torch\n    reason: \"x \\ud800 y\"\n    link: l\n  - id: b\n    op: toy_attention\n    use: torch\n", 6, ("lone surrogate U+D800", "invalid Unicode character escape")),
    ("escape-in-reason", "    use: torch\n    reason: \"\\e[31mred\"\n    link: l\n  - id: b\n    op: toy_attention\n    use: torch\n", 6, "control character U+001B"),
]


@pytest.mark.parametrize("name,body,line,words", BAD_VALUES, ids=[b[0] for b in BAD_VALUES])
def test_bad_values_name_file_line(tmp_path, name, body, line, words):
    path = tmp_path / f"{name}.yaml"
    path.write_text(one_rule(body))
    with pytest.raises(RuleError) as info:
        load_rule_file(path)
    assert info.value.location == f"{path}:{line}", str(info.value)
    assert any(w in info.value.message for w in ((words,) if isinstance(words, str) else words)), info.value.message
    assert len(info.value.message) < 400  # no value is printed whole


def test_unprintable_strings_are_named_and_shown_escaped():
    assert safe_string("plain text, tabs\tand\nnewlines") is None
    assert safe_string("x \ud800") == "a lone surrogate U+D800 at character 2"
    assert safe_string("\x1b[31m") == "a control character U+001B at character 0"
    assert show("x \ud800" * 1000).isascii() and len(show("y" * 10**6)) < 100
    assert show(10**5000) == "an integer of about 5001 digits"


def test_transform_bounded_by_the_ops_heads_maximum(tmp_path):
    heads = REGISTRY.op("sparse_mla_decode").spec("heads")
    assert heads.maximum is not None
    path = tmp_path / "pad.yaml"
    path.write_text(one_rule("    adapt: {kernel: torch, pad_heads: 1000000}\n", op="sparse_mla_decode"))
    with pytest.raises(RuleError, match=f"more than {heads.maximum}, the most 'heads' sparse_mla_decode takes"):
        load_rule_file(path)
    path.write_text(one_rule(f"    adapt: {{kernel: torch, pad_heads: {heads.maximum}}}\n", op="sparse_mla_decode"))
    (rule,) = load_rule_file(path)
    assert rule.action.transform.pad_heads == heads.maximum


def test_config_in_space_and_feature_reference_load():
    (rule,) = parse_rules_text(one_rule("    adapt: {kernel: chunked, config: {block: 16}}\n"), "x.yaml")
    assert dict(rule.action.config) == {"block": 16}
    (rule,) = parse_rules_text(one_rule("    use: chunked\n    config: {block: $dim}\n"), "x.yaml")
    assert rule.action.resolved_config({"dim": 8}) == {"block": 8}


def test_every_problem_of_a_file_is_collected(tmp_path):
    text = (
        "version: 1\n"
        "rules:\n"
        "  - id: Bad_Id\n"  # 3: not kebab-case
        "    op: toy_attention\n"
        "    use: torch\n"
        "    reason: r\n"
        "    link: l\n"
        "  - id: b\n"
        "    op: toy_attention\n"
        "    when: {heads: '=>16', tokens: 4}\n"  # 10: bad comparator, unknown feature
        "    use: cuda_magic\n"  # 11: unknown kernel
        "    reason: r\n"
        "    link: l\n"
        "  - id: c\n"
        "    op: nope\n"  # 15: unknown op
        "    use: torch\n"
        "    reason: r\n"
        "    link: l\n"
        "  - id: d\n"
        "    op: toy_attention\n"
        "    adapt: {kernel: chunked, config: {block: 0}}\n"  # 21: outside the space
        "    reason: r\n"
        "    link: l\n"
    )
    path = tmp_path / "six.yaml"
    path.write_text(text)
    rules, errors = check_rule_file(path)
    assert rules == []
    assert [e.location for e in errors] == [f"{path}:{n}" for n in (3, 10, 10, 11, 15, 21)], [str(e) for e in errors]
    with pytest.raises(RuleError) as info:
        load_rule_file(path)
    assert info.value.more == 5 and "and 5 more problems" in str(info.value)


def test_good_rules_survive_beside_bad_ones(tmp_path):
    text = one_rule("    use: torch\n") + "  - id: b\n    op: toy_attention\n    use: nope\n    reason: r\n    link: l\n"
    path = tmp_path / "mixed.yaml"
    path.write_text(text)
    rules, errors = check_rule_file(path)
    assert [r.id for r in rules] == ["a"] and len(errors) == 1


def test_merge_keys_share_fields(tmp_path):
    text = (
        "version: 1\n"
        "defaults: &d {op: toy_attention, reason: shared, link: l}\n"
        "rules:\n"
        "  - {<<: *d, id: a, use: torch}\n"
        "  - {<<: *d, id: b, use: chunked, reason: own}\n"
    )
    path = tmp_path / "merge.yaml"
    path.write_text(text)
    rules, errors = check_rule_file(path)
    assert [str(e) for e in errors] == [f"{path}:2: unknown top-level key 'defaults'; expected ['version', 'rules']"]
    assert [(r.id, r.reason) for r in rules] == [("a", "shared"), ("b", "own")]


def test_self_merge_is_read_once(tmp_path):
    path = tmp_path / "loop.yaml"
    path.write_text("version: 1\nrules:\n  - &r {<<: *r, id: a, op: toy_attention, use: torch, reason: r, link: l}\n")
    (rule,) = load_rule_file(path)  # the mapping merges itself: a no-op, not a loop
    assert rule.id == "a"


def test_size_limit_is_configurable(tmp_path, monkeypatch):
    path = tmp_path / "r.yaml"
    path.write_text(one_rule("    use: torch\n"))
    size = path.stat().st_size
    monkeypatch.setenv("KERNMUX_RULES_MAX_BYTES", str(size))
    assert [r.id for r in load_rule_file(path)] == ["a"]
    monkeypatch.setenv("KERNMUX_RULES_MAX_BYTES", str(size - 1))
    with pytest.raises(RuleError, match=f"{path}:1: rule file is {size} bytes; the limit is {size - 1}"):
        load_rule_file(path)
    monkeypatch.setenv("KERNMUX_RULES_MAX_BYTES", "lots")
    with pytest.raises(RuleError, match="KERNMUX_RULES_MAX_BYTES: expected a positive number of bytes, got 'lots'"):
        load_rule_file(path)


def test_node_limit_follows_the_size_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("KERNMUX_RULES_MAX_BYTES", "100000")  # 12,500 nodes
    path = tmp_path / "flood.yaml"
    path.write_text("version: 1\nrules: [" + "1," * 20_000 + "1]\n")
    with pytest.raises(RuleError, match=f"{path}:2: more than 12500 YAML nodes"):
        load_rule_file(path)


def test_aliases_within_budget_load(tmp_path):
    """Sharing a block among many rules is what anchors are for: it stays within budget."""
    text = "version: 1\nshared: &w {heads: 16, dtype: bf16}\nrules:\n" + "".join(
        f"  - {{id: r{i}, op: toy_attention, when: *w, use: torch, reason: r, link: l}}\n" for i in range(2000)
    )
    path = tmp_path / "shared.yaml"
    path.write_text(text)
    rules, errors = check_rule_file(path)
    assert len(rules) == 2000 and [e.message for e in errors] == ["unknown top-level key 'shared'; expected ['version', 'rules']"]
