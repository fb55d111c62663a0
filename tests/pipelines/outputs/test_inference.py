"""Batch inference to Parquet: schema, sources, completeness, idempotent re-runs, kills, locks, bad input, S3
(one local Ray cluster for the module)."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipelines.dataset.info import load_dataset_info, read_manifest
from pipelines.outputs import progress
from pipelines.outputs.assignments import read_assignments, read_marker
from pipelines.outputs.evaluation import evaluate_assignments
from pipelines.outputs.inference import InferenceOptions, InferenceResult, run_inference
from pipelines.outputs.publish import TEST_PAUSE_ENV, lock_path
from pipelines.outputs.schema import assignment_schema
from pipelines.storage import Storage
from pipelines.training.checkpointing import checkpoint_at, find_latest_checkpoint, load_checkpoint
from secu.augment import EvalTransform, normalize
from tests.pipelines.run_builders import add_checkpoint, make_dataset

RUN = "fm1"
"""The run id of the README's examples, whose queries a test runs as written."""
N = 120
REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def lake(tmp_path_factory: pytest.TempPathFactory) -> tuple[Storage, np.ndarray]:
    """A local root with dataset 'tiny' (120 images, 3 shards), 'tiny-new' (30 images) and checkpoints."""
    storage = Storage(str(tmp_path_factory.mktemp("lake")))
    images = make_dataset(storage, "tiny", N, shard_size=40)
    make_dataset(storage, "tiny-new", 30, shard_size=30, seed=5)
    add_checkpoint(storage, RUN, "tiny", 1)
    add_checkpoint(storage, RUN, "tiny", 3, centers_from=images[::12][:10])  # head 0 spreads the images
    return storage, images


@pytest.fixture(scope="module")
def published(ray_cluster: None, lake: tuple[Storage, np.ndarray]) -> InferenceResult:
    """The run's assignments of 'tiny', published once for the module."""
    storage, _ = lake
    return run_inference(storage, RUN, options=InferenceOptions(batch_size=32))


def _plain_torch_clusters(storage: Storage, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Head-0 clusters and similarities computed without Ray: load, eval transform, normalise, assign."""
    loaded = load_checkpoint(find_latest_checkpoint(storage, RUN))
    aug = loaded.job.experiment.augment
    t = EvalTransform(aug)
    x = torch.stack([t(image) for image in images])
    out = loaded.method.assign(normalize(x, aug.mean, aug.std))
    return out.clusters_HB[0].numpy(), out.similarity_HB[0].numpy()


def test_latest_checkpoint_skips_incomplete_ones(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="jobs.train"):
        find_latest_checkpoint(storage, "nope")
    add_checkpoint(storage, "x", "tiny", 2)
    add_checkpoint(storage, "x", "tiny", 5)
    meta_only = tmp_path / "runs/x/checkpoints/checkpoint_9"
    meta_only.mkdir(parents=True)
    (meta_only / "secu_checkpoint.json").write_text('{"epoch": 9, "global_step": 90}')
    corrupt = Path(storage.path(add_checkpoint(storage, "x", "tiny", 7)))
    (corrupt / "secu_checkpoint.json").write_text('{"epoch": 7,')  # an interrupted upload

    latest = find_latest_checkpoint(storage, "x")

    assert latest.epoch == 5 and latest.label.startswith("runs/x/checkpoints/")
    assert checkpoint_at(str(meta_only.parent / Path(latest.label).name), storage).epoch == 5
    with pytest.raises(FileNotFoundError, match="not a complete SeCu checkpoint"):
        checkpoint_at(str(meta_only), storage)


@pytest.mark.ray
def test_inference_writes_the_declared_schema_and_every_image_once(
        published: InferenceResult, lake: tuple[Storage, np.ndarray]) -> None:
    storage, images = lake
    result = published

    out = Path(storage.path("runs", RUN, "assignments"))
    parts = sorted(out.glob("part-*.parquet"))
    assert parts and result.rows == N and result.checkpoint_epoch == 3
    for part in parts:
        assert pq.read_schema(part).remove_metadata().equals(assignment_schema(3)), pq.read_schema(part)
    frame = pd.read_parquet(out)  # pandas reads the directory as is (_SUCCESS is ignored)
    assert len(frame) == N and frame["sample_index"].is_unique
    assert sorted(frame["sample_index"]) == list(range(N))
    manifest = read_manifest(storage, load_dataset_info(storage, "tiny")).to_pandas().set_index("sample_index")
    frame = frame.set_index("sample_index").sort_index()
    assert (frame["key"] == manifest["key"]).all() and (frame["shard"] == manifest["shard"]).all()
    assert (frame["source"] == manifest["source"]).all() and frame["source"].str.startswith("synthetic:").all()
    assert (frame["checkpoint_epoch"] == 3).all() and (frame["run_id"] == RUN).all()
    for h, k in enumerate((10, 20, 30)):
        assert frame[f"cluster_h{h}"].between(0, k - 1).all()
        assert frame[f"confidence_h{h}"].between(1.0 / k, 1.0).all()
        assert frame[f"similarity_h{h}"].between(-1.0 - 1e-6, 1.0 + 1e-6).all()  # float32 rounding of a cosine
    clusters, sims = _plain_torch_clusters(storage, images)
    np.testing.assert_array_equal(frame["cluster_h0"].to_numpy(), clusters)
    np.testing.assert_allclose(frame["similarity_h0"].to_numpy(), sims, atol=1e-5)
    marker = read_marker(storage, RUN)
    assert marker["rows"] == N and marker["dataset"] == "tiny" and marker["checkpoint_epoch"] == 3
    assert [f["path"] for f in marker["files"]] == [p.name for p in parts]


@pytest.mark.ray
def test_the_model_in_actors_writes_the_rows_of_the_model_in_the_read_tasks(
        published: InferenceResult, lake: tuple[Storage, np.ndarray]) -> None:
    storage, _ = lake
    assert published.marker["model_in"] == "tasks" and published.marker["actors"] == 0  # the default on CPUs

    actors = run_inference(storage, RUN, output_name="assignments-actors",
                           options=InferenceOptions(batch_size=32, model_in="actors", cpus_per_actor=0.5))

    assert actors.marker["model_in"] == "actors" and actors.marker["actors"] >= 1
    tasks_rows = read_assignments(storage, RUN).sort_by("sample_index")
    actor_rows = read_assignments(storage, RUN, "assignments-actors").sort_by("sample_index")
    assert actor_rows.schema.remove_metadata().equals(tasks_rows.schema.remove_metadata())
    assert actor_rows.num_rows == N
    for name in tasks_rows.column_names:
        a = tasks_rows.column(name).to_numpy(zero_copy_only=False)
        b = actor_rows.column(name).to_numpy(zero_copy_only=False)
        if name.startswith(("similarity_", "confidence_")):  # other batch sizes: float rounding may differ
            np.testing.assert_allclose(a, b, atol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.ray
def test_actors_that_leave_no_node_a_whole_cpu_for_the_reads_are_warned_of(
        ray_cluster: None, caplog: pytest.LogCaptureFixture) -> None:
    from pipelines.outputs.inference import _resources

    with caplog.at_level(logging.WARNING, logger="pipelines.outputs.inference"):
        _resources(InferenceOptions(model_in="actors", concurrency=1, cpus_per_actor=0.5))
    assert "no node a whole CPU" not in caplog.text  # 1.5 of the 2 CPUs stay free

    with caplog.at_level(logging.WARNING, logger="pipelines.outputs.inference"):
        use_gpu, actors = _resources(InferenceOptions(model_in="actors", concurrency=2, cpus_per_actor=0.6))
    assert (use_gpu, actors) == (False, 2)
    assert "leave no node a whole CPU for a read task" in caplog.text and "model_in=tasks" in caplog.text


README = REPO / "README.md"


def _readme_queries() -> tuple[str, str]:
    """The DuckDB query and the pandas snippet of README.md's "Output format", as written there."""
    text = README.read_text()
    sql = re.search(r"```sql\n(SELECT source, cluster_h0 FROM .*?);?\n```", text, re.S)
    code = re.search(r"```python\n(import pandas as pd\ndf = pd.read_parquet\(.*?)```", text, re.S)
    assert sql and code, "README.md lost the DuckDB and pandas queries of the output format"
    return sql.group(1), code.group(1)


@pytest.mark.ray
def test_readme_queries_name_the_files_of_a_cluster(
        published: InferenceResult, lake: tuple[Storage, np.ndarray], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    import duckdb

    storage, images = lake
    sql, snippet = _readme_queries()
    assert "'data/runs/fm1/assignments/*.parquet'" in sql and f"runs/{RUN}/" in snippet
    (tmp_path / "data").symlink_to(storage.root)  # the quick start's storage root ./data
    monkeypatch.chdir(tmp_path)
    clusters, _ = _plain_torch_clusters(storage, images)  # computed without Ray, Parquet or the output
    assert clusters[84] == 7  # the image whose embedding is center 7
    manifest = read_manifest(storage, load_dataset_info(storage, "tiny"))
    expected = sorted(manifest["source"].to_numpy(zero_copy_only=False)[clusters == 7].tolist())
    assert expected, "no image in cluster 7: the query would be vacuous"

    rows = duckdb.connect().execute(sql).fetchall()
    namespace: dict[str, object] = {}
    exec(snippet, namespace)  # the README's pandas lines, as written

    assert sorted(source for source, _ in rows) == expected and {c for _, c in rows} == {7}
    assert sorted(namespace["sources"]) == expected  # type: ignore[call-overload]


@pytest.mark.ray
def test_rerun_replaces_rows_and_other_datasets_get_their_own_output(
        published: InferenceResult, lake: tuple[Storage, np.ndarray], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    storage, _ = lake
    assert read_assignments(storage, RUN).num_rows == N
    monkeypatch.setattr(progress, "EVERY_S", 0.05)
    with caplog.at_level(logging.INFO, logger="pipelines.outputs.progress"):
        result = run_inference(storage, RUN, options=InferenceOptions(batch_size=50, with_embeddings=True))
    # Progress a person can read (issue 16): done of total, and once any are done the rate and the time left.
    lines = [r.getMessage() for r in caplog.records if r.name == "pipelines.outputs.progress"]
    assert lines and all(re.match(rf"inference of run {RUN}: [\d,]+ of {N:,} images", line) for line in lines), lines
    other = run_inference(storage, RUN, dataset="tiny-new", options=InferenceOptions(batch_size=50))

    table = read_assignments(storage, RUN)
    assert result.rows == N and table.num_rows == N  # not 2N
    assert table.schema.equals(assignment_schema(3, 128))
    assert table.schema.field("embedding").type == pa.list_(pa.field("item", pa.float32(), nullable=False), 128)
    z = np.stack(table["embedding"].to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    out = Path(storage.path("runs", RUN, "assignments"))
    files = [f["path"] for f in read_marker(storage, RUN)["files"]]
    assert sorted(p.name for p in out.iterdir()) == ["_SUCCESS", *files]
    assert other.name == "assignments-tiny-new" and other.rows == 30
    new = read_assignments(storage, RUN, "assignments-tiny-new")
    assert sorted(new["sample_index"].to_pylist()) == list(range(30))
    assert read_marker(storage, RUN, "assignments-tiny-new")["train_dataset"] == "tiny"


@pytest.mark.ray
def test_inference_of_selected_shards_writes_only_their_rows(
        published: InferenceResult, lake: tuple[Storage, np.ndarray]) -> None:
    """What reclustering's infer_scope=new uses: only the shards named (here the last of three)."""
    storage, _ = lake
    last = load_dataset_info(storage, "tiny").shards[-1]
    with pytest.raises(ValueError, match="not committed shards"):
        run_inference(storage, RUN, shards=["shard-000999.tar"], output_name="assignments-part")
    result = run_inference(storage, RUN, shards=[last.name], output_name="assignments-part",
                           options=InferenceOptions(batch_size=32))
    ids = sorted(read_assignments(storage, RUN, "assignments-part")["sample_index"].to_pylist())
    assert result.rows == last.count and ids == list(range(last.first_index, last.first_index + last.count))
    marker = read_marker(storage, RUN, "assignments-part")
    assert (marker["scope"], marker["shards"], marker["skipped"]["count"]) == ("shards", [last.name], 0)
    assert read_marker(storage, RUN)["scope"] == "all"


def ray_cluster_address() -> str:
    import ray

    return str(ray.get_runtime_context().gcs_address)


def _start_job(storage: Storage, ray_address: str, pause: str) -> subprocess.Popen[str]:
    env = dict(os.environ, RAY_ADDRESS=ray_address, PYTHONPATH=str(REPO), **{TEST_PAUSE_ENV: pause})
    return subprocess.Popen(
        [sys.executable, "-m", "jobs.infer", "--storage", storage.root, "--run-id", RUN, "--batch-size", "40"],
        cwd=REPO, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, start_new_session=True)


def _kill_at_pause(proc: subprocess.Popen[str], stage: str, timeout: float = 150.0) -> None:
    """Wait until the job reports the pause point, then SIGKILL it (and its process group)."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if f"SECU-TEST-PAUSE {stage}" in line:
            break
        assert time.monotonic() < deadline, "".join(seen[-30:])
    else:
        raise AssertionError(f"the job ended before pausing at {stage!r}:\n{''.join(seen[-30:])}")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def _staging_and_versions(storage: Storage) -> tuple[list[str], list[str]]:
    def names(rel: str) -> list[str]:
        path = Path(storage.path(rel))
        return sorted(p.name for p in path.iterdir()) if path.exists() else []

    return names(f"runs/{RUN}/_staging/assignments"), names(f"runs/{RUN}/_versions/assignments")


@pytest.mark.ray
def test_inference_killed_while_publishing_is_completed_by_a_rerun(
        published: InferenceResult, lake: tuple[Storage, np.ndarray], caplog: pytest.LogCaptureFixture) -> None:
    storage, _ = lake
    before = read_assignments(storage, RUN, columns=["sample_index", "cluster_h0", "cluster_h2"])
    version = read_marker(storage, RUN)["version"]
    out = Path(storage.path("runs", RUN, "assignments"))

    # Killed with the new version folder complete, just before the switch: the old version stays published
    # and whole for every reader, and the dead job's lock stays behind.
    _kill_at_pause(_start_job(storage, ray_cluster_address(), "versioned"), "versioned")
    assert read_marker(storage, RUN)["version"] == version
    assert read_assignments(storage, RUN).num_rows == N and pd.read_parquet(out)["sample_index"].is_unique
    assert len(pd.read_parquet(out)) == N and len(_staging_and_versions(storage)[1]) >= 2
    assert storage.exists(lock_path(f"runs/{RUN}/assignments"))

    with caplog.at_level(logging.WARNING, logger="pipelines.run_lock"):
        result = run_inference(storage, RUN, options=InferenceOptions(batch_size=60))
    assert "its holder's process is gone" in caplog.text and "taking it over" in caplog.text
    after = read_assignments(storage, RUN).sort_by("sample_index")
    assert result.rows == N and after.num_rows == N
    assert after["sample_index"].to_pylist() == list(range(N))
    assert after.select(before.column_names).equals(before.sort_by("sample_index"))
    staging, versions = _staging_and_versions(storage)
    assert staging == [] and versions == sorted([version, result.marker["version"]])  # new and replaced
    assert not storage.exists(lock_path(f"runs/{RUN}/assignments"))


@pytest.mark.ray
@pytest.mark.slow
def test_inference_killed_after_staging_leaves_the_previous_output_published(
        published: InferenceResult, lake: tuple[Storage, np.ndarray]) -> None:
    storage, _ = lake
    run_inference(storage, RUN, options=InferenceOptions(batch_size=60))
    before = read_assignments(storage, RUN)

    _kill_at_pause(_start_job(storage, ray_cluster_address(), "staged"), "staged")

    assert read_assignments(storage, RUN).equals(before)
    assert _staging_and_versions(storage)[0]
    run_inference(storage, RUN, options=InferenceOptions(batch_size=60))
    assert read_assignments(storage, RUN).num_rows == N
    assert _staging_and_versions(storage)[0] == []


def test_read_assignments_refuses_unpublished_output(tmp_path: Path) -> None:
    storage = Storage(str(tmp_path))
    part = tmp_path / "runs" / "r" / "_staging" / "assignments" / "20260101T000000-0a1b2c3d" / "x_0.parquet"
    part.parent.mkdir(parents=True)
    pq.write_table(assignment_schema(1).empty_table(), part)  # a killed attempt: staged, never published
    with pytest.raises(FileNotFoundError, match="in progress or interrupted"):
        read_assignments(storage, "r")
    with pytest.raises(FileNotFoundError, match="absent"):
        read_assignments(storage, "other")


@pytest.fixture()
def s3_root(ray_cluster: None, moto_endpoint: str, s3_bucket: str) -> Storage:
    """A fresh bucket on the moto S3 server on 127.0.0.1 (a real HTTP endpoint that Ray workers reach)."""
    return Storage(f"s3://{s3_bucket}/lake", s3_endpoint=moto_endpoint)


@pytest.mark.ray
def test_infer_evaluate_report_jobs_on_s3(s3_root: Storage, capsys: pytest.CaptureFixture[str]) -> None:
    """The three job entrypoints against an S3 endpoint on loopback, checkpoint read from S3."""
    from jobs import evaluate, infer, report

    storage = s3_root
    make_dataset(storage, "tiny", 60, shard_size=30)
    rel = add_checkpoint(storage, RUN, "tiny", 4)
    common = ["--storage", storage.root, "--s3-endpoint", str(storage.s3_endpoint), "--run-id", RUN]

    assert infer.main([*common, "--checkpoint", storage.uri(rel), "--batch-size", "30"]) == 0

    marker = read_marker(storage, RUN)
    assert marker["rows"] == 60 and marker["checkpoint"] == storage.uri(rel)
    assert marker["checkpoint_epoch"] == 4
    # On S3 the published prefix holds only the marker; the files are in the version folder it names.
    assert [e.path for e in storage.list(f"runs/{RUN}/assignments", recursive=True)] == ["_SUCCESS"]
    assert storage.list(f"runs/{RUN}/_staging", recursive=True) == []
    listed = [e.path for e in storage.list(marker["location"])]
    assert listed == sorted(["_SUCCESS", *(f["path"] for f in marker["files"])])
    part = marker["files"][0]["path"]
    with storage.filesystem.open_input_file(storage.path(marker["location"], part)) as handle:
        assert pq.read_schema(handle).remove_metadata().equals(assignment_schema(3))
    assert sorted(read_assignments(storage, RUN)["sample_index"].to_pylist()) == list(range(60))

    assert evaluate.main(common) == 0
    assert "ACC" in capsys.readouterr().out
    metrics = evaluate_assignments(storage, RUN)
    assert metrics["protocol"]["labelled_rows"] == 60 and storage.exists(f"runs/{RUN}/metrics.json")

    assert report.main([*common, "--set", "top=2", "--set", "random=1"]) == 0
    assert capsys.readouterr().out.strip() == storage.uri(f"runs/{RUN}/report/index.html")
    uploaded = {e.path for e in storage.list(f"runs/{RUN}/report", recursive=True)}
    assert {"index.html", "clusters/c0000.html", "clusters/c0009.html"} <= uploaded
    index = storage.read_bytes(f"runs/{RUN}/report/index.html").decode()
    thumbs = set(re.findall(r'src="(thumbs/[^"]+)"', index))
    assert thumbs and thumbs <= uploaded  # every image the index shows was uploaded


def _corrupt_one_image(storage: Storage, dataset: str, shard: str, position: int) -> None:
    """Overwrite most of one PNG member of a shard with zeros; the tar keeps its size (not a truncated shard)."""
    import tarfile

    path = storage.path("datasets", dataset, "shards", shard)
    with tarfile.open(path) as tar:
        member = [m for m in tar.getmembers() if m.name.endswith(".png")][position]
    data = bytearray(Path(path).read_bytes())
    data[member.offset_data + 16: member.offset_data + member.size] = bytes(member.size - 16)
    Path(path).write_bytes(bytes(data))


class _ErrorLines(logging.Handler):
    """The messages of ERROR records, kept as text."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.mark.ray
def test_bad_image_over_the_budget_exits_2_naming_it_and_the_option(
        published: InferenceResult, lake: tuple[Storage, np.ndarray]) -> None:
    from jobs import infer

    storage, _ = lake
    make_dataset(storage, "broken", 40, shard_size=20, seed=3)
    # Samples 23 and 25: 0.01 x 40 images allows 1 (the budget is at least one image when the fraction is above 0).
    _corrupt_one_image(storage, "broken", "shard-000001.tar", 3)
    _corrupt_one_image(storage, "broken", "shard-000001.tar", 5)
    argv = ["--storage", storage.root, "--run-id", RUN, "--dataset", "broken", "--batch-size", "20"]

    # Last in the module: inside pytest the failed execution's model actor stays alive (1 of the 2 CPUs) until Ray
    # shuts down, which the garbage collection in run_inference releases in a plain process (a second inference in
    # the same pytest process waited for that CPU).
    errors = _ErrorLines()
    logging.getLogger("jobs.common").addHandler(errors)
    try:
        start = time.monotonic()
        code = infer.main(argv)
        elapsed = time.monotonic() - start
    finally:
        logging.getLogger("jobs.common").removeHandler(errors)

    [message] = errors.lines
    assert code == 2 and elapsed < 90, (code, elapsed)
    assert message.startswith("secu infer: bad input: inference of run fm1 on dataset 'broken': 2 of 40 images")
    for i in (3, 5):
        assert (f"sample_index {20 + i} (source synthetic:train:{20 + i}, shard shard-000001.tar key "
                f"s000001_000000{i}): undecodable") in message
    assert "max_bad_fraction=0.01 allows (1)" in message and "--set max_bad_fraction=0.05" in message
    assert "Nothing was published" in message and "object at 0x" not in message
    with pytest.raises(FileNotFoundError, match="_SUCCESS is missing"):
        read_marker(storage, RUN, "assignments-broken")
