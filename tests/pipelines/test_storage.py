"""Storage: validation, paths, atomic writes, local and S3 (moto server), clear failures."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipelines.dataset.info import load_dataset_info
from pipelines.storage import Storage, credentials_in_env, join


def test_config_validation_and_normalisation(tmp_path: Path) -> None:
    assert Storage(str(tmp_path / "a" / ".." / "b")).root == str(tmp_path / "b")
    assert Storage("s3://bucket/x//y/").root == "s3://bucket/x/y"
    assert Storage("s3://bkt", "http://127.0.0.1:9000/").s3_endpoint == "http://127.0.0.1:9000"
    with pytest.raises(ValueError, match="storage root is empty"):
        Storage("  ")
    with pytest.raises(ValueError, match="not a valid S3 bucket name"):
        Storage("s3://B_ad/prefix")
    with pytest.raises(ValueError, match="unsupported scheme"):
        Storage("gs://bucket/prefix")
    with pytest.raises(ValueError, match="must start with http"):
        Storage("s3://bucket", s3_endpoint="127.0.0.1:9000")


def test_paths_and_join(tmp_path: Path) -> None:
    assert join("datasets/", "/fm", "", "shards") == "datasets/fm/shards"
    s3 = Storage("s3://bucket/pre", "http://127.0.0.1:1")
    assert s3.path("datasets", "fm") == "bucket/pre/datasets/fm"
    assert s3.uri("datasets/fm") == "s3://bucket/pre/datasets/fm"
    assert s3.bucket == "bucket" and s3.is_s3
    fs, path = s3.pyarrow_fs_and_path("runs/r1")
    assert isinstance(fs, pafs.S3FileSystem) and path == "bucket/pre/runs/r1"
    local = Storage(str(tmp_path))
    assert local.path("a", "b") == f"{tmp_path}/a/b" and isinstance(local.filesystem, pafs.LocalFileSystem)
    assert local.child("datasets").root == str(tmp_path / "datasets")


def test_pickle_carries_only_the_fields_and_no_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECRETVALUE1")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "VERYSECRETVALUE2")
    cfg = Storage("s3://bucket/p", "http://127.0.0.1:9")
    _ = cfg.filesystem  # cached, must not travel
    blob = pickle.dumps(cfg)
    assert b"VERYSECRETVALUE2" not in blob and b"AKIDSECRETVALUE1" not in blob
    back = pickle.loads(blob)
    assert back == cfg and "filesystem" not in back.__dict__
    assert "SECRET" not in repr(cfg)


def test_local_files_atomic(tmp_path: Path) -> None:
    st = Storage(str(tmp_path / "root"))
    st.check_reachable()
    assert not st.exists("a/b.txt") and st.size("a/b.txt") is None and st.list("a") == []
    st.write_bytes_atomic("a/b.txt", b"hello")
    st.write_bytes_atomic("a/c/d.bin", b"12")
    assert st.read_bytes("a/b.txt") == b"hello" and st.size("a/b.txt") == 5 and st.exists("a")
    assert [e.path for e in st.list("a")] == ["b.txt"]
    assert [(e.path, e.size) for e in st.list("a", recursive=True)] == [("b.txt", 5), ("c/d.bin", 2)]
    assert oct(os.stat(st.path("a/b.txt")).st_mode & 0o777) != oct(0o600)
    with pytest.raises(RuntimeError), st.atomic_writer("a/b.txt") as handle:
        handle.write(b"partial")
        raise RuntimeError("writer failed")
    assert st.read_bytes("a/b.txt") == b"hello"  # old content kept, no temp file left behind
    assert sorted(os.listdir(st.path("a"))) == ["b.txt", "c"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        st.read_bytes("nope.bin")
    st.delete("a/b.txt")
    assert not st.exists("a/b.txt")


def test_root_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        Storage(str(tmp_path / "f")).check_reachable()


def test_s3_roundtrip_pyarrow_and_fsspec(moto_endpoint: str, s3_bucket: str) -> None:
    st = Storage(f"s3://{s3_bucket}/root", moto_endpoint)
    st.check_reachable()
    st.write_bytes_atomic("datasets/x/dataset.json", b"{}")
    with st.atomic_writer("datasets/x/shards/s.tar") as handle:
        handle.write(b"a" * 1000)
    assert st.exists("datasets/x/dataset.json") and st.size("datasets/x/shards/s.tar") == 1000
    assert [e.path for e in st.list("datasets/x", recursive=True)] == ["dataset.json", "shards/s.tar"]
    assert st.read_head("datasets/x/shards/s.tar", 10) == b"a" * 10
    fs = st.fsspec()
    assert fs.cat_file(f"{s3_bucket}/root/datasets/x/dataset.json") == b"{}"
    with pytest.raises(RuntimeError), st.atomic_writer("datasets/x/never.bin") as handle:
        handle.write(b"zzz")
        raise RuntimeError("failed before upload")
    assert not st.exists("datasets/x/never.bin")


def test_s3_missing_bucket_is_a_clear_error(moto_endpoint: str) -> None:
    st = Storage("s3://no-such-bucket/p", moto_endpoint)
    with pytest.raises(FileNotFoundError, match=r"bucket 'no-such-bucket' does not exist at endpoint "
                                                r"http://127\.0\.0\.1:\d+: create it or fix --storage"):
        st.check_reachable()


def test_s3_unreachable_endpoint_is_a_clear_error(moto_endpoint: str) -> None:
    st = Storage("s3://bucket/p", "http://127.0.0.1:9")  # nothing listens on port 9
    with pytest.raises((ConnectionError, PermissionError), match="(cannot reach|cannot access)"):
        st.check_reachable()


def test_half_set_credentials_fail_early(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    with pytest.raises(ValueError, match="AWS_SECRET_ACCESS_KEY is not set"):
        Storage("s3://bucket/p", "http://127.0.0.1:9").check_reachable()
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    for name in ("AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE", "AWS_CONTAINER_CREDENTIALS_FULL_URI",
                 "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI"):
        monkeypatch.delenv(name, raising=False)
    assert credentials_in_env() is None


def test_missing_dataset_names_the_ingest_command(tmp_path: Path) -> None:
    st = Storage(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"no dataset 'fmnist' under .*/datasets: run "
                                                r"`python -m jobs.ingest .*--dataset fmnist"):
        load_dataset_info(st, "fmnist")
