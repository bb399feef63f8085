"""Nearest tuned bucket: an untuned problem borrows the winner of the nearest tuned bucket
with the same categorical features, within KERNMUX_NEAREST_MAX (log2 units)."""

from __future__ import annotations

import json
import math

import pytest

from kernmux.dispatch.platform import Platform, current_platform
from kernmux.dispatch.registry import REGISTRY
from kernmux.dispatch.resolver import resolve
from kernmux.dispatch.rule_model import RuleSet
from kernmux.dispatch.tuning import NEAREST_ENV, config_problem, numeric_features
from kernmux.tuning_db.storage.records import TrialRecord
from kernmux.tuning_db.storage.selection import Neighbour, borrowed_text, log2_distance, nearest_buckets
from kernmux.tuning_db.storage.source import open_source
from kernmux.tuning_db.storage.store import TuningStore

OP = "moe_topk_softmax"
# A what-if H100 (availability judged on metadata only): torch, torch_compile, triton and
# vllm survive for CUDA features; triton has the highest default priority.
H100 = Platform(
    vendor="cuda", arch="sm_90", device="NVIDIA H100 80GB HBM3", units=132,
    libs={"torch": "2.9.0", "triton": "3.5.0", "vllm": "0.11.0"}, what_if=True,
)
TRITON = {"rows": 1, "num_warps": 1, "select": "packed"}


def feats(**overrides):
    base = {"tokens": 100, "experts": 64, "topk": 2, "shared": 0, "dtype": "bf16",
            "renormalize": False, "padding": False, "device": "cuda"}
    base.update(overrides)
    return base


def record(store, kernel="torch", config=None, p50=10.0, platform=H100, **overrides):
    op = REGISTRY.op(OP)
    features = feats(**overrides)
    return store.record(TrialRecord.for_platform(
        platform, op=OP, kernel=kernel, config=dict(config or {}), features=features,
        bucket=op.bucket(features), status="ok", p50_us=p50, p20_us=p50, p80_us=p50, reps=10,
        metrics={}, error=None,
    ))


@pytest.fixture
def db(sqlite_url, monkeypatch):
    monkeypatch.delenv(NEAREST_ENV, raising=False)
    store = TuningStore(sqlite_url)
    yield store
    store.close()


def decide(store, platform=H100, **overrides):
    source = open_source(store.url)
    try:
        return resolve(OP, feats(**overrides), platform, RuleSet(), tuning=source, force={})
    finally:
        source.close()


# --------------------------------------------------------------------------- pure parts


def test_distance_is_euclidean_over_log2_of_numeric_features():
    numeric = {"batch", "context"}
    asked = {"batch": 50, "context": 3000, "dtype": "bf16"}
    bucket = {"batch": 64, "context": 4096, "dtype": "bf16"}
    expected = math.hypot(math.log2(64 / 50), math.log2(4096 / 3000))
    assert log2_distance(asked, bucket, numeric) == pytest.approx(expected)
    assert log2_distance(asked, {**bucket, "dtype": "fp16"}, numeric) is None  # categorical differs
    assert log2_distance(asked, {"batch": 64, "context": 4096}, numeric) is None  # other keys
    # log2 of 0 does not exist: 0 matches only 0.
    assert log2_distance({"shared": 0, "n": 4}, {"shared": 2, "n": 4}, {"shared", "n"}) is None
    assert log2_distance({"shared": 0, "n": 4}, {"shared": 0, "n": 8}, {"shared", "n"}) == 1.0


def test_neighbours_nearest_first_ties_to_the_larger_and_limit():
    numeric = {"tokens"}
    buckets = [(f"k{t}", {"tokens": t, "dtype": "bf16"}) for t in (16, 64, 256, 512)]
    within, beyond = nearest_buckets({"tokens": 128, "dtype": "bf16"}, buckets, numeric, 2.0)
    # 64 and 256 are both one doubling away: the larger first.
    assert [n.bucket["tokens"] for n in within] == [256, 64, 512]  # 512: exactly at the limit
    assert beyond is not None and beyond.bucket["tokens"] == 16 and beyond.distance == 3.0
    within, _ = nearest_buckets({"tokens": 128, "dtype": "bf16"}, buckets, numeric, 2.0, exclude="k256")
    assert [n.bucket["tokens"] for n in within] == [64, 512]


def test_borrowed_wording():
    asked = {"tokens": 100, "dtype": "bf16"}
    one = Neighbour(math.log2(128 / 100), {"tokens": 128, "dtype": "bf16"}, "k")
    assert borrowed_text(asked, one, {"tokens"}) == "borrowed from tokens=128, asked 100 (distance 0.36)"
    two = Neighbour(0.52, {"batch": 64, "context": 4096}, "k")
    text = borrowed_text({"batch": 50, "context": 3000}, two, {"batch", "context"})
    assert text == "borrowed from batch=64 context=4096, asked batch=50 context=3000 (distance 0.52)"


def test_numeric_features_leave_enumerated_ints_categorical():
    assert numeric_features(REGISTRY.op(OP)) == {"tokens", "experts", "topk"}  # shared has choices


# --------------------------------------------------------------------------- decisions


def test_exact_bucket_is_not_borrowed(db):
    exact = record(db, "torch", p50=5.0, tokens=128)
    record(db, "torch_compile", p50=1.0, tokens=64)  # nearer in log2, but not this bucket
    d = decide(db, tokens=100)
    assert (d.source, d.kernel, d.row_id) == ("tuning_db", "torch", exact)
    assert d.borrowed_from is None and d.distance is None
    assert "borrowed" not in d.detail
    assert d.as_dict()["borrowed_from"] is None and d.as_dict()["distance"] is None


def test_untuned_problem_borrows_the_nearest_bucket(db):
    near = record(db, "torch", p50=5.0, tokens=64)
    record(db, "torch_compile", p50=1.0, tokens=512)
    d = decide(db, tokens=100)
    assert (d.source, d.kernel, d.row_id) == ("tuning_db", "torch", near)
    assert d.borrowed_from == REGISTRY.op(OP).bucket(feats(tokens=64))
    assert d.distance == pytest.approx(math.log2(100 / 64), abs=1e-4)
    assert d.detail.startswith("borrowed from tokens=64, asked 100 (distance 0.64): tuning row ")
    out = json.loads(json.dumps(d.as_dict()))
    assert out["borrowed_from"]["tokens"] == 64 and out["distance"] == pytest.approx(0.6439, abs=1e-4)


def test_other_numeric_features_borrow_too(db):
    record(db, "torch", p50=5.0, tokens=128, experts=128)
    d = decide(db, tokens=128, experts=160)
    assert d.source == "tuning_db" and d.kernel == "torch"
    assert d.detail.startswith("borrowed from experts=128, asked 160 (distance 0.32)")


def test_too_far_falls_to_priority(db, monkeypatch):
    record(db, "torch", p50=5.0, tokens=16)  # log2(100/16) = 2.64 > 2.0
    d = decide(db, tokens=100)
    assert (d.source, d.kernel) == ("priority", "triton")
    assert any("at distance 2.64, beyond the limit 2" in n for n in d.notes), d.notes
    monkeypatch.setenv(NEAREST_ENV, "3")
    d = decide(db, tokens=100)
    assert (d.source, d.kernel) == ("tuning_db", "torch") and d.distance == pytest.approx(2.6439, abs=1e-4)
    monkeypatch.setenv(NEAREST_ENV, "0")
    d = decide(db, tokens=100)
    assert d.source == "priority" and any("borrowing disabled" in n for n in d.notes)


def test_unusable_limit_takes_the_default_and_says_so(db, monkeypatch):
    record(db, "torch", p50=5.0, tokens=64)
    monkeypatch.setenv(NEAREST_ENV, "far")
    d = decide(db, tokens=100)
    assert d.source == "tuning_db" and d.borrowed_from is not None
    assert any("KERNMUX_NEAREST_MAX='far' is not a finite distance" in n for n in d.notes)


def test_tie_goes_to_the_larger_bucket(db):
    record(db, "torch", p50=5.0, tokens=64)
    larger = record(db, "torch_compile", p50=50.0, tokens=256)
    d = decide(db, tokens=128)  # bucket 128 untuned; 64 and 256 one doubling away each
    assert (d.kernel, d.row_id, d.distance) == ("torch_compile", larger, 1.0)
    assert d.detail.startswith("borrowed from tokens=256, asked 128 (distance 1.00)")


@pytest.mark.parametrize("differs", [{"dtype": "fp16"}, {"renormalize": True}, {"shared": 2}, {"padding": True}])
def test_categorical_mismatch_is_never_borrowed(db, differs):
    record(db, "torch", p50=5.0, tokens=128, **differs)
    d = decide(db, tokens=100)
    assert d.source == "priority" and d.borrowed_from is None


def test_other_platform_rows_are_not_borrowed(db):
    other = H100.with_overrides({"device": "NVIDIA H200", "units": 132})
    record(db, "torch", p50=5.0, tokens=64, platform=other)
    assert decide(db, tokens=100).source == "priority"


def test_kernel_must_survive_for_the_asked_problem(db):
    # experts=2048 is beyond the Triton kernel's tile: its row at experts=1024 is not
    # borrowed for it; the neighbour's best survivor is.
    record(db, "triton", TRITON, p50=1.0, tokens=128, experts=1024)
    slower = record(db, "torch", p50=9.0, tokens=128, experts=1024)
    d = decide(db, tokens=128, experts=2048)
    assert (d.kernel, d.row_id) == ("torch", slower)
    assert d.detail.startswith("borrowed from experts=1024, asked 2048 (distance 1.00)")


def test_config_invalid_for_the_asked_shape_tries_the_next_nearest(db):
    # Triton's config_valid: rows per program <= next_power_of_two(tokens). The nearest
    # bucket's winner runs 8 rows per program, invalid for 4 tokens; the next one is taken.
    eight_rows = {"rows": 8, "num_warps": 1, "select": "packed"}
    assert config_problem(REGISTRY.kernels_of(OP)["triton"], eight_rows, feats(tokens=4))
    record(db, "triton", eight_rows, p50=1.0, tokens=8)
    far = record(db, "torch", p50=5.0, tokens=1)
    d = decide(db, tokens=4)
    assert (d.kernel, d.row_id) == ("torch", far)
    assert d.detail.startswith("borrowed from tokens=1, asked 4 (distance 2.00)")
    assert any("skipped" in n and "not valid for the asked features" in n for n in d.notes), d.notes


def test_borrowed_config_is_the_decision_config(db):
    record(db, "triton", TRITON, p50=1.0, tokens=64)
    d = decide(db, tokens=100)
    assert d.kernel == "triton" and dict(d.config) == TRITON and d.borrowed_from is not None


def test_a_borrowed_shape_heuristic_is_resolved_again_at_the_asked_shape(db):
    # Triton's default is its shape heuristic: at 1024 tokens x 64 experts it picks the
    # bitonic network, at 2048 the two-pass pick. When the neighbour's winner is exactly
    # its heuristic there, the asked shape runs the heuristic's own choice.
    triton = REGISTRY.kernels_of(OP)["triton"]
    at_1024 = triton.resolved_default(feats(tokens=1024))
    at_2048 = triton.resolved_default(feats(tokens=2048))
    assert at_1024 != at_2048 and at_1024["select"] == "bitonic" and at_2048["select"] == "twopass"
    row = record(db, "triton", at_1024, p50=1.0, tokens=1024)
    d = decide(db, tokens=2048)
    assert (d.kernel, d.row_id, dict(d.config)) == ("triton", row, at_2048)
    assert d.borrowed_from["tokens"] == 1024
    assert any("is its shape heuristic at the neighbour" in n for n in d.notes), d.notes
    # A winner that is not the heuristic is borrowed as it is.
    other = {**at_1024, "num_warps": 2}
    other_row = record(db, "triton", other, p50=0.5, tokens=1024, experts=32)
    d = decide(db, tokens=2048, experts=32)
    assert (d.row_id, dict(d.config)) == (other_row, other)


# --------------------------------------------------------------------------- explain


def test_explain_names_the_borrowed_bucket(sqlite_url, monkeypatch, capsys):
    from kernmux.cli.main import main

    monkeypatch.delenv(NEAREST_ENV, raising=False)
    here = current_platform()
    device = "cpu" if here.vendor == "cpu" else "cuda"  # what explain assumes for this platform
    with TuningStore(sqlite_url) as store:
        row = record(store, "torch", p50=5.0, platform=here, tokens=64, device=device)
    args = ["explain", OP, "tokens=100", "experts=64", "topk=2", "--db", sqlite_url]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert f"source:    tuning_db level: borrowed from tokens=64, asked 100 (distance 0.64): tuning row {row}:" in text
    assert "borrowed:  nearest tuned bucket tokens=64 experts=64 " in text
    assert "(distance 0.64 in log2 units; limit: KERNMUX_NEAREST_MAX)" in text
    assert main(args + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"] == "tuning_db" and out["tuning_row"] == row
    assert out["borrowed_from"]["tokens"] == 64 and out["distance"] == pytest.approx(0.6439, abs=1e-4)
