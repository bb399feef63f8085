"""``kernmux tune --gpus``: one tuning process per GPU, pinned, one shared study.

Without GPUs here the same code path runs with a fake GPU list: each process is pinned
to "its" GPU id (CUDA_VISIBLE_DEVICES, KERNMUX_GPU_INDEX) and tunes CPU tensors; the
rows must carry the GPU index of the process that measured them, and the two processes
together must measure every point exactly once."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("optuna")

from kernmux.tuning_db.measurement.trial import GPU_INDEX_ENV  # noqa: E402
from kernmux.tuning_db.storage.store import TuningStore  # noqa: E402
from kernmux.tuning_db.tuning.gpus import gpu_envs, parse_gpus, visible_gpus  # noqa: E402
from kernmux.tuning_db.tuning.tuner import _agent_envs, make_plans, tune  # noqa: E402
from tests.conftest import HAS_CUDA  # noqa: E402
from tests.tuning_db.test_tuner import OP, _settings  # noqa: E402


def test_parse_gpus():
    assert parse_gpus("all", ["0", "1", "2", "3"]) == ("0", "1", "2", "3")
    assert parse_gpus("2, 0", ["0", "1", "2"]) == ("2", "0")
    assert parse_gpus("5", ["5", "7"]) == ("5",)  # ids as the host numbers them
    with pytest.raises(ValueError, match="GPU 4 not visible here; visible: 0, 1"):
        parse_gpus("0,4", ["0", "1"])
    with pytest.raises(ValueError, match="listed twice"):
        parse_gpus("1,1", ["0", "1"])
    with pytest.raises(ValueError, match="none is visible"):
        parse_gpus("all", [])
    with pytest.raises(ValueError, match="expected 'all' or GPU ids"):
        parse_gpus(",", ["0"])


def test_visible_gpus_follow_cuda_visible_devices(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3, 5")
    assert visible_gpus() == ["3", "5"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert visible_gpus() == []


def test_each_process_is_pinned_to_its_gpu():
    from kernmux.dispatch.platform import current_platform

    settings = _settings("sqlite://", kernels=("torch",), gpus=("1", "3"))
    plans = make_plans(settings, [{"n": 8, "device": "cpu"}], current_platform())
    assert _agent_envs(settings, plans) == gpu_envs(("1", "3")) == [
        {"CUDA_VISIBLE_DEVICES": "1", GPU_INDEX_ENV: "1"},
        {"CUDA_VISIBLE_DEVICES": "3", GPU_INDEX_ENV: "3"},
    ]


def test_two_pinned_processes_share_one_study(sqlite_url):
    # Without GPUs, fake ids (the processes tune CPU tensors); with them, two real ones.
    gpus = ("0", "1") if not HAS_CUDA else tuple(visible_gpus()[:2])
    if len(gpus) < 2:
        pytest.skip("one GPU here: two pinned processes need two (benchmarks/multi_gpu_tune.py)")
    settings = _settings(sqlite_url, kernels=("torch", "good"), sampler="grid", trials=100, gpus=gpus,
                         isolate=False, seed=3)
    events = []
    (result,) = tune(settings, [{"n": 64, "device": "cpu"}], progress=events.append)
    assert not [e for e in events if e["event"] == "agent_error"]
    with TuningStore(sqlite_url) as store:
        rows = store.rows(op=OP, study=result.study)
    points = [(r.kernel, json.dumps(r.config, sort_keys=True)) for r in rows]
    assert len(set(points)) == len(points), "no point measured twice"
    assert len(points) == result.points, "every point of the space measured"
    assert all(r.platform.get("gpu_index") in gpus for r in rows)
    assert len({r.fingerprint for r in rows}) == 1


def test_cli_refuses_gpus_without_gpus(sqlite_url, capsys, monkeypatch):
    from kernmux.cli.main import main

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert main(["tune", OP, "n=4", "--gpus", "all", "--db", sqlite_url, "--import", "tests.tuning_db.fault_kernels"]) == 2
    assert "none is visible" in capsys.readouterr().err
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert main(["tune", OP, "n=4", "--gpus", "0,2", "--db", sqlite_url, "--import", "tests.tuning_db.fault_kernels"]) == 2
    assert "GPU 2 not visible" in capsys.readouterr().err
    assert main(["tune", OP, "n=4", "--gpus", "0", "--workers", "2", "--db", sqlite_url,
                 "--import", "tests.tuning_db.fault_kernels"]) == 2
    assert "leave out --workers" in capsys.readouterr().err
