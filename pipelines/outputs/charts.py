"""PNG charts drawn with matplotlib (Agg), with the pixel boxes of what a page should link.

Why matplotlib: the hand-written SVG and Pillow charts this replaces got the details wrong that a
plotting library has long solved (tick values such as 7.8 / 15.6 / 23.4 instead of 5 / 10 / 15, a
heat map title cut off at the figure edge, legends over the data), and every new chart meant more of
that code. matplotlib is the most widely kept Python plotting library, renders headless through Agg
without a display or a browser, and writes a plain PNG, so the report stays a static folder.

Each function writes one PNG and returns a ``Chart``: the file, its display size in CSS pixels, and
``areas``, the rectangles or circles (in CSS pixels from the top left of the image) of the marks that
link somewhere (a bar, a heat map cell, a cluster label on the map), read from matplotlib's own
transforms after drawing. The page turns them into an HTML image map, so links and tooltips work from
disk without JavaScript. Figures are created with ``matplotlib.figure.Figure`` and an Agg canvas, not
``pyplot``: no global state, no backend selection, safe in a worker thread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib import patheffects
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import hsv_to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

Point = tuple[float, float | None]
"""(x, y); a y of None or NaN is skipped."""

SCALE = 2
"""Device pixels per CSS pixel: charts stay sharp on high-density screens."""


@dataclass
class Area:
    """A region of a chart that links to a page."""

    shape: str
    """``rect`` (coords: left, top, right, bottom) or ``circle`` (coords: x, y, radius)."""
    coords: tuple[int, ...]
    """CSS pixels from the image's top left corner."""
    href: str
    title: str
    """Tooltip text."""


@dataclass
class Chart:
    """One chart written as a PNG file."""

    path: str
    """Where the PNG was written."""
    width: int
    """Display width in CSS pixels (the PNG is ``SCALE`` times larger)."""
    height: int
    alt: str
    areas: list[Area] = field(default_factory=list)
    x_ticks: list[float] = field(default_factory=list)
    """Tick values shown on the x axis (within its limits)."""
    y_ticks: list[float] = field(default_factory=list)
    y_limits: tuple[float, float] = (0.0, 1.0)


def _figure(width: int, height: int, scale: int) -> tuple[Figure, FigureCanvasAgg]:
    fig = Figure(figsize=(width / 100, height / 100), dpi=100 * scale, layout="constrained")
    return fig, FigureCanvasAgg(fig)


def _save(fig: Figure, canvas: FigureCanvasAgg, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    canvas.print_png(str(path))


def _visible_ticks(values: np.ndarray, limits: tuple[float, float]) -> list[float]:
    lo, hi = min(limits), max(limits)
    return [float(v) for v in values if lo - 1e-9 * abs(hi - lo) <= v <= hi + 1e-9 * abs(hi - lo)]


def _css_box(bbox: object, height: int, scale: int, pad: int = 0) -> tuple[int, int, int, int]:
    """A display-space bounding box (origin bottom left, device pixels) as CSS left, top, right, bottom."""
    x0, y0, x1, y1 = (float(v) / scale for v in bbox.extents)  # type: ignore[attr-defined]
    return (max(0, math.floor(x0) - pad), max(0, math.floor(height - y1) - pad), math.ceil(x1) + pad,
            math.ceil(height - y0) + pad)


def finite(points: Sequence[Point]) -> list[tuple[float, float]]:
    """The points with a finite y."""
    return [(float(x), float(y)) for x, y in points if y is not None and math.isfinite(float(y))]


def line_chart(path: str | Path, series: dict[str, Sequence[Point]], title: str, *, x_label: str = "epoch",
               y_label: str = "", y_range: tuple[float, float] | None = None, dashed: Sequence[str] = (),
               integer_x: bool = True, width: int = 520, height: int = 280, scale: int = SCALE) -> Chart:
    """Lines of (x, y) points, one colour per series, with nice ticks, grid and legend.

    Args:
        path: The PNG to write.
        series: Name -> points; series without a finite point are left out ("no data" when none is left).
        title: Shown above the plot.
        x_label: Label of the x axis.
        y_label: Label of the y axis.
        y_range: Fixed y limits; automatic when None (a flat series gets a range around its value).
        dashed: Names of the series drawn dashed (references such as "ideal linear").
        integer_x: Ticks at whole numbers only (epochs, worker counts).
        width: Display width in CSS pixels.
        height: Display height in CSS pixels.
        scale: Device pixels per CSS pixel of the PNG.
    """
    fig, canvas = _figure(width, height, scale)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10, wrap=True)
    clean = {name: pts for name, pts in ((n, finite(p)) for n, p in series.items()) if pts}
    if not clean:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", color="#666", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    for name, pts in clean.items():
        xs, ys = zip(*pts, strict=True)
        ax.plot(xs, ys, label=name, linewidth=1.8, linestyle="--" if name in dashed else "-",
                marker="o" if len(pts) <= 60 else None, markersize=3)
    if clean:
        ax.set_xlabel(x_label, fontsize=9)
        ax.set_ylabel(y_label, fontsize=9)
        ax.grid(True, color="#e5e5e5")
        ax.xaxis.set_major_locator(MaxNLocator(nbins=8, steps=[1, 2, 5, 10], integer=integer_x))
        if y_range is not None:
            ax.set_ylim(*y_range)
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=8, loc="best", frameon=True, framealpha=0.85)
    canvas.draw()
    chart = Chart(str(path), width, height, title, x_ticks=_visible_ticks(ax.get_xticks(), ax.get_xlim()),
                  y_ticks=_visible_ticks(ax.get_yticks(), ax.get_ylim()),
                  y_limits=(float(ax.get_ylim()[0]), float(ax.get_ylim()[1])))
    _save(fig, canvas, path)
    return chart


def bar_chart(path: str | Path, values: Sequence[float], labels: Sequence[str], title: str, *,
              links: Sequence[str] | None = None, reference: float | None = None, reference_label: str = "",
              y_label: str = "images", width: int = 900, height: int = 260, scale: int = SCALE,
              max_links: int = 300) -> Chart:
    """Vertical bars left to right; with ``links`` (and at most ``max_links`` bars) each bar is an area."""
    fig, canvas = _figure(width, height, scale)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10, wrap=True)
    xs = np.arange(len(values))
    bars = ax.bar(xs, values, width=0.85 if len(values) <= 200 else 1.0, color="#1f77b4")
    if reference is not None:
        ax.axhline(reference, color="#d62728", linestyle="--", linewidth=1.2, label=reference_label)
        ax.legend(fontsize=8, loc="upper right")
    if len(values) <= 40:
        ax.set_xticks(xs, list(labels), fontsize=7, rotation=60 if len(values) > 15 else 0)
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{len(values)} bars", fontsize=8)
    ax.set_xlim(-0.6, len(values) - 0.4)
    ax.set_ylabel(y_label, fontsize=9)
    ax.yaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(True, axis="y", color="#e5e5e5")
    ax.set_axisbelow(True)
    canvas.draw()
    areas = []
    if links is not None and len(values) <= max_links:
        renderer = canvas.get_renderer()
        for bar, label, value, href in zip(bars, labels, values, links, strict=True):
            left, top, right, bottom = _css_box(bar.get_window_extent(renderer), height, scale)
            plot_top = _css_box(ax.get_window_extent(renderer), height, scale)[1]
            # The whole column above a bar links too: a tiny bar stays clickable.
            areas.append(Area("rect", (left, plot_top, max(right, left + 1), bottom), href,
                              f"{label}: {value:,.0f}"))
    chart = Chart(str(path), width, height, title, areas, y_ticks=_visible_ticks(ax.get_yticks(), ax.get_ylim()))
    _save(fig, canvas, path)
    return chart


def heatmap(path: str | Path, values_RC: np.ndarray, row_labels: Sequence[str], col_labels: Sequence[str],
            title: str, *, col_links: Sequence[str] | None = None, tooltips: Sequence[Sequence[str]] | None = None,
            colorbar_label: str = "share", scale: int = SCALE, max_cell_areas: int = 2_000,
            max_col_areas: int = 1_000) -> Chart:
    """Rows x columns shaded white (0) to dark blue (1), with a colour bar.

    Areas: one per cell (``tooltips[r][c]``, linking to its column) when there are at most
    ``max_cell_areas`` cells, else one per column when there are at most ``max_col_areas`` columns.
    """
    rows, cols = values_RC.shape
    label_w = min(200, 12 + 6 * max((len(s) for s in row_labels), default=1))
    width = int(min(1200, max(560, label_w + 120 + 26 * cols)))
    height = int(min(620, max(220, 110 + 22 * rows + (40 if cols <= 60 else 0))))
    fig, canvas = _figure(width, height, scale)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10, wrap=True)
    image = ax.imshow(values_RC, cmap="Blues", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    bar = fig.colorbar(image, ax=ax, fraction=0.04, pad=0.02)
    bar.set_label(colorbar_label, fontsize=8)
    bar.ax.tick_params(labelsize=7)
    if rows <= 60:
        ax.set_yticks(range(rows), list(row_labels), fontsize=8)
    else:
        ax.set_yticks([])
        ax.set_ylabel(f"{rows} classes", fontsize=8)
    if cols <= 60:
        ax.set_xticks(range(cols), list(col_labels), fontsize=7, rotation=90 if cols > 20 else 0)
    else:
        ax.set_xticks([])
        ax.set_xlabel(f"{cols} clusters", fontsize=8)
    canvas.draw()
    areas: list[Area] = []
    if col_links is not None:
        to_px = ax.transData.transform

        def box(c0: float, r0: float, c1: float, r1: float) -> tuple[int, int, int, int]:
            (x0, y0), (x1, y1) = to_px((c0, r0)) / scale, to_px((c1, r1)) / scale
            return (round(min(x0, x1)), round(height - max(y0, y1)), round(max(x0, x1)), round(height - min(y0, y1)))

        if tooltips is not None and rows * cols <= max_cell_areas:
            areas = [Area("rect", box(c - 0.5, r - 0.5, c + 0.5, r + 0.5), col_links[c], tooltips[r][c])
                     for r in range(rows) for c in range(cols)]
        elif cols <= max_col_areas:
            areas = [Area("rect", box(c - 0.5, -0.5, c + 0.5, rows - 0.5), col_links[c], f"cluster {col_labels[c]}")
                     for c in range(cols)]
    chart = Chart(str(path), width, height, title, areas)
    _save(fig, canvas, path)
    return chart


def cluster_colors(k: int) -> np.ndarray:
    """K x 3 RGB colours: matplotlib's tab10 / tab20 up to 20 clusters, then hues spaced by the golden ratio."""
    if k <= 20:
        from matplotlib import colormaps

        cmap = colormaps["tab10" if k <= 10 else "tab20"]
        return np.asarray([cmap(i)[:3] for i in range(k)])
    hues = (np.arange(k) * 0.6180339887) % 1.0
    sat = 0.55 + 0.35 * ((np.arange(k) // 7) % 2)
    return np.asarray(hsv_to_rgb(np.stack([hues, sat, np.full(k, 0.85)], axis=1)))


def cluster_map(path: str | Path, xy_N2: np.ndarray, clusters_N: np.ndarray, k: int, title: str, *,
                labels: Sequence[str], links: Sequence[str], tooltips: Sequence[str], max_text_labels: int = 60,
                width: int = 900, height: int = 640, scale: int = SCALE) -> Chart:
    """A 2-D scatter of points coloured by cluster, each cluster marked at the median of its points.

    With at most ``max_text_labels`` clusters present the mark is the text ``labels[c]`` (the area is its box);
    with more it is a small ringed dot (the area a circle) and the text is only in the tooltip.
    """
    fig, canvas = _figure(width, height, scale)
    ax = fig.add_subplot()
    ax.set_title(title, fontsize=10, wrap=True)
    colors_K3 = cluster_colors(k)
    ax.scatter(xy_N2[:, 0], xy_N2[:, 1], c=colors_K3[clusters_N], s=6 if len(xy_N2) <= 5000 else 3,
               linewidths=0, alpha=0.75, rasterized=True)
    ax.set_xticks([])
    ax.set_yticks([])
    present = [int(c) for c in np.unique(clusters_N)]
    centers = {c: np.median(xy_N2[clusters_N == c], axis=0) for c in present}
    use_text = len(present) <= max_text_labels
    marks = {}
    halo = [patheffects.withStroke(linewidth=3, foreground="white")]
    for c in present:
        x, y = centers[c]
        if use_text:
            marks[c] = ax.text(x, y, labels[c], fontsize=8, fontweight="bold", ha="center", va="center",
                               color=tuple(np.clip(colors_K3[c] * 0.6, 0, 1)), path_effects=halo)
        else:
            ax.scatter([x], [y], s=18, c=[colors_K3[c]], edgecolors="black", linewidths=0.6)
    canvas.draw()
    renderer = canvas.get_renderer()
    areas = []
    for c in present:
        if use_text:
            areas.append(Area("rect", _css_box(marks[c].get_window_extent(renderer), height, scale, pad=2), links[c],
                              tooltips[c]))
        else:
            px, py = ax.transData.transform(centers[c]) / scale
            areas.append(Area("circle", (round(px), round(height - py), 6), links[c], tooltips[c]))
    chart = Chart(str(path), width, height, title, areas)
    _save(fig, canvas, path)
    return chart
