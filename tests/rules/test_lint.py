"""Semantic lint: rules that can never match, use rules shadowed by an earlier one."""

from kernmux.cli.main import main
from kernmux.rules.lint import lint_files

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
