"""The report's drift page, ``drift.html``: what moved between the previous reclustering tick and this run.

It shows, for the report's head: how many images kept their cluster, the largest flows (cluster a at
the previous tick -> cluster b now, with counts and shares), a heat map of where each cluster's images
went (K <= 60), the clusters that appeared and vanished, the largest size changes, and the per-head
summary that the index also shows. The flows come from ``pipelines.outputs.report_drift``.
"""

from __future__ import annotations

import os
from html import escape
from typing import Any

import numpy as np

from pipelines.outputs.charts import heatmap
from pipelines.outputs.report_data import ReportData
from pipelines.outputs.report_drift import DriftFlows
from pipelines.outputs.report_html import CHARTS_DIR, chart_html, cluster_page, drift_summary_table, fmt_pct, page

_MAX_HEATMAP_K = 60


def _cluster_link(data: ReportData, c: int) -> str:
    v = data.views[c] if 0 <= c < len(data.views) else None
    main = f" <span class=meta>{escape(v.majority[0])}</span>" if v is not None and v.majority is not None else ""
    return f'<a href="clusters/{cluster_page(c)}">{c}</a>{main}'


def _flows_table(data: ReportData, flows: DriftFlows) -> str:
    if not flows.flows:
        return "<p class=meta>No image changed cluster.</p>"
    rows = "".join(f"<tr><td class=l>{_cluster_link(data, f.source)}</td>"
                   f"<td class=l>{_cluster_link(data, f.target)}</td><td>{f.count}</td>"
                   f"<td>{fmt_pct(f.share_of_source)}</td><td>{fmt_pct(f.share_of_compared)}</td></tr>"
                   for f in flows.flows)
    return ("<table><tr><th class=l>from (previous tick)</th><th class=l>to (now)</th><th>images</th>"
            f"<th>share of the from-cluster</th><th>share of all compared</th></tr>{rows}</table>")


def _flow_heatmap(data: ReportData, flows: DriftFlows, out_dir: str) -> str:
    matrix = flows.matrix_KK
    if matrix is None or flows.k > _MAX_HEATMAP_K or not flows.compared:
        return ""
    share = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    ids = [str(c) for c in range(flows.k)]
    tips = [[f"{int(matrix[a, b])} images of cluster {a} ({fmt_pct(share[a, b])}) are in cluster {b} now"
             for b in range(flows.k)] for a in range(flows.k)]
    chart = heatmap(os.path.join(out_dir, CHARTS_DIR, "flows.png"), share, [f"was {c}" for c in ids], ids,
                    "where each cluster's images are now (rows: previous tick, columns: now)",
                    col_links=[f"clusters/{cluster_page(c)}" for c in range(flows.k)], tooltips=tips,
                    colorbar_label="share of the row's images")
    return "<h2>Where each cluster's images went</h2>" + chart_html(chart, out_dir, "flows")


def _appeared_vanished(data: ReportData, row: dict[str, Any]) -> str:
    before, now = row.get("sizes_before", []), row.get("sizes_now", [])

    def table(ids: list[int], what: str) -> str:
        if not ids:
            return f"<p class=meta>No cluster {what}.</p>"
        body = "".join(f"<tr><td class=l>{_cluster_link(data, c)}</td><td>{before[c] if c < len(before) else '?'}</td>"
                       f"<td>{now[c] if c < len(now) else '?'}</td></tr>" for c in ids)
        return f"<table><tr><th class=l>cluster</th><th>images before</th><th>images now</th></tr>{body}</table>"

    return (f"<h2>Appeared ({len(row['appeared'])}): empty at the previous tick, not now</h2>"
            + table(row["appeared"], "appeared")
            + f"<h2>Vanished ({len(row['vanished'])}): not empty at the previous tick, empty now</h2>"
            + table(row["vanished"], "vanished"))


def _size_changes(data: ReportData, row: dict[str, Any]) -> str:
    changes = row.get("largest_changes") or []
    if not changes:
        return ""
    body = "".join(f'<tr><td class=l>{_cluster_link(data, int(c["cluster"]))}</td><td>{c["before"]}</td>'
                   f'<td>{c["now"]}</td><td>{fmt_pct(c["share_before"])}</td><td>{fmt_pct(c["share_now"])}</td></tr>'
                   for c in changes)
    return ("<h2>Largest size changes</h2><table><tr><th class=l>cluster</th><th>before</th><th>now</th>"
            f"<th>share before</th><th>share now</th></tr>{body}</table>")


def render_drift_page(data: ReportData, flows: DriftFlows, out_dir: str) -> str:
    """``drift.html`` for the report's head; a flow heat map goes to ``out_dir/charts/flows.png``."""
    drift = data.drift or {}
    row = next((r for r in drift.get("heads", []) if int(r.get("head", -1)) == flows.head), None)
    parts = ['<nav><a href="index.html">report index</a></nav>',
             f"<h1>What moved from run {escape(flows.previous_run_id)} to run {escape(data.run_id)} "
             f"(head {flows.head}, K = {flows.k})</h1>"]
    if flows.note:
        parts.append(f"<p class=warn>Flows unknown: {escape(flows.note)}.</p>")
    else:
        moved = flows.compared - flows.stayed
        parts.append(f"<p class=meta>{flows.compared} images are labelled in both ticks ({escape(flows.source)}); "
                     f"{flows.stayed} kept their cluster, {moved} ({fmt_pct(moved / max(flows.compared, 1))}) "
                     "moved. Cluster ids are stable across ticks (the tick matched them to the previous tick's), "
                     "so a -> b means: in cluster a before, in cluster b now. Links go to this run's cluster "
                     "pages.</p>")
        parts += [f"<h2>Largest flows ({len(flows.flows)})</h2>", _flows_table(data, flows),
                  _flow_heatmap(data, flows, out_dir)]
    if row is not None:
        parts += [_appeared_vanished(data, row), _size_changes(data, row)]
    parts += ["<h2>Every head</h2>", drift_summary_table(drift)]
    return page(f"drift {data.run_id}", "\n".join(parts))
