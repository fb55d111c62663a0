"""The matplotlib charts of the report: nice ticks, nothing cut off at the edges, link areas where the marks are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.outputs.charts import bar_chart, cluster_map, heatmap, line_chart


def _gray(path: str) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("L"), dtype=np.float64)


def test_epoch_axis_gets_round_ticks(tmp_path: Path) -> None:
    # 40 epochs: the hand-drawn charts labelled this axis 7.8 / 15.6 / 23.4.
    chart = line_chart(tmp_path / "acc.png", {"ACC": [(e, 0.2 + 0.01 * e) for e in range(40)]}, "ACC per epoch")
    assert chart.x_ticks and all(t == int(t) and int(t) % 5 == 0 for t in chart.x_ticks), chart.x_ticks
    steps = np.diff(chart.y_ticks)
    assert np.allclose(steps, steps[0]) and any(np.isclose(steps[0], s) for s in (0.05, 0.1, 0.2, 0.25, 0.5))


def test_a_flat_series_sits_inside_its_axis(tmp_path: Path) -> None:
    chart = line_chart(tmp_path / "flat.png", {"ACC": [(e, 1.0) for e in range(5)]}, "ACC 1.0 every epoch")
    lo, hi = chart.y_limits
    assert lo < 1.0 < hi and hi - lo <= 1.5
    empty = line_chart(tmp_path / "empty.png", {"loss": [(0, None), (1, float("nan"))]}, "nothing finite")
    assert Path(empty.path).exists() and not empty.areas


def test_heatmap_title_and_labels_stay_inside_the_image(tmp_path: Path) -> None:
    values = np.random.default_rng(0).uniform(size=(10, 30))
    names = [f"class with a long name {i}" for i in range(10)]
    chart = heatmap(tmp_path / "h.png", values, names, [str(c) for c in range(30)],
                    "share of each cluster's images per class (columns: clusters, grouped by main class)",
                    col_links=[f"c{c}.html" for c in range(30)], tooltips=[[f"{r},{c}" for c in range(30)]
                                                                           for r in range(10)])
    gray = _gray(chart.path)
    # Text cut off at the figure's edge would leave dark pixels in the outermost columns and rows.
    for edge in (gray[:, :2], gray[:, -2:], gray[:2, :], gray[-2:, :]):
        assert edge.min() > 200
    assert len(chart.areas) == 300
    # The area of cell (row 0, column 0) lies left of and above the one of (row 9, column 29).
    first, last = chart.areas[0].coords, chart.areas[-1].coords
    assert first[2] <= last[0] and first[3] <= last[1]
    assert all(0 <= a.coords[0] < a.coords[2] <= chart.width and 0 <= a.coords[1] < a.coords[3] <= chart.height
               for a in chart.areas)


def test_bar_areas_follow_the_bars(tmp_path: Path) -> None:
    chart = bar_chart(tmp_path / "b.png", [50.0, 30.0, 20.0], ["a", "b", "c"], "sizes",
                      links=["a.html", "b.html", "c.html"], reference=33.3, reference_label="uniform")
    lefts = [a.coords[0] for a in chart.areas]
    assert [a.href for a in chart.areas] == ["a.html", "b.html", "c.html"] and lefts == sorted(lefts)
    assert all(t == int(t) for t in chart.y_ticks)


def test_cluster_map_marks_every_cluster(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    k = 100
    clusters = np.repeat(np.arange(k), 5)
    xy = rng.normal(size=(500, 2)) + np.stack([clusters % 10, clusters // 10], axis=1) * 8
    chart = cluster_map(tmp_path / "m.png", xy, clusters, k, "map", labels=[str(c) for c in range(k)],
                        links=[f"c{c}.html" for c in range(k)], tooltips=[f"cluster {c}" for c in range(k)])
    # More than 60 clusters: ringed dots with tooltips instead of text, one circle area each.
    assert len(chart.areas) == k and {a.shape for a in chart.areas} == {"circle"}
    x = np.asarray([a.coords[0] for a in chart.areas])
    assert x[9] > x[0] and np.all((x > 0) & (x < chart.width))  # column 9 of the grid lies right of column 0


def test_map_sample_keeps_every_cluster_and_its_budget() -> None:
    from pipelines.outputs.report_map import sample_rows

    rng = np.random.default_rng(0)
    pred = np.concatenate([np.zeros(9000, np.int64), rng.integers(1, 1000, 51000)])  # one huge, 999 small
    rows = sample_rows(pred, 1000, 2000, seed=0)
    assert np.unique(pred[rows]).size == np.unique(pred).size  # every non-empty cluster is on the map
    assert 2000 <= rows.size <= 3000 and np.unique(rows).size == rows.size
    assert 250 <= int((pred[rows] == 0).sum()) <= 320  # the huge cluster in proportion (15 % of 2000)
    few = sample_rows(np.repeat(np.arange(3), [500, 490, 10]), 3, 100, seed=0)
    assert np.bincount(np.repeat(np.arange(3), [500, 490, 10])[few]).tolist() == [50, 49, 5]
