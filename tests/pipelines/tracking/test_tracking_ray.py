"""A tiny training run and an inference on a local Ray whose metrics endpoint is known: the ``secu_*`` figures
appear on the node's Prometheus endpoint, and the run lands in a local MLflow file store with its params and one
value per epoch and key."""

from __future__ import annotations

import re
import socket
import threading
import time
import urllib.request
from collections.abc import Iterator

import pytest

from pipelines.outputs.inference import InferenceOptions, run_inference
from pipelines.storage import Storage
from pipelines.training.job_config import ComputeConfig, TrainJobConfig, apply_job_overrides
from pipelines.training.trainer import run_training
from secu.recipes import recipe
from tests.pipelines.run_builders import make_dataset

pytestmark = pytest.mark.ray

N, EPOCHS = 96, 2
_SAMPLE = re.compile(r"^(ray_secu_\w+)\{([^}]*)\}\s+(\S+)$")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    """A local 2-CPU Ray exporting its metrics at a known port, every second (Ray's default is 10 s)."""
    import ray

    port = _free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_metrics_report_interval_ms", "1000")
        if ray.is_initialized():
            ray.shutdown()
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, _metrics_export_port=port,
                 _system_config={"metrics_report_interval_ms": 1000})
        try:
            yield f"http://127.0.0.1:{port}/metrics"
        finally:
            ray.shutdown()


def scrape(url: str) -> list[tuple[str, dict[str, str], float]]:
    """The ``ray_secu_*`` samples on the endpoint: (name, labels, value)."""
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return []
    out = []
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            out.append((match.group(1), labels, float(match.group(3))))
    return out


class Scraper:
    """Scrapes the endpoint every 0.3 s on a thread, keeping every (name, job, run_id) seen."""

    def __init__(self, url: str) -> None:
        self.url, self.seen = url, set[tuple[str, str, str]]()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.3):
            self.seen |= {(n, lab.get("job", ""), lab.get("run_id", "")) for n, lab, _ in scrape(self.url)}

    def stop(self) -> set[tuple[str, str, str]]:
        self._stop.set()
        self._thread.join()
        return self.seen


@pytest.fixture(scope="module")
def storage(tmp_path_factory: pytest.TempPathFactory, endpoint: str) -> Storage:
    st = Storage(str(tmp_path_factory.mktemp("tracking-root")))
    make_dataset(st, "patterns", N, shard_size=48)  # an ingest while Ray runs: its counters go to the endpoint
    return st


@pytest.fixture(scope="module")
def trained(storage: Storage, endpoint: str, tmp_path_factory: pytest.TempPathFactory
            ) -> tuple[set[tuple[str, str, str]], str]:
    """Run ``track`` trained for two epochs with an MLflow file store; the (name, job, run_id) scraped meanwhile
    and the store's URI."""
    with pytest.MonkeyPatch.context() as mp:
        # Set after Ray started, so the workers get it only through the driver's tracking handle.
        mp.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
        uri = tmp_path_factory.mktemp("mlruns").as_uri()
        job = TrainJobConfig(experiment=recipe("fashion-mnist-cpu"), dataset="patterns", run_id="track",
                             compute=ComputeConfig(num_workers=1, cpus_per_worker=1.0, torch_threads=1, log_every=1))
        job = apply_job_overrides(job, ["optim.batch_size=32", "model.cnn_width=8", "secu.ks=[3,6]",
                                        "adapt.enabled=false", f"optim.epochs={EPOCHS}", f"tracking.mlflow_uri={uri}"])
        scraper = Scraper(endpoint)
        outcome = run_training(job, storage)
        seen = scraper.stop()
        assert outcome.epochs_run == EPOCHS
        return seen, uri


def test_training_figures_reach_prometheus_and_mlflow(trained: tuple[set[tuple[str, str, str]], str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import mlflow

    seen, uri = trained
    train = {name for name, job_tag, run in seen if job_tag == "train" and run == "track"}
    for name in ("ray_secu_epoch", "ray_secu_train_loss", "ray_secu_train_loss_center", "ray_secu_data_images_per_s",
                 "ray_secu_data_bad_inputs", "ray_secu_clusters_min_size_frac", "ray_secu_clusters_max_size_frac",
                 "ray_secu_clusters_entropy", "ray_secu_time_run_left_s"):
        assert name in train, f"{name} never appeared on the endpoint; seen: {sorted(train)}"
    assert ("ray_secu_ingest_images_added_total", "ingest", "") in seen

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(uri)
    experiment = client.get_experiment_by_name("secu")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id], "tags.`secu.run_id` = 'track'")
    assert run.info.status == "FINISHED"
    assert run.data.params["experiment.optim.epochs"] == str(EPOCHS)
    assert run.data.params["compute.num_workers"] == "1" and run.data.params["dataset"] == "patterns"
    for key in ("epoch", "train/loss", "data/images_per_s", "clusters/h0/min_size_frac", "clusters/h1/entropy"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == list(range(EPOCHS)), f"{key}: {steps}"
    assert "train_history.json" in [f.path for f in client.list_artifacts(run.info.run_id)]


@pytest.mark.slow
def test_inference_figures_reach_prometheus(storage: Storage, endpoint: str,
                                            trained: tuple[set[tuple[str, str, str]], str]) -> None:
    run_inference(storage, "track", options=InferenceOptions(batch_size=32, concurrency=1))
    deadline = time.monotonic() + 30
    infer: dict[str, float] = {}
    while time.monotonic() < deadline and not {"ray_secu_infer_images_total",
                                               "ray_secu_clusters_min_size_frac"} <= set(infer):
        infer = {n: v for n, lab, v in scrape(endpoint) if lab.get("job") == "infer" and lab.get("run_id") == "track"}
        time.sleep(0.3)
    assert infer.get("ray_secu_infer_images_total") == N, infer
    assert 0.0 <= infer["ray_secu_clusters_min_size_frac"] <= 1.0 / 3
