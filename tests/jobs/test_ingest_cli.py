"""``python -m jobs.ingest``: arguments, exit codes, messages; local and S3 (moto) targets."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from jobs import ingest as ingest_job
from jobs.common import storage_from_args
from pipelines.dataset.info import load_dataset_info
from pipelines.storage import Storage
from tests.fixtures import write_idx_dataset


@pytest.fixture(autouse=True)
def _no_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)  # small sources then run inline, without Ray


def test_parser_defaults_and_storage_args() -> None:
    args = ingest_job.build_parser().parse_args(
        ["--source", "idx:/d", "--dataset", "fm", "--storage", "s3://bkt/p",
         "--s3-endpoint", "http://127.0.0.1:9"])
    assert (args.split, args.shard_size, args.max_pixels, args.limit, args.ray) == ("train", None, None, None, "auto")
    assert storage_from_args(args) == Storage("s3://bkt/p", "http://127.0.0.1:9")
    with pytest.raises(SystemExit):
        ingest_job.build_parser().parse_args(["--source", "x", "--dataset", "fm"])  # --storage is required


def test_ingest_idx_then_rerun_then_append(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path / "fm", 6, 3)
    base = ["--source", f"idx:{tmp_path / 'fm'}", "--dataset", "fm", "--storage", str(tmp_path / "st"),
            "--shard-size", "4", "--ray", "off"]
    assert ingest_job.main(base) == 0
    assert ingest_job.main(base) == 0
    info = load_dataset_info(Storage(str(tmp_path / "st")), "fm")
    assert (info.num_samples, info.version, [s.count for s in info.shards]) == (6, 1, [4, 2])
    assert ingest_job.main([*base, "--split", "test"]) == 0
    info = load_dataset_info(Storage(str(tmp_path / "st")), "fm")
    assert (info.num_samples, info.version) == (9, 2)
    assert info.ingests[-1]["split"] == "test" and info.ingests[-1]["added"] == 3


def test_config_file_and_set_choose_the_options(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path / "fm", 6, 3)
    cfg = tmp_path / "ingest.yaml"
    cfg.write_text("shard_size: 2\nlimit: 5\nuse_ray: false\n")
    argv = ["--source", f"idx:{tmp_path / 'fm'}", "--dataset", "fm", "--storage", str(tmp_path / "st"),
            "--config", str(cfg)]
    assert ingest_job.main([*argv, "--set", "limit=3"]) == 0  # --set wins over the file
    info = load_dataset_info(Storage(str(tmp_path / "st")), "fm")
    assert (info.num_samples, [s.count for s in info.shards]) == (3, [2, 1])
    assert ingest_job.main([*argv, "--shard-size", "3"]) == 0  # a shortcut option wins over the file too
    info = load_dataset_info(Storage(str(tmp_path / "st")), "fm")
    assert (info.num_samples, [s.count for s in info.shards]) == (5, [2, 1, 2])


def test_user_errors_exit_2_with_a_message(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR)
    argv = ["--source", f"idx:{tmp_path}", "--dataset", "fm", "--storage", str(tmp_path)]
    assert ingest_job.main(argv) == 2
    assert "no train-images-idx3-ubyte" in caplog.text
    assert ingest_job.main(["--source", str(tmp_path), "--dataset", "fm", "--storage", "gs://b/p"]) == 2
    assert "unsupported scheme" in caplog.text
    write_idx_dataset(tmp_path / "fm", 2, 1)
    assert ingest_job.main(["--source", f"idx:{tmp_path / 'fm'}", "--dataset", "fm", "--split", "valid",
                            "--storage", str(tmp_path / "st")]) == 2
    assert "--split 'valid' is not valid for idx" in caplog.text


def test_s3_storage_and_missing_bucket(tmp_path: Path, moto_endpoint: str, s3_bucket: str,
                                       caplog: pytest.LogCaptureFixture) -> None:
    write_idx_dataset(tmp_path / "fm", 5, 1)
    argv = ["--source", f"idx:{tmp_path / 'fm'}", "--dataset", "fm", "--s3-endpoint", moto_endpoint]
    assert ingest_job.main([*argv, "--storage", f"s3://{s3_bucket}/secu"]) == 0
    st = Storage(f"s3://{s3_bucket}/secu", moto_endpoint)
    assert json.loads(st.read_bytes("datasets/fm/dataset.json"))["num_samples"] == 5
    caplog.set_level(logging.ERROR)
    assert ingest_job.main([*argv, "--storage", "s3://missing-bucket/secu"]) == 2
    assert "bucket 'missing-bucket' does not exist at endpoint" in caplog.text


def test_module_entrypoint_help() -> None:
    out = subprocess.run([sys.executable, "-m", "jobs.ingest", "--help"], capture_output=True, text=True,
                         check=True, cwd=Path(__file__).resolve().parents[2])
    assert "--source" in out.stdout and "--shard-size" in out.stdout and "idx:DIR" in out.stdout


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="the Fashion-MNIST files are not on this machine")
def test_fashion_mnist_gets_its_class_names_and_a_rerun_adds_them_to_an_unnamed_dataset(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.INFO)
    base = ["--dataset", "fm", "--storage", str(tmp_path / "st"), "--limit", "30", "--ray", "off"]
    # First as if the directory said nothing: a copy under a neutral name, no names.
    (tmp_path / "copy").mkdir()
    for path in FASHION_MNIST.glob("t*-idx*-ubyte.gz"):
        (tmp_path / "copy" / path.name).symlink_to(path)
    assert ingest_job.main(["--source", f"idx:{tmp_path / 'copy'}", *base]) == 0
    assert load_dataset_info(Storage(str(tmp_path / "st")), "fm").label_names is None
    assert "pass --label-names to name the classes" in caplog.text
    assert ingest_job.main(["--source", f"idx:{FASHION_MNIST}", *base, "--json"]) == 0
    assert "label names from fashion-mnist, from the directory name" in caplog.text
    info = load_dataset_info(Storage(str(tmp_path / "st")), "fm")
    assert info.num_samples == 30 and info.label_names is not None
    assert info.label_names[0] == "T-shirt/top" and info.label_names[9] == "Ankle boot"
    printed = json.loads(capsys.readouterr().out)
    assert (printed["added"], printed["already_present"], printed["num_samples"]) == (0, 30, 30)


def test_summary_and_json_count_skipped_files_per_reason(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from tests.pipelines.dataset.bad_folder import write_bad_input_folder

    folder = write_bad_input_folder(tmp_path / "lake")
    caplog.set_level(logging.INFO)
    argv = ["--source", str(folder.root), "--dataset", "lake", "--storage", str(tmp_path / "st"), "--json"]
    assert ingest_job.main(argv) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["skipped"] == folder.skipped and printed["added"] == len(folder.valid)
    assert printed["skipped_examples"]["dangling_symlink"] == [str(folder.root / "a" / "gone.jpg")]
    assert "8 skipped: corrupt 1, dangling_symlink 1, empty 1, non_image_file 2, not_an_image 1, too_large 1, " \
           "truncated 1" in caplog.text
