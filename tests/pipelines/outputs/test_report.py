"""The static HTML report: files, links, thumbnails, the embedding map, the drift page, and rendering in
headless Chromium (no Ray needed).

Chromium comes from Debian's ``chromium`` package (``scripts/ensure_chromium.sh`` installs it); the
rendering tests are skipped, with a message, where it is not installed.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.dataset.info import load_dataset_info, read_manifest
from pipelines.outputs.assignments import output_dir, read_assignment_rows
from pipelines.outputs.publish import new_attempt, publish, staging_dir
from pipelines.outputs.report import ReportOptions, build_report
from pipelines.outputs.schema import (
    EMBEDDING_COLUMN,
    SCHEMA_VERSION,
    assignment_schema,
    cluster_column,
    confidence_column,
    similarity_column,
)
from pipelines.recluster.alignment import RunLabels, drift_summary
from pipelines.storage import Storage, join
from pipelines.training.metrics_log import MetricsLog
from tests.pipelines.run_builders import add_checkpoint, make_dataset, publish_assignments

_REF_RE = re.compile(r'(?:src|href)="([^"#?]+)"')
_AREA_RE = re.compile(r'<area shape="(\w+)" coords="([\d,]+)" href="([^"]+)" title="([^"]*)"')


def _refs(page: Path) -> list[Path]:
    """Local files a page references (images, links, image-map areas), resolved relative to the page."""
    text = page.read_text(encoding="utf-8")
    return [(page.parent / ref).resolve() for ref in _REF_RE.findall(text) if "://" not in ref]


def _image_map(page: Path, name: str) -> list[tuple[str, tuple[int, ...], str, str]]:
    """The areas (shape, coords, href, title) of the image map ``name`` of a page."""
    text = page.read_text(encoding="utf-8")
    match = re.search(rf'<map name="{name}">(.*?)</map>', text)
    assert match is not None, f"{page.name} has no image map {name}"
    return [(s, tuple(int(c) for c in coords.split(",")), href, title)
            for s, coords, href, title in _AREA_RE.findall(match.group(1))]


def _screenshot(chromium: str, page: Path, out: Path, profile: Path, height: int = 900) -> np.ndarray:
    cmd = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", f"--screenshot={out}", f"--window-size=1200,{height}",
           "--virtual-time-budget=5000", f"file://{page}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0 and out.exists(), f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return np.asarray(Image.open(out).convert("L"), dtype=np.float64)


def _set_marker(storage: Storage, run_id: str, **fields: object) -> None:
    """Change fields of a published output's ``_SUCCESS`` (as a real inference would have written them)."""
    rel = join(output_dir(run_id), "_SUCCESS")
    marker = json.loads(storage.read_bytes(rel)) | fields
    storage.write_bytes_atomic(rel, json.dumps(marker).encode())


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


@pytest.fixture()
def large_run(tmp_path: Path) -> tuple[Storage, np.ndarray, np.ndarray]:
    """240 pattern images in 3 shards, head 0 K=3 (80 each, 10 % of them in a wrong cluster), and the run's
    checkpoint named in ``_SUCCESS`` (a fresh network of the CPU recipe), so the report can embed images."""
    storage = Storage(str(tmp_path))
    make_dataset(storage, "mid", 240, shard_size=80)
    manifest = read_manifest(storage, load_dataset_info(storage, "mid"))
    labels = manifest["label"].to_numpy()
    rng = np.random.default_rng(3)
    pred = labels.copy()
    flip = rng.choice(240, 24, replace=False)
    pred[flip] = (pred[flip] + 1) % 3
    conf = rng.uniform(0.2, 1.0, 240)
    publish_assignments(storage, "r", "mid", list(range(240)), manifest["key"].to_pylist(),
                        manifest["shard"].to_pylist(), [pred], ks=[3], confidence=[conf])
    _set_marker(storage, "r", checkpoint=add_checkpoint(storage, "r", "mid", epoch=1))
    return storage, pred, conf


def test_report_pages_link_to_existing_files(labelled_run: tuple[Storage, np.ndarray, np.ndarray]) -> None:
    storage, pred0, conf0 = labelled_run
    result = build_report(storage, "r", options=ReportOptions(top=4, borderline=3, random=2))

    root = Path(storage.path("runs/r/report"))
    assert result.uri == str(root / "index.html") and result.clusters == 4
    pages = [root / "index.html"] + [root / "clusters" / f"c{c:04d}.html" for c in range(4)]
    assert all(p.exists() for p in pages)
    for page in pages:
        refs = _refs(page)
        assert refs, page
        missing = [str(r) for r in refs if not r.exists()]
        assert not missing, f"{page.name} references missing files: {missing}"
    # Clusters 0-2 (about 18 members) show 4 + 3 + 2 and put the rest (up to 2 x 9) on extra pages;
    # cluster 3 has 6 members: 4 top, 2 borderline, no random.
    sizes = np.bincount(pred0, minlength=4)
    assert result.thumbnails == sum(min(int(s), 4 + 3 + 2 + 2 * 9) for s in sizes) and result.missing_images == 0
    index = (root / "index.html").read_text()
    charts = re.findall(r'<img class="chart" src="(charts/[^"]+\.png)"', index)
    assert set(charts) == {"charts/sizes.png", "charts/loss.png", "charts/changed.png", "charts/scores.png",
                           "charts/confusion.png"}  # no map: the hand-made assignments name no checkpoint
    assert "No map: the assignments have no embedding column" in index
    assert "Confusion" in index and "stripes-h" in index
    # The main class of each cluster, by name.
    assert "<td class=l><b>stripes-v (" in index
    # What each stage left out as bad input (none here), in words (issue 17).
    assert "skipped as bad input: 0 at ingest; 0 at inference." in index
    # Cluster 0's page: its most confident members first, in order, then its least confident, least first.
    members = np.flatnonzero(pred0 == 0)
    by_conf = members[np.argsort(-conf0[members])]
    keys = read_manifest(storage, load_dataset_info(storage, "tiny"))["key"].to_pylist()
    page0 = (root / "clusters" / "c0000.html").read_text()
    shown = re.findall(r'<img src="../thumbs/([^"]+)\.png"', page0)
    assert shown[:4] == [keys[i] for i in by_conf[:4]]
    assert shown[4:7] == [keys[i] for i in by_conf[::-1][:3]]
    assert len(set(shown)) == len(shown) == 9
    assert "c0000-2.html" in page0 and (root / "clusters" / "c0000-2.html").exists()


def test_cluster_page_shows_48_members_in_three_groups(large_run: tuple[Storage, np.ndarray, np.ndarray]) -> None:
    storage, pred, conf = large_run
    build_report(storage, "r", options=ReportOptions(map_layout="pca"))
    root = Path(storage.path("runs/r/report"))
    keys = read_manifest(storage, load_dataset_info(storage, "mid"))["key"].to_pylist()
    page = (root / "clusters" / "c0001.html").read_text()
    groups = re.split(r"<h2>", page)
    grids = {g.split("(")[0].strip(): re.findall(r'<img src="../thumbs/([^"]+)\.png"', g) for g in groups}
    top, low, rnd = grids["Most confident"], grids["Least confident: the borderline members"], grids["Random members"]
    assert len(top) == len(low) == len(rnd) == 16
    assert len(set(top + low + rnd)) == 48
    members = np.flatnonzero(pred == 1)
    by_conf = [keys[i] for i in members[np.argsort(-conf[members])]]
    assert top == by_conf[:16] and low == by_conf[::-1][:16]
    assert set(rnd) <= set(by_conf[16:-16])
    # The rest of the cluster (80 +- flips - 48 members) is on page 2, none of them shown twice.
    more = re.findall(r'<img src="../thumbs/([^"]+)\.png"', (root / "clusters" / "c0001-2.html").read_text())
    assert len(more) == members.size - 48 and not set(more) & set(top + low + rnd)
    assert all(r.exists() for r in _refs(root / "clusters" / "c0001.html") + _refs(root / "clusters" / "c0001-2.html"))


def test_map_from_the_checkpoint_links_every_cluster(large_run: tuple[Storage, np.ndarray, np.ndarray]) -> None:
    storage, pred, _ = large_run
    result = build_report(storage, "r", options=ReportOptions(map_points=120, map_layout="tsne"))

    root = Path(storage.path("runs/r/report"))
    index_path = root / "index.html"
    index = index_path.read_text()
    assert result.map_points == 120 and "computed for this page with checkpoint" in result.map_source
    assert "t-SNE of 120 images" in index and "computed for this page with checkpoint" in index
    areas = _image_map(index_path, "embedding-map")
    size = re.search(r'src="charts/map.png" width="(\d+)" height="(\d+)"', index)
    assert size is not None
    width, height = int(size.group(1)), int(size.group(2))
    # One linked label per cluster, pointing at that cluster's existing page, inside the image.
    assert sorted(href for _, _, href, _ in areas) == [f"clusters/c{c:04d}.html" for c in range(3)]
    for shape, (x0, y0, x1, y1), href, title in areas:
        assert shape == "rect" and 0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height
        assert (root / href).exists()
        c = int(href[-9:-5])
        assert title.startswith(f"cluster {c}: {int((pred == c).sum())} images")
    with Image.open(root / "charts" / "map.png") as img:
        assert img.size == (2 * width, 2 * height)
        assert np.asarray(img.convert("L")).std() > 5  # points were drawn


def test_map_from_the_embedding_column(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    make_dataset(storage, "tiny", 60, shard_size=30)
    manifest = read_manifest(storage, load_dataset_info(storage, "tiny"))
    labels = manifest["label"].to_numpy()
    emb = np.random.default_rng(0).normal(size=(60, 8)).astype(np.float32)
    emb[:, 0] += 6 * labels  # three well separated groups
    schema = assignment_schema(1, 8)
    n = 60
    cols = {"sample_index": pa.array(np.arange(n)), "key": pa.array(manifest["key"].to_pylist()),
            "shard": pa.array(manifest["shard"].to_pylist()), "source": pa.array(manifest["source"].to_pylist()),
            cluster_column(0): pa.array(labels.astype(np.int32)),
            similarity_column(0): pa.array(np.full(n, 0.5, np.float32)),
            confidence_column(0): pa.array(np.full(n, 0.9, np.float32)),
            EMBEDDING_COLUMN: pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1)), 8),
            "run_id": pa.array(["e"] * n), "checkpoint": pa.array(["hand-made"] * n),
            "checkpoint_epoch": pa.array(np.full(n, 1, np.int32))}
    out_rel = output_dir("e")
    staging = staging_dir(out_rel, new_attempt())
    table = pa.Table.from_arrays([cols[c] for c in schema.names], schema=schema)
    for i, (lo, hi) in enumerate([(0, 37), (37, 60)]):  # two files of row groups of 8 rows
        buf = io.BytesIO()
        pq.write_table(table.slice(lo, hi - lo), buf, row_group_size=8)
        storage.write_bytes_atomic(join(staging, f"x_{i:06d}.parquet"), buf.getvalue())
    publish(storage, out_rel, staging, {"run_id": "e", "name": "assignments", "schema_version": SCHEMA_VERSION,
                                        "dataset": "tiny", "train_dataset": "tiny", "checkpoint": "hand-made",
                                        "checkpoint_epoch": 1, "num_heads": 1, "ks": [3], "embedding_dim": 8})
    rows = np.array([59, 3, 36, 37, 3, 0, 44])  # unsorted, repeated, both sides of a file and a group boundary
    taken = read_assignment_rows(storage, "e", "assignments", EMBEDDING_COLUMN, rows)
    assert np.array_equal(taken.flatten().to_numpy().reshape(-1, 8), emb[rows])
    with pytest.raises(ValueError, match="outside the 60 rows"):
        read_assignment_rows(storage, "e", "assignments", EMBEDDING_COLUMN, np.array([60]))

    result = build_report(storage, "e", options=ReportOptions(map_layout="pca"))

    index = Path(storage.path("runs/e/report/index.html")).read_text()
    assert result.map_points == 60 and "embedding column" in result.map_source
    assert "PCA of 60 images" in index and "the assignments&#x27; embedding column" in index


def test_report_renders_in_headless_chromium(large_run: tuple[Storage, np.ndarray, np.ndarray],
                                             chromium: str, tmp_path: Path) -> None:
    storage, _, _ = large_run
    build_report(storage, "r", options=ReportOptions(map_points=120, map_layout="pca"))
    root = Path(storage.path("runs/r/report"))

    index = _screenshot(chromium, root / "index.html", tmp_path / "index.png", tmp_path / "profile", height=1400)
    cluster = _screenshot(chromium, root / "clusters" / "c0001.html", tmp_path / "c1.png", tmp_path / "profile",
                          height=1200)

    assert index.shape == (1400, 1200)
    assert index.var() > 100.0, "the index page rendered blank"
    assert (index < 250).mean() > 0.05, "the index page shows almost nothing but background"
    # The map sits below the metrics table: its points (coloured, mid-grey in L) fill part of the first screen.
    assert ((index > 60) & (index < 200)).mean() > 0.01, "the embedding map did not render"
    # 48 thumbnails of stripes at 60 px: tens of thousands of dark pixels, far more than the page's text.
    assert (cluster < 60).sum() > 40_000, "the cluster page's thumbnails did not render"
    for page in (root / "index.html", root / "clusters" / "c0001.html"):
        for ref in _refs(page):
            assert ref.exists(), ref
            if ref.suffix == ".png":
                with Image.open(ref) as img:
                    assert np.asarray(img.convert("L")).std() > 1, f"{ref.name} is blank"


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
    assert len(list((root / "clusters").glob("c????.html"))) == 1000
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
    build_report(storage, "r", options=ReportOptions(top=1, borderline=0, random=0, more_pages=0))
    root = Path(storage.path("runs/r/report"))
    assert len(list((root / "thumbs").glob("*.png"))) == 4
    assert not list((root / "clusters").glob("c????-2.html"))
    assert not [p for p in root.parent.iterdir() if p.name.startswith(".report-")]


def test_report_options_are_checked() -> None:
    with pytest.raises(ValueError, match="map_layout='umap'"):
        ReportOptions(map_layout="umap")
    with pytest.raises(ValueError, match="borderline"):
        ReportOptions(borderline=-1)


def _drift_runs(storage: Storage) -> tuple[np.ndarray, np.ndarray]:
    """Runs ``prev`` and ``now`` over one dataset of 60 images (K=4); ``now`` has drift.json against ``prev``.

    Between them: 10 images of cluster 0 moved to 2, 4 of cluster 1 to 0, cluster 1's other members to
    cluster 3, which was empty before (appeared); cluster 1 is empty now (vanished).
    """
    make_dataset(storage, "tiny", 60, shard_size=30)
    manifest = read_manifest(storage, load_dataset_info(storage, "tiny"))
    keys, shards = manifest["key"].to_pylist(), manifest["shard"].to_pylist()
    before = np.repeat([0, 1, 2], 20)
    now = before.copy()
    now[:10] = 2
    now[20:24] = 0
    now[24:40] = 3
    for run_id, labels in (("prev", before), ("now", now)):
        publish_assignments(storage, run_id, "tiny", list(range(60)), keys, shards, [labels], ks=[4])
    summary = drift_summary(RunLabels(np.arange(60), before[None], "assignments"),
                            RunLabels(np.arange(60), now[None], "assignments"), [4])
    record = {"run_id": "now", "previous_run_id": "prev", "tick": "t2", **summary}
    storage.write_bytes_atomic("runs/now/drift.json", json.dumps(record).encode())
    return before, now


def test_drift_page_shows_the_largest_flows(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    _drift_runs(storage)

    build_report(storage, "now", options=ReportOptions(map_points=0))

    root = Path(storage.path("runs/now/report"))
    index, drift = (root / "index.html").read_text(), root / "drift.html"
    assert 'href="drift.html"' in index
    text = drift.read_text()
    flows = re.findall(r'<tr><td class=l><a href="clusters/c(\d+).html">\d+</a>.*?</td><td class=l><a href='
                       r'"clusters/c(\d+).html">\d+</a>.*?</td><td>(\d+)</td><td>([\d.]+)%</td>', text)
    assert [(int(a), int(b), int(n), float(s)) for a, b, n, s in flows] == [
        (1, 3, 16, 80.0), (0, 2, 10, 50.0), (1, 0, 4, 20.0)]
    assert "60 images are labelled in both ticks (assignments); 30 kept their cluster, 30 (50.0%) moved" in text
    appeared = text.split("<h2>Appeared (1)")[1].split("<h2>Vanished")[0]
    vanished = text.split("<h2>Vanished (1)")[1].split("<h2>")[0]
    assert 'href="clusters/c0003.html"' in appeared and "<td>0</td><td>16</td>" in appeared
    assert 'href="clusters/c0001.html"' in vanished and "<td>20</td><td>0</td>" in vanished
    assert all(r.exists() for r in _refs(drift)), [str(r) for r in _refs(drift) if not r.exists()]
    cells = _image_map(drift, "flows")
    assert len(cells) == 16 and all((root / href).exists() for _, _, href, _ in cells)


def test_drift_page_says_why_when_the_previous_assignments_are_gone(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    _drift_runs(storage)
    storage.delete("runs/prev/assignments/_SUCCESS")

    build_report(storage, "now", options=ReportOptions(map_points=0))

    text = Path(storage.path("runs/now/report/drift.html")).read_text()
    assert "Flows unknown: the published assignments of both ticks are needed" in text
    assert "<h2>Appeared (1)" in text  # what drift.json itself says is still shown


def test_the_aligned_checkpoint_directory_matches_the_ticks() -> None:
    from pipelines.outputs.report_drift import ALIGNED_DIR
    from pipelines.recluster.tick import ALIGNED_DIR as TICK_ALIGNED_DIR

    assert ALIGNED_DIR == TICK_ALIGNED_DIR
