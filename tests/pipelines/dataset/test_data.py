"""Ray Data streaming over ingested shards: ids, epochs, consumers, S3, decoding and the bad-input policy."""

from __future__ import annotations

import io
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from pipelines.dataset.bad_input import (
    BadInputError,
    BadInputPolicy,
    BadInputTally,
    BadSample,
    new_bad_input_counter,
    verify_epoch,
)
from pipelines.dataset.decode import decode_image, pil_to_array
from pipelines.dataset.info import (
    MANIFEST_SCHEMA,
    DatasetInfo,
    ShardInfo,
    commit,
    load_dataset_info,
    load_manifest_labels,
    read_manifest,
    sample_key,
    shard_name,
)
from pipelines.dataset.ingest import IngestOptions, ingest
from pipelines.dataset.sources import open_source
from pipelines.dataset.streams import build_eval_dataset, build_train_dataset
from pipelines.storage import Storage
from secu.config import AugmentConfig
from tests.fixtures import image_bytes, write_idx_dataset
from tests.pipelines.dataset.bad_folder import write_bad_input_folder
from tests.pipelines.dataset.test_shard_reader import whole_before

AUG = AugmentConfig(image_size=16, channels=1, mean=(0.5,), std=(0.5,))


def _ids(ds: Any) -> np.ndarray:
    return np.concatenate([b["sample_index"] for b in ds.iter_batches(batch_size=64)])


def _fm_dataset(tmp_path: Path, st: Storage, n: int = 23, shard_size: int = 8) -> np.ndarray:
    train_x, train_y, _, _ = write_idx_dataset(tmp_path / "fm", n, 1)
    options = IngestOptions(shard_size=shard_size, use_ray=False)
    ingest(st, "fm", open_source(f"idx:{tmp_path / 'fm'}"), options)
    return train_y


# ---------------------------------------------------------------------------------------------
# Decoding (no Ray)
# ---------------------------------------------------------------------------------------------


def _decoded(mode: str, channels: int, fmt: str = "PNG") -> tuple[np.ndarray, Image.Image]:
    data = image_bytes(mode, fmt=fmt)
    return decode_image(data, channels, 10_000), Image.open(io.BytesIO(data))


def test_decode_converts_every_mode() -> None:
    rgba_out, rgba = _decoded("RGBA", 3)
    src = np.asarray(rgba).astype(np.uint16)
    expected = ((src[..., :3] * src[..., 3:] + 127) // 255).astype(np.uint8)  # composited on black
    np.testing.assert_array_equal(rgba_out, expected)

    la_out, la = _decoded("LA", 1)
    src = np.asarray(la).astype(np.uint16)
    np.testing.assert_array_equal(la_out[..., 0], ((src[..., 0] * src[..., 1] + 127) // 255).astype(np.uint8))

    i16_out, i16 = _decoded("I;16", 1)
    wide = np.asarray(i16).astype(np.int64)
    np.testing.assert_array_equal(i16_out[..., 0], ((wide * 255 + 32767) // 65535).astype(np.uint8))

    bw_out, _ = _decoded("1", 1)
    assert set(np.unique(bw_out)) <= {0, 255}

    p_out, p = _decoded("P", 3)
    np.testing.assert_array_equal(p_out, np.asarray(p.convert("RGB")))
    cmyk_out, cmyk = _decoded("CMYK", 3, fmt="TIFF")
    np.testing.assert_array_equal(cmyk_out, np.asarray(cmyk.convert("RGB")))

    gray3, gray = _decoded("L", 3)
    assert gray3.shape == (10, 12, 3) and (gray3 == np.asarray(gray)[..., None]).all()
    rgb1, rgb = _decoded("RGB", 1)
    np.testing.assert_array_equal(rgb1[..., 0], np.asarray(rgb.convert("L")))
    for mode in ("L", "1", "LA", "RGB", "RGBA", "P", "I;16"):
        for channels in (1, 3):
            out, _ = _decoded(mode, channels)
            assert out.dtype == np.uint8 and out.shape == (10, 12, channels), (mode, channels)


def test_float_images_are_scaled() -> None:
    img = Image.fromarray(np.array([[0.0, 0.5], [1.0, 0.25]], dtype=np.float32))
    np.testing.assert_array_equal(pil_to_array(img, 1)[..., 0], [[0, 128], [255, 64]])


def test_decode_failures_name_the_reason() -> None:
    with pytest.raises(ValueError, match="^empty"):
        decode_image(b"", 1, 100)
    with pytest.raises(ValueError, match="^undecodable"):
        decode_image(b"\x89PNG\r\n\x1a\n not really", 1, 100)
    with pytest.raises(ValueError, match="^too_large: 40x30 pixels > max_pixels=1000"):
        decode_image(image_bytes("L", size=(40, 30)), 1, 1000)
    truncated = image_bytes("RGB", size=(64, 64), fmt="JPEG")[:200]
    with pytest.raises(ValueError, match="^undecodable"):
        decode_image(truncated, 3, 10_000)


def test_a_small_collection_may_hold_one_bad_file_under_a_nonzero_fraction() -> None:
    """Issue 17: 53 images under the default 1 % had a budget of 0, so one bad file failed the run."""
    default = BadInputPolicy()
    assert [default.budget(n) for n in (53, 99, 100, 250, 10_000)] == [1, 1, 1, 2, 100]
    assert BadInputPolicy(max_bad_fraction=0).budget(10_000) == 0
    tally = BadInputTally(53, default)
    assert tally.record(52, [BadSample("s.tar", "k1", "undecodable")]) is False
    assert tally.record(0, [BadSample("s.tar", "k2", "undecodable")]) is True


def test_tally_counts_each_bad_sample_once() -> None:
    tally = BadInputTally(100, BadInputPolicy(max_bad_fraction=0.03, log_first=2))
    bad = [BadSample("s.tar", "k1", "undecodable"), BadSample("s.tar", "k2", "empty")]
    assert tally.record(10, bad) is False
    assert tally.record(10, bad) is False  # a second epoch sees the same samples
    tally.exclude_shard("t.tar", "missing_shard", 1)
    tally.exclude_shard("t.tar", "missing_shard", 1)
    report = tally.report()
    assert report.bad == 3 and report.by_reason == {"undecodable": 1, "empty": 1, "missing_shard": 1}
    assert report.budget == 3 and len(report.examples) == 2 and report.decoded == 20
    assert tally.record(0, [BadSample("s.tar", "k3", "too_large")]) is True


def test_tally_counts_a_cut_shard_once_per_shard() -> None:
    tally = BadInputTally(100, BadInputPolicy(max_bad_fraction=0.05))
    tally.cut_shard("u.tar", "truncated_shard", 3, "ReadError: unexpected end of data")
    tally.cut_shard("u.tar", "truncated_shard", 3)  # the next epoch reads it again
    assert tally.report().by_reason == {"truncated_shard": 3} and tally.report().cut_shards == {"u.tar": 3}
    tally.cut_shard("v.tar", "damaged_shard", 2)
    report = tally.report()
    assert report.bad == 5 and not report.over_limit and report.cut_shards == {"u.tar": 3, "v.tar": 2}
    assert any("u.tar: truncated_shard (ReadError" in e for e in report.examples)


# ---------------------------------------------------------------------------------------------
# Streaming (Ray)
# ---------------------------------------------------------------------------------------------


@pytest.mark.ray
def test_train_stream_ids_dense_and_stable_every_epoch(tmp_path: Path, ray_cluster: None) -> None:
    st = Storage(str(tmp_path / "store"))
    _fm_dataset(tmp_path, st)
    st.write_bytes_atomic("datasets/fm/shards/shard-000099.tar", b"uncommitted junk is never read")
    ds = build_train_dataset(st, "fm", AUG, seed=3)
    for _ in range(2):
        batches = list(ds.iter_batches(batch_size=10))
        assert all(set(b) == {"view1", "view2", "sample_index"} for b in batches)
        assert all(b["view1"].dtype == np.uint8 and b["view1"].shape[1:] == (1, 16, 16) for b in batches)
        assert all(b["view2"].shape == b["view1"].shape for b in batches)
        ids = np.concatenate([b["sample_index"] for b in batches])
        assert ids.dtype == np.int64 and sorted(ids.tolist()) == list(range(23))
    first = next(iter(ds.iter_batches(batch_size=23)))
    assert not np.array_equal(first["view1"], first["view2"])  # two different views


@pytest.mark.ray
def test_eval_stream_is_deterministic_with_keys_and_labels(tmp_path: Path, ray_cluster: None) -> None:
    st = Storage(str(tmp_path / "store"))
    labels = _fm_dataset(tmp_path, st)
    rows = list(build_eval_dataset(st, "fm", AUG).iter_rows())
    manifest = read_manifest(st, load_dataset_info(st, "fm")).to_pylist()
    assert sorted(r["sample_index"] for r in rows) == list(range(23))
    for row in rows:
        entry = manifest[row["sample_index"]]
        expected = (entry["key"], entry["shard"], int(labels[row["sample_index"]]))
        assert (row["key"], row["shard"], row["label"]) == expected
        assert row["image"].shape == (1, 16, 16) and row["image"].dtype == np.uint8
    again = {r["sample_index"]: r["image"] for r in build_eval_dataset(st, "fm", AUG).iter_rows()}
    assert all(np.array_equal(again[r["sample_index"]], r["image"]) for r in rows)
    np.testing.assert_array_equal(load_manifest_labels(st, "fm"), labels)


@pytest.mark.ray
def test_read_through_s3(tmp_path: Path, ray_cluster: None, moto_endpoint: str, s3_bucket: str) -> None:
    st = Storage(f"s3://{s3_bucket}/secu", moto_endpoint)
    _fm_dataset(tmp_path, st, n=12, shard_size=5)
    assert sorted(_ids(build_train_dataset(st, "fm", AUG, seed=0)).tolist()) == list(range(12))
    eval_rows = list(build_eval_dataset(st, "fm", AUG).iter_rows())
    assert {r["shard"] for r in eval_rows} == {shard_name(i) for i in range(3)}


def _consume(it: Any, epochs: int) -> list[list[int]]:
    return [[int(i) for b in it.iter_batches(batch_size=4) for i in b["sample_index"]] for _ in range(epochs)]


@pytest.mark.ray
def test_two_consumers_see_every_sample_once_per_epoch(tmp_path: Path, ray_cluster: None) -> None:
    # Consumers are threads of this process (as Train workers are separate processes; the split logic,
    # in the SplitCoordinator actor, is the same); each epoch starts when both have started iterating.
    st = Storage(str(tmp_path / "store"))
    _fm_dataset(tmp_path, st, n=23, shard_size=6)
    ds = build_train_dataset(st, "fm", AUG, seed=1)
    with ThreadPoolExecutor(2) as pool:
        a, b = pool.map(_consume, ds.streaming_split(2, equal=False), [2, 2])
        for epoch in range(2):
            assert not set(a[epoch]) & set(b[epoch])
            assert sorted(a[epoch] + b[epoch]) == list(range(23))
        # equal=True (what Ray Train's DataConfig uses): equal lengths, disjoint, at most n - 1 rows dropped.
        ((a1,), (b1,)) = pool.map(_consume, ds.streaming_split(2, equal=True), [1, 1])
    assert len(a1) == len(b1) and not set(a1) & set(b1) and len(a1) + len(b1) >= 22


# ---------------------------------------------------------------------------------------------
# Bad input (Ray)
# ---------------------------------------------------------------------------------------------

Sample = tuple[dict[str, bytes], dict[str, Any] | None]


def _make_dataset(st: Storage, name: str, shards: list[list[Sample]]) -> DatasetInfo:
    """Write hand-made shards (members per sample) and commit them as a dataset."""
    info = DatasetInfo(name=name, created="t", updated="t", image_formats=["png"], channels=1, version=1)
    rows: dict[str, list[Any]] = {f.name: [] for f in MANIFEST_SCHEMA}
    for number, samples in enumerate(shards):
        members = []
        for pos, (fields, meta) in enumerate(samples):
            key = sample_key(number, pos)
            full = dict(fields)
            if meta is not None:
                meta = {**meta, "sample_index": info.num_samples + pos}
                full["json"] = json.dumps(meta).encode()
            members.append((key, full))
            for col, value in zip(("sample_index", "key", "shard", "label", "source"),
                                  (info.num_samples + pos, key, shard_name(number), 0,
                                   f"test:{number}:{pos}"),
                                  strict=True):
                rows[col].append(value)
        rel = f"datasets/{name}/shards/{shard_name(number)}"
        with st.atomic_writer(rel) as handle:
            _write_members(handle, members)
        info.shards.append(ShardInfo(shard_name(number), info.num_samples, len(samples), st.size(rel) or 0))
        info.num_samples += len(samples)
    commit(st, info, pa.Table.from_pydict(rows, schema=MANIFEST_SCHEMA))
    return info


def _write_members(handle: Any, members: list[tuple[str, dict[str, bytes]]]) -> None:
    import tarfile

    with tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, fields in members:
            for ext in sorted(fields):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(fields[ext])
                tar.addfile(info, io.BytesIO(fields[ext]))


def _good(seed: int) -> Sample:
    return {"png": image_bytes("L", size=(20, 20), seed=seed)}, {"label": 1}


def _bad_shards() -> list[list[Sample]]:
    shard0 = [_good(i) for i in range(6)] + [
        ({"png": b"\x89PNG\r\n\x1a\n garbage"}, {"label": 1}),                    # undecodable
        ({"jpg": b""}, {"label": 1}),                                              # empty
        ({"txt": b"just text"}, {"label": 1}),                                     # non-image member
        ({"png": image_bytes("L", size=(80, 80))}, {"label": 1}),                  # over max_pixels=5000
        ({"png": image_bytes("RGBA", size=(20, 20))}, None),                       # no json: id from the key
    ]
    return [shard0, [_good(10 + i) for i in range(5)], [_good(20 + i) for i in range(4)]]


@pytest.mark.ray
def test_each_bad_input_is_skipped_and_counted(tmp_path: Path, ray_cluster: None) -> None:
    st = Storage(str(tmp_path / "store"))
    _make_dataset(st, "bad", _bad_shards())
    path = st.path("datasets/bad/shards", shard_name(2))
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])  # truncated copy: the size no longer matches
    kept = [16 + p for p in whole_before(data, len(data) // 2)]
    assert len(kept) == 2  # of its 4 samples (ids 16-19), the 2 whole ones before the cut are read
    policy = BadInputPolicy(max_bad_fraction=0.5, max_pixels=5000)
    counter = new_bad_input_counter(20, policy)
    ds = build_train_dataset(st, "bad", AugmentConfig(image_size=8, channels=1, mean=(0.5,), std=(0.5,)),
                             seed=0, policy=policy, counter=counter)
    for _ in range(2):
        ids = _ids(ds)
        assert sorted(ids.tolist()) == [0, 1, 2, 3, 4, 5, 10, 11, 12, 13, 14, 15, *kept]
        report = verify_epoch(counter, len(ids))
    assert report.by_reason == {"undecodable": 1, "empty": 1, "non_image_member": 1, "too_large": 1,
                                "truncated_shard": 2}
    assert report.bad == 6 and report.cut_shards == {shard_name(2): 2} and not report.over_limit
    assert any("s000000_0000006" in e and "undecodable" in e for e in report.examples)


@pytest.mark.ray
def test_too_much_bad_input_fails_with_a_clear_message(tmp_path: Path, ray_cluster: None) -> None:
    st = Storage(str(tmp_path / "store"))
    _make_dataset(st, "bad", _bad_shards())
    ds = build_eval_dataset(st, "bad", AUG, policy=BadInputPolicy(max_bad_fraction=0.1, max_pixels=5000))
    with pytest.raises(Exception, match="too much bad input: .* the policy allows 2"):
        _ids(ds)
    path = st.path("datasets/bad/shards", shard_name(1))
    open(path, "ab").write(b"\0" * 512)  # a shard replaced after ingest: larger than ingest wrote it
    with pytest.raises(BadInputError, match=r"shards \['shard-000001.tar'\] are missing or changed since ingest"):
        build_train_dataset(st, "bad", AUG, seed=0, policy=BadInputPolicy(max_bad_fraction=0.1))


@pytest.mark.ray
def test_damaged_shard_loses_its_rows_and_is_counted(tmp_path: Path, ray_cluster: None) -> None:
    st = Storage(str(tmp_path / "store"))
    _make_dataset(st, "lost", [[_good(i) for i in range(5)] for _ in range(4)])
    path = st.path("datasets/lost/shards", shard_name(3))
    data = bytearray(open(path, "rb").read())
    data[:100] = b"\xff" * 100  # corrupt first tar header, same size: only the read can find it
    open(path, "wb").write(bytes(data))
    policy = BadInputPolicy(max_bad_fraction=0.3)
    counter = new_bad_input_counter(20, policy)
    ids = _ids(build_train_dataset(st, "lost", AUG, seed=0, policy=policy, counter=counter))
    assert sorted(ids.tolist()) == list(range(15))  # nothing before the damage; the job went on
    report = verify_epoch(counter, len(ids))
    assert report.by_reason == {"damaged_shard": 5} and report.bad == 5 and report.cut_shards == {shard_name(3): 5}
    strict = new_bad_input_counter(20, BadInputPolicy(max_bad_fraction=0.2))
    with pytest.raises(BadInputError, match="5 of 20 samples bad"):
        verify_epoch(strict, 15)


@pytest.mark.ray
def test_truncated_shard_keeps_its_samples_before_the_cut(tmp_path: Path, ray_cluster: None) -> None:
    st = Storage(str(tmp_path / "store"))
    labels = _fm_dataset(tmp_path, st, n=23, shard_size=8)  # shards: ids 0-7, 8-15, 16-22
    path = st.path("datasets/fm/shards", shard_name(1))
    data = open(path, "rb").read()
    cut = 14_500  # by hand, at a byte offset inside the sixth sample's image (samples take 2,560 bytes each)
    open(path, "wb").write(data[:cut])
    kept = [8 + p for p in whole_before(data, cut)]
    assert kept == [8, 9, 10, 11, 12]
    policy = BadInputPolicy(max_bad_fraction=0.2)  # budget 4 of 23: the 3 samples after the cut fit
    counter = new_bad_input_counter(23, policy)
    ids = _ids(build_train_dataset(st, "fm", AUG, seed=0, policy=policy, counter=counter))
    assert sorted(ids.tolist()) == [*range(8), *kept, *range(16, 23)]
    report = verify_epoch(counter, len(ids))
    assert report.by_reason == {"truncated_shard": 3} and report.cut_shards == {shard_name(1): 3}
    rows = list(build_eval_dataset(st, "fm", AUG, policy=policy, counter=counter).iter_rows())  # inference's
    assert sorted(r["sample_index"] for r in rows) == [*range(8), *kept, *range(16, 23)]
    assert all(r["label"] == labels[r["sample_index"]] for r in rows)
    assert verify_epoch(counter, len(rows)).bad == 3  # the same shard read again: counted once


@pytest.mark.ray
def test_bad_input_folder_ingested_samples_all_decode_in_the_streams(tmp_path: Path, ray_cluster: None) -> None:
    folder = write_bad_input_folder(tmp_path / "lake")
    st = Storage(str(tmp_path / "store"))
    res = ingest(st, "lake", open_source(str(folder.root)), IngestOptions(shard_size=6, use_ray=False))
    assert res.added == len(folder.valid) and res.skipped == folder.skipped
    strict = BadInputPolicy(max_bad_fraction=0.0)  # fail on the first sample the streams cannot decode
    for channels in (1, 3):
        aug = AugmentConfig(image_size=8, channels=channels, mean=(0.5,) * channels, std=(0.5,) * channels)
        counter = new_bad_input_counter(res.num_samples, strict)
        rows = list(build_eval_dataset(st, "lake", aug, policy=strict, counter=counter).iter_rows())
        assert sorted(r["sample_index"] for r in rows) == list(range(res.num_samples))
        assert all(r["image"].shape == (channels, 8, 8) for r in rows)
        assert verify_epoch(counter, len(rows)).bad == 0
    train = _ids(build_train_dataset(st, "lake", AUG, seed=0, policy=strict))
    assert sorted(train.tolist()) == list(range(res.num_samples))


# ---------------------------------------------------------------------------------------------
# Parallel ingest (here rather than in test_ingest.py to share this module's Ray cluster)
# ---------------------------------------------------------------------------------------------


def _tar_members(path: str) -> list[tuple[str, bytes]]:
    import tarfile

    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]


@pytest.mark.ray
def test_parallel_ingest_on_ray_equals_inline(tmp_path: Path, ray_cluster: None) -> None:
    write_idx_dataset(tmp_path / "fm", 23, 0)
    src = open_source(f"idx:{tmp_path / 'fm'}")
    a, b = Storage(str(tmp_path / "a")), Storage(str(tmp_path / "b"))
    ingest(a, "d", src, IngestOptions(shard_size=5, use_ray=False))
    res = ingest(b, "d", src, IngestOptions(shard_size=5, use_ray=True, max_in_flight=2))
    assert res.added == 23 and len(res.shards_added) == 5
    assert read_manifest(a, load_dataset_info(a, "d")).equals(read_manifest(b, load_dataset_info(b, "d")))
    for shard in load_dataset_info(a, "d").shards:
        assert _tar_members(a.path("datasets/d/shards", shard.name)) == _tar_members(
            b.path("datasets/d/shards", shard.name))
