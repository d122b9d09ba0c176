"""A dependency-free SVG plot of a Pareto frontier (budget metric vs total sensitivity).

``edgeq allocate --pareto`` and report.md show the frontier with the chosen
plan marked, so a user sees what a little more (or less) budget would buy.
Sensitivity is drawn on a log axis (it spans orders of magnitude along the
frontier); the metric axis is linear, in the unit ``compiler.budget`` prints.
The user's budget on the metric is a dashed line when it falls near the
frontier, else a note that every plan drawn fits it.
"""

from __future__ import annotations

import math
from xml.sax.saxutils import escape

from compiler.budget import format_metric

WIDTH, HEIGHT = 560, 360
LEFT, RIGHT, TOP, BOTTOM = 80, 40, 36, 50
# A budget more than this fraction of the frontier's width beyond its widest plan
# is noted rather than drawn: drawing it would squash the frontier into a corner.
BUDGET_REACH = 0.25
BUDGET_COLOR = "#555555"


def pareto_svg(
    points: list[tuple[float, float]],
    metric: str,
    chosen: tuple[float, float] | None = None,
    title: str = "",
    budget: float | None = None,
) -> str:
    """SVG text: ``points`` are (metric value, total sensitivity), ``chosen`` is marked in red,
    ``budget`` (the limit on ``metric``) drawn or noted."""
    if not points:
        raise ValueError("no points to plot")
    xs = [x for x, _ in points] + ([chosen[0]] if chosen else [])
    ys = [max(y, 1e-12) for _, y in points] + ([max(chosen[1], 1e-12)] if chosen else [])
    x_lo, x_hi = min(xs), max(xs)
    draw_budget = budget is not None and x_lo <= budget <= x_hi + BUDGET_REACH * ((x_hi - x_lo) or abs(x_hi))
    if draw_budget:
        x_hi = max(x_hi, budget)
    y_lo, y_hi = math.log10(min(ys)), math.log10(max(ys))
    x_span = (x_hi - x_lo) or 1.0
    y_span = (y_hi - y_lo) or 1.0

    def at(x: float, y: float) -> tuple[float, float]:
        px = LEFT + (x - x_lo) / x_span * (WIDTH - LEFT - RIGHT)
        py = HEIGHT - BOTTOM - (math.log10(max(y, 1e-12)) - y_lo) / y_span * (HEIGHT - TOP - BOTTOM)
        return round(px, 1), round(py, 1)

    ordered = sorted(points)
    path = " ".join(f"{px},{py}" for px, py in (at(x, y) for x, y in ordered))
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" font-family="sans-serif" font-size="12">',
        f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
        f'<line x1="{LEFT}" y1="{HEIGHT - BOTTOM}" x2="{WIDTH - RIGHT}" y2="{HEIGHT - BOTTOM}" stroke="black"/>',
        f'<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{HEIGHT - BOTTOM}" stroke="black"/>',
        f'<polyline points="{path}" fill="none" stroke="#1f77b4" stroke-width="1.5"/>',
    ]
    for x, y in ordered:
        px, py = at(x, y)
        parts.append(f'<circle cx="{px}" cy="{py}" r="3" fill="#1f77b4"><title>{escape(format_metric(metric, x))}: {y:.4g}</title></circle>')
    if chosen:
        px, py = at(*chosen)
        parts.append(f'<circle cx="{px}" cy="{py}" r="6" fill="none" stroke="#d62728" stroke-width="2"/>')
        parts.append(_label(px, py - 10, "chosen", 'fill="#d62728"'))
    if draw_budget:
        px, _ = at(budget, 10**y_lo)
        parts.append(f'<line x1="{px}" y1="{TOP}" x2="{px}" y2="{HEIGHT - BOTTOM}" stroke="{BUDGET_COLOR}" '
                     'stroke-dasharray="5,4"/>')
        parts.append(_label(px, TOP + 12, f"budget {format_metric(metric, budget)}", f'fill="{BUDGET_COLOR}"'))
    elif budget is not None:
        parts.append(f'<text x="{WIDTH - RIGHT}" y="{TOP - 20}" text-anchor="end" fill="{BUDGET_COLOR}">budget '
                     f'{escape(format_metric(metric, budget))}: every plan drawn fits</text>')
    for x, anchor in ((x_lo, "start"), (x_hi, "end")):  # the ends of the axis, inside the picture
        px, _ = at(x, 10**y_lo)
        parts.append(f'<text x="{px}" y="{HEIGHT - BOTTOM + 16}" text-anchor="{anchor}">'
                     f'{escape(format_metric(metric, x))}</text>')
    for y in _log_ticks(y_lo, y_hi):
        _, py = at(x_lo, 10**y)
        parts.append(f'<line x1="{LEFT - 4}" y1="{py}" x2="{LEFT}" y2="{py}" stroke="black"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{py + 4}" text-anchor="end">{10**y:.3g}</text>')
    parts.append(f'<text x="{(LEFT + WIDTH - RIGHT) / 2}" y="{HEIGHT - 12}" text-anchor="middle">{escape(metric)}</text>')
    parts.append(f'<text x="16" y="{(TOP + HEIGHT - BOTTOM) / 2}" transform="rotate(-90 16 {(TOP + HEIGHT - BOTTOM) / 2})" '
                 'text-anchor="middle">total sensitivity (log)</text>')
    if title:
        parts.append(f'<text x="{LEFT}" y="{TOP - 20}">{escape(title)}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _label(px: float, py: float, text: str, style: str) -> str:
    """Text beside a mark, on the side with room for it (left of marks in the right half)."""
    right_half = px > (LEFT + WIDTH - RIGHT) / 2
    x, anchor = (px - 8, "end") if right_half else (px + 8, "start")
    return f'<text x="{x}" y="{py}" text-anchor="{anchor}" {style}>{escape(text)}</text>'


def _log_ticks(y_lo: float, y_hi: float) -> list[float]:
    """The axis ends and the powers of ten between them that do not crowd an end (log10 values)."""
    inner = [float(k) for k in range(math.ceil(y_lo), math.floor(y_hi) + 1)
             if min(k - y_lo, y_hi - k) > 0.12 * ((y_hi - y_lo) or 1.0)]
    return [y_lo, *inner, y_hi] if y_hi > y_lo else [y_lo]
