"""Ray metrics of the jobs' figures, at the unit level: names and tags, the emitter calls of the training, ingest
and inference figures (with recording stand-ins for ``ray.util.metrics``), and the gauge refresh."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pytest

from pipelines.dataset.ingest import IngestResult
from pipelines.outputs.inference import InferenceResult
from pipelines.storage import Storage
from pipelines.tracking import ray_metrics
from pipelines.tracking.ray_metrics import RayMetrics, export_inference, export_ingest, metric_name
from pipelines.tracking.training import TrackingHandle, TrainingTracker
from pipelines.training.metrics_log import progress
from tests.pipelines.run_builders import publish_assignments


class Recorder:
    """Stand-in for ``ray.util.metrics``: records every (kind, name, value, tags)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, float, dict[str, str]]] = []

    def classes(self) -> tuple[type, type]:
        recorder = self

        class Gauge:
            def __init__(self, name: str, description: str = "", tag_keys: tuple[str, ...] = ()) -> None:
                self.name, self.tag_keys = name, tag_keys

            def set(self, value: float, tags: dict[str, str]) -> None:
                assert set(tags) == set(self.tag_keys), (self.name, tags, self.tag_keys)
                recorder.calls.append(("gauge", self.name, value, dict(tags)))

        class Counter(Gauge):
            def inc(self, value: float, tags: dict[str, str]) -> None:
                assert set(tags) == set(self.tag_keys) and value > 0
                recorder.calls.append(("counter", self.name, value, dict(tags)))

        return Gauge, Counter

    def values(self, kind: str, name: str, **tags: str) -> list[float]:
        return [v for k, n, v, t in self.calls if k == kind and n == name and tags.items() <= t.items()]


@pytest.fixture
def recorder(monkeypatch: pytest.MonkeyPatch) -> Recorder:
    import ray.util.metrics

    rec = Recorder()
    gauge, counter = rec.classes()
    monkeypatch.setattr(ray.util.metrics, "Gauge", gauge)
    monkeypatch.setattr(ray.util.metrics, "Counter", counter)
    monkeypatch.setattr(ray_metrics, "_ray_connected", lambda: True)
    return rec


def test_metric_names_follow_the_project_keys() -> None:
    assert metric_name("train/loss_center") == ("secu_train_loss_center", {})
    assert metric_name("clusters/h12/min_size_frac") == ("secu_clusters_min_size_frac", {"head": "12"})
    assert metric_name("epoch") == ("secu_epoch", {})
    assert metric_name("self_label/confident-frac") == ("secu_self_label_confident_frac", {})


def test_nothing_is_exported_without_ray_or_off_rank_zero(recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    TrainingTracker(TrackingHandle(run_id="r", dataset="d"), enabled=False).epoch_end({"epoch": 0, "train/loss": 1.0})
    monkeypatch.setattr(ray_metrics, "_ray_connected", lambda: False)
    RayMetrics("ingest", "", "d").set_gauges({"x/y": 1.0})
    assert recorder.calls == []


def test_training_figures_on_rank_zero(recorder: Recorder) -> None:
    tracker = TrainingTracker(TrackingHandle(run_id="r1", dataset="d"), enabled=True)
    tracker.progress(progress(1, 4, 10, 20, 64, 5.0, 12.0).figures())
    tracker.epoch_end({"epoch": 1, "train/loss": 2.5, "train/loss_center": 1.5, "data/images_per_s": 123.0,
                       "data/bad_inputs": 2.0, "clusters/h0/min_size_frac": 0.05, "clusters/h1/min_size_frac": 0.01,
                       "clusters/h0/entropy": 2.2, "note": "text", "nan": float("nan"), "flag": True})
    tracker.close()
    tags = {"job": "train", "run_id": "r1", "dataset": "d"}
    assert recorder.values("gauge", "secu_data_images_per_s", **tags) == [128.0, 123.0]  # 10 steps x 64 in 5 s
    assert recorder.values("gauge", "secu_time_run_left_s", **tags) == [5.0 + 2 * 12.0]
    assert recorder.values("gauge", "secu_epoch", **tags) == [1.0, 1.0]
    assert recorder.values("gauge", "secu_train_loss_center", **tags) == [1.5]
    assert recorder.values("gauge", "secu_data_bad_inputs", **tags) == [2.0]
    assert recorder.values("gauge", "secu_clusters_min_size_frac", head="0", **tags) == [0.05]
    assert recorder.values("gauge", "secu_clusters_min_size_frac", head="1", **tags) == [0.01]
    assert recorder.values("gauge", "secu_clusters_entropy", head="0") == [2.2]
    assert {n for _, n, _, _ in recorder.calls}.isdisjoint({"secu_note", "secu_nan", "secu_flag"})


def test_a_figure_whose_name_has_other_tags_is_left_out(recorder: Recorder) -> None:
    """ProPos reports ``propos/h0/kmeans_iters`` and its copy ``propos/kmeans_iters``: one Ray metric name with
    and without the head tag, which Ray refuses ("Missing value for tag key(s): head") and killed rank 0."""
    metrics = RayMetrics("train", "r", "d")
    metrics.set_gauges({"propos/h0/kmeans_iters": 7.0, "propos/h1/kmeans_iters": 9.0, "propos/kmeans_iters": 7.0,
                        "train/loss": 1.0})
    metrics.close()
    assert recorder.values("gauge", "secu_propos_kmeans_iters", head="0") == [7.0]
    assert recorder.values("gauge", "secu_propos_kmeans_iters", head="1") == [9.0]
    assert len(recorder.values("gauge", "secu_propos_kmeans_iters")) == 2
    assert recorder.values("gauge", "secu_train_loss") == [1.0]


def test_gauges_are_set_again_until_closed(recorder: Recorder, monkeypatch: pytest.MonkeyPatch) -> None:
    """Ray's agent drops a gauge not set within two export intervals: the exporter sets it again meanwhile."""
    monkeypatch.setenv(ray_metrics.REPORT_INTERVAL_ENV, "1000")  # refresh every 0.5 s
    metrics = RayMetrics("train", "r", "d")
    metrics.set_gauges({"train/loss": 3.0})
    deadline = time.monotonic() + 10
    while len(recorder.values("gauge", "secu_train_loss")) < 3 and time.monotonic() < deadline:
        time.sleep(0.1)
    metrics.close()
    seen = len(recorder.values("gauge", "secu_train_loss"))
    assert seen >= 3 and set(recorder.values("gauge", "secu_train_loss")) == {3.0}
    time.sleep(1.2)
    assert len(recorder.values("gauge", "secu_train_loss")) == seen  # closed: no more


def test_ingest_figures(recorder: Recorder) -> None:
    result = IngestResult(dataset="photos", added=90, already_present=5, skipped={"too_large": 3, "not_an_image": 2},
                          shards_added=["shard-000000.tar", "shard-000001.tar"], num_samples=190, seconds=3.0)
    assert export_ingest(result) is result
    tags = {"job": "ingest", "dataset": "photos"}
    assert recorder.values("counter", "secu_ingest_images_added", **tags) == [90.0]
    assert recorder.values("counter", "secu_ingest_shards_added", **tags) == [2.0]
    assert recorder.values("counter", "secu_ingest_skipped", reason="too_large", **tags) == [3.0]
    assert recorder.values("counter", "secu_ingest_skipped", reason="not_an_image", **tags) == [2.0]
    assert recorder.values("gauge", "secu_ingest_num_samples", **tags) == [190.0]
    assert recorder.values("gauge", "secu_data_images_per_s", **tags) == [30.0]


def test_inference_figures_include_the_cluster_statistics_of_the_output(recorder: Recorder, tmp_path: Any) -> None:
    storage = Storage(str(tmp_path))
    clusters_h0 = np.array([0] * 6 + [1] * 3 + [2] * 1)  # shares 0.6, 0.3, 0.1 of K = 4 (one empty)
    publish_assignments(storage, "run", "d", range(10), [f"k{i}" for i in range(10)], ["s"] * 10,
                        [clusters_h0], ks=[4])
    result = InferenceResult(run_id="run", name="assignments", uri="", rows=10, checkpoint="c", checkpoint_epoch=7,
                             dataset="d", seconds=2.0, images_per_s=5.0,
                             marker={"ks": [4], "skipped": {"count": 1, "by_reason": {"undecodable": 1}}})
    export_inference(storage, result)
    tags = {"job": "infer", "run_id": "run", "dataset": "d"}
    assert recorder.values("counter", "secu_infer_images", **tags) == [10.0]
    assert recorder.values("counter", "secu_infer_bad_inputs", reason="undecodable", **tags) == [1.0]
    assert recorder.values("gauge", "secu_data_images_per_s", **tags) == [5.0]
    assert recorder.values("gauge", "secu_infer_checkpoint_epoch", **tags) == [7.0]
    assert recorder.values("gauge", "secu_clusters_min_size_frac", head="0", **tags) == [0.0]
    assert recorder.values("gauge", "secu_clusters_max_size_frac", head="0", **tags) == [pytest.approx(0.6)]
    assert recorder.values("gauge", "secu_clusters_empty", head="0", **tags) == [1.0]
    entropy = -(0.6 * np.log(0.6) + 0.3 * np.log(0.3) + 0.1 * np.log(0.1))
    assert recorder.values("gauge", "secu_clusters_entropy", head="0", **tags) == [pytest.approx(entropy)]


def test_a_metrics_failure_does_not_fail_the_job(recorder: Recorder, tmp_path: Any,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    result = InferenceResult(run_id="run", name="assignments", uri="", rows=10, checkpoint="c", checkpoint_epoch=7,
                             dataset="d", seconds=2.0, images_per_s=5.0, marker={"ks": [4]})
    export_inference(Storage(str(tmp_path)), result)  # nothing published: the statistics cannot be read
    assert "could not export the inference's Ray metrics" in caplog.text
