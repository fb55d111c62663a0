"""Evaluation of published assignments against manifest labels (no Ray needed)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from pipelines.dataset.info import load_dataset_info, read_manifest
from pipelines.dataset.ingest import IngestOptions, ingest
from pipelines.dataset.sources import ArrayPart, ArraySource
from pipelines.dataset.synthetic import pattern_images
from pipelines.outputs.assignments import published_files, read_marker
from pipelines.outputs.evaluation import evaluate_assignments, format_table, metrics_file, write_metrics
from pipelines.storage import Storage
from pipelines.training.metrics_log import MetricsLog
from tests.pipelines.run_builders import make_dataset, publish_assignments


def _ids(storage: Storage, dataset: str) -> tuple[list[str], list[str], np.ndarray]:
    manifest = read_manifest(storage, load_dataset_info(storage, dataset))
    labels = manifest["label"].fill_null(-1).to_numpy()
    return manifest["key"].to_pylist(), manifest["shard"].to_pylist(), labels


def test_hand_made_assignment_gives_known_acc_nmi_ari(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    make_dataset(storage, "tiny", 12, shard_size=6)
    keys, shards, labels = _ids(storage, "tiny")
    rows = [0, 1, 3, 4]  # labels 0, 1, 0, 1
    assert labels[rows].tolist() == [0, 1, 0, 1]
    perfect = [1, 0, 1, 0]  # the classes with swapped names
    one_off = [0, 0, 0, 1]  # contingency [[2, 0], [1, 1]]
    publish_assignments(storage, "r", "tiny", rows, [keys[i] for i in rows], [shards[i] for i in rows],
                        [perfect, one_off], ks=[2, 3], confidence=[[0.9, 0.8, 0.7, 0.6], [0.5, 0.5, 0.5, 0.1]])

    result = evaluate_assignments(storage, "r")

    h0, h1 = result["heads"]
    assert (h0["acc"], h0["nmi"], h0["ari"]) == (1.0, 1.0, 1.0)
    # By hand from the table [[2, 0], [1, 1]]: the best matching keeps 2 + 1 of 4.
    assert h1["acc"] == pytest.approx(0.75)
    # ARI: sum C(n_ij, 2) = 1, rows give 2, columns C(3, 2) = 3, C(4, 2) = 6 -> expected 1, max 2.5 -> 0.
    assert h1["ari"] == pytest.approx(0.0, abs=1e-12)
    mi = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    h_true, h_pred = math.log(2), -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert h1["nmi"] == pytest.approx(mi / ((h_true + h_pred) / 2), rel=1e-9)
    assert h1["empty"] == 1.0 and h1["max_size_frac"] == pytest.approx(0.75)
    assert h0["mean_confidence"] == pytest.approx(0.75, abs=1e-6)
    assert h1["mean_confidence"] == pytest.approx(0.4, abs=1e-6)
    assert result["metrics"]["eval/h1/acc"] == pytest.approx(0.75)
    protocol = result["protocol"]
    assert protocol["dataset"] == "tiny" and protocol["splits"] == ["train"]
    assert protocol["rows"] == 4 and protocol["labelled_rows"] == 4 and protocol["primary_head"] == 0
    assert protocol["checkpoint_epoch"] == 7
    # Head 1 left one of its 3 clusters empty: the evaluation says so in words, in the file and the table.
    (warning,) = result["warnings"]
    assert warning.startswith("head 1 (K=3) collapsed in the published output") and "1 of its 3 clusters" in warning
    assert "WARNING: head 1 (K=3)" in format_table(result)


def test_metrics_file_matches_sklearn_and_includes_history(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    make_dataset(storage, "tiny", 30, shard_size=10)
    keys, shards, labels = _ids(storage, "tiny")
    rng = np.random.default_rng(3)
    pred0 = np.where(rng.random(30) < 0.8, (labels + 2) % 3, rng.integers(0, 3, 30))
    pred1 = rng.integers(0, 5, 30)
    publish_assignments(storage, "r", "tiny", list(range(30)), keys, shards, [pred0, pred1], ks=[3, 5])
    log = MetricsLog()
    for epoch in range(3):
        log.append({"epoch": epoch, "train/loss": 3.0 - epoch, "clusters/h0/acc": [0.2, 0.6, 0.5][epoch]})
    log.write(storage, "r")

    result = evaluate_assignments(storage, "r")
    where = write_metrics(storage, "r", result)

    for row, pred in zip(result["heads"], (pred0, pred1), strict=True):
        assert row["nmi"] == pytest.approx(normalized_mutual_info_score(labels, pred), abs=1e-9)
        assert row["ari"] == pytest.approx(adjusted_rand_score(labels, pred), abs=1e-9)
    saved = json.loads((tmp_path / "runs" / "r" / "metrics.json").read_text())
    assert where.endswith("runs/r/metrics.json")
    assert saved["heads"][0]["acc"] == pytest.approx(result["heads"][0]["acc"])
    assert saved["train_history"]["num_epochs"] == 3
    assert saved["train_history"]["best"]["clusters/h0/acc"] == {"value": 0.6, "epoch": 1.0}
    assert saved["protocol"]["evaluated_on_training_images"] is True
    table = format_table(result)
    assert "ACC" in table and f"{result['heads'][1]['ari']:.4f}" in table


def test_evaluation_without_labels_reports_sizes_and_confidence(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    images, _ = pattern_images(8)
    ingest(storage, "unlabelled", ArraySource("synthetic", [ArrayPart("unlabeled", images, None)]),
           IngestOptions(shard_size=8, use_ray=False), split="unlabeled")
    keys, shards, labels = _ids(storage, "unlabelled")
    assert (labels == -1).all()
    publish_assignments(storage, "r", "unlabelled", list(range(8)), keys, shards, [[0, 0, 0, 0, 0, 0, 1, 1]], ks=[4],
                        confidence=[[1.0] * 8], name="assignments-unlabelled", files=1)

    result = evaluate_assignments(storage, "r", "assignments-unlabelled")
    write_metrics(storage, "r", result)

    (row,) = result["heads"]
    assert "acc" not in row and "nmi" not in row
    assert row["empty"] == 2.0 and row["max_size_frac"] == pytest.approx(0.75) and row["mean_confidence"] == 1.0
    assert result["protocol"]["labelled_rows"] == 0
    assert "ACC" not in format_table(result)
    assert metrics_file("assignments-unlabelled") == "metrics-unlabelled.json"
    assert (tmp_path / "runs" / "r" / "metrics-unlabelled.json").exists()


def test_published_files_are_plain_parquet(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    make_dataset(storage, "tiny", 6, shard_size=6)
    keys, shards, _ = _ids(storage, "tiny")
    publish_assignments(storage, "r", "tiny", list(range(6)), keys, shards, [[0, 1, 2, 0, 1, 2]], ks=[3])
    marker = read_marker(storage, "r")
    files = sorted(p.name for p in (tmp_path / "runs" / "r" / "assignments").iterdir())
    unique = marker["version"].rpartition("-")[2]
    assert files == ["_SUCCESS", f"part-00000-{unique}.parquet", f"part-00001-{unique}.parquet"]
    assert [f["path"] for f in marker["files"]] == files[1:] and marker["rows"] == 6
    # A plain reader of the directory (pyarrow dataset discovery) sees exactly the rows once.
    table = pq.read_table(str(tmp_path / "runs" / "r" / "assignments"))
    assert sorted(table["sample_index"].to_pylist()) == list(range(6))
    listed = published_files(storage, "r")  # in the version folder, which does not change under a reader
    assert listed == [str(tmp_path / "runs" / "r" / "_versions" / "assignments" / marker["version"] / f)
                      for f in files[1:]]


def test_images_skipped_as_bad_input_are_counted_per_stage(tmp_path: Path) -> None:
    """Issue 17: images skipped at ingest, in training and at inference appear in metrics.json and the table."""
    from pipelines.outputs.evaluation import describe_skipped, skipped_images

    storage = Storage(str(tmp_path))
    make_dataset(storage, "tiny", 12, shard_size=6)
    keys, shards, labels = _ids(storage, "tiny")
    publish_assignments(storage, "r", "tiny", list(range(12)), keys, shards, [labels], ks=[3])
    log = MetricsLog()
    log.append({"epoch": 0, "train/loss": 1.0, "data/bad_inputs": 2})
    log.write(storage, "r")
    result = evaluate_assignments(storage, "r")
    assert result["skipped"] == {"ingest": {"count": 0, "by_reason": {}}, "training": {"count": 2},
                                 "inference": {"count": 0, "by_reason": {}, "examples": []}}
    assert "skipped as bad input: 0 at ingest; 2 at training; 0 at inference" in format_table(result)

    info = load_dataset_info(storage, "tiny")
    info.ingests[0]["skipped"] = {"truncated": 1, "not_an_image": 2}
    marker = {"skipped": {"count": 3, "by_reason": {"undecodable": 3}, "examples": ["s/k1: undecodable"]}}
    counts = skipped_images(marker, info, None)
    assert counts["ingest"] == {"count": 3, "by_reason": {"truncated": 1, "not_an_image": 2}}
    assert counts["training"] is None and counts["inference"]["count"] == 3
    assert describe_skipped(counts) == ("skipped as bad input: 3 at ingest (not_an_image 2, truncated 1); "
                                        "3 at inference (undecodable 3)")
