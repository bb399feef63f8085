"""``kernmux db report`` as an analysis: numeric column order, constant features in the
caption, failures and dispersed timings in the cells, a colour scale past 4x, each
study's best value over trials, and an optuna-dashboard recipe that opens the very
studies of the database."""

from __future__ import annotations

import re

import optuna
import pytest

from kernmux.cli.main import main
from kernmux.dispatch.platform import Platform
from kernmux.tuning_db.storage.records import TrialRecord
from kernmux.tuning_db.storage.store import TuningStore
from kernmux.tuning_db.tuning.report import _color, collect, constant_features, write_report
from kernmux.tuning_db.tuning.report_plot import History, dashboard_recipe, svg_best_over_trials

CPU = Platform(vendor="cpu", arch="cpu", device="cpu", units=2, libs={"torch": "2.13.0"})
OP = "moe_topk_softmax"


def _trial(kernel, tokens, experts, status="ok", p50=10.0, p20=None, p80=None, metrics=None, error=None):
    features = {"tokens": tokens, "experts": experts, "topk": 6, "shared": 0, "dtype": "bf16",
                "renormalize": False, "padding": False, "device": "cpu"}
    ok = status == "ok"
    return TrialRecord.for_platform(
        CPU, op=OP, kernel=kernel, config={}, features=features, bucket=dict(features), status=status,
        p50_us=p50 if ok else None, p20_us=(p20 or p50) if ok else None, p80_us=(p80 or p50) if ok else None,
        reps=10 if ok else None, metrics=metrics or {}, error=error,
    )


@pytest.fixture
def report_html(sqlite_url, tmp_path):
    rows = []
    for experts in (128, 160, 256, 64):  # stored out of order on purpose
        for tokens in (128, 1, 16):
            rows.append(_trial("torch", tokens, experts, p50=100.0))
            rows.append(_trial("torch_topk", tokens, experts, p50=100.0 / 20 if experts == 64 else 50.0))
    rows.append(_trial("torch_compile", 16, 160, status="numerics_failed", error="ids differ", metrics={"id_mismatches": 3}))
    rows.append(_trial("torch_compile", 16, 160, status="crashed", error="SIGSEGV"))
    rows.append(_trial("torch_topk", 1, 128, p50=1.0, p20=1.0, p80=50.0))  # fastest but dispersed: never the winner
    with TuningStore(sqlite_url) as store:
        store.record_many(rows)
        out = tmp_path / "r.html"
        write_report(store, out)
        sections = collect(store)
    return out.read_text(), sections


def test_columns_and_rows_in_numeric_order(report_html):
    html, _ = report_html
    headers = re.findall(r"<th>experts=(\d+)</th>", html)
    assert headers == ["64", "128", "160", "256"]
    assert re.findall(r"<th>tokens=(\d+)</th>", html) == ["1", "16", "128"]


def test_constant_features_are_stated_once_in_a_caption(report_html):
    html, sections = report_html
    assert constant_features(sections[0].cells) == {
        "device": "cpu", "dtype": "bf16", "padding": False, "renormalize": False, "shared": 0, "topk": 6}
    assert "<caption>every bucket: device=cpu, dtype=bf16, padding=False, renormalize=False, shared=0, topk=6</caption>" in html
    assert "topk=6</th>" not in html  # not repeated in every column header


@pytest.mark.dispersion_gate  # synthetic rows judged by the shipped bound
def test_failures_and_dispersed_timings_are_visible_in_the_cells(report_html):
    html, sections = report_html
    assert '<small class="fail">torch_compile: crashed &times;1</small>' in html
    assert '<small class="fail">torch_compile: numerics_failed &times;1</small>' in html
    assert '<small class="fail">torch_topk: dispersed &times;1</small>' in html
    [cell] = [c for c in sections[0].cells if c.bucket["tokens"] == 1 and c.bucket["experts"] == 128]
    assert cell.winner.p50_us == 50.0 and cell.dispersed["torch_topk"] == 1


def test_colour_keeps_going_past_4x():
    shades = [_color(s) for s in (1, 2, 4, 16, 64, 256)]
    assert len(set(shades)) == len(shades)  # every step a different colour
    greens = [int(c[1:3], 16) for c in shades]  # red channel falls as the speed-up grows
    assert greens == sorted(greens, reverse=True)
    slows = [_color(s) for s in (1, 0.5, 0.25, 1 / 16)]
    assert len(set(slows)) == 4


def test_best_over_trials_plot():
    svg = svg_best_over_trials([
        History("s1", "tokens=1", ((0, 30.0), (1, 20.0), (2, 25.0), (3, 10.0))),
        History("s2", "tokens=128", ((0, 900.0), (2, 800.0))),
        History("s3", "empty", ()),
    ])
    assert svg.startswith("<svg") and svg.endswith("</svg>")
    assert svg.count("<path") == 2 and "tokens=1 (best 10.00 us after 4 trials)" in svg
    assert "trial 3: 10.00 us" in svg
    assert svg_best_over_trials([History("s", "x", ())]) == ""


def test_report_plots_the_stored_studies_and_the_recipe_opens_them(capsys, tmp_path):
    """Tune for real (two feature sets, in-process, CPU), then: the report holds one line
    per study, and every study name the recipe gives loads from the storage URL it gives."""
    db = str(tmp_path / "t.sqlite")
    code = main(["tune", OP, "tokens=1,8", "experts=16", "topk=2", "--kernels", "torch,torch_topk", "--trials", "2",
                 "--warmup-ms", "1", "--rep-ms", "5", "--in-process", "--device", "cpu", "--db", db])
    assert code == 0, capsys.readouterr()
    out = tmp_path / "r.html"
    assert main(["db", "report", "--db", db, "-o", str(out), "--json"]) == 0
    html = out.read_text()
    assert "Search history: best p50 over trials, per study" in html
    assert html.count("<path") == 2 and "tokens=1 (best" in html and "tokens=8 (best" in html
    with TuningStore(db) as store:
        studies = sorted({r.study for r in store.rows()})
        recipe = dashboard_recipe(store.display_url, studies)
    assert recipe["command"] == f"optuna-dashboard {recipe['storage']}"
    assert f"<code>{recipe['command']}</code>" in html
    for name in recipe["studies"]:
        assert f"<code>{name}</code>" in html
        study = optuna.load_study(study_name=name, storage=recipe["storage"])
        assert len(study.trials) == 2 and study.best_value > 0
