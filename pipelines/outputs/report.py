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

Modules: ``pipelines.outputs.report_data`` reads what the report shows (assignments, labels, metrics,
history, drift) and chooses each cluster's members; ``pipelines.outputs.report_html`` renders the
pages; ``pipelines.outputs.thumbnails`` cuts the thumbnails out of the shards. This module builds and
publishes the report directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from pipelines.outputs.assignments import DEFAULT_NAME
from pipelines.outputs.report_data import load_report_data, wanted_thumbnails
from pipelines.outputs.report_html import cluster_page, render_cluster_page, render_index, render_table_page
from pipelines.outputs.thumbnails import extract_all
from pipelines.storage import Storage, join

logger = logging.getLogger(__name__)


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


def build_report(storage: Storage, run_id: str, name: str = DEFAULT_NAME,
                 options: ReportOptions | None = None) -> ReportResult:
    """Render and publish the report of output ``name`` of ``run_id``."""
    options = options or ReportOptions()
    data = load_report_data(storage, run_id, name, options.head, options.top, options.random, options.seed)
    h, k = data.head, data.k
    with tempfile.TemporaryDirectory(prefix="secu-report-") as tmp:
        os.makedirs(os.path.join(tmp, "thumbs"))
        os.makedirs(os.path.join(tmp, "clusters"))
        wanted = wanted_thumbnails(data)
        data.available = extract_all(storage, str(data.marker["dataset"]), wanted, os.path.join(tmp, "thumbs"),
                                     options.thumb_px, options.threads)
        total_wanted = sum(len(s) for s in wanted.values())
        _write(tmp, "index.html", render_index(data, options.page_size, tmp))
        pages = [data.views[i:i + options.page_size] for i in range(0, k, options.page_size)]
        if len(pages) > 1:
            for p, chunk in enumerate(pages):
                _write(tmp, f"clusters/page-{p + 1:03d}.html", render_table_page(data, chunk, p, len(pages)))
        for v in data.views:
            _write(tmp, f"clusters/{cluster_page(v.cluster)}", render_cluster_page(data, v))
        files = _publish_dir(storage, tmp, report_dir(run_id, name), options.threads)
    found, missing = len(data.available), total_wanted - len(data.available)
    uri = storage.uri(report_dir(run_id, name), "index.html")
    logger.info("report of run %s (%s, head %d, K=%d): %d thumbnails (%d missing) at %s", run_id, name, h, k,
                found, missing, uri)
    return ReportResult(uri=uri, clusters=k, thumbnails=found, missing_images=missing, files=files)


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
