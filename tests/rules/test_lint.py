"""Lint: every problem of a file in one run, rules that can never match, use rules
shadowed by an earlier one (checked against the pairwise definition), 20,000 rules."""

import json
import random
import time

import pytest

from kernmux.cli.main import main
from kernmux.rules.lint import implies, lint_files
from kernmux.rules.loader import (
    RuleError,
    check_rule_file,
    load_rules,
    shipped_rule_files,
)
from kernmux.rules.shadow import shadowed

HEADER = "version: 1\nrules:\n"


def rule(rid, when, action="use: torch"):
    return f"  - id: {rid}\n    op: toy_attention\n    when: {when}\n    {action}\n    reason: r\n    link: https://example.org/x\n"


def lint_text(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(HEADER + text)
    return lint_files([path]), path


def test_never_matches(tmp_path):
    report, path = lint_text(
        tmp_path,
        rule("bad-choice", "{dtype: fp16}")
        + rule("empty-range", "{heads: '64..16'}")
        + rule("below-minimum", "{heads: '<1'}")
        + rule("arch-of-other-vendor", "{vendor: rocm, arch: sm_90}")
        + rule("vendor-kernel-elsewhere", "{vendor: cuda}", "use: vendorlib")
        + rule("empty-lib-range", "{libs: {torch: '>=3,<2'}}")
        + rule("fine", "{heads: '<=16'}"),
    )
    never = {p.message.split("'")[1] for p in report.problems if p.kind == "never-matches"}
    assert never == {"bad-choice", "empty-range", "below-minimum", "arch-of-other-vendor", "vendor-kernel-elsewhere", "empty-lib-range"}
    assert all(p.location.startswith(f"{path}:") for p in report.problems)


def test_shadowed_use(tmp_path):
    report, path = lint_text(
        tmp_path,
        rule("general", "{heads: '>=16'}")
        + rule("specific", "{heads: 64, dtype: bf16}", "use: chunked")
        + rule("not-shadowed", "{heads: 8}", "use: chunked")
        + rule("deny-is-not-use", "{heads: 64}", "deny: [wide]"),
    )
    shadowed = [p for p in report.problems if p.kind == "shadowed"]
    assert len(shadowed) == 1 and "'specific'" in shadowed[0].message and "'general'" in shadowed[0].message
    assert shadowed[0].location == f"{path}:9"


def test_clean_file_exits_0(tmp_path, capsys):
    _, path = lint_text(tmp_path, rule("only", "{heads: 16}"))
    assert main(["rules", "lint", str(path)]) == 0
    assert main(["rules", "lint", "--json", str(path)]) == 0
    assert '"ok": true' in capsys.readouterr().out


def test_shipped_rules_are_lint_clean():
    report = lint_files()
    assert report.files, "no shipped rule files found"
    assert report.ok, "\n".join(p.text() for p in report.problems)


def test_every_mistake_reported_in_one_run(tmp_path, capsys):
    text = (
        rule("Bad_Id", "{heads: 16}")  # line 3
        + rule("bad-comparator", "{heads: '=>16'}")  # line 11
        + rule("unknown-kernel", "{heads: 16}", "use: cuda_magic")  # line 18
        + rule("outside-space", "{heads: 16}", "adapt: {kernel: chunked, config: {block: 0, num_warps: -3}}")  # 24 (two)
        + rule("pad-too-far", "{heads: 16}", "adapt: {kernel: wide, pad_heads: 1000000}")  # line 30
    )
    _, path = lint_text(tmp_path, text)
    assert main(["rules", "lint", str(path)]) == 1
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if ": error: " in line]
    assert [line.split(": error: ")[0] for line in lines] == [f"{path}:{n}" for n in (3, 11, 18, 24, 24, 30)], out
    assert "unknown config key 'num_warps'" in out and "block=0 is not in" in out and "pad_heads" in out


def test_json_shape_is_stable(tmp_path, capsys):
    _, path = lint_text(tmp_path, rule("a", "{heads: '=>16'}"))
    assert main(["rules", "lint", "--json", str(path)]) == 1
    data = json.loads(capsys.readouterr().out)
    assert set(data) == {"ok", "files", "rules", "problems"} and data["ok"] is False
    assert data["problems"] == [{"location": f"{path}:5", "kind": "error", "message": data["problems"][0]["message"]}]


def test_user_rule_reusing_a_shipped_id(tmp_path):
    shipped = check_rule_file(shipped_rule_files()[0], layer="shipped")[0][0]
    text = HEADER + f"  - id: {shipped.id}\n    op: {shipped.op}\n    use: torch\n    reason: r\n    link: l\n"
    path = tmp_path / "mine.yaml"
    path.write_text(text)
    report = lint_files([path])
    assert [(p.location, p.kind) for p in report.problems] == [(f"{path}:3", "error")]
    assert f"already used by the shipped rule at {shipped.source}" in report.problems[0].message
    with pytest.raises(RuleError, match=f"{path}:3: rule id .* is already used by the shipped rule"):  # the runtime refuses it
        load_rules([path])
    assert lint_files(shipped_rule_files()).ok  # linting the shipped files themselves: no clash with themselves


def test_arbitrary_equality_and_maximum_never_match(tmp_path):
    report, _ = lint_text(
        tmp_path,
        rule("arbitrary", "{libs: {amd-aiter: '===foobar'}}")
        + rule("arbitrary-ok", "{libs: {amd-aiter: '===0.1.12'}}")
        + "  - id: above-max\n    op: sparse_mla_decode\n    when: {heads: '>128'}\n    use: torch\n    reason: r\n    link: l\n"
        + "  - id: at-max\n    op: sparse_mla_decode\n    when: {heads: '>=128'}\n    use: torch\n    reason: r\n    link: l\n",
    )
    never = {p.message.split("'")[1]: p.message for p in report.problems if p.kind == "never-matches"}
    assert set(never) == {"arbitrary", "above-max"}, report.problems
    assert "'===' matches no installed release" in never["arbitrary"] and "at most 128" in never["above-max"]


# --------------------------------------------------------------------------- shadow index


def brute_force_shadowed(rules):
    """The definition, pair by pair: the first earlier use rule whose every condition
    the later one implies."""
    out = []
    uses = [r for r in rules if r.action.kind == "use"]
    for i, later in enumerate(uses):
        conds = {(c.kind, c.key): c for c in later.when}
        for earlier in uses[:i]:
            if earlier.op == later.op and all(implies(c, conds) for c in earlier.when):
                out.append((later.id, earlier.id))
                break
    return out


def random_rules(n, seed):
    rng = random.Random(seed)
    forms = [
        lambda: rng.choice([8, 16, 32, 64]),
        lambda: f"'{rng.choice(['<', '<=', '>', '>=', '!='])}{rng.choice([8, 16, 32])}'",
        lambda: f"'{rng.choice([1, 8, 16])}..{rng.choice([16, 32, 64])}'",
        lambda: f"[{', '.join(map(str, rng.sample([8, 16, 24, 32, 64], rng.randint(1, 3))))}]",
        lambda: f"'%{rng.choice([8, 16])}'",
    ]
    text = ""
    for i in range(n):
        when = {}
        for key in rng.sample(["heads", "batch", "keys"], rng.randint(0, 3)):
            when[key] = rng.choice(forms)()
        if rng.random() < 0.3:
            when["dtype"] = rng.choice(["fp32", "bf16", "[fp32, bf16]"])
        if rng.random() < 0.2:
            when["vendor"] = rng.choice(["rocm", "cuda"])
        body = "{" + ", ".join(f"{k}: {v}" for k, v in when.items()) + "}"
        action = rng.choice(["use: torch", "use: chunked", "use: torch", "deny: [wide]"])
        text += rule(f"r{i}", body, action)
    return text


@pytest.mark.parametrize("seed", range(6))
def test_indexed_shadow_check_agrees_with_the_definition(tmp_path, seed):
    path = tmp_path / "random.yaml"
    path.write_text(HEADER + random_rules(300, seed))
    rules, errors = check_rule_file(path)
    assert not errors and len(rules) == 300
    expected = brute_force_shadowed(rules)
    assert expected, "the random set should contain shadowed rules"
    assert [(r.id, e.id) for r, e in shadowed(rules)] == expected


def test_twenty_thousand_rules(tmp_path):
    lines = [HEADER]
    for i in range(20_000):
        when = f"{{vendor: rocm, heads: {i % 512 + 1}, batch: '{i // 512 + 1}..{i // 512 + 8}', dtype: bf16}}"
        lines.append(rule(f"r-{i}", when, "use: chunked" if i % 2 else "use: torch"))
    # planted: a rule whose conditions imply rule r-7's (heads 8, batch 1..8), and one
    # that can never match (dtype outside the feature's choices)
    lines.append(rule("planted-shadowed", "{vendor: rocm, heads: 8, batch: '2..3', dtype: bf16}"))
    lines.append(rule("planted-never", "{heads: 8, dtype: fp64}"))
    path = tmp_path / "big.yaml"
    path.write_text("".join(lines))
    assert path.stat().st_size < 4 * 1024 * 1024  # the default size limit
    start = time.perf_counter()
    report = lint_files([path])
    elapsed = time.perf_counter() - start
    assert elapsed < 60, f"lint of 20,000 rules took {elapsed:.1f} s"  # a guard, not a benchmark
    assert report.rules == 20_002
    assert [(p.kind, p.message.split("'")[1]) for p in report.problems] == [
        ("never-matches", "planted-never"),
        ("shadowed", "planted-shadowed"),
    ], report.problems[:5]
    assert "shadowed by 'r-7'" in report.problems[1].message
