"""A static HTML report of a run's clusters: ``runs/<run_id>/report/index.html`` plus pages and thumbnails.

Layout of the report directory (``report`` for the output ``assignments``, ``report-<suffix>`` for
``assignments-<suffix>``)::

    index.html              run, protocol, metrics per head, a 2-D map of a sample of the embeddings
                            (every cluster labelled and linked), cluster-size bar chart, training curves,
                            drift since the previous reclustering tick (when the run has drift.json),
                            confusion heat map (with labels), the cluster table (inline when K is small)
    drift.html              what moved between the previous tick and this run (with drift.json): the
                            largest flows cluster a -> b, the appeared and vanished clusters
    clusters/page-001.html  the cluster table, ``page_size`` clusters per page (K > page_size)
    clusters/c0042.html     one page per cluster: size, scores, main class and label mix, its most
                            confident, least confident (borderline) and random members (16 each)
    clusters/c0042-2.html   further pages of random members of a large cluster (``more_pages``)
    charts/*.png            the charts (matplotlib, ``pipelines.outputs.charts``)
    thumbs/<key>.png        thumbnails, read from the dataset's shards by key

Everything is plain HTML with PNG images and relative links (linked chart marks through HTML image
maps): open ``index.html`` from disk, or serve the directory from a bucket; no server or JavaScript
is needed. K = 1000 stays usable: the index holds summaries only, every cluster has its own small
pages.

The map's embeddings come from the assignments' ``embedding`` column when inference wrote one, else
from the output's checkpoint run on the CPU over the sampled images, read in the same pass over the
shards as the thumbnails (``pipelines.outputs.report_map``); the page says which, or why there is no
map.

Publishing: the report is rendered into a local temporary directory first. On a local root it then
replaces the old report directory by renames; on S3 every file is uploaded, ``index.html`` last,
and files of an older report that the new one does not have are deleted.

Modules: ``pipelines.outputs.report_data`` reads what the report shows (assignments, labels, metrics,
history, drift) and chooses each cluster's members; ``report_map`` embeds and lays out the map's
sample; ``report_drift`` computes the flows between ticks; ``report_html`` and ``report_drift_html``
render the pages; ``thumbnails`` cuts the thumbnails out of the shards. This module builds and
publishes the report directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipelines.outputs.assignments import DEFAULT_NAME
from pipelines.outputs.report_data import MemberCounts, ReportData, load_report_data, wanted_thumbnails
from pipelines.outputs.report_drift import drift_flows
from pipelines.outputs.report_drift_html import render_drift_page
from pipelines.outputs.report_html import (
    CHARTS_DIR,
    cluster_page,
    render_cluster_page,
    render_index,
    render_member_page,
    render_table_page,
)
from pipelines.outputs.report_map import (
    MAP_METHODS,
    CheckpointEmbedder,
    MapData,
    build_map,
    embeddings_from_column,
    no_map,
    sample_rows,
)
from pipelines.outputs.thumbnails import extract_all
from pipelines.storage import Storage, join

logger = logging.getLogger(__name__)


@dataclass
class ReportOptions:
    """What the report shows."""

    head: int = 0
    """The head whose clusters get pages."""
    top: int = 16
    """Most confident images shown per cluster."""
    borderline: int = 16
    """Least confident images shown per cluster (the borderline members)."""
    random: int = 16
    """Random other members shown per cluster."""
    more_pages: int = 2
    """Extra pages of further random members (``top + borderline + random`` each) for a large cluster."""
    map_points: int = 2000
    """Images on the embedding map (sampled by cluster); 0 for no map."""
    map_layout: str = "tsne"
    """``tsne`` (scikit-learn t-SNE, seconds for a few thousand points), ``pca`` (instant) or ``none``."""
    page_size: int = 100
    """Clusters per table page; the table is inline in index.html when K <= page_size."""
    thumb_px: int = 64
    """Longest side of a thumbnail (small images are enlarged by an integer factor)."""
    seed: int = 0
    """Seed of the random member selection."""
    threads: int = 8
    """Shards read (and files uploaded) in parallel."""

    def __post_init__(self) -> None:
        if min(self.head, self.top, self.borderline, self.random, self.more_pages, self.map_points) < 0:
            raise ValueError("head, top, borderline, random, more_pages and map_points must be >= 0")
        if self.map_layout not in MAP_METHODS:
            raise ValueError(f"map_layout={self.map_layout!r}: use one of {', '.join(MAP_METHODS)}")
        if self.page_size < 1 or self.thumb_px < 8 or self.threads < 1:
            raise ValueError("page_size >= 1, thumb_px >= 8 and threads >= 1 are required")


@dataclass
class ReportResult:
    """Where the report went and what it holds."""

    uri: str
    """Location of index.html."""
    clusters: int
    thumbnails: int
    missing_images: int
    files: int
    map_points: int = 0
    """Images on the embedding map (0: no map; the page says why)."""
    map_source: str = ""


def report_dir(run_id: str, name: str = DEFAULT_NAME) -> str:
    """The report directory of output ``name``, relative to the storage root."""
    if name == DEFAULT_NAME:
        return join("runs", run_id, "report")
    suffix = name[len(DEFAULT_NAME) + 1:] if name.startswith(DEFAULT_NAME + "-") else name
    return join("runs", run_id, f"report-{suffix}")


def build_report(storage: Storage, run_id: str, name: str = DEFAULT_NAME,
                 options: ReportOptions | None = None) -> ReportResult:
    """Render and publish the report of output ``name`` of ``run_id``."""
    options = options or ReportOptions()
    counts = MemberCounts(options.top, options.borderline, options.random, options.more_pages)
    data = load_report_data(storage, run_id, name, options.head, counts, options.seed)
    h, k = data.head, data.k
    with tempfile.TemporaryDirectory(prefix="secu-report-") as tmp:
        for sub in ("thumbs", "clusters", CHARTS_DIR):
            os.makedirs(os.path.join(tmp, sub))
        wanted = wanted_thumbnails(data)
        embedding_map = _thumbnails_and_map(storage, data, wanted, tmp, options)
        total_wanted = sum(len(s) for s in wanted.values())
        _write(tmp, "index.html", render_index(data, options.page_size, tmp, embedding_map))
        flows = drift_flows(storage, run_id, data.drift, h) if data.drift is not None else None
        if flows is not None:
            _write(tmp, "drift.html", render_drift_page(data, flows, tmp))
        pages = [data.views[i:i + options.page_size] for i in range(0, k, options.page_size)]
        if len(pages) > 1:
            for p, chunk in enumerate(pages):
                _write(tmp, f"clusters/page-{p + 1:03d}.html", render_table_page(data, chunk, p, len(pages)))
        for v in data.views:
            _write(tmp, f"clusters/{cluster_page(v.cluster)}", render_cluster_page(data, v))
            for number in range(2, len(v.more) + 2):
                _write(tmp, f"clusters/{cluster_page(v.cluster, number)}", render_member_page(data, v, number))
        files = _publish_dir(storage, tmp, report_dir(run_id, name), options.threads)
    found, missing = len(data.available), total_wanted - len(data.available)
    uri = storage.uri(report_dir(run_id, name), "index.html")
    logger.info("report of run %s (%s, head %d, K=%d): %d thumbnails (%d missing), map of %d images, at %s", run_id,
                name, h, k, found, missing, embedding_map.rows.size, uri)
    return ReportResult(uri=uri, clusters=k, thumbnails=found, missing_images=missing, files=files,
                        map_points=int(embedding_map.rows.size), map_source=embedding_map.source or embedding_map.note)


def _thumbnails_and_map(storage: Storage, data: ReportData, wanted: dict[str, set[str]], out_dir: str,
                        options: ReportOptions) -> MapData:
    """Write the thumbnails (fills ``data.available``) and embed the map's sample in the same pass over the
    shards: from the embedding column when the output has one, else with the output's checkpoint."""
    dataset = str(data.marker["dataset"])
    thumbs = os.path.join(out_dir, "thumbs")
    if options.map_points == 0 or options.map_layout == "none":
        data.available = extract_all(storage, dataset, wanted, thumbs, options.thumb_px, options.threads)
        return no_map("turned off (map_points=0 or map_layout=none)")
    rows = sample_rows(data.pred, data.k, options.map_points, options.seed)
    if data.marker.get("embedding_dim"):
        data.available = extract_all(storage, dataset, wanted, thumbs, options.thumb_px, options.threads)
        source = "the assignments' embedding column (inference with --with-embeddings)"
        return build_map(lambda: (rows, embeddings_from_column(storage, data.run_id, data.name, rows), source),
                         options.map_layout, options.seed)
    label = str(data.marker.get("checkpoint", ""))
    try:
        embedder = CheckpointEmbedder(storage, label)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as err:
        data.available = extract_all(storage, dataset, wanted, thumbs, options.thumb_px, options.threads)
        return no_map(f"the assignments have no embedding column (run inference with --with-embeddings) and "
                      f"their checkpoint {label!r} cannot be loaded ({err})")
    views: dict[str, Any] = {}
    extra: dict[str, set[str]] = defaultdict(set)
    for i in rows:
        extra[data.shards[int(i)]].add(data.keys[int(i)])

    def collect(key: str, blob: bytes) -> None:
        views[key] = embedder.view(blob)  # decoded and transformed in the reading threads

    data.available = extract_all(storage, dataset, wanted, thumbs, options.thumb_px, options.threads, extra, collect)

    def embed() -> tuple[np.ndarray, np.ndarray, str]:
        kept = np.asarray([int(i) for i in rows if views.get(data.keys[int(i)]) is not None], dtype=np.int64)
        source = f"computed for this page with checkpoint {embedder.label} on the CPU ({kept.size} images)"
        if kept.size == 0:
            return kept, np.zeros((0, 0)), source
        return kept, embedder.embed([views[data.keys[int(i)]] for i in kept]), source

    try:
        return build_map(embed, options.map_layout, options.seed)
    except ValueError as err:  # the method gives no embedding
        return no_map(f"the assignments have no embedding column and {err}")


def _write(root: str, rel: str, text: str) -> None:
    with open(os.path.join(root, rel), "w", encoding="utf-8") as handle:
        handle.write(text)


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
