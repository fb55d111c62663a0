"""Small PNG line charts for ``docs/benchmarks.md``, drawn with Pillow (no plotting library needed).

    python -m benchmarks.plot_png history OUT.png RUN_DIR[=LABEL] ...   # per-epoch ACC of each run's memory
    python -m benchmarks.plot_png scaling OUT.png benchmarks/results/scaling.json      # also written by scaling
    python -m benchmarks.plot_png methods OUT.png benchmarks/results/methods.json      # test ACC per epoch

``history`` reads ``runs/<id>/train_history.json`` (the training loop's per-epoch metrics) and plots
``clusters/h0/acc`` (ACC of head 0's assignment memory against the manifest labels) per epoch.
``scaling`` plots measured throughput per worker count against ideal linear scaling.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw

Series = tuple[str, Sequence[float], Sequence[float]]
"""(label, xs, ys)."""

_COLORS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (127, 127, 127)]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    step = (hi - lo) / n if hi > lo else 1.0
    return [lo + i * step for i in range(n + 1)]


def line_chart(path: str | Path, series: Sequence[Series], *, title: str, xlabel: str, ylabel: str,
               y_range: tuple[float, float] | None = None, dashed: Sequence[bool] | None = None) -> None:
    """Write a PNG line chart (800 x 500) of ``series`` to ``path``.

    Raises:
        ValueError: No series, or a series whose xs and ys differ in length.
    """
    if not series:
        raise ValueError("line_chart needs at least one series")
    for label, xs, ys in series:
        if len(xs) != len(ys) or not xs:
            raise ValueError(f"series {label!r}: {len(xs)} x values for {len(ys)} y values")
    W, H, left, right, top, bottom = 800, 500, 70, 20, 40, 60
    img = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(img)
    x_lo = min(min(xs) for _, xs, _ in series)
    x_hi = max(max(xs) for _, xs, _ in series)
    y_lo, y_hi = y_range or (min(min(ys) for _, _, ys in series), max(max(ys) for _, _, ys in series))
    if y_hi <= y_lo:
        y_hi = y_lo + 1.0
    if x_hi <= x_lo:
        x_hi = x_lo + 1.0

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo) * (W - left - right),
                H - bottom - (y - y_lo) / (y_hi - y_lo) * (H - top - bottom))

    draw.rectangle([left, top, W - right, H - bottom], outline="black")
    for y in _ticks(y_lo, y_hi):
        _, py = px(x_lo, y)
        draw.line([left, py, W - right, py], fill=(225, 225, 225))
        draw.text((5, py - 6), f"{y:,.0f}" if y_hi >= 100 else f"{y:.3g}", fill="black")
    xs_all = sorted({float(x) for _, xs, _ in series for x in xs})
    x_ticks = xs_all if len(xs_all) <= 12 else _ticks(x_lo, x_hi)
    for x in x_ticks:
        qx, _ = px(x, y_lo)
        draw.text((qx - 8, H - bottom + 6), f"{x:.3g}", fill="black")
    draw.text((W / 2 - 4 * len(title), 12), title, fill="black")
    draw.text((W / 2 - 3 * len(xlabel), H - 25), xlabel, fill="black")
    draw.text((5, top - 20), ylabel, fill="black")
    for i, (label, xs, ys) in enumerate(series):
        color = _COLORS[i % len(_COLORS)]
        points = [px(x, y) for x, y in zip(xs, ys, strict=True)]
        if dashed and dashed[i]:
            for a, b in zip(points[:-1], points[1:], strict=True):
                pieces = max(2, int(((b[0] - a[0]) ** 2 + (b[1] - a[1]) ** 2) ** 0.5 // 8))
                for j in range(0, pieces, 2):  # every other piece of about 8 px
                    t0, t1 = j / pieces, (j + 1) / pieces
                    draw.line([(a[0] + t0 * (b[0] - a[0]), a[1] + t0 * (b[1] - a[1])),
                               (a[0] + t1 * (b[0] - a[0]), a[1] + t1 * (b[1] - a[1]))], fill=color, width=2)
        else:
            draw.line(points, fill=color, width=2)
        for p in points:
            draw.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=color)
        draw.line([left + 15, top + 15 + 18 * i, left + 40, top + 15 + 18 * i], fill=color, width=3)
        draw.text((left + 46, top + 9 + 18 * i), label, fill="black")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def history_series(run_dir: str, label: str, key: str = "clusters/h0/acc") -> Series:
    """Per-epoch ``key`` from ``RUN_DIR/train_history.json``."""
    rows = json.loads(Path(run_dir, "train_history.json").read_text())["epochs"]
    rows = [r for r in rows if key in r]
    return label, [float(r["epoch"]) for r in rows], [float(r[key]) for r in rows]


def scaling_png(out: str | Path, result: dict) -> None:
    """Measured (median) vs ideal linear throughput per worker count, from ``benchmarks.scaling``'s JSON."""
    workers = [int(w) for w in result["config"]["workers"]]
    rows = [result["scaling"][f"W{w}"] for w in workers]
    measured = [float(r["images_per_s"]["median"]) for r in rows]
    ideal = [float(r["ideal_images_per_s"]) for r in rows]
    line_chart(out, [("measured (median)", workers, measured), ("ideal linear", workers, ideal)],
               title="Training throughput vs Ray Train workers (Fashion-MNIST, fashion-mnist-cpu)",
               xlabel="workers", ylabel="images/s", y_range=(0.0, max(ideal + measured) * 1.1),
               dashed=[False, True])


def methods_png(out: str | Path, result: dict) -> None:
    """Test-subset ACC after every epoch of each method's seed-0 run against its training time, and k-means
    (dashed), from ``benchmarks.methods``' JSON."""
    series: list[Series] = []
    for method, runs in result["runs"].items():
        if method == "kmeans" or not runs:
            continue
        run = min(runs, key=lambda r: r["seed"])
        accs = run["per_epoch_acc"]
        xs = [run["train_s"] * (e + 1) / len(accs) for e in range(len(accs))]
        series.append((f"{method} (seed {run['seed']})", xs, accs))
    budget = float(result["config"]["budget_s"])
    kmeans = float(result["summary"]["kmeans"]["acc"]["median"])
    series.append(("k-means on pixels (median)", [0.0, budget], [kmeans, kmeans]))
    line_chart(out, series, title="Fashion-MNIST: test ACC (head 0, K = 10) during training, same time budget",
               xlabel="training seconds (one CPU thread)", ylabel="ACC", y_range=(0.0, 1.0),
               dashed=[False] * (len(series) - 1) + [True])


def main(argv: list[str] | None = None) -> int:
    """Command line: see the module docstring."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) < 3 or args[0] not in ("history", "scaling", "methods"):
        print(__doc__, file=sys.stderr)
        return 2
    kind, out, inputs = args[0], args[1], args[2:]
    if kind == "history":
        series = []
        for spec in inputs:
            run_dir, _, label = spec.partition("=")
            series.append(history_series(run_dir, label or Path(run_dir).name))
        line_chart(out, series, title="SeCu on Fashion-MNIST: ACC of the assignment memory (head K = 10) per epoch",
                   xlabel="epoch", ylabel="ACC", y_range=(0.0, 1.0))
    elif kind == "methods":
        methods_png(out, json.loads(Path(inputs[0]).read_text()))
    else:
        scaling_png(out, json.loads(Path(inputs[0]).read_text()))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
