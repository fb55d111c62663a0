"""Small hand-written SVG charts for the static report (no plotting library needed).

Each function returns one ``<svg>`` element as a string, sized in CSS pixels, with text escaped.
Charts: ``line_chart`` (training curves), ``bar_chart`` (cluster sizes, bars may link to pages),
``heatmap`` (confusion matrix). Missing values (None, NaN) are skipped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape

PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000")
_FONT = 'font-family="system-ui, sans-serif" font-size="11"'


def nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0]
    if hi <= lo:  # a flat series: a range around its value, so the line sits mid-chart (was: [v, 2v])
        half = (abs(lo) or 1.0) / 2
        lo, hi = lo - half, hi + half
    raw = (hi - lo) / max(count, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    start = math.floor(lo / step) * step
    ticks = []
    value = start
    while value <= hi + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < hi:
        ticks.append(round(value, 12))
    return ticks


def _fmt(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 1000 or abs(value) < 0.01:
        return f"{value:.2g}"
    return f"{value:.3g}"


def _finite(points: Sequence[tuple[float, float | None]]) -> list[tuple[float, float]]:
    return [(float(x), float(y)) for x, y in points if y is not None and math.isfinite(float(y))]


def line_chart(series: dict[str, Sequence[tuple[float, float | None]]], title: str, x_label: str = "epoch",
               y_label: str = "", width: int = 520, height: int = 260) -> str:
    """Lines of (x, y) points, one colour per series, with axes, grid and legend."""
    clean = {name: _finite(points) for name, points in series.items()}
    clean = {name: pts for name, pts in clean.items() if pts}
    left, right, top, bottom = 56, 16, 28, 40
    plot_w, plot_h = width - left - right, height - top - bottom
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}" {_FONT}>',
           f'<rect width="{width}" height="{height}" fill="#fff"/>',
           f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13" font-weight="600">{escape(title)}</text>']
    if not clean:
        out.append(f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" fill="#666">no data</text></svg>')
        return "".join(out)
    xs = [x for pts in clean.values() for x, _ in pts]
    ys = [y for pts in clean.values() for _, y in pts]
    x_ticks, y_ticks = nice_ticks(min(xs), max(xs), 6), nice_ticks(min(ys), max(ys), 5)
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]

    def px(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1.0) * plot_w

    def py(y: float) -> float:
        return top + plot_h - (y - y0) / ((y1 - y0) or 1.0) * plot_h

    for t in y_ticks:
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{py(t):.1f}" y2="{py(t):.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{left - 6}" y="{py(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    for t in x_ticks:
        out.append(f'<text x="{px(t):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{_fmt(t)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>')
    out.append(f'<text x="{left + plot_w / 2}" y="{height - 6}" text-anchor="middle">{escape(x_label)}</text>')
    if y_label:
        out.append(f'<text transform="translate(12 {top + plot_h / 2}) rotate(-90)" text-anchor="middle">'
                   f'{escape(y_label)}</text>')
    for i, (name, pts) in enumerate(clean.items()):
        color = PALETTE[i % len(PALETTE)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in pts)
        out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2">'
                   f'<title>{escape(name)}</title></polyline>')
        if len(pts) <= 60:
            out.extend(f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="2.5" fill="{color}">'
                       f'<title>{escape(name)} @ {_fmt(x)}: {_fmt(y)}</title></circle>' for x, y in pts)
        ly = top + 8 + 14 * i
        out.append(f'<line x1="{left + plot_w - 150}" x2="{left + plot_w - 132}" y1="{ly}" y2="{ly}" '
                   f'stroke="{color}" stroke-width="3"/><text x="{left + plot_w - 128}" y="{ly + 4}">'
                   f'{escape(name)}</text>')
    out.append("</svg>")
    return "".join(out)


def bar_chart(values: Sequence[float], labels: Sequence[str], title: str, links: Sequence[str] | None = None,
              reference: float | None = None, reference_label: str = "", width: int = 900,
              height: int = 240) -> str:
    """Vertical bars (one per value, left to right), each with a tooltip and optionally a link."""
    left, right, top, bottom = 56, 16, 28, 30
    plot_w, plot_h = width - left - right, height - top - bottom
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}" {_FONT}>',
           f'<rect width="{width}" height="{height}" fill="#fff"/>',
           f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13" font-weight="600">{escape(title)}</text>']
    top_value = max([*values, reference or 0.0, 1e-12])
    ticks = nice_ticks(0.0, float(top_value), 4)
    scale = plot_h / (ticks[-1] or 1.0)
    for t in ticks:
        y = top + plot_h - t * scale
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="#e5e5e5"/>'
                   f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    n = max(len(values), 1)
    slot = plot_w / n
    gap = 0.15 * slot if slot >= 4 else 0.0
    for i, (value, label) in enumerate(zip(values, labels, strict=True)):
        h = max(float(value) * scale, 0.0)
        bar = (f'<rect x="{left + i * slot + gap / 2:.2f}" y="{top + plot_h - h:.2f}" '
               f'width="{max(slot - gap, 0.5):.2f}" height="{h:.2f}" fill="{PALETTE[0]}">'
               f'<title>{escape(label)}: {_fmt(float(value))}</title></rect>')
        if links is not None:
            bar = f'<a href="{escape(links[i])}">{bar}</a>'
        out.append(bar)
    if reference is not None:
        y = top + plot_h - reference * scale
        out.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" stroke="{PALETTE[1]}" '
                   f'stroke-dasharray="5 3"/><text x="{left + plot_w - 4}" y="{y - 4:.1f}" text-anchor="end" '
                   f'fill="{PALETTE[1]}">{escape(reference_label)}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>')
    if len(labels) <= 40:
        for i, label in enumerate(labels):
            out.append(f'<text x="{left + (i + 0.5) * slot:.1f}" y="{top + plot_h + 14}" text-anchor="middle">'
                       f'{escape(label)}</text>')
    out.append("</svg>")
    return "".join(out)


def _heat(value: float) -> str:
    v = min(max(value, 0.0), 1.0)
    lo, hi = (255, 255, 255), (8, 48, 107)
    r, g, b = (round(a + (c - a) * v) for a, c in zip(lo, hi, strict=True))
    return f"#{r:02x}{g:02x}{b:02x}"


def heatmap(values: Sequence[Sequence[float]], row_labels: Sequence[str], col_labels: Sequence[str], title: str,
            tooltips: Sequence[Sequence[str]] | None = None, col_links: Sequence[str] | None = None,
            max_width: int = 1000) -> str:
    """A rows x columns grid of cells shaded white (0) to dark blue (1)."""
    rows, cols = len(row_labels), len(col_labels)
    label_w = min(160, 8 + 7 * max((len(s) for s in row_labels), default=1))
    cell_w = max(1.0, min(40.0, (max_width - label_w - 10) / max(cols, 1)))
    cell_h = max(8.0, min(28.0, 400 / max(rows, 1)))
    top = 28 + (40 if cols <= 60 else 0)
    width = int(max(label_w + cols * cell_w + 10, 20 + 7 * len(title)))
    height = int(top + rows * cell_h + 10)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}" {_FONT}>',
           f'<rect width="{width}" height="{height}" fill="#fff"/>',
           f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13" font-weight="600">{escape(title)}</text>']
    if cols <= 60:
        for j, label in enumerate(col_labels):
            x = label_w + (j + 0.5) * cell_w
            out.append(f'<text transform="translate({x:.1f} {top - 4}) rotate(-60)">{escape(label)}</text>')
    for i, label in enumerate(row_labels):
        y = top + i * cell_h
        out.append(f'<text x="{label_w - 4}" y="{y + cell_h / 2 + 4:.1f}" text-anchor="end">{escape(label)}</text>')
        for j in range(cols):
            tip = f"<title>{escape(tooltips[i][j])}</title>" if tooltips is not None else ""
            cell = (f'<rect x="{label_w + j * cell_w:.2f}" y="{y:.2f}" width="{cell_w:.2f}" height="{cell_h:.2f}" '
                    f'fill="{_heat(float(values[i][j]))}">{tip}</rect>')
            if col_links is not None and tooltips is not None:
                cell = f'<a href="{escape(col_links[j])}">{cell}</a>'
            out.append(cell)
    out.append(f'<rect x="{label_w}" y="{top}" width="{cols * cell_w:.2f}" height="{rows * cell_h:.2f}" '
               'fill="none" stroke="#999"/></svg>')
    return "".join(out)
