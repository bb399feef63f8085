"""Hostile rule files: each ends fast, small, with ``file:line`` and exit 1, never a traceback.

Every input runs through ``kernmux rules lint FILE``, ``kernmux explain OP --rules FILE``
and ``kernmux explain OP`` with ``KERNMUX_RULES=FILE``, each in its own process: a harness
subprocess imports kernmux once, then forks one child per run, so each run's wall time and
peak memory (``wait4`` rusage) are its own. Children run under an address-space limit and
a kill timeout, so a regression (an alias bomb expanding again, a FIFO read) fails the test
instead of eating the machine.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

OP = "sparse_mla_decode"
SECONDS = 5.0  # the acceptance bound per run (a run takes ~0.1 s here)
GROWTH_MB = 300.0  # peak memory a run may add to the process it starts from
KILL_AFTER = 60.0
# A file at the size limit full of one-character items composes the node limit (as many
# nodes as a 20,000-rule file) before it is refused: ~1.5 s on an idle 2-core machine.
FLOOD_SECONDS = 20.0


def rule_file(body: str) -> str:
    return f"version: 1\nrules:\n  - id: r\n    op: {OP}\n{body}    reason: r\n    link: l\n"


def laughs(levels: int = 9, width: int = 9) -> str:
    """Anchors a0..a9, each a list of ``width`` aliases of the previous: 9**9 leaves."""
    lines = ['a0: &a0 "lol"']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def merge_bomb() -> str:
    text = "m0: &m0 {" + ", ".join(f"k{i}: {i}" for i in range(9)) + "}\n"
    for i in range(1, 9):
        text += f"m{i}: &m{i} {{<<: [" + ", ".join([f"*m{i - 1}"] * 9) + "]}\n"
    return text + f"version: 1\nrules:\n  - id: r\n    op: {OP}\n    use: {{<<: *m8}}\n    reason: r\n    link: l\n"


def shipped_id() -> str:
    from kernmux.rules.loader import check_rule_file, shipped_rule_files

    return next(r.id for f in shipped_rule_files() for r in check_rule_file(f, layer="shipped")[0] if r.op == OP)


# name -> (contents: str | bytes | special, line | None (any), pattern the message matches,
#          explain's exit code: 0 where the file is valid and only lint objects)
CASES: dict[str, tuple[object, int | None, str, int]] = {
    "alias-bomb-value": (laughs() + "version: *a9\nrules: []\n", 7, "alias bomb", 1),
    "alias-bomb-key": (laughs() + "? *a9\n: 1\nversion: 1\nrules: []\n", 7, "alias bomb", 1),
    "alias-bomb-rules": (laughs() + "version: 1\nrules: *a9\n", 7, "alias bomb", 1),
    "merge-bomb": (merge_bomb(), 5, "alias bomb", 1),
    "dev-zero": ("/dev/zero", 0, "character device", 1),
    "dev-urandom": ("/dev/urandom", 0, "character device", 1),
    "fifo": ("FIFO", 0, "a FIFO", 1),
    "directory": ("DIRECTORY", 0, "a directory", 1),
    "oversize-sparse": ("SPARSE", 1, "the limit is", 1),
    "node-flood": ("version: 1\nrules: [" + "1," * 1_900_000 + "1]\n", 2, "YAML nodes", 1),
    "utf16-bom": ("version: 1\nrules: []\n".encode("utf-16"), 1, "UTF-16", 1),
    "utf16-no-bom": ("version: 1\nrules: []\n".encode("utf-16-le"), 1, "UTF-16", 1),
    "binary": (b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 8, 1, "not UTF-8", 1),
    "nul-byte": (b"version: 1\nrules: []\n# x\x00y\n", 3, r"U\+0000", 1),
    "deep-lists": ("version: 1\nrules: " + "[" * 20_000 + "]" * 20_000 + "\n", 2, "nesting deeper", 1),
    "deep-mappings": ("version: 1\nrules: " + "{a: " * 20_000 + "1" + "}" * 20_000 + "\n", 2, "nesting deeper", 1),
    "int-5000-digits": (rule_file("    when: {heads: " + "9" * 5000 + "}\n    use: torch\n"), 5, "5000 digits", 1),
    "version-5000-digits": ("version: " + "9" * 5000 + "\nrules: []\n", 1, "5000 digits", 1),
    "range-5000-digits": (rule_file("    when: {heads: '1.." + "9" * 5000 + "'}\n    use: torch\n"), 5, "at most 30 digits", 1),
    "multiple-5000-digits": (rule_file("    when: {heads: '%" + "9" * 5000 + "'}\n    use: torch\n"), 5, "at most 30 digits", 1),
    "compare-5000-digits": (rule_file("    when: {heads: '<" + "9" * 5000 + "'}\n    use: torch\n"), 5, "at most 30 digits", 1),
    "specifier-5000-digits": (rule_file("    when: {libs: {amd-aiter: '>=1" + "0" * 5000 + "'}}\n    use: torch\n"), 5, "libs.amd-aiter", 1),
    "arbitrary-equality": (rule_file("    when: {libs: {amd-aiter: '===foobar'}}\n    use: torch\n"), 3, "'===' matches no installed release", 0),
    # libyaml refuses the escape; PyYAML's pure-Python parser builds the surrogate, refused after
    "lone-surrogate": (rule_file("    use: torch\n").replace("reason: r", 'reason: "x \\ud800 y"'), 6, r"U\+D800|invalid Unicode character escape", 1),
    "timestamp": ("version: 2024-13-45\nrules: []\n", 1, "2024-13-45", 1),
    "python-tag": ("version: !!python/object/apply:os.system [echo hi]\nrules: []\n", 1, "'version'", 1),
    "pad-heads-million": (rule_file("    adapt: {kernel: torch, pad_heads: 1000000}\n"), 5, "pad_heads", 1),
    "config-outside-space": (rule_file("    adapt: {kernel: triton, config: {SPLITS: 0, num_warps: -3}}\n"), 5, "config space", 1),
    "config-set": (rule_file("    adapt: {kernel: triton, config: {SPLITS: !!set {1, 2}}}\n"), 5, "got a set", 1),
    "empty-dist-name": (rule_file("    when: {libs: {'': '>=1'}}\n    use: torch\n"), 5, "not a distribution name", 1),
    "shipped-id": ("SHIPPED_ID", 3, "already used by the shipped rule", 1),
}
COMMANDS = ("lint", "explain", "explain-env")


def materialise(root: Path) -> dict[str, str]:
    paths = {}
    for name, (contents, _, _, _) in CASES.items():
        path = root / f"{name}.yaml"
        if contents in ("/dev/zero", "/dev/urandom"):
            paths[name] = contents
            continue
        if contents == "FIFO":
            os.mkfifo(path)
        elif contents == "DIRECTORY":
            path.mkdir()
        elif contents == "SPARSE":
            with open(path, "wb") as fh:
                fh.truncate(100 * 1024 * 1024)
        elif contents == "SHIPPED_ID":
            path.write_text(f"version: 1\nrules:\n  - id: {shipped_id()}\n    op: {OP}\n    use: torch\n    reason: r\n    link: l\n")
        elif isinstance(contents, bytes):
            path.write_bytes(contents)
        else:
            path.write_text(contents, encoding="utf-8")
        paths[name] = str(path)
    return paths


def runs(paths: dict[str, str]) -> list[dict]:
    out = []
    for name, path in paths.items():
        for command in COMMANDS:
            argv, env = {
                "lint": (["rules", "lint", path], {}),
                "explain": (["explain", OP, "--rules", path], {}),
                "explain-env": (["explain", OP], {"KERNMUX_RULES": path}),
            }[command]
            out.append({"case": name, "command": command, "argv": argv, "env": env})
    return out


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    todo = runs(materialise(root))
    spec = root / "runs.json"
    spec.write_text(json.dumps(todo))
    report = root / "results.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    env.pop("KERNMUX_RULES", None)
    proc = subprocess.run([sys.executable, __file__, str(spec), str(report)], capture_output=True, text=True, timeout=900, env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return {(r["case"], r["command"]): r for r in json.loads(report.read_text())}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", list(CASES))
def test_hostile_rule_file(results, case, command):
    r = results[(case, command)]
    _, line, words, explain_code = CASES[case]
    path = re.escape(r["path"])
    output = r["stdout"] + r["stderr"]
    assert not r["killed"], f"still running after {KILL_AFTER} s: {output[-2000:]}"
    assert "Traceback" not in output, output[-4000:]
    expected = 1 if command == "lint" else explain_code
    assert r["rc"] == expected, output[-2000:]
    if expected:
        where = rf"{path}:{line if line is not None else r'[0-9]+'}:"
        assert re.search(where, output), output[-2000:]
        if command == "lint" or case != "arbitrary-equality":
            assert re.search(words, output), output[-2000:]
    assert r["seconds"] < (FLOOD_SECONDS if case == "node-flood" else SECONDS), f"{r['seconds']:.2f} s"
    assert r["growth_mb"] < GROWTH_MB, f"{r['growth_mb']:.0f} MB more than the process it started from"


# --------------------------------------------------------------------------- harness


def _rss_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _vm_size() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def _run_child(run: dict, out_path: str, err_path: str, rss_path: str) -> None:
    """In the forked child: its starting RSS (a child starts with fewer resident pages
    than its parent), limits, redirections, then the CLI; never returns."""
    import resource
    import traceback

    code = 99
    try:
        Path(rss_path).write_text(str(_rss_kb()))
        limit = _vm_size() + (1 << 30)  # what is mapped now + 1 GiB
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        for fd, target in ((1, out_path), (2, err_path)):
            handle = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(handle, fd)
            os.close(handle)
        os.environ.update(run["env"])
        from kernmux.cli.main import main

        code = main(run["argv"])
    except BaseException:  # noqa: BLE001 - the test must see any traceback
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code if isinstance(code, int) else 98)


def harness(spec_path: str, report_path: str) -> None:
    import signal
    import time

    from kernmux.cli.main import main
    from kernmux.dispatch.registry import REGISTRY

    REGISTRY.ensure_loaded()
    with open(os.devnull, "w") as null:  # import everything explain needs before forking
        saved = sys.stdout
        sys.stdout = null
        try:
            main(["explain", OP])
        finally:
            sys.stdout = saved
    work = Path(report_path).parent
    results = []
    for i, run in enumerate(json.loads(Path(spec_path).read_text())):
        out_path, err_path = str(work / f"{i}.out"), str(work / f"{i}.err")
        sys.stdout.flush()
        sys.stderr.flush()
        rss_path = str(work / f"{i}.rss")
        start = time.perf_counter()
        pid = os.fork()
        if pid == 0:
            _run_child(run, out_path, err_path, rss_path)
        killed = False
        while True:
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                break
            if time.perf_counter() - start > KILL_AFTER:
                os.kill(pid, signal.SIGKILL)
                _, status, usage = os.wait4(pid, 0)
                killed = True
                break
            time.sleep(0.005)
        seconds = time.perf_counter() - start
        results.append({
            **run,
            "path": run["argv"][2] if run["command"] == "lint" else run["argv"][-1] if run["command"] == "explain" else run["env"]["KERNMUX_RULES"],
            "rc": os.waitstatus_to_exitcode(status),
            "killed": killed,
            "seconds": seconds,
            "growth_mb": max(0, usage.ru_maxrss - int(Path(rss_path).read_text() or 0)) / 1024,
            "stdout": Path(out_path).read_text(errors="backslashreplace"),
            "stderr": Path(err_path).read_text(errors="backslashreplace"),
        })
    Path(report_path).write_text(json.dumps(results))
    if os.environ.get("KERNMUX_HOSTILE_TIMES"):  # measuring by hand: the figures per run
        for r in results:
            print(f"{r['case']:24s} {r['command']:12s} rc={r['rc']} {r['seconds']:6.2f} s +{r['growth_mb']:6.1f} MB", file=sys.stderr)


if __name__ == "__main__":
    harness(sys.argv[1], sys.argv[2])
