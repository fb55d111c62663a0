"""The report's HTML: the index page, the cluster table pages and the pages of each cluster.

Every page is a complete HTML document with the stylesheet inline and relative links, so the report
opens from disk or from a bucket without a server or JavaScript. Charts are PNG files under
``charts/`` drawn by ``pipelines.outputs.charts`` (matplotlib); where a chart's marks link to cluster
pages (size bars, heat map cells, the labels on the embedding map) the page carries an HTML image
map built from the pixel boxes the chart returns. The index holds summaries only (metrics per head,
the embedding map, cluster sizes, training curves, drift, the confusion heat map and the cluster
table or its page links), so K = 1000 stays usable. The drift page is
``pipelines.outputs.report_drift_html``'s. What the pages show comes from
``pipelines.outputs.report_data``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from html import escape
from typing import Any

import numpy as np

from pipelines.outputs.charts import Chart, bar_chart, cluster_map, heatmap, line_chart
from pipelines.outputs.evaluation import describe_skipped
from pipelines.outputs.report_data import ClusterView, ReportData
from pipelines.outputs.report_map import MapData
from pipelines.outputs.thumbnails import thumb_name
from secu.methods import DISPLAY_NAMES

_MAX_BARS = 1_000
_MAX_CELL_AREAS = 2_000
CHARTS_DIR = "charts"

CSS = """
.warn { background: #fff3cd; border: 1px solid #e0b000; padding: 8px 12px; border-radius: 4px; }
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1340px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}h3{font-size:14px}
table{border-collapse:collapse;font-size:13px}td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:right}
th{background:#f5f5f5}td.l,th.l{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:6px}.grid figure{margin:0;text-align:center;font-size:11px}
.grid img,td img{image-rendering:pixelated;border:1px solid #ccc;background:#fff}
.missing{display:inline-block;border:1px dashed #c00;color:#c00;font-size:10px}
.meta{color:#555;font-size:13px}nav>*{margin-right:12px}.charts{display:flex;flex-wrap:wrap;gap:12px}
.chart{border:1px solid #eee}
"""


def cluster_page(cluster: int, page: int = 1) -> str:
    """File name of a cluster's page under ``clusters/`` (``page`` > 1: its extra pages of members)."""
    return f"c{cluster:04d}.html" if page <= 1 else f"c{cluster:04d}-{page}.html"


def page(title: str, body: str) -> str:
    """A complete HTML document."""
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def fmt_pct(x: float) -> str:
    """A fraction as a percentage with one decimal."""
    return f"{100 * x:.1f}%"


def chart_html(chart: Chart, out_dir: str, map_name: str) -> str:
    """The ``<img>`` of a chart (path relative to ``out_dir``) and, when it has areas, its image map."""
    src = os.path.relpath(chart.path, out_dir).replace(os.sep, "/")
    use = f' usemap="#{map_name}"' if chart.areas else ""
    img = (f'<img class="chart" src="{escape(src)}" width="{chart.width}" height="{chart.height}" '
           f'alt="{escape(chart.alt)}"{use}>')
    if not chart.areas:
        return img
    areas = "".join(f'<area shape="{a.shape}" coords="{",".join(str(c) for c in a.coords)}" href="{escape(a.href)}" '
                    f'title="{escape(a.title)}" alt="{escape(a.title)}">' for a in chart.areas)
    return f'{img}<map name="{map_name}">{areas}</map>'


def _img(key: str, available: set[str], prefix: str, caption: str = "", px: int = 64) -> str:
    if key not in available:
        return f'<span class="missing" style="width:{px}px;height:{px}px" title="{escape(key)}">missing</span>'
    img = f'<img src="{prefix}thumbs/{escape(thumb_name(key))}" alt="{escape(key)}" title="{escape(key)}" ' \
          f'width="{px}" height="{px}" loading="lazy">'
    return f"<figure>{img}<figcaption>{escape(caption)}</figcaption></figure>" if caption else img


def _main_class(v: ClusterView) -> str:
    major = v.majority
    return "" if major is None else f"{major[0]} ({fmt_pct(major[1])})"


def _cluster_rows(views: list[ClusterView], keys: list[str], available: set[str], n: int, prefix: str,
                  labelled: bool) -> str:
    head = ("<tr><th>cluster</th><th>size</th><th>share</th><th>mean conf</th><th>mean sim</th>"
            + ("<th class=l>main class</th><th class=l>next classes</th>" if labelled else "")
            + "<th class=l>most confident</th></tr>")
    rows = []
    for v in views:
        thumbs = "".join(_img(keys[i], available, prefix, px=32) for i in v.top[:4])
        mix = ", ".join(f"{escape(c)} {fmt_pct(cnt / max(v.size, 1))}" for c, cnt in v.label_counts[1:3])
        link = f'{"" if prefix == "../" else "clusters/"}{cluster_page(v.cluster)}'
        rows.append(f'<tr><td><a href="{link}">{v.cluster}</a></td><td>{v.size}</td>'
                    f"<td>{fmt_pct(v.size / max(n, 1))}</td><td>{v.mean_confidence:.3f}</td>"
                    f"<td>{v.mean_similarity:.3f}</td>"
                    + (f"<td class=l><b>{escape(_main_class(v))}</b></td><td class=l>{mix}</td>" if labelled else "")
                    + f"<td class=l>{thumbs}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _curves(history: list[dict[str, Any]], head: int, out_dir: str) -> str:
    if not history:
        return "<p class=meta>No training history (train_history.json) for this run.</p>"

    def series(key: str) -> list[tuple[float, float | None]]:
        return [(float(e["epoch"]), e.get(key)) for e in history if "epoch" in e]

    charts = os.path.join(out_dir, CHARTS_DIR)
    # Every loss term the method logs (SeCu: loss, loss_center, loss_repr; ProPos: loss_psa, loss_psl; ...).
    terms = sorted({k for e in history for k in e if k.startswith("train/loss")}, key=lambda k: (k != "train/loss", k))
    losses: dict[str, Sequence[tuple[float, float | None]]] = {k.split("/")[-1]: series(k) for k in terms}
    losses["self-labeling"] = series("self_label/loss")
    out = [line_chart(os.path.join(charts, "loss.png"), losses, "training loss", y_label="loss"),
           # Both high after the warm-up: the size-constraint duals cycle (train_loop.warn_if_duals_cycle).
           line_chart(os.path.join(charts, "changed.png"),
                      {f"h{head} changed": series(f"clusters/h{head}/changed_frac"),
                       f"h{head} batch share": series(f"clusters/h{head}/largest_batch_share"),
                       "confident (self-labeling)": series("self_label/confident_frac")},
                      "images that changed cluster; largest batch share", y_label="fraction")]
    if any(f"clusters/h{head}/acc" in e for e in history):
        out.append(line_chart(os.path.join(charts, "scores.png"),
                              {m.upper(): series(f"clusters/h{head}/{m}") for m in ("acc", "nmi", "ari")},
                              f"head {head} against labels (training memory)", y_label="score"))
    return '<div class="charts">' + "".join(chart_html(c, out_dir, f"curve{i}") for i, c in enumerate(out)) + "</div>"


def drift_summary_table(drift: dict[str, Any]) -> str:
    """Per head: images compared, share that changed cluster, appeared/vanished clusters, size change."""
    images = drift.get("images", {})
    parts = [f"<p class=meta>Compared with run <b>{escape(str(drift['previous_run_id']))}</b> on "
             f"{escape(str(drift.get('source', '')))} labels: {images.get('common', 0)} images in both runs, "
             f"{images.get('only_current', 0)} new. Cluster ids are the previous run's (matched by the "
             "Hungarian algorithm on the cosine similarity of the centers, or on the overlap of the two runs' labels "
             "for a method without centers).</p>",
             "<table><tr><th>head</th><th>K</th><th>compared</th><th>changed cluster</th><th>appeared</th>"
             "<th>vanished</th><th>size TV distance</th><th>center match (mean cos)</th></tr>"]
    for row in drift.get("heads", []):
        changed = row.get("changed_frac")
        match = row.get("match", {})
        parts.append(
            f"<tr><td>{row['head']}</td><td>{row['k']}</td><td>{row['compared']}</td>"
            f"<td>{'n/a' if changed is None else fmt_pct(changed)}</td>"
            f"<td class=l>{escape(', '.join(map(str, row['appeared'][:20])) or '-')}</td>"
            f"<td class=l>{escape(', '.join(map(str, row['vanished'][:20])) or '-')}</td>"
            f"<td>{row['size_tv']:.3f}</td><td>{match.get('mean_similarity', float('nan')):.3f}</td></tr>")
    parts.append("</table>")
    return "".join(parts)


def _drift_section(drift: dict[str, Any]) -> str:
    if not drift.get("previous_run_id"):
        return f"<p class=meta>{escape(str(drift.get('note', 'no previous tick')))}.</p>"
    return (drift_summary_table(drift) + '<p><a href="drift.html">What moved between the ticks</a>: the largest '
            "flows of images from one cluster to another, the clusters that appeared and vanished.</p>")


def _skipped_line(evaluation: dict[str, Any]) -> str:
    """The images each stage left out as bad input (metrics files from before the count have none)."""
    skipped = evaluation.get("skipped")
    if not skipped:
        return ""
    total = sum(int((skipped.get(stage) or {}).get("count", 0)) for stage in ("ingest", "training", "inference"))
    style = " style='color:#b00'" if total else ""
    return f"<p class=meta{style}>{escape(describe_skipped(skipped))}.</p>"


def _metrics_table(evaluation: dict[str, Any]) -> str:
    labelled = bool(evaluation["protocol"]["labelled_rows"])
    cols = [("k", "K", "{:.0f}")] + ([("acc", "ACC", "{:.4f}"), ("nmi", "NMI", "{:.4f}"), ("ari", "ARI", "{:.4f}")]
                                     if labelled else []) + [
        ("min_size_frac", "min size", "{:.4f}"), ("max_size_frac", "max size", "{:.4f}"),
        ("empty", "empty", "{:.0f}"), ("entropy_norm", "H / log K", "{:.3f}"),
        ("mean_confidence", "mean conf", "{:.3f}"), ("mean_similarity", "mean sim", "{:.3f}")]
    head = "<tr><th>head</th>" + "".join(f"<th>{label}</th>" for _, label, _ in cols) + "</tr>"
    rows = "".join("<tr><td>" + str(r["head"]) + "</td>" + "".join(f"<td>{fmt.format(r[key])}</td>"
                                                                  for key, _, fmt in cols) + "</tr>"
                   for r in evaluation["heads"])
    return f"<table>{head}{rows}</table>"


def _confusion(data: ReportData, out_dir: str) -> str:
    """The confusion heat map (classes x clusters, clusters grouped by their main class), cells linked."""
    assert data.table_CK is not None
    table_CK, class_names, sizes_K = data.table_CK, data.class_names, data.sizes_K
    classes, _ = table_CK.shape
    majority = table_CK.argmax(axis=0)
    order = np.lexsort((-sizes_K, majority, sizes_K == 0))  # by main class, larger first, empty clusters last
    frac = table_CK[:, order] / np.maximum(sizes_K[order], 1)[None, :]
    tooltips = None
    if classes * order.size <= _MAX_CELL_AREAS:  # one linked cell each; larger tables link whole columns
        tooltips = [[f"cluster {int(c)}: {int(table_CK[i, c])} of {class_names[i]} ({fmt_pct(frac[i, j])})"
                     for j, c in enumerate(order)] for i in range(classes)]
    chart = heatmap(os.path.join(out_dir, CHARTS_DIR, "confusion.png"), frac, class_names,
                    [str(int(c)) for c in order], "share of each cluster's images per class",
                    col_links=[f"clusters/{cluster_page(int(c))}" for c in order], tooltips=tooltips,
                    max_cell_areas=_MAX_CELL_AREAS)
    names = "" if classes <= 60 else " Rows: classes " + ", ".join(
        f"{i}: {escape(n)}" for i, n in enumerate(class_names[:100])) + (" ..." if classes > 100 else "") + "."
    return (f"<p class=meta>Columns: clusters, grouped by their main class (larger first); rows: classes; "
            f"white = 0, dark blue = 1. Point at a cell for its count; click for the cluster.{names}</p>"
            + chart_html(chart, out_dir, "confusion"))


def _size_bars(data: ReportData, out_dir: str) -> str:
    sizes_K, k, n = data.sizes_K, data.k, data.n
    order = np.argsort(-sizes_K, kind="stable")
    path = os.path.join(out_dir, CHARTS_DIR, "sizes.png")
    if k <= _MAX_BARS:
        chart = bar_chart(path, [float(sizes_K[c]) for c in order], [f"cluster {int(c)}" for c in order],
                          "images per cluster, largest first",
                          links=[f"clusters/{cluster_page(int(c))}" for c in order], reference=n / k,
                          reference_label="uniform N/K")
    else:
        ranks = np.linspace(0, k - 1, _MAX_BARS).round().astype(int)  # the sorted sizes at evenly spaced ranks
        chart = bar_chart(path, [float(sizes_K[order[r]]) for r in ranks],
                          [f"rank {r} (cluster {int(order[r])})" for r in ranks],
                          f"images per cluster, largest first ({_MAX_BARS} of {k} ranks shown)",
                          reference=n / k, reference_label="uniform N/K")
    hint = " Click a bar for its cluster." if chart.areas else ""
    return chart_html(chart, out_dir, "sizes") + (f"<p class=meta>{hint.strip()}</p>" if hint else "")


def _map_section(data: ReportData, m: MapData, out_dir: str) -> str:
    if m.note:
        return f"<p class=meta>No map: {escape(m.note)}.</p>"
    clusters = data.pred[m.rows]
    k = data.k

    def label(v: ClusterView) -> str:
        major = v.majority
        named = major is not None and data.named_classes and k <= 20  # a name says more than a class number
        return f"{v.cluster} {major[0]}" if major is not None and named else str(v.cluster)

    def tooltip(v: ClusterView) -> str:
        main = f", {fmt_pct(v.majority[1])} {v.majority[0]}" if v.majority is not None else ""
        return f"cluster {v.cluster}: {v.size} images{main}"

    chart = cluster_map(os.path.join(out_dir, CHARTS_DIR, "map.png"), m.xy_N2, clusters, k,
                        f"{m.layout} of {m.rows.size} images' embeddings, coloured by cluster of head {data.head}",
                        labels=[label(v) for v in data.views],
                        links=[f"clusters/{cluster_page(v.cluster)}" for v in data.views],
                        tooltips=[tooltip(v) for v in data.views])
    how = ("t-SNE keeps neighbourhoods: nearby points are similar images, but distances between islands and "
           "island sizes mean little" if m.layout == "t-SNE" else
           "PCA: the two directions of largest variance of the embeddings")
    return (f"<p class=meta>{m.rows.size} images sampled by cluster (in proportion to its size, but every cluster "
            f"is on the map). Embeddings: "
            f"{escape(m.source)}; {how}. Each cluster's label sits at the median of its points: click it for the "
            f"cluster's page. Built in {m.seconds:.1f} s.</p>" + chart_html(chart, out_dir, "embedding-map"))


def render_index(data: ReportData, page_size: int, out_dir: str, embedding_map: MapData) -> str:
    """``index.html``: run and protocol, metrics, map, sizes, curves, drift, confusion, the cluster table or pages.

    The charts are written under ``out_dir/charts/``.
    """
    sizes_K, table_CK = data.sizes_K, data.table_CK
    m, p = data.marker, data.evaluation["protocol"]
    title = DISPLAY_NAMES.get(str(m.get("method", "secu")), str(m.get("method")))
    parts = [f"<h1>{escape(title)} clusters of run {escape(data.run_id)}</h1>",
             f'<p class=meta>output <b>{escape(data.name)}</b>: {data.n} images of dataset '
             f'<b>{escape(str(m["dataset"]))}</b> (splits {escape(", ".join(p["splits"]) or "unknown")}; trained on '
             f'{escape(str(m.get("train_dataset")))}), checkpoint <code>{escape(str(m["checkpoint"]))}</code> '
             f'(epoch {m["checkpoint_epoch"]}), published {escape(str(m.get("published", "")))}. '
             f"{escape(p['note'][:1].upper() + p['note'][1:])}. Assignment: {escape(p['assignment'])}.</p>",
             *[f"<p class=warn><b>Warning:</b> {escape(w)}</p>" for w in data.evaluation.get("warnings", [])],
             "<h2>Metrics per head</h2>", _metrics_table(data.evaluation),
             f"<p class=meta>{escape(p['metrics'])}; {p['labelled_rows']} labelled images.</p>",
             _skipped_line(data.evaluation),
             f"<h2>Map of the embeddings (head {data.head})</h2>", _map_section(data, embedding_map, out_dir),
             f"<h2>Cluster sizes (head {data.head}, K = {data.k})</h2>", _size_bars(data, out_dir),
             "<h2>Training</h2>", _curves(data.history, data.head, out_dir)]
    if data.drift is not None:
        parts += ["<h2>Drift since the previous reclustering tick</h2>", _drift_section(data.drift)]
    if table_CK is not None:
        parts += ["<h2>Confusion (classes x clusters)</h2>", _confusion(data, out_dir)]
    parts.append(f"<h2>Clusters of head {data.head}</h2>")
    if data.k <= page_size:
        parts.append(_cluster_rows(data.views, data.keys, data.available, data.n, "", data.labelled))
    else:
        pages = (data.k + page_size - 1) // page_size
        links = " ".join(f'<a href="clusters/page-{i + 1:03d}.html">{i * page_size}-'
                         f'{min((i + 1) * page_size, data.k) - 1}</a>' for i in range(pages))
        largest = [data.views[int(c)] for c in np.argsort(-sizes_K, kind="stable")[:10]]
        parts += [f"<p>Table pages ({page_size} clusters each): {links}</p>", "<h3>Largest clusters</h3>",
                  _cluster_rows(largest, data.keys, data.available, data.n, "", data.labelled)]
    return page(f"{title} report {data.run_id}", "\n".join(parts))


def render_table_page(data: ReportData, chunk: list[ClusterView], number: int, pages: int) -> str:
    """``clusters/page-NNN.html``: the cluster table rows of ``chunk`` (page ``number`` of ``pages``, from 0)."""
    nav = ['<a href="../index.html">report index</a>']
    if number > 0:
        nav.append(f'<a href="page-{number:03d}.html">previous page</a>')
    if number + 1 < pages:
        nav.append(f'<a href="page-{number + 2:03d}.html">next page</a>')
    body = (f"<nav>{''.join(nav)}</nav><h1>Clusters {chunk[0].cluster}-{chunk[-1].cluster} of {data.k} "
            f"(run {escape(data.run_id)}, head {data.head})</h1>"
            + _cluster_rows(chunk, data.keys, data.available, data.n, "../", data.labelled))
    return page(f"clusters page {number + 1}", body)


def _grid(data: ReportData, rows: list[int]) -> str:
    if not rows:
        return "<p class=meta>none</p>"
    cells = (_img(data.keys[i], data.available, "../", caption=f"{float(data.conf[i]):.3f}", px=60) for i in rows)
    return '<div class="grid">' + "".join(cells) + "</div>"


def _cluster_nav(data: ReportData, v: ClusterView, current: int) -> str:
    nav = ['<a href="../index.html">report index</a>']
    if v.cluster > 0:
        nav.append(f'<a href="{cluster_page(v.cluster - 1)}">cluster {v.cluster - 1}</a>')
    if v.cluster + 1 < data.k:
        nav.append(f'<a href="{cluster_page(v.cluster + 1)}">cluster {v.cluster + 1}</a>')
    if v.more:
        pages = [("first page" if p == 1 else f"page {p}", p) for p in range(1, len(v.more) + 2)]
        nav += [f"<b>{name}</b>" if p == current else f'<a href="{cluster_page(v.cluster, p)}">{name}</a>'
                for name, p in pages]
    return f"<nav>{''.join(nav)}</nav>"


def _title(data: ReportData, v: ClusterView) -> str:
    main = f": {escape(_main_class(v))}" if v.majority is not None else ""
    return f"Cluster {v.cluster} of head {data.head}{main} (run {escape(data.run_id)})"


def render_cluster_page(data: ReportData, v: ClusterView) -> str:
    """``clusters/cNNNN.html``: size, scores, label mix, most confident, least confident and random members."""
    mix = ""
    if v.label_counts:
        mix = "<h2>Classes in this cluster</h2><table><tr><th class=l>class</th><th>images</th><th>share</th></tr>" + \
              "".join(f"<tr><td class=l>{escape(c)}</td><td>{cnt}</td><td>{fmt_pct(cnt / max(v.size, 1))}</td></tr>"
                      for c, cnt in v.label_counts) + "</table>"
    more = ""
    if v.more:
        links = ", ".join(f'<a href="{cluster_page(v.cluster, p + 2)}">page {p + 2}</a> ({len(rows)} images)'
                          for p, rows in enumerate(v.more))
        more = f"<h2>More random members</h2><p>{links}</p>"
    shown = len(v.shown)
    body = (f"{_cluster_nav(data, v, 1)}<h1>{_title(data, v)}</h1>"
            f"<p class=meta>{v.size} images ({fmt_pct(v.size / max(data.n, 1))} of {data.n}); mean confidence "
            f"{v.mean_confidence:.3f}, mean cosine similarity {v.mean_similarity:.3f}; its pages show {shown} of its "
            f"images. Captions: confidence (softmax probability of this cluster).</p>{mix}"
            f"<h2>Most confident ({len(v.top)})</h2>{_grid(data, v.top)}"
            f"<h2>Least confident: the borderline members ({len(v.borderline)})</h2>"
            f"<p class=meta>Least confident first: where the cluster blurs into its neighbours.</p>"
            f"{_grid(data, v.borderline)}"
            f"<h2>Random members ({len(v.random)})</h2>{_grid(data, v.random)}{more}")
    return page(f"cluster {v.cluster}", body)


def render_member_page(data: ReportData, v: ClusterView, number: int) -> str:
    """``clusters/cNNNN-P.html``: extra page ``number`` (from 2) of a cluster's random members."""
    rows = v.more[number - 2]
    body = (f"{_cluster_nav(data, v, number)}<h1>{_title(data, v)}</h1>"
            f"<p class=meta>Page {number} of {len(v.more) + 1}: {len(rows)} more random members of its {v.size} "
            "images (none shown on another page), most confident first. Captions: confidence.</p>"
            f"{_grid(data, rows)}")
    return page(f"cluster {v.cluster}, page {number}", body)
