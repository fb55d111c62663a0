"""PNG line charts for ``docs/benchmarks.md``, drawn with matplotlib (``pipelines.outputs.charts``).

    python -m benchmarks.plot_png history OUT.png RUN[=LABEL] ...   # per-epoch ACC of each run's memory
    python -m benchmarks.plot_png scaling OUT.png benchmarks/results/scaling.json      # also written by scaling
    python -m benchmarks.plot_png methods OUT.png benchmarks/results/methods.json      # test ACC per epoch

``history`` reads a run's ``train_history.json`` (RUN: the run directory ``runs/<id>``, or the JSON file
itself, such as ``docs/results/train_history_demo.json``) and plots ``clusters/h0/acc`` (ACC of head 0's
assignment memory against the manifest labels) per epoch. ``scaling`` plots measured throughput per
worker count against ideal linear scaling. The charts in ``docs/img/`` are made by::

    python -m benchmarks.plot_png history docs/img/quality_per_epoch.png \
        "docs/results/train_history_fashion-mnist-cpu-long.json=fashion-mnist-cpu-long (40 epochs)" \
        "docs/results/train_history_demo.json=make demo: fashion-mnist-cpu (12 epochs)"
    python -m benchmarks.plot_png scaling docs/img/scaling.png docs/results/scaling.json
    python -m benchmarks.plot_png methods docs/img/methods_per_epoch.png docs/results/methods.json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from pipelines.outputs.charts import Point
from pipelines.outputs.charts import line_chart as draw_line_chart

Series = tuple[str, Sequence[float], Sequence[float]]
"""(label, xs, ys)."""

WIDTH, HEIGHT = 800, 500
"""Size of the PNGs in pixels."""


def line_chart(path: str | Path, series: Sequence[Series], *, title: str, xlabel: str, ylabel: str,
               y_range: tuple[float, float] | None = None, dashed: Sequence[bool] | None = None,
               integer_x: bool = True) -> None:
    """Write a PNG line chart (``WIDTH`` x ``HEIGHT``) of ``series`` to ``path``.

    Raises:
        ValueError: No series, two series with one label, or a series whose xs and ys differ in length.
    """
    if not series:
        raise ValueError("line_chart needs at least one series")
    for label, xs, ys in series:
        if len(xs) != len(ys) or not xs:
            raise ValueError(f"series {label!r}: {len(xs)} x values for {len(ys)} y values")
    if len({label for label, _, _ in series}) != len(series):
        raise ValueError("line_chart needs a distinct label per series")
    points: dict[str, Sequence[Point]] = {label: list(zip(map(float, xs), map(float, ys), strict=True))
                                          for label, xs, ys in series}
    dashed_names = [label for (label, _, _), d in zip(series, dashed or [False] * len(series), strict=True) if d]
    draw_line_chart(path, points, title, x_label=xlabel, y_label=ylabel, y_range=y_range, dashed=dashed_names,
                    integer_x=integer_x, width=WIDTH, height=HEIGHT, scale=1)


def history_series(run: str, label: str, key: str = "clusters/h0/acc") -> Series:
    """Per-epoch ``key`` from ``RUN/train_history.json`` (``run`` a run directory) or from the JSON file ``run``."""
    path = Path(run) if Path(run).is_file() else Path(run, "train_history.json")
    rows = json.loads(path.read_text())["epochs"]
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
               dashed=[False] * (len(series) - 1) + [True], integer_x=False)


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
            run, _, label = spec.partition("=")
            series.append(history_series(run, label or Path(run).stem))
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
