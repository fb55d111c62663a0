"""The static HTML report: files, links, thumbnails, and rendering in headless Chromium (no Ray needed).

Chromium comes from Debian's ``chromium`` package (``scripts/ensure_chromium.sh`` installs it); the
rendering test is skipped, with a message, where it is not installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines.dataset.info import load_dataset_info, read_manifest
from pipelines.outputs.report import ReportOptions, build_report
from pipelines.storage import Storage
from pipelines.training.metrics_log import MetricsLog
from tests.pipelines.run_builders import make_dataset, publish_assignments

_REF_RE = re.compile(r'(?:src|href)="([^"#?]+)"')


def _refs(page: Path) -> list[Path]:
    """Local files a page references (images and links), resolved relative to the page."""
    text = page.read_text(encoding="utf-8")
    return [(page.parent / ref).resolve() for ref in _REF_RE.findall(text) if "://" not in ref]


def _screenshot(chromium: str, page: Path, out: Path, profile: Path) -> np.ndarray:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", f"--screenshot={out}", "--window-size=1200,900",
           "--virtual-time-budget=5000", f"file://{page}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0 and out.exists(), f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return np.asarray(Image.open(out).convert("L"), dtype=np.float64)


@pytest.fixture(scope="module")
def chromium() -> str:
    path = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if not path:
        pytest.skip("chromium is not installed: run scripts/ensure_chromium.sh (as root) to render the report")
    return path


@pytest.fixture()
def labelled_run(tmp_path: Path) -> tuple[Storage, np.ndarray, np.ndarray]:
    """60 pattern images in 3 shards, hand-made assignments (head 0: K=4, head 1: K=2), a training history."""
    storage = Storage(str(tmp_path))
    make_dataset(storage, "tiny", 60, shard_size=20)
    manifest = read_manifest(storage, load_dataset_info(storage, "tiny"))
    labels = manifest["label"].to_numpy()
    rng = np.random.default_rng(0)
    pred0 = labels.copy()
    pred0[rng.choice(60, 6, replace=False)] = 3
    conf0 = rng.uniform(0.3, 1.0, 60)
    publish_assignments(storage, "r", "tiny", list(range(60)), manifest["key"].to_pylist(),
                        manifest["shard"].to_pylist(), [pred0, labels % 2], ks=[4, 2], confidence=[conf0, conf0])
    log = MetricsLog()
    for epoch in range(5):
        log.append({"epoch": epoch, "train/loss": 4.0 / (epoch + 1), "train/loss_center": 2.0 / (epoch + 1),
                    "train/loss_repr": 2.0 / (epoch + 1), "clusters/h0/changed_frac": 0.6 / (epoch + 1),
                    "clusters/h0/acc": 0.4 + 0.1 * epoch, "clusters/h0/nmi": 0.3 + 0.1 * epoch})
    log.write(storage, "r")
    return storage, pred0, conf0


def test_report_pages_link_to_existing_files(labelled_run: tuple[Storage, np.ndarray, np.ndarray]) -> None:
    storage, pred0, conf0 = labelled_run
    result = build_report(storage, "r", options=ReportOptions(top=4, random=2))

    root = Path(storage.path("runs/r/report"))
    assert result.uri == str(root / "index.html") and result.clusters == 4
    pages = [root / "index.html"] + [root / "clusters" / f"c{c:04d}.html" for c in range(4)]
    assert all(p.exists() for p in pages)
    for page in pages:
        refs = _refs(page)
        assert refs, page
        missing = [str(r) for r in refs if not r.exists()]
        assert not missing, f"{page.name} references missing files: {missing}"
    # 4 + 2 images for clusters 0-2 (20ish members), cluster 3 has 6 members: 4 top + 2 random.
    assert result.thumbnails == 24 and result.missing_images == 0
    index = (root / "index.html").read_text()
    assert index.count("<svg") >= 5  # size bars, 3 training charts, confusion heat map
    assert "Confusion" in index and "stripes-h" in index
    # Cluster 0's page shows its most confident members first, in order.
    members = np.flatnonzero(pred0 == 0)
    best = members[np.argsort(-conf0[members])][:4]
    manifest = read_manifest(storage, load_dataset_info(storage, "tiny"))
    keys = manifest["key"].to_pylist()
    page0 = (root / "clusters" / "c0000.html").read_text()
    shown = re.findall(r'<img src="../thumbs/([^"]+)\.png"', page0)
    assert shown[:4] == [keys[i] for i in best]


def test_report_renders_in_headless_chromium(labelled_run: tuple[Storage, np.ndarray, np.ndarray],
                                             chromium: str, tmp_path: Path) -> None:
    storage, _, _ = labelled_run
    build_report(storage, "r", options=ReportOptions(top=4, random=2))
    root = Path(storage.path("runs/r/report"))

    index = _screenshot(chromium, root / "index.html", tmp_path / "index.png", tmp_path / "profile")
    cluster = _screenshot(chromium, root / "clusters" / "c0001.html", tmp_path / "c1.png", tmp_path / "profile")

    assert index.shape == (900, 1200)
    assert index.var() > 100.0, "the index page rendered blank"
    assert (index < 250).mean() > 0.02, "the index page shows almost nothing but background"
    # The cluster page shows six 96 px thumbnails of stripes: thousands of dark pixels, far more than its text.
    assert (cluster < 60).sum() > 10_000, "the cluster page's thumbnails did not render"


def test_report_with_1000_clusters_stays_small_and_paged(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    make_dataset(storage, "tiny", 60, shard_size=30)
    manifest = read_manifest(storage, load_dataset_info(storage, "tiny"))
    pred = np.random.default_rng(1).integers(0, 1000, 60)
    publish_assignments(storage, "big", "tiny", list(range(60)), manifest["key"].to_pylist(),
                        manifest["shard"].to_pylist(), [pred], ks=[1000], files=1)

    result = build_report(storage, "big", options=ReportOptions(page_size=100, top=2, random=1))

    root = Path(storage.path("runs/big/report"))
    assert result.clusters == 1000
    assert len(list((root / "clusters").glob("c*.html"))) == 1000
    assert len(list((root / "clusters").glob("page-*.html"))) == 10
    index = root / "index.html"
    assert index.stat().st_size < 400_000
    assert all(r.exists() for r in _refs(index))
    assert all(r.exists() for r in _refs(root / "clusters" / "page-010.html"))
    empty = next(c for c in range(1000) if c not in set(pred.tolist()))
    assert "0 images" in (root / "clusters" / f"c{empty:04d}.html").read_text()
    # 60 images cannot fill 1000 clusters: the first screen says so in words.
    text = index.read_text()
    assert "<p class=warn><b>Warning:</b> head 0 (K=1000) collapsed in the published output" in text
    assert "clusters are empty" in text


def test_rebuilding_replaces_the_report(labelled_run: tuple[Storage, np.ndarray, np.ndarray]) -> None:
    storage, _, _ = labelled_run
    build_report(storage, "r", options=ReportOptions(top=4, random=2))
    build_report(storage, "r", options=ReportOptions(top=1, random=0))
    root = Path(storage.path("runs/r/report"))
    assert len(list((root / "thumbs").glob("*.png"))) == 4
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".report-")]


def test_a_flat_series_gets_axis_ticks_around_its_value() -> None:
    from pipelines.outputs.svg_charts import nice_ticks

    ticks = nice_ticks(1.0, 1.0, 5)  # ACC 1.0 every epoch: the line must sit inside the axis, not on its floor
    assert ticks[0] < 1.0 < ticks[-1] and ticks[-1] - ticks[0] <= 1.5
    assert nice_ticks(0.0, 0.0)[0] < 0.0 < nice_ticks(0.0, 0.0)[-1]
    assert nice_ticks(0.2, 0.8, 5)[0] <= 0.2 and nice_ticks(0.2, 0.8, 5)[-1] >= 0.8
