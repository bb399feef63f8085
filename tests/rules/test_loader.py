"""Rule files: every malformation gives file:line and what was expected; good files load."""

import textwrap

import pytest

from kernmux.cli.main import main
from kernmux.dispatch.platform import Platform
from kernmux.rules.loader import RuleError, load_rule_file, load_rules, parse_rules_text

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
