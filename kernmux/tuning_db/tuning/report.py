"""A self-contained HTML heatmap of the tuning database (``kernmux db report``).

One section per (op, platform fingerprint, torch/triton versions). Each section is a
grid: rows are the values of the bucket feature with the most distinct values (e.g.
tokens), columns the combinations of the other bucket features. A cell names the
winning kernel (the fastest ok row whose config never failed in that bucket, the rule
the resolver uses) and its speed-up over the reference kernel ``torch``, colored on a
log scale (green faster, red slower, grey when torch was not measured). Hovering a cell
shows config, timings, row id and failures (HTML ``title``: no script, no external file).
"""

from __future__ import annotations

import datetime as dt
import html
import json
import math
import pathlib
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kernmux.tuning_db.storage.records import FAILURE_STATUSES, TrialRow, config_key
from kernmux.tuning_db.storage.store import TuningStore

REFERENCE_KERNEL = "torch"
_VERSION_LIBS = ("torch", "triton")


@dataclass
class Cell:
    """The outcome for one bucket: winner, reference and failure counts."""

    bucket: dict[str, Any]
    winner: TrialRow | None
    reference: TrialRow | None
    failures: Counter

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


def _fastest(rows: Sequence[TrialRow]) -> TrialRow | None:
    return min(rows, key=lambda r: (r.p50_us, r.id)) if rows else None


def _cell(bucket: dict[str, Any], rows: Sequence[TrialRow]) -> Cell:
    failed = {(r.kernel, config_key(r.config)) for r in rows if r.status in FAILURE_STATUSES}
    ok = [r for r in rows if r.status == "ok" and (r.kernel, config_key(r.config)) not in failed]
    failures = Counter(f"{r.kernel}: {r.status}" for r in rows if r.status in FAILURE_STATUSES)
    reference = _fastest([r for r in ok if r.kernel == REFERENCE_KERNEL])
    return Cell(bucket, _fastest(ok), reference, failures)


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
        sections.append(Section(op_name, fingerprint, rows[0].platform, json.loads(versions), cells))
    return sections


def _axes(cells: Sequence[Cell]) -> tuple[str | None, list[Any], list[str]]:
    """(row feature, its values, column labels): the feature with most values is the row axis."""
    keys = sorted({k for c in cells for k in c.bucket})
    if not keys:
        return None, [None], [""]
    distinct = {k: {json.dumps(c.bucket.get(k)) for c in cells} for k in keys}
    row_key = max(keys, key=lambda k: (len(distinct[k]), k))
    row_values = sorted({json.dumps(c.bucket.get(row_key)) for c in cells}, key=_natural)
    columns = sorted({_column_label(c.bucket, row_key) for c in cells})
    return row_key, [json.loads(v) for v in row_values], columns


def _natural(text: str) -> tuple:
    try:
        return (0, float(text), "")
    except ValueError:
        return (1, 0.0, text)


def _column_label(bucket: dict[str, Any], row_key: str | None) -> str:
    return ", ".join(f"{k}={bucket[k]}" for k in sorted(bucket) if k != row_key)


def _color(speedup: float | None) -> str:
    if speedup is None:
        return "#e6e6e6"
    # log2 scale, saturating at 4x either way.
    t = max(-1.0, min(1.0, math.log2(speedup) / 2)) if speedup > 0 else -1.0
    if t >= 0:
        r, g, b = 255 - int(155 * t), 255 - int(45 * t), 255 - int(155 * t)
    else:
        r, g, b = 255 + int(25 * t), 255 + int(155 * t), 255 + int(155 * t)
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


def _cell_html(cell: Cell | None) -> str:
    if cell is None:
        return '<td class="none">&nbsp;</td>'
    title = html.escape(_tooltip(cell), quote=True)
    if cell.winner is None:
        return f'<td class="none" title="{title}">no ok trial</td>'
    speed = cell.speedup
    speed_text = f"&times;{speed:.2f}" if speed is not None else "no torch"
    return (
        f'<td style="background:{_color(speed)}" title="{title}">'
        f'<b>{html.escape(cell.winner.kernel)}</b><br>{speed_text}'
        f'<br><small>{cell.winner.p50_us:.1f} us</small></td>'
    )


def _section_html(section: Section) -> str:
    row_key, row_values, columns = _axes(section.cells)
    grid = {
        (json.dumps(c.bucket.get(row_key)) if row_key else "null", _column_label(c.bucket, row_key)): c
        for c in section.cells
    }
    wins = Counter(c.winner.kernel for c in section.cells if c.winner is not None)
    plat = section.platform
    versions = ", ".join(f"{k} {v}" for k, v in sorted(section.versions.items())) or "versions not recorded"
    head = "".join(f"<th>{html.escape(col) or '&nbsp;'}</th>" for col in columns)
    body = []
    for value in row_values:
        cells = "".join(_cell_html(grid.get((json.dumps(value), col))) for col in columns)
        body.append(f"<tr><th>{html.escape(str(row_key))}={html.escape(str(value))}</th>{cells}</tr>")
    win_text = ", ".join(f"{html.escape(k)} {n}" for k, n in wins.most_common()) or "none"
    return (
        f"<section><h2>{html.escape(section.op)}</h2>"
        f"<p>{html.escape(str(plat.get('vendor')))} {html.escape(str(plat.get('arch')))} &middot; "
        f"{html.escape(str(plat.get('device')))} ({html.escape(str(plat.get('units')))} units) &middot; "
        f"{html.escape(versions)} &middot; fingerprint <code>{html.escape(section.fingerprint)}</code></p>"
        f"<p>buckets won: {win_text}</p>"
        f"<table><tr><th>&nbsp;</th>{head}</tr>{''.join(body)}</table></section>"
    )


_STYLE = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #bbb; padding: 4px 8px; text-align: center; font-size: 13px; }
th { background: #f4f4f4; font-weight: 600; }
td.none { background: #fafafa; color: #999; }
.legend span { display: inline-block; padding: 2px 8px; margin-right: 4px; border: 1px solid #bbb; }
"""


def render_html(sections: Sequence[Section], *, title: str) -> str:
    legend = "".join(
        f'<span style="background:{_color(s)}">&times;{s:g}</span>' for s in (0.25, 0.5, 1, 2, 4)
    ) + f'<span style="background:{_color(None)}">no torch row</span>'
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    content = "".join(_section_html(s) for s in sections) or "<p>No ok or failed trials recorded.</p>"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        f"<p>Winning kernel per bucket and its speed-up over <code>{REFERENCE_KERNEL}</code> "
        f"(p50 ratio); generated {now}. Hover a cell for config, timings and failures.</p>"
        f'<p class="legend">{legend}</p>{content}</body></html>\n'
    )


def write_report(store: TuningStore, path: str | pathlib.Path, op: str | None = None) -> int:
    """Write the HTML heatmap to ``path``; returns the number of sections (op x platform)."""
    sections = collect(store, op)
    title = f"kernmux tuning report: {op or 'all ops'}"
    pathlib.Path(path).write_text(render_html(sections, title=f"{title} ({store.display_url})"))
    return len(sections)
