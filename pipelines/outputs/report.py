"""A static HTML report of a run's clusters: ``runs/<run_id>/report/index.html`` plus pages and thumbnails.

Layout of the report directory (``report`` for the output ``assignments``, ``report-<suffix>`` for
``assignments-<suffix>``)::

    index.html              run, protocol, metrics per head, cluster-size bar chart, training curves,
                            drift since the previous reclustering tick (when the run has drift.json),
                            confusion heat map (with labels), the cluster table (inline when K is small)
    clusters/page-001.html  the cluster table, ``page_size`` clusters per page (K > page_size)
    clusters/c0042.html     one page per cluster: size, scores, label mix, most confident and random images
    thumbs/<key>.png        thumbnails, read from the dataset's shards by key

Everything is plain HTML with inline SVG and relative links: open ``index.html`` from disk, or serve
the directory from a bucket; no server or JavaScript is needed. K = 1000 stays usable: the index
holds summaries only, every cluster has its own small page.

Publishing: the report is rendered into a local temporary directory first. On a local root it then
replaces the old report directory by renames; on S3 every file is uploaded, ``index.html`` last,
and files of an older report that the new one does not have are deleted.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import uuid
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from html import escape
from typing import Any

import numpy as np
from PIL import Image

from pipelines.dataset.info import dataset_dir
from pipelines.outputs.assignments import DEFAULT_NAME, read_assignments, read_marker
from pipelines.outputs.evaluation import evaluate_assignments, labels_for, load_labels
from pipelines.outputs.schema import cluster_column, confidence_column, similarity_column
from pipelines.outputs.svg_charts import bar_chart, heatmap, line_chart
from pipelines.recluster.alignment import DRIFT_FILE
from pipelines.storage import Storage, join
from pipelines.training.metrics_log import HISTORY_FILE
from secu.metrics import contingency

logger = logging.getLogger(__name__)

_MEMBER_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_IMAGE_EXTS = {"png", "jpg", "jpeg", "ppm", "pgm", "pbm", "pnm", "bmp", "webp", "tif", "tiff", "gif"}
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


@dataclass
class ReportOptions:
    """What the report shows."""

    head: int = 0
    """The head whose clusters get pages."""
    top: int = 8
    """Most confident images shown per cluster."""
    random: int = 4
    """Random other members shown per cluster."""
    page_size: int = 100
    """Clusters per table page; the table is inline in index.html when K <= page_size."""
    thumb_px: int = 64
    """Longest side of a thumbnail (small images are enlarged by an integer factor)."""
    seed: int = 0
    """Seed of the random member selection."""
    threads: int = 8
    """Shards read (and files uploaded) in parallel."""

    def __post_init__(self) -> None:
        if self.head < 0 or self.top < 0 or self.random < 0:
            raise ValueError("head, top and random must be >= 0")
        if self.page_size < 1 or self.thumb_px < 8 or self.threads < 1:
            raise ValueError("page_size >= 1, thumb_px >= 8 and threads >= 1 are required")


@dataclass
class ClusterView:
    """What one cluster's page and table row show."""

    cluster: int
    size: int
    mean_confidence: float
    mean_similarity: float
    top: list[int]
    """Row indices (into the assignment table) of the most confident members."""
    random: list[int]
    """Row indices of random other members."""
    label_counts: list[tuple[str, int]] = field(default_factory=list)
    """(class name, count) of the most frequent classes, most frequent first (labelled data only)."""


@dataclass
class ReportResult:
    """Where the report went and what it holds."""

    uri: str
    """Location of index.html."""
    clusters: int
    thumbnails: int
    missing_images: int
    files: int


def report_dir(run_id: str, name: str = DEFAULT_NAME) -> str:
    """The report directory of output ``name``, relative to the storage root."""
    if name == DEFAULT_NAME:
        return join("runs", run_id, "report")
    suffix = name[len(DEFAULT_NAME) + 1:] if name.startswith(DEFAULT_NAME + "-") else name
    return join("runs", run_id, f"report-{suffix}")


def cluster_page(cluster: int) -> str:
    """File name of a cluster's page under ``clusters/``."""
    return f"c{cluster:04d}.html"


def select_members(pred: np.ndarray, confidence: np.ndarray, k: int, top: int, random: int,
                   seed: int) -> list[tuple[list[int], list[int]]]:
    """Per cluster, the row indices of its ``top`` most confident members and of ``random`` others."""
    order = np.lexsort((-confidence, pred))
    bounds = np.searchsorted(pred[order], np.arange(k + 1))
    rng = np.random.default_rng(seed)
    out = []
    for c in range(k):
        members = order[bounds[c]:bounds[c + 1]]
        rest = members[top:]
        picked = rng.choice(rest, size=min(random, rest.size), replace=False) if rest.size else rest
        picked = picked[np.argsort(-confidence[picked], kind="stable")]
        out.append(([int(i) for i in members[:top]], [int(i) for i in picked]))
    return out


def _thumbnail(data: bytes, px: int) -> bytes:
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()
        image: Image.Image = opened
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        w, h = image.size
        if max(w, h) < px:  # tiny images (28 px): enlarge by an integer factor, keep the pixels crisp
            f = max(1, px // max(w, h))
            image = image.resize((w * f, h * f), Image.Resampling.NEAREST)
        else:
            image.thumbnail((px, px), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        image.save(buf, format="PNG", optimize=True)
        return buf.getvalue()


def extract_thumbnails(storage: Storage, shard_rel: str, keys: set[str], out_dir: str, px: int) -> set[str]:
    """Write ``out_dir/<key>.png`` for the image members of ``keys`` in one shard; returns the keys found.

    The tar is streamed once and reading stops when every key was found.
    """
    found: set[str] = set()
    with storage.filesystem.open_input_stream(storage.path(shard_rel)) as stream, \
            tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            match = _MEMBER_RE.match(member.name)
            if not member.isfile() or match is None:
                continue
            key, ext = match.group(1), match.group(2).lower()
            if key not in keys or key in found or ext not in _IMAGE_EXTS:
                continue
            handle = tar.extractfile(member)
            if handle is None:
                continue
            try:
                png = _thumbnail(handle.read(), px)
            except (OSError, ValueError) as err:  # undecodable image: shown as missing on the page
                logger.warning("cannot decode %s in %s: %s", member.name, shard_rel, err)
                continue
            with open(os.path.join(out_dir, _thumb_name(key)), "wb") as out:
                out.write(png)
            found.add(key)
            if found == keys:
                break
    return found


def _thumb_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key) + ".png"


def _page(title: str, body: str, css_depth: int = 0) -> str:
    del css_depth  # the stylesheet is inline on every page
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{escape(title)}</title>"
            f"<style>{CSS}</style></head><body>\n{body}\n</body></html>\n")


def _img(key: str, available: set[str], prefix: str, caption: str = "", px: int = 64) -> str:
    if key not in available:
        return f'<span class="missing" style="width:{px}px;height:{px}px" title="{escape(key)}">missing</span>'
    img = f'<img src="{prefix}thumbs/{escape(_thumb_name(key))}" alt="{escape(key)}" title="{escape(key)}" ' \
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


def _history(storage: Storage, run_id: str) -> list[dict[str, Any]]:
    rel = join("runs", run_id, HISTORY_FILE)
    if not storage.exists(rel):
        return []
    epochs = json.loads(storage.read_bytes(rel).decode("utf-8")).get("epochs", [])
    return sorted((e for e in epochs if isinstance(e, dict)), key=lambda e: float(e.get("epoch", 0)))


def _curves(history: list[dict[str, Any]], head: int) -> str:
    if not history:
        return "<p class=meta>No training history (train_history.json) for this run.</p>"

    def series(key: str) -> list[tuple[float, float | None]]:
        return [(float(e["epoch"]), e.get(key)) for e in history if "epoch" in e]

    losses: dict[str, Sequence[tuple[float, float | None]]] = {
        k.split("/")[-1]: series(k) for k in ("train/loss", "train/loss_center", "train/loss_repr")}
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


def _drift(storage: Storage, run_id: str) -> dict[str, Any] | None:
    rel = join("runs", run_id, DRIFT_FILE)
    if not storage.exists(rel):
        return None
    data: dict[str, Any] = json.loads(storage.read_bytes(rel).decode("utf-8"))
    return data


def _drift_section(drift: dict[str, Any], head: int) -> str:
    """Per head: images compared, share that changed cluster, appeared/vanished clusters, size change."""
    if not drift.get("previous_run_id"):
        return f"<p class=meta>{escape(str(drift.get('note', 'no previous tick')))}.</p>"
    images = drift.get("images", {})
    parts = [f"<p class=meta>Compared with run <b>{escape(str(drift['previous_run_id']))}</b> on "
             f"{escape(str(drift.get('source', '')))} labels: {images.get('common', 0)} images in both runs, "
             f"{images.get('only_current', 0)} new. Cluster ids are the previous run's (centers matched by the "
             "Hungarian algorithm on cosine similarity).</p>",
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


def build_report(storage: Storage, run_id: str, name: str = DEFAULT_NAME,
                 options: ReportOptions | None = None) -> ReportResult:
    """Render and publish the report of output ``name`` of ``run_id``."""
    options = options or ReportOptions()
    marker = read_marker(storage, run_id, name)
    heads, ks = int(marker["num_heads"]), [int(k) for k in marker["ks"]]
    if options.head >= heads:
        raise ValueError(f"--head {options.head}: the run has heads 0..{heads - 1}")
    h, k = options.head, ks[options.head]
    table = read_assignments(storage, run_id, name, columns=[
        "sample_index", "key", "shard", cluster_column(h), confidence_column(h), similarity_column(h)])
    pred = table[cluster_column(h)].to_numpy().astype(np.int64)
    conf = table[confidence_column(h)].to_numpy()
    sim = table[similarity_column(h)].to_numpy()
    keys = [str(x) for x in table["key"].to_pylist()]
    shards = [os.path.basename(str(x)) for x in table["shard"].to_pylist()]
    n = len(keys)
    labels = load_labels(storage, marker["dataset"])
    y_true = labels_for(labels, table["sample_index"].to_numpy())
    labelled = bool((y_true >= 0).any())
    table_CK = contingency(y_true, pred, num_clusters=k) if labelled else None
    classes = table_CK.shape[0] if table_CK is not None else 0
    names = list(labels.names or [])
    class_names = [names[i] if i < len(names) else str(i) for i in range(classes)]
    evaluation = evaluate_assignments(storage, run_id, name)
    history = _history(storage, run_id)

    sizes_K = np.bincount(pred, minlength=k)
    conf_sum = np.bincount(pred, weights=conf, minlength=k)
    sim_sum = np.bincount(pred, weights=sim, minlength=k)
    views = []
    for c, (top, rnd) in enumerate(select_members(pred, conf, k, options.top, options.random, options.seed)):
        size = int(sizes_K[c])
        mix: list[tuple[str, int]] = []
        if table_CK is not None:
            col = table_CK[:, c]
            mix = [(class_names[i], int(col[i])) for i in np.argsort(-col, kind="stable")[:5] if col[i] > 0]
        views.append(ClusterView(c, size, float(conf_sum[c] / max(size, 1)), float(sim_sum[c] / max(size, 1)),
                                 top, rnd, mix))

    with tempfile.TemporaryDirectory(prefix="secu-report-") as tmp:
        os.makedirs(os.path.join(tmp, "thumbs"))
        os.makedirs(os.path.join(tmp, "clusters"))
        wanted: dict[str, set[str]] = defaultdict(set)
        for v in views:
            for i in v.top + v.random:
                wanted[shards[i]].add(keys[i])
        available = _extract_all(storage, str(marker["dataset"]), wanted, os.path.join(tmp, "thumbs"), options)
        total_wanted = sum(len(s) for s in wanted.values())
        ctx = _Context(run_id, name, marker, evaluation, views, keys, conf, available, labelled, n, k, h,
                       _drift(storage, run_id))
        _write(tmp, "index.html", _index_page(ctx, history, table_CK, class_names, sizes_K, options, tmp))
        pages = [views[i:i + options.page_size] for i in range(0, k, options.page_size)]
        if len(pages) > 1:
            for p, chunk in enumerate(pages):
                _write(tmp, f"clusters/page-{p + 1:03d}.html", _table_page(ctx, chunk, p, len(pages)))
        for v in views:
            _write(tmp, f"clusters/{cluster_page(v.cluster)}", _cluster_page(ctx, v))
        files = _publish_dir(storage, tmp, report_dir(run_id, name), options.threads)
    uri = storage.uri(report_dir(run_id, name), "index.html")
    logger.info("report of run %s (%s, head %d, K=%d): %d thumbnails (%d missing) at %s", run_id, name, h, k,
                len(available), total_wanted - len(available), uri)
    return ReportResult(uri=uri, clusters=k, thumbnails=len(available),
                        missing_images=total_wanted - len(available), files=files)


@dataclass
class _Context:
    run_id: str
    name: str
    marker: dict[str, Any]
    evaluation: dict[str, Any]
    views: list[ClusterView]
    keys: list[str]
    conf: np.ndarray
    available: set[str]
    labelled: bool
    n: int
    k: int
    head: int
    drift: dict[str, Any] | None = None
    """``drift.json`` of a reclustering tick (``pipelines.recluster.tick``), when the run has one."""


def _extract_all(storage: Storage, dataset: str, wanted: dict[str, set[str]], out_dir: str,
                 options: ReportOptions) -> set[str]:
    base = join(dataset_dir(dataset), "shards")

    def one(item: tuple[str, set[str]]) -> set[str]:
        shard, keys = item
        try:
            return extract_thumbnails(storage, join(base, shard), keys, out_dir, options.thumb_px)
        except (OSError, tarfile.TarError) as err:  # a missing/corrupt shard: its images show as missing
            logger.warning("cannot read thumbnails from shard %s: %s", storage.uri(base, shard), err)
            return set()

    found: set[str] = set()
    with ThreadPoolExecutor(options.threads) as pool:
        for keys in pool.map(one, sorted(wanted.items())):
            found |= keys
    return found


def _write(root: str, rel: str, text: str) -> None:
    with open(os.path.join(root, rel), "w", encoding="utf-8") as handle:
        handle.write(text)


def _nav(ctx: _Context, prefix: str) -> str:
    return f'<nav><a href="{prefix}index.html">report index</a></nav>'


def _index_page(ctx: _Context, history: list[dict[str, Any]], table_CK: np.ndarray | None,
                class_names: list[str], sizes_K: np.ndarray, options: ReportOptions, out_dir: str) -> str:
    m, p = ctx.marker, ctx.evaluation["protocol"]
    parts = [f"<h1>SeCu clusters of run {escape(ctx.run_id)}</h1>",
             f'<p class=meta>output <b>{escape(ctx.name)}</b>: {ctx.n} images of dataset <b>{escape(str(m["dataset"]))}'
             f'</b> (splits {escape(", ".join(p["splits"]) or "unknown")}; trained on '
             f'{escape(str(m.get("train_dataset")))}), checkpoint <code>{escape(str(m["checkpoint"]))}</code> '
             f'(epoch {m["checkpoint_epoch"]}), published {escape(str(m.get("published", "")))}. '
             f"{escape(p['note'][:1].upper() + p['note'][1:])}. Assignment: {escape(p['assignment'])}.</p>",
             *[f"<p class=warn><b>Warning:</b> {escape(w)}</p>" for w in ctx.evaluation.get("warnings", [])],
             "<h2>Metrics per head</h2>", _metrics_table(ctx.evaluation),
             f"<p class=meta>{escape(p['metrics'])}; {p['labelled_rows']} labelled images.</p>",
             f"<h2>Cluster sizes (head {ctx.head}, K = {ctx.k})</h2>"]
    parts.append(_size_bars(sizes_K, ctx.n))
    parts += ["<h2>Training</h2>", _curves(history, ctx.head)]
    if ctx.drift is not None:
        parts += ["<h2>Drift since the previous reclustering tick</h2>", _drift_section(ctx.drift, ctx.head)]
    if table_CK is not None:
        parts += ["<h2>Confusion (classes x clusters)</h2>", _confusion(table_CK, class_names, sizes_K, out_dir)]
    parts.append(f"<h2>Clusters of head {ctx.head}</h2>")
    if ctx.k <= options.page_size:
        parts.append(_cluster_rows(ctx.views, ctx.keys, ctx.available, ctx.n, "", ctx.labelled))
    else:
        pages = (ctx.k + options.page_size - 1) // options.page_size
        links = " ".join(f'<a href="clusters/page-{i + 1:03d}.html">{i * options.page_size}-'
                         f'{min((i + 1) * options.page_size, ctx.k) - 1}</a>' for i in range(pages))
        largest = [ctx.views[int(c)] for c in np.argsort(-sizes_K, kind="stable")[:10]]
        parts += [f"<p>Table pages ({options.page_size} clusters each): {links}</p>", "<h3>Largest clusters</h3>",
                  _cluster_rows(largest, ctx.keys, ctx.available, ctx.n, "", ctx.labelled)]
    return _page(f"SeCu report {ctx.run_id}", "\n".join(parts))


def _table_page(ctx: _Context, chunk: list[ClusterView], page: int, pages: int) -> str:
    nav = ['<a href="../index.html">report index</a>']
    if page > 0:
        nav.append(f'<a href="page-{page:03d}.html">previous page</a>')
    if page + 1 < pages:
        nav.append(f'<a href="page-{page + 2:03d}.html">next page</a>')
    body = (f"<nav>{''.join(nav)}</nav><h1>Clusters {chunk[0].cluster}-{chunk[-1].cluster} of {ctx.k} "
            f"(run {escape(ctx.run_id)}, head {ctx.head})</h1>"
            + _cluster_rows(chunk, ctx.keys, ctx.available, ctx.n, "../", ctx.labelled))
    return _page(f"clusters page {page + 1}", body)


def _cluster_page(ctx: _Context, v: ClusterView) -> str:
    nav = ['<a href="../index.html">report index</a>']
    if v.cluster > 0:
        nav.append(f'<a href="{cluster_page(v.cluster - 1)}">cluster {v.cluster - 1}</a>')
    if v.cluster + 1 < ctx.k:
        nav.append(f'<a href="{cluster_page(v.cluster + 1)}">cluster {v.cluster + 1}</a>')

    def grid(rows: list[int]) -> str:
        if not rows:
            return "<p class=meta>none</p>"
        cells = (_img(ctx.keys[i], ctx.available, "../", caption=f"{float(ctx.conf[i]):.3f}", px=96) for i in rows)
        return '<div class="grid">' + "".join(cells) + "</div>"

    mix = ""
    if v.label_counts:
        mix = "<h2>Classes in this cluster</h2><table><tr><th class=l>class</th><th>images</th><th>share</th></tr>" + \
              "".join(f"<tr><td class=l>{escape(c)}</td><td>{cnt}</td><td>{_fmt_pct(cnt / max(v.size, 1))}</td></tr>"
                      for c, cnt in v.label_counts) + "</table>"
    body = (f"<nav>{''.join(nav)}</nav><h1>Cluster {v.cluster} of head {ctx.head} (run {escape(ctx.run_id)})</h1>"
            f"<p class=meta>{v.size} images ({_fmt_pct(v.size / max(ctx.n, 1))} of {ctx.n}); mean confidence "
            f"{v.mean_confidence:.3f}, mean cosine similarity {v.mean_similarity:.3f}. Captions: confidence "
            f"(softmax probability of this cluster).</p>{mix}"
            f"<h2>Most confident ({len(v.top)})</h2>{grid(v.top)}<h2>Random members ({len(v.random)})</h2>"
            f"{grid(v.random)}")
    return _page(f"cluster {v.cluster}", body)


def _local_files(root: str) -> list[str]:
    out = []
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            out.append(os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/"))
    return sorted(out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _publish_dir(storage: Storage, local: str, rel: str, threads: int) -> int:
    files = _local_files(local)
    if not storage.is_s3:
        target = storage.path(rel)
        parent = os.path.dirname(target)
        os.makedirs(parent, exist_ok=True)
        staged = os.path.join(parent, f".report-new-{uuid.uuid4().hex[:8]}")
        shutil.copytree(local, staged)
        os.chmod(staged, 0o777 & ~_umask())  # the temporary directory was private (0700)
        old = os.path.join(parent, f".report-old-{uuid.uuid4().hex[:8]}")
        if os.path.exists(target):
            os.replace(target, old)
        os.replace(staged, target)
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(old)
        return len(files)
    previous = {e.path for e in storage.list(rel, recursive=True)}
    rest = [f for f in files if f != "index.html"]

    def upload(name: str) -> None:
        with open(os.path.join(local, name), "rb") as handle:
            storage.write_bytes_atomic(join(rel, name), handle.read())

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(upload, rest))
    upload("index.html")
    stale = sorted(previous - set(files))
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda f: storage.delete(join(rel, f)), stale))
    return len(files)
