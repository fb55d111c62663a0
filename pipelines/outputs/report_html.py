"""The report's HTML: the index page, the cluster table pages and one page per cluster.

Every page is a complete HTML document with the stylesheet inline, inline SVG charts
(``pipelines.outputs.svg_charts``) and relative links, so the report opens from disk or from a bucket
without a server or JavaScript. The index holds summaries only (metrics per head, cluster sizes,
training curves, drift, the confusion heat map and the cluster table or its page links), so K = 1000
stays usable. What the pages show comes from ``pipelines.outputs.report_data``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from html import escape
from typing import Any

import numpy as np
from PIL import Image

from pipelines.outputs.report_data import ClusterView, ReportData
from pipelines.outputs.svg_charts import bar_chart, heatmap, line_chart
from pipelines.outputs.thumbnails import thumb_name
from secu.methods import DISPLAY_NAMES

_MAX_SVG_CELLS = 2_000
_MAX_BARS = 1_000

CSS = """
.warn { background: #fff3cd; border: 1px solid #e0b000; padding: 8px 12px; border-radius: 4px; }
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1280px}
h1{font-size:22px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px}td,th{padding:3px 8px;border-bottom:1px solid #eee;text-align:right}
th{background:#f5f5f5}td.l,th.l{text-align:left}
.grid{display:flex;flex-wrap:wrap;gap:8px}.grid figure{margin:0;text-align:center;font-size:11px}
.grid img,td img{image-rendering:pixelated;border:1px solid #ccc;background:#fff}
.missing{display:inline-block;border:1px dashed #c00;color:#c00;font-size:10px}
.meta{color:#555;font-size:13px}nav a{margin-right:12px}.charts{display:flex;flex-wrap:wrap;gap:12px}
"""

def cluster_page(cluster: int) -> str:
    """File name of a cluster's page under ``clusters/``."""
    return f"c{cluster:04d}.html"


def _page(title: str, body: str) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def _img(key: str, available: set[str], prefix: str, caption: str = "", px: int = 64) -> str:
    if key not in available:
        return f'<span class="missing" style="width:{px}px;height:{px}px" title="{escape(key)}">missing</span>'
    img = f'<img src="{prefix}thumbs/{escape(thumb_name(key))}" alt="{escape(key)}" title="{escape(key)}" ' \
          f'width="{px}" height="{px}" loading="lazy">'
    return f"<figure>{img}<figcaption>{escape(caption)}</figcaption></figure>" if caption else img


def _fmt_pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _cluster_rows(views: list[ClusterView], keys: list[str], available: set[str], n: int, prefix: str,
                  labelled: bool) -> str:
    head = ("<tr><th>cluster</th><th>size</th><th>share</th><th>mean conf</th><th>mean sim</th>"
            + ("<th class=l>main classes</th>" if labelled else "") + "<th class=l>most confident</th></tr>")
    rows = []
    for v in views:
        thumbs = "".join(_img(keys[i], available, prefix, px=32) for i in v.top[:4])
        mix = ", ".join(f"{escape(c)} {_fmt_pct(cnt / max(v.size, 1))}" for c, cnt in v.label_counts[:3])
        link = f'{"" if prefix == "../" else "clusters/"}{cluster_page(v.cluster)}'
        rows.append(f'<tr><td><a href="{link}">{v.cluster}</a></td><td>{v.size}</td>'
                    f"<td>{_fmt_pct(v.size / max(n, 1))}</td><td>{v.mean_confidence:.3f}</td>"
                    f"<td>{v.mean_similarity:.3f}</td>" + (f"<td class=l>{mix}</td>" if labelled else "")
                    + f"<td class=l>{thumbs}</td></tr>")
    return f"<table>{head}{''.join(rows)}</table>"

def _curves(history: list[dict[str, Any]], head: int) -> str:
    if not history:
        return "<p class=meta>No training history (train_history.json) for this run.</p>"

    def series(key: str) -> list[tuple[float, float | None]]:
        return [(float(e["epoch"]), e.get(key)) for e in history if "epoch" in e]

    # Every loss term the method logs (SeCu: loss, loss_center, loss_repr; ProPos: loss_psa, loss_psl; ...).
    terms = sorted({k for e in history for k in e if k.startswith("train/loss")}, key=lambda k: (k != "train/loss", k))
    losses: dict[str, Sequence[tuple[float, float | None]]] = {k.split("/")[-1]: series(k) for k in terms}
    losses["self-labeling"] = series("self_label/loss")
    charts = [line_chart(losses, "training loss", y_label="loss"),
              # Both high after the warm-up: the size-constraint duals cycle (train_loop.warn_if_duals_cycle).
              line_chart({f"h{head} changed": series(f"clusters/h{head}/changed_frac"),
                          f"h{head} batch share": series(f"clusters/h{head}/largest_batch_share"),
                          "confident (self-labeling)": series("self_label/confident_frac")},
                         "images that changed cluster; largest batch share", y_label="fraction")]
    if any(f"clusters/h{head}/acc" in e for e in history):
        charts.append(line_chart({m.upper(): series(f"clusters/h{head}/{m}") for m in ("acc", "nmi", "ari")},
                                 f"head {head} against labels (training memory)", y_label="score"))
    return f'<div class="charts">{"".join(charts)}</div>'

def _drift_section(drift: dict[str, Any], head: int) -> str:
    """Per head: images compared, share that changed cluster, appeared/vanished clusters, size change."""
    if not drift.get("previous_run_id"):
        return f"<p class=meta>{escape(str(drift.get('note', 'no previous tick')))}.</p>"
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
            f"<td>{'n/a' if changed is None else _fmt_pct(changed)}</td>"
            f"<td class=l>{escape(', '.join(map(str, row['appeared'][:20])) or '-')}</td>"
            f"<td class=l>{escape(', '.join(map(str, row['vanished'][:20])) or '-')}</td>"
            f"<td>{row['size_tv']:.3f}</td><td>{match.get('mean_similarity', float('nan')):.3f}</td></tr>")
    parts.append("</table>")
    rows = next((r for r in drift.get("heads", []) if r["head"] == head), None)
    if rows and rows.get("largest_changes"):
        parts.append(f"<p class=meta>Largest size changes of head {head}:</p><table><tr><th>cluster</th>"
                     "<th>before</th><th>now</th><th>share before</th><th>share now</th></tr>")
        parts += [f'<tr><td><a href="clusters/{cluster_page(c["cluster"])}">{c["cluster"]}</a></td><td>{c["before"]}'
                  f'</td><td>{c["now"]}</td><td>{_fmt_pct(c["share_before"])}</td><td>{_fmt_pct(c["share_now"])}</td>'
                  "</tr>" for c in rows["largest_changes"]]
        parts.append("</table>")
    return "".join(parts)


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


def _confusion(table_CK: np.ndarray, class_names: list[str], sizes_K: np.ndarray, out_dir: str) -> str:
    """The confusion heat map: inline SVG with tooltips when small, else a PNG file beside the page."""
    classes, k = table_CK.shape
    majority = table_CK.argmax(axis=0)
    # Clusters grouped by their main class, larger first, empty clusters last.
    order = np.lexsort((-sizes_K, majority, sizes_K == 0))
    frac = table_CK[:, order] / np.maximum(sizes_K[order], 1)[None, :]
    title = "share of each cluster's images per class (columns: clusters, grouped by main class)"
    if classes * k <= _MAX_SVG_CELLS:
        tooltips = [[f"cluster {int(c)}: {int(table_CK[i, c])} of {class_names[i]} ({_fmt_pct(frac[i, j])})"
                     for j, c in enumerate(order)] for i in range(classes)]
        return heatmap(frac.tolist(), class_names, [str(int(c)) for c in order], title, tooltips=tooltips,
                       col_links=[f"clusters/{cluster_page(int(c))}" for c in order])
    # Large tables (K = 1000 clusters x 1000 classes) as an image: one pixel block per cell.
    cell_w, cell_h = max(1, min(40, 1200 // k)), max(1, min(28, 400 // classes))
    lo, hi = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])
    rgb = (lo + (hi - lo) * np.clip(frac, 0, 1)[..., None]).round().astype(np.uint8)
    rgb = np.repeat(np.repeat(rgb, cell_h, axis=0), cell_w, axis=1)
    Image.fromarray(rgb, "RGB").save(os.path.join(out_dir, "confusion.png"), optimize=True)
    names = ", ".join(f"{i}: {escape(n)}" for i, n in enumerate(class_names[:100]))
    return (f'<p class=meta>{escape(title)}; white = 0, dark blue = 1. Rows: classes {names}'
            f'{" ..." if classes > 100 else ""}.</p><img src="confusion.png" alt="confusion heat map" '
            f'width="{rgb.shape[1]}" height="{rgb.shape[0]}" style="max-width:100%;height:auto">')


def _size_bars(sizes_K: np.ndarray, n: int) -> str:
    k = sizes_K.size
    order = np.argsort(-sizes_K, kind="stable")
    if k <= _MAX_BARS:
        return bar_chart([float(sizes_K[c]) for c in order], [f"cluster {int(c)}" for c in order],
                         "images per cluster, largest first (click a bar)",
                         links=[f"clusters/{cluster_page(int(c))}" for c in order],
                         reference=n / k, reference_label="uniform N/K")
    ranks = np.linspace(0, k - 1, _MAX_BARS).round().astype(int)  # the sorted sizes at evenly spaced ranks
    return bar_chart([float(sizes_K[order[r]]) for r in ranks], [f"rank {r} (cluster {int(order[r])})" for r in ranks],
                     f"images per cluster, largest first ({_MAX_BARS} of {k} ranks shown)",
                     reference=n / k, reference_label="uniform N/K")

def render_index(data: ReportData, page_size: int, out_dir: str) -> str:
    """``index.html``: run and protocol, metrics, sizes, curves, drift, confusion, the cluster table or its pages.

    A large confusion table is written as ``out_dir/confusion.png`` beside the page.
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
             f"<h2>Cluster sizes (head {data.head}, K = {data.k})</h2>"]
    parts.append(_size_bars(sizes_K, data.n))
    parts += ["<h2>Training</h2>", _curves(data.history, data.head)]
    if data.drift is not None:
        parts += ["<h2>Drift since the previous reclustering tick</h2>", _drift_section(data.drift, data.head)]
    if table_CK is not None:
        parts += ["<h2>Confusion (classes x clusters)</h2>", _confusion(table_CK, data.class_names, sizes_K, out_dir)]
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
    return _page(f"{title} report {data.run_id}", "\n".join(parts))


def render_table_page(data: ReportData, chunk: list[ClusterView], page: int, pages: int) -> str:
    """``clusters/page-NNN.html``: the cluster table rows of ``chunk`` (page ``page`` of ``pages``, from 0)."""
    nav = ['<a href="../index.html">report index</a>']
    if page > 0:
        nav.append(f'<a href="page-{page:03d}.html">previous page</a>')
    if page + 1 < pages:
        nav.append(f'<a href="page-{page + 2:03d}.html">next page</a>')
    body = (f"<nav>{''.join(nav)}</nav><h1>Clusters {chunk[0].cluster}-{chunk[-1].cluster} of {data.k} "
            f"(run {escape(data.run_id)}, head {data.head})</h1>"
            + _cluster_rows(chunk, data.keys, data.available, data.n, "../", data.labelled))
    return _page(f"clusters page {page + 1}", body)


def render_cluster_page(data: ReportData, v: ClusterView) -> str:
    """``clusters/cNNNN.html``: a cluster's size, scores, label mix, most confident and random members."""
    nav = ['<a href="../index.html">report index</a>']
    if v.cluster > 0:
        nav.append(f'<a href="{cluster_page(v.cluster - 1)}">cluster {v.cluster - 1}</a>')
    if v.cluster + 1 < data.k:
        nav.append(f'<a href="{cluster_page(v.cluster + 1)}">cluster {v.cluster + 1}</a>')

    def grid(rows: list[int]) -> str:
        if not rows:
            return "<p class=meta>none</p>"
        cells = (_img(data.keys[i], data.available, "../", caption=f"{float(data.conf[i]):.3f}", px=96) for i in rows)
        return '<div class="grid">' + "".join(cells) + "</div>"

    mix = ""
    if v.label_counts:
        mix = "<h2>Classes in this cluster</h2><table><tr><th class=l>class</th><th>images</th><th>share</th></tr>" + \
              "".join(f"<tr><td class=l>{escape(c)}</td><td>{cnt}</td><td>{_fmt_pct(cnt / max(v.size, 1))}</td></tr>"
                      for c, cnt in v.label_counts) + "</table>"
    body = (f"<nav>{''.join(nav)}</nav><h1>Cluster {v.cluster} of head {data.head} (run {escape(data.run_id)})</h1>"
            f"<p class=meta>{v.size} images ({_fmt_pct(v.size / max(data.n, 1))} of {data.n}); mean confidence "
            f"{v.mean_confidence:.3f}, mean cosine similarity {v.mean_similarity:.3f}. Captions: confidence "
            f"(softmax probability of this cluster).</p>{mix}"
            f"<h2>Most confident ({len(v.top)})</h2>{grid(v.top)}<h2>Random members ({len(v.random)})</h2>"
            f"{grid(v.random)}")
    return _page(f"cluster {v.cluster}", body)
