"""A self-contained HTML report of the tuning database (``kernmux db report``).

One section per (op, platform fingerprint, torch/triton versions). Each section is a
grid: rows are the values of the bucket feature with the most distinct values (e.g.
tokens), columns the combinations of the other bucket features that vary, both in
numeric order; features with one value in the whole section are stated once in the
caption. A cell names the winning kernel (the fastest ok row whose config never failed in
that bucket and whose timing is not dispersed, the rule the resolver uses), its speed-up
over the reference kernel ``torch`` (colour on a log scale that keeps going past 4x: green
faster, red slower, grey when torch was not measured) and, in the cell itself, the
failures and dispersed timings of that bucket. Hovering a cell shows config, timings and
row ids (HTML ``title``). Below the grid, each study's best value over its trials (inline
SVG from the optuna studies stored in the same database) and how to open them in
optuna-dashboard. No script, no external file.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import html
import json
import math
import pathlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kernmux.tuning_db.storage.dispersion import is_dispersed
from kernmux.tuning_db.storage.records import FAILURE_STATUSES, TrialRow, config_key
from kernmux.tuning_db.storage.store import TuningStore
from kernmux.tuning_db.tuning.report_plot import History, dashboard_recipe, load_histories, svg_best_over_trials

REFERENCE_KERNEL = "torch"
_VERSION_LIBS = ("torch", "triton")


@dataclass
class Cell:
    """The outcome for one bucket: winner, reference and failure counts."""

    bucket: dict[str, Any]
    winner: TrialRow | None
    reference: TrialRow | None
    failures: Counter
    dispersed: Counter = dataclasses.field(default_factory=Counter)  # kernel -> ok rows with dispersed timing

    @property
    def speedup(self) -> float | None:
        if self.winner is None or self.reference is None or not self.winner.p50_us:
            return None
        return self.reference.p50_us / self.winner.p50_us


@dataclass
class Section:
    op: str
    fingerprint: str
    platform: dict[str, Any]
    versions: dict[str, str]
    cells: list[Cell]
    studies: dict[str, str] = dataclasses.field(default_factory=dict)  # study name -> label (its features)
    histories: list[History] = dataclasses.field(default_factory=list)


def _fastest(rows: Sequence[TrialRow]) -> TrialRow | None:
    return min(rows, key=lambda r: (r.p50_us, r.id)) if rows else None


def _cell(bucket: dict[str, Any], rows: Sequence[TrialRow]) -> Cell:
    failed = {(r.kernel, config_key(r.config)) for r in rows if r.status in FAILURE_STATUSES}
    ok = [r for r in rows if r.status == "ok" and (r.kernel, config_key(r.config)) not in failed]
    dispersed = Counter(r.kernel for r in ok if is_dispersed(r))
    ok = [r for r in ok if not is_dispersed(r)]
    failures = Counter(f"{r.kernel}: {r.status}" for r in rows if r.status in FAILURE_STATUSES)
    reference = _fastest([r for r in ok if r.kernel == REFERENCE_KERNEL])
    return Cell(bucket, _fastest(ok), reference, failures, dispersed)


def _study_labels(rows: Sequence[TrialRow]) -> dict[str, str]:
    """Study name -> the features that tell it apart from the section's other studies."""
    features = {r.study: r.features for r in rows if r.study}
    varying = sorted({k for f in features.values() for k in f if len({json.dumps(g.get(k)) for g in features.values()}) > 1})
    return {name: (" ".join(f"{k}={f.get(k)}" for k in varying) or "one study") for name, f in sorted(features.items())}


def collect(store: TuningStore, op: str | None = None) -> list[Section]:
    """Group the store's rows into report sections (the data behind the HTML)."""
    groups: dict[tuple[str, str, str], list[TrialRow]] = defaultdict(list)
    for row in store.rows(op=op, status=("ok", *FAILURE_STATUSES)):
        versions = {k: row.libs[k] for k in _VERSION_LIBS if k in row.libs}
        groups[(row.op, row.fingerprint, json.dumps(versions, sort_keys=True))].append(row)
    sections = []
    for (op_name, fingerprint, versions), rows in sorted(groups.items()):
        by_bucket: dict[str, list[TrialRow]] = defaultdict(list)
        for row in rows:
            by_bucket[json.dumps(row.bucket, sort_keys=True)].append(row)
        cells = [_cell(json.loads(key), bucket_rows) for key, bucket_rows in sorted(by_bucket.items())]
        sections.append(Section(op_name, fingerprint, rows[0].platform, json.loads(versions), cells,
                                _study_labels(rows)))
    return sections


def _natural(value: Any) -> tuple:
    """Sort key: numbers by value (64 before 128), then everything else as text."""
    if isinstance(value, bool):
        return (1, 0.0, str(value))
    if isinstance(value, (int, float)):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def constant_features(cells: Sequence[Cell]) -> dict[str, Any]:
    """Bucket features with one value in every cell (stated once, in the caption)."""
    keys = sorted({k for c in cells for k in c.bucket})
    out = {}
    for key in keys:
        values = {json.dumps(c.bucket.get(key), sort_keys=True) for c in cells}
        if len(values) == 1 and len(cells) > 1:
            out[key] = cells[0].bucket.get(key)
    return out


def _axes(cells: Sequence[Cell], constant: dict[str, Any]) -> tuple[str | None, list[Any], list[tuple]]:
    """(row feature, its values, column keys) in numeric order: the varying feature with
    most values is the row axis; a column key is the tuple of the other varying values."""
    keys = sorted({k for c in cells for k in c.bucket} - set(constant))
    if not keys:
        return None, [None], [()]
    distinct = {k: {json.dumps(c.bucket.get(k)) for c in cells} for k in keys}
    row_key = max(keys, key=lambda k: (len(distinct[k]), k == "tokens", k))
    row_values = sorted({c.bucket.get(row_key) for c in cells}, key=_natural)
    columns = sorted({_column_key(c.bucket, row_key, constant) for c in cells},
                     key=lambda col: tuple(_natural(v) for _, v in col))
    return row_key, row_values, columns


def _column_key(bucket: dict[str, Any], row_key: str | None, constant: dict[str, Any]) -> tuple:
    return tuple((k, bucket[k]) for k in sorted(bucket) if k != row_key and k not in constant)


def _column_label(column: tuple) -> str:
    return ", ".join(f"{k}={v}" for k, v in column)


def _color(speedup: float | None) -> str:
    """Background for a speed-up: log scale without a ceiling (2x, 4x, 16x, 256x each a
    step deeper; the tint approaches full colour, never reaches it)."""
    if speedup is None:
        return "#e6e6e6"
    if speedup <= 0:
        return "#ffb4b4"
    octaves = math.log2(speedup)
    t = math.copysign(1 - 1 / (1 + abs(octaves) / 2), octaves)  # 2x: 0.33, 4x: 0.5, 16x: 0.67, 256x: 0.8
    if t >= 0:
        r, g, b = 255 - int(215 * t), 255 - int(90 * t), 255 - int(215 * t)
    else:
        r, g, b = 255 + int(40 * t), 255 + int(215 * t), 255 + int(215 * t)
    return f"#{r:02x}{g:02x}{b:02x}"


def _tooltip(cell: Cell) -> str:
    lines = [f"bucket {json.dumps(cell.bucket, sort_keys=True)}"]
    if cell.winner is not None:
        w = cell.winner
        lines.append(f"winner: {w.kernel} {config_key(w.config)} p50 {w.p50_us:.2f} us (row {w.id})")
    if cell.reference is not None:
        lines.append(f"torch: p50 {cell.reference.p50_us:.2f} us (row {cell.reference.id})")
    for what, n in sorted(cell.failures.items()):
        lines.append(f"failed: {what} x{n}")
    return "\n".join(lines)


def _problems_html(cell: Cell) -> str:
    """Failures and dispersed timings of a bucket, written in the cell."""
    lines = [f"{html.escape(what)} &times;{n}" for what, n in sorted(cell.failures.items())]
    lines += [f"{html.escape(k)}: dispersed &times;{n}" for k, n in sorted(cell.dispersed.items())]
    return "".join(f'<br><small class="fail">{line}</small>' for line in lines)


def _cell_html(cell: Cell | None) -> str:
    if cell is None:
        return '<td class="none">&nbsp;</td>'
    title = html.escape(_tooltip(cell), quote=True)
    if cell.winner is None:
        return f'<td class="none" title="{title}">no ok trial{_problems_html(cell)}</td>'
    speed = cell.speedup
    speed_text = f"&times;{speed:.2f}" if speed is not None else "no torch"
    return (
        f'<td style="background:{_color(speed)}" title="{title}">'
        f'<b>{html.escape(cell.winner.kernel)}</b><br>{speed_text}'
        f'<br><small>{cell.winner.p50_us:.1f} us</small>{_problems_html(cell)}</td>'
    )


def _history_html(section: Section, recipe: dict[str, Any] | None) -> str:
    if not section.studies:
        return ""
    svg = svg_best_over_trials(section.histories)
    parts = ['<div class="history-panel"><h3>Search history: best p50 over trials, per study</h3>']
    parts.append(svg or "<p>No finished optuna trial recorded for these studies.</p>")
    if recipe is not None:
        names = "".join(f"<li><code>{html.escape(n)}</code> ({html.escape(section.studies[n])})</li>"
                        for n in recipe["studies"] if n in section.studies)
        parts.append(
            "<p>Every trial, parameter and intermediate state of these studies in optuna-dashboard "
            f"(<code>{html.escape(recipe['install'])}</code>): <code>{html.escape(recipe['command'])}</code></p>"
            f"<details><summary>studies ({len(section.studies)})</summary><ul>{names}</ul></details>"
        )
    return "".join(parts) + "</div>"


def _section_html(section: Section, recipe: dict[str, Any] | None = None) -> str:
    constant = constant_features(section.cells)
    row_key, row_values, columns = _axes(section.cells, constant)
    grid = {(c.bucket.get(row_key) if row_key else None, _column_key(c.bucket, row_key, constant)): c
            for c in section.cells}
    wins = Counter(c.winner.kernel for c in section.cells if c.winner is not None)
    plat = section.platform
    versions = ", ".join(f"{k} {v}" for k, v in sorted(section.versions.items())) or "versions not recorded"
    head = "".join(f"<th>{html.escape(_column_label(col)) or '&nbsp;'}</th>" for col in columns)
    body = []
    for value in row_values:
        cells = "".join(_cell_html(grid.get((value, col))) for col in columns)
        body.append(f"<tr><th>{html.escape(str(row_key))}={html.escape(str(value))}</th>{cells}</tr>")
    win_text = ", ".join(f"{html.escape(k)} {n}" for k, n in wins.most_common()) or "none"
    caption = ", ".join(f"{k}={v}" for k, v in constant.items())
    caption_html = f"<caption>every bucket: {html.escape(caption)}</caption>" if caption else ""
    return (
        f"<section><h2>{html.escape(section.op)}</h2>"
        f"<p>{html.escape(str(plat.get('vendor')))} {html.escape(str(plat.get('arch')))} &middot; "
        f"{html.escape(str(plat.get('device')))} ({html.escape(str(plat.get('units')))} units) &middot; "
        f"{html.escape(versions)} &middot; fingerprint <code>{html.escape(section.fingerprint)}</code></p>"
        f"<p>buckets won: {win_text}</p>"
        f'<div class="panels"><table>{caption_html}<tr><th>&nbsp;</th>{head}</tr>{"".join(body)}</table>'
        f"{_history_html(section, recipe)}</div></section>"
    )


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 19px; margin-bottom: 0.2em; } h3 { font-size: 15px; margin: 0 0 0.3em; }
.panels { display: flex; flex-wrap: wrap; gap: 2em; align-items: flex-start; }
p { margin: 0.4em 0; }
.history-panel { flex: 0 1 660px; min-width: 0; font-size: 13px; overflow-wrap: anywhere; }
details { font-size: 12px; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #bbb; padding: 4px 8px; text-align: center; font-size: 13px; }
th { background: #f4f4f4; font-weight: 600; }
td.none { background: #fafafa; color: #999; }
small.fail { color: #a40000; }
caption { caption-side: top; text-align: left; font-size: 13px; padding: 4px 0; color: #444; }
.legend span { display: inline-block; padding: 2px 8px; margin-right: 4px; border: 1px solid #bbb; }
svg.history { display: block; margin: 0.5em 0 1em; }
"""


def render_html(sections: Sequence[Section], *, title: str, recipe: dict[str, Any] | None = None,
                notes: Sequence[str] = ()) -> str:
    legend = "".join(
        f'<span style="background:{_color(s)}">&times;{s:g}</span>' for s in (0.25, 0.5, 1, 2, 4, 16, 64, 256)
    ) + f'<span style="background:{_color(None)}">no torch row</span>'
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    content = "".join(_section_html(s, recipe) for s in sections) or "<p>No ok or failed trials recorded.</p>"
    note_html = "".join(f"<p><small>{html.escape(n)}</small></p>" for n in notes)
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<p>Winning kernel per bucket and its speed-up over <code>{REFERENCE_KERNEL}</code> "
        f"(p50 ratio; rows with dispersed timings, p80/p20 over the bound, are not used); generated {now}. "
        "Failures are listed in their cell; hover a cell for config, timings and row ids.</p>"
        f'<p class="legend">{legend}</p>{content}{note_html}</body></html>\n'
    )


def write_report(store: TuningStore, path: str | pathlib.Path, op: str | None = None) -> int:
    """Write the HTML report to ``path``; returns the number of sections (op x platform)."""
    sections = collect(store, op)
    studies = sorted({name for s in sections for name in s.studies})
    notes: list[str] = []
    for section in sections:
        section.histories, missing = load_histories(store.url, section.studies)
        notes += missing
    recipe = dashboard_recipe(store.display_url, studies) if studies else None
    title = f"kernmux tuning report: {op or 'all ops'}"
    pathlib.Path(path).write_text(render_html(sections, title=f"{title} ({store.display_url})", recipe=recipe,
                                              notes=notes))
    return len(sections)
