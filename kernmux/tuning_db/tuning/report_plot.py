"""The report's trial history: each study's best value over its trials, as inline SVG,
and the optuna-dashboard recipe for the same studies.

The studies live in the tuning database itself (optuna's RDB storage), so the history is
read from optuna, exactly what ``optuna-dashboard <storage URL>`` shows interactively.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Line colours (colour-blind friendly: Okabe-Ito), cycled.
PALETTE = ("#0072b2", "#e69f00", "#009e73", "#cc79a7", "#56b4e9", "#d55e00", "#f0e442", "#000000")


@dataclass(frozen=True)
class History:
    """One study's finished trials: (trial number, value in us) in trial order."""

    study: str
    label: str
    points: tuple[tuple[int, float], ...]

    def best_so_far(self) -> list[tuple[int, float]]:
        out, best = [], math.inf
        for number, value in self.points:
            best = min(best, value)
            out.append((number, best))
        return out


def load_histories(url: str, studies: Mapping[str, str]) -> tuple[list[History], list[str]]:
    """Histories of ``studies`` (name -> label) from optuna's storage at ``url``, and
    notes on studies that could not be read (missing, or optuna not installed)."""
    try:
        import optuna
        from optuna.trial import TrialState
    except ImportError:
        return [], ["optuna is not installed: no trial history"]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    histories, notes = [], []
    for name, label in studies.items():
        try:
            study = optuna.load_study(study_name=name, storage=url)
        except KeyError:
            notes.append(f"study {name!r} has rows but no optuna study (imported or merged rows)")
            continue
        points = tuple(
            (t.number, float(t.value)) for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
            if t.value is not None and math.isfinite(t.value) and t.value > 0
        )
        histories.append(History(name, label, tuple(sorted(points))))
    return histories, notes


def svg_best_over_trials(histories: Sequence[History], *, width: int = 640, height: int = 260) -> str:
    """An inline SVG line chart: best p50 so far (log scale, us) against trial number,
    one step line per study, with a legend. "" when no study has a finished trial."""
    series = [(h, h.best_so_far()) for h in histories if h.points]
    if not series:
        return ""
    left, right, top, bottom = 64, 16, 12, 36
    legend_h = 16 * len(series)
    plot_w, plot_h = width - left - right, height - top - bottom
    max_x = max(max(n for n, _ in pts) for _, pts in series)
    values = [v for history, _ in series for _, v in history.points]  # every trial, not only the best so far
    lo, hi = math.log10(min(values)), math.log10(max(values))
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    lo, hi = math.floor(lo * 4) / 4, math.ceil(hi * 4) / 4

    def x(n: float) -> float:
        return left + plot_w * (n / max(max_x, 1))

    def y(v: float) -> float:
        return top + plot_h * (1 - (math.log10(v) - lo) / (hi - lo))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height + legend_h}" '
             f'role="img" aria-label="best p50 over trials" class="history">']
    parts.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="#fff" stroke="#bbb"/>')
    for exp in range(math.floor(lo), math.floor(hi) + 1):  # decades
        for mant in (1, 2, 5):
            v = mant * 10**exp
            if lo <= math.log10(v) <= hi:
                parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#eee"/>')
                parts.append(f'<text x="{left - 6}" y="{y(v) + 4:.1f}" text-anchor="end" font-size="11">{v:g}</text>')
    for n in sorted({0, max_x} | {round(max_x * f) for f in (0.25, 0.5, 0.75)}):
        parts.append(f'<text x="{x(n):.1f}" y="{top + plot_h + 14}" text-anchor="middle" font-size="11">{n}</text>')
    parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h + 30}" text-anchor="middle" font-size="11">'
                 'trial number</text>')
    parts.append(f'<text x="14" y="{top + plot_h / 2}" text-anchor="middle" font-size="11" '
                 f'transform="rotate(-90 14 {top + plot_h / 2})">best p50 so far (us, log)</text>')
    for i, (history, pts) in enumerate(series):
        colour = PALETTE[i % len(PALETTE)]
        (n0, v0), path = pts[0], []
        path.append(f"M{x(n0):.1f},{y(v0):.1f}")
        for n, v in pts[1:]:  # steps: the best holds until a better trial
            path.append(f"H{x(n):.1f} V{y(v):.1f}")
        parts.append(f'<path d="{" ".join(path)}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for n, v in history.points:
            parts.append(f'<circle cx="{x(n):.1f}" cy="{y(v):.1f}" r="2" fill="{colour}" fill-opacity="0.45">'
                         f'<title>trial {n}: {v:.2f} us</title></circle>')
        ly = height + 16 * i + 4
        parts.append(f'<rect x="{left}" y="{ly}" width="12" height="3" fill="{colour}"/>'
                     f'<text x="{left + 18}" y="{ly + 5}" font-size="11">{html.escape(history.label)} '
                     f'(best {pts[-1][1]:.2f} us after {len(history.points)} trials)</text>')
    parts.append("</svg>")
    return "".join(parts)


def dashboard_recipe(url: str, studies: Sequence[str]) -> dict[str, Any]:
    """How to open the same studies in optuna-dashboard: the command, the storage URL
    (optuna's: the tuning database itself) and the study names."""
    return {
        "install": "pip install optuna-dashboard",
        "command": f"optuna-dashboard {url}",
        "storage": url,
        "studies": sorted(studies),
    }
