"""Ingest: shards, manifest and dataset.json from IDX, CIFAR, STL-10 and image folders; append, re-run."""

from __future__ import annotations

import io
import json
import tarfile
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.dataset.decode import decode_image
from pipelines.dataset.info import MANIFEST_SCHEMA, load_dataset_info, load_manifest_labels, read_manifest
from pipelines.dataset.ingest import IngestOptions, ingest
from pipelines.dataset.same_source import CHECKED_ITEMS, check_present_items_match
from pipelines.dataset.sources import ArraySource, load_cifar, load_stl10, open_source
from pipelines.run_lock import LockHeldError, LockInfo, StorageLock
from pipelines.storage import Storage
from tests.fixtures import image_bytes, write_cifar10, write_cifar100, write_idx_dataset, write_stl10
from tests.pipelines.dataset.bad_folder import write_bad_input_folder

INLINE = IngestOptions(shard_size=7, use_ray=False)


def _tar_members(path: str) -> list[tuple[str, bytes]]:
    with tarfile.open(path) as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar.getmembers()]  # type: ignore[union-attr]


def _samples(storage: Storage, dataset: str) -> dict[int, tuple[str, bytes, dict]]:
    """sample_index -> (member extension, image bytes, json) over every committed shard."""
    info = load_dataset_info(storage, dataset)
    out: dict[int, tuple[str, bytes, dict]] = {}
    for shard in info.shards:
        members = _tar_members(storage.path("datasets", dataset, "shards", shard.name))
        names = [n for n, _ in members]
        assert names == sorted(names), "members must be sorted"
        by_key: dict[str, dict[str, bytes]] = {}
        for name, data in members:
            key, ext = name.split(".", 1)
            by_key.setdefault(key, {})[ext] = data
        assert len(by_key) == shard.count
        for key, fields in by_key.items():
            meta = json.loads(fields.pop("json"))
            ((ext, data),) = fields.items()
            assert "." not in key and key.startswith("s")
            out[meta["sample_index"]] = (ext, data, meta)
    return out


def _png_array(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)))


def test_idx_ingest_append_and_rerun(tmp_path: Path) -> None:
    train_x, train_y, test_x, test_y = write_idx_dataset(tmp_path / "fm", 10, 4)
    st = Storage(str(tmp_path / "store"))
    source = open_source(f"idx:{tmp_path / 'fm'}", split="train")
    first = ingest(st, "fm", source, INLINE, source_spec="idx", split="train")
    assert (first.added, first.shards_added) == (10, ["shard-000000.tar", "shard-000001.tar"])

    again = ingest(st, "fm", open_source(f"idx:{tmp_path / 'fm'}", split="train"), INLINE)
    assert (again.added, again.already_present, again.num_samples) == (0, 10, 10)
    assert load_dataset_info(st, "fm").version == 1  # nothing committed

    more = ingest(st, "fm", open_source(f"idx:{tmp_path / 'fm'}", split="all"), INLINE)
    assert (more.added, more.already_present, more.shards_added) == (4, 10, ["shard-000002.tar"])

    info = load_dataset_info(st, "fm")
    assert info.num_samples == 14 and info.version == 2 and info.channels == 1
    assert info.image_format == "png" and info.created and info.updated
    assert [(s.name, s.first_index, s.count) for s in info.shards] == [
        ("shard-000000.tar", 0, 7), ("shard-000001.tar", 7, 3), ("shard-000002.tar", 10, 4)]
    assert all(s.bytes == st.size(f"datasets/fm/shards/{s.name}") for s in info.shards)

    table = pq.read_table(st.path("datasets/fm/manifest.parquet"))
    assert table.schema.equals(MANIFEST_SCHEMA, check_metadata=False)
    assert table["sample_index"].to_pylist() == list(range(14))
    keys = table["key"].to_pylist()
    assert len(set(keys)) == 14 and keys[7] == "s000001_0000000"
    assert table["source"].to_pylist()[:2] == ["idx:train:0", "idx:train:1"]
    assert table["source"].to_pylist()[10] == "idx:test:0"
    np.testing.assert_array_equal(load_manifest_labels(st, "fm"), np.concatenate([train_y, test_y]))

    samples = _samples(st, "fm")
    assert sorted(samples) == list(range(14))
    for index in range(14):
        ext, data, meta = samples[index]
        expected = train_x[index] if index < 10 else test_x[index - 10]
        assert ext == "png"
        np.testing.assert_array_equal(_png_array(data), expected)  # PNG is lossless
        assert meta["label"] == int(np.concatenate([train_y, test_y])[index])


def test_limit_then_larger_limit_adds_the_rest(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path / "fm", 9, 1, gz=False)  # plain, not gzipped
    st = Storage(str(tmp_path / "store"))
    src = open_source(f"idx:{tmp_path / 'fm'}")
    assert ingest(st, "d", src, IngestOptions(limit=4, use_ray=False)).added == 4
    assert ingest(st, "d", src, IngestOptions(limit=4, use_ray=False)).added == 0
    assert ingest(st, "d", src, IngestOptions(limit=6, use_ray=False)).added == 2
    assert read_manifest(st, load_dataset_info(st, "d"))["source"].to_pylist()[-1] == "idx:train:5"


def test_uncommitted_manifest_rows_are_ignored(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path / "fm", 5, 1)
    st = Storage(str(tmp_path / "store"))
    ingest(st, "d", open_source(f"idx:{tmp_path / 'fm'}"), IngestOptions(shard_size=3, use_ray=False))
    # A crash after the manifest but before dataset.json: put back a dataset.json naming one shard only.
    info = load_dataset_info(st, "d")
    info.shards, info.num_samples = info.shards[:1], info.shards[0].count
    st.write_bytes_atomic("datasets/d/dataset.json", info.to_json().encode())
    assert read_manifest(st, load_dataset_info(st, "d"))["sample_index"].to_pylist() == [0, 1, 2]
    res = ingest(st, "d", open_source(f"idx:{tmp_path / 'fm'}"), IngestOptions(shard_size=3, use_ray=False))
    assert (res.added, res.shards_added, res.num_samples) == (2, ["shard-000001.tar"], 5)


def test_cifar10_cifar100_and_coarse_labels(tmp_path: Path) -> None:
    c10 = write_cifar10(tmp_path / "c10")
    src = load_cifar(str(tmp_path / "c10"), "cifar10", ["train", "test"])
    assert len(src.items) == 24 and src.label_names == [f"class{k}" for k in range(10)]
    assert src.items[5].source_id == "cifar10:data_batch_2:1"
    np.testing.assert_array_equal(src.rows([5])[0], c10["data_batch_2"][0][1])
    st = Storage(str(tmp_path / "store"))
    res = ingest(st, "c10", src, IngestOptions(use_ray=False))
    assert res.added == 24 and load_dataset_info(st, "c10").channels == 3
    samples = _samples(st, "c10")
    np.testing.assert_array_equal(_png_array(samples[23][1]), c10["test_batch"][0][3])
    assert samples[23][2]["label"] == c10["test_batch"][1][3]

    c100 = write_cifar100(tmp_path / "c100")
    fine = load_cifar(str(tmp_path / "c100"), "cifar100", ["train"])
    coarse = open_source(f"cifar100-20:{tmp_path / 'c100'}", split="test")
    assert isinstance(coarse, ArraySource)
    assert [it.label for it in fine.items] == c100["train"][1]
    assert [it.label for it in coarse.items] == c100["test"][2]
    assert coarse.label_names is not None and len(coarse.label_names) == 20
    np.testing.assert_array_equal(coarse.rows([2])[0], c100["test"][0][2])


def test_cifar_loader_refuses_arbitrary_pickles(tmp_path: Path) -> None:
    import pickle

    (tmp_path / "data_batch_1").write_bytes(pickle.dumps({b"data": print}))
    with pytest.raises(pickle.UnpicklingError, match="not a CIFAR python batch"):
        load_cifar(str(tmp_path), "cifar10", ["train"])


def test_stl10_column_major_and_unlabeled(tmp_path: Path) -> None:
    stl = write_stl10(tmp_path / "stl", n_train=3, n_unlabeled=2)
    src = load_stl10(str(tmp_path / "stl"), ["train", "unlabeled"])
    assert [it.label for it in src.items] == [0, 1, 2, None, None]
    assert src.items[3].source_id == "stl10:unlabeled:0" and src.label_names == [f"stl{k}" for k in range(10)]
    np.testing.assert_array_equal(src.rows([1])[0], stl["train"][1])
    np.testing.assert_array_equal(src.rows([4])[0], stl["unlabeled"][1])
    st = Storage(str(tmp_path / "store"))
    ingest(st, "stl", src, IngestOptions(use_ray=False))
    samples = _samples(st, "stl")
    assert samples[4][2]["label"] is None
    np.testing.assert_array_equal(_png_array(samples[4][1]), stl["unlabeled"][1])
    with pytest.raises(ValueError, match="--split 'extra' is not valid for stl10"):
        open_source(f"stl10:{tmp_path / 'stl'}", split="extra")


def _image_folder(root: Path) -> dict[str, bytes]:
    files = {
        "cat/a.png": image_bytes("RGBA"),
        "cat/b.jpg": image_bytes("RGB", fmt="JPEG"),
        "cat/deep/c.png": image_bytes("P"),
        "dog/d.tif": image_bytes("CMYK", fmt="TIFF"),
        "dog/e.png": image_bytes("I;16"),
        "dog/f.png": image_bytes("L"),
        "loose.png": image_bytes("LA"),
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "dog" / "notes.txt").write_text("not an image")
    (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 garbage")
    (root / "big.png").write_bytes(image_bytes("L", size=(400, 300)))
    return files


def test_image_folder_labels_modes_and_original_bytes(tmp_path: Path) -> None:
    files = _image_folder(tmp_path / "imgs")
    st = Storage(str(tmp_path / "store"))
    src = open_source(str(tmp_path / "imgs"))
    res = ingest(st, "pets", src, IngestOptions(shard_size=3, max_pixels=100_000, use_ray=False))
    assert res.added == 7 and res.skipped == {"non_image_file": 1, "not_an_image": 1, "too_large": 1}
    info = load_dataset_info(st, "pets")
    assert info.label_names == ["cat", "dog"] and info.channels == 3
    assert info.image_formats == ["jpg", "png", "tiff"] and info.image_format == "mixed"
    by_source = {meta["source"]: (ext, data, meta) for ext, data, meta in _samples(st, "pets").values()}
    for rel, data in files.items():
        ext, stored, meta = by_source[str(tmp_path / "imgs" / rel)]
        assert stored == data, "the original encoding is kept byte for byte"
        assert ext == {"a.png": "png", "b.jpg": "jpg", "d.tif": "tiff"}.get(rel.rsplit("/", 1)[-1], "png")
        expected = {"cat": 0, "dog": 1}.get(rel.split("/")[0]) if "/" in rel else None
        assert meta["label"] == expected
    assert ingest(st, "pets", open_source(str(tmp_path / "imgs")),
                  IngestOptions(max_pixels=100_000, use_ray=False)).added == 0

    (tmp_path / "imgs" / "bird").mkdir()
    (tmp_path / "imgs" / "bird" / "g.png").write_bytes(image_bytes("RGB"))
    (tmp_path / "imgs" / "cat" / "h.png").write_bytes(image_bytes("RGB", seed=3))
    res = ingest(st, "pets", open_source(str(tmp_path / "imgs")),
                 IngestOptions(max_pixels=100_000, use_ray=False))
    assert res.added == 2
    info = load_dataset_info(st, "pets")
    assert info.label_names == ["cat", "dog", "bird"]  # existing ids kept, the new class appended
    sources = read_manifest(st, info)["source"].to_pylist()
    labels = dict(zip(sources, load_manifest_labels(st, "pets"), strict=True))
    assert labels[str(tmp_path / "imgs" / "bird" / "g.png")] == 2
    assert labels[str(tmp_path / "imgs" / "cat" / "h.png")] == 0


def test_concurrent_ingest_is_refused(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path / "fm", 3, 1)
    st = Storage(str(tmp_path / "store"))
    st.write_bytes_atomic("datasets/d/_ingest.lock", b'{"pid": 1}')
    with pytest.raises(RuntimeError, match="another ingest into this dataset is running"):
        ingest(st, "d", open_source(f"idx:{tmp_path / 'fm'}"), INLINE)


def test_second_ingest_while_the_lock_is_held_names_the_holder(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path / "fm", 3, 1)
    st = Storage(str(tmp_path / "store"))
    holder = StorageLock(st, "datasets/d/_ingest.lock", ttl_s=600, purpose="ingest into dataset d")
    with holder:
        assert holder.info is not None
        with pytest.raises(LockHeldError, match="another ingest into this dataset is running") as err:
            ingest(st, "d", open_source(f"idx:{tmp_path / 'fm'}"), INLINE)
        assert holder.info.owner in str(err.value) and "ingest into dataset d" in str(err.value)
        assert holder.read() == holder.info  # the refused ingest left the holder's lock alone
        assert not st.exists("datasets/d/dataset.json")
    assert ingest(st, "d", open_source(f"idx:{tmp_path / 'fm'}"), INLINE).added == 3
    assert not st.exists("datasets/d/_ingest.lock")


def test_an_expired_ingest_lock_is_taken_over(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path / "fm", 3, 1)
    st = Storage(str(tmp_path / "store"))
    crashed = LockInfo("gone-host:1:dead", "ingest into dataset d", time.time() - 7200, time.time() - 3600)
    st.write_bytes_atomic("datasets/d/_ingest.lock", crashed.to_bytes())
    res = ingest(st, "d", open_source(f"idx:{tmp_path / 'fm'}"), INLINE)
    assert res.added == 3 and load_dataset_info(st, "d").num_samples == 3
    assert not st.exists("datasets/d/_ingest.lock")


def test_bad_names_and_sources(tmp_path: Path) -> None:
    st = Storage(str(tmp_path / "store"))
    with pytest.raises(ValueError, match="dataset name 'a/b' is not allowed"):
        ingest(st, "a/b", open_source(str(_empty_dir(tmp_path))), INLINE)
    with pytest.raises(FileNotFoundError, match="no train-images-idx3-ubyte"):
        open_source(f"idx:{_empty_dir(tmp_path)}")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        open_source(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="no usable images"):
        ingest(st, "empty", open_source(str(_empty_dir(tmp_path))), INLINE)
    with pytest.raises(ValueError, match="shard_size=0"):
        IngestOptions(shard_size=0)


def _empty_dir(tmp_path: Path) -> Path:
    path = tmp_path / "empty"
    path.mkdir(exist_ok=True)
    return path


def test_s3_target_and_s3_source(tmp_path: Path, moto_endpoint: str, s3_bucket: str) -> None:
    src_root = Storage(f"s3://{s3_bucket}/lake", moto_endpoint)
    src_root.write_bytes_atomic("a/x.png", image_bytes("RGB"))
    src_root.write_bytes_atomic("b/y.jpg", image_bytes("RGB", fmt="JPEG"))
    src_root.write_bytes_atomic("b/readme.md", b"text")
    st = Storage(f"s3://{s3_bucket}/store", moto_endpoint)
    src = open_source(f"s3://{s3_bucket}/lake", s3_endpoint=moto_endpoint)
    expected = {f"s3://{s3_bucket}/lake/a/x.png", f"s3://{s3_bucket}/lake/b/y.jpg"}
    assert {it.source_id for it in src.items} == expected
    res = ingest(st, "lake", src, IngestOptions(shard_size=1, use_ray=False))
    assert res.added == 2 and res.shards_added == ["shard-000000.tar", "shard-000001.tar"]
    info = load_dataset_info(st, "lake")
    assert info.label_names == ["a", "b"] and info.num_samples == 2
    assert not st.exists("datasets/lake/_ingest.lock")
    assert ingest(st, "lake", open_source(f"s3://{s3_bucket}/lake", s3_endpoint=moto_endpoint),
                  IngestOptions(use_ray=False)).added == 0


def test_bad_input_folder_every_file_ingested_and_decodable_or_skipped_with_its_reason(tmp_path: Path) -> None:
    folder = write_bad_input_folder(tmp_path / "lake", n_good=36)  # 52 good files and 8 bad, as in issue 17
    st = Storage(str(tmp_path / "store"))
    res = ingest(st, "lake", open_source(str(folder.root)), IngestOptions(shard_size=8, use_ray=False))
    assert res.skipped == folder.skipped == {
        "empty": 1, "not_an_image": 1, "truncated": 1, "corrupt": 1, "too_large": 1, "non_image_file": 2,
        "dangling_symlink": 1}
    assert res.added == len(folder.valid) == 52
    root = str(folder.root)
    expected_examples = {r: [f"{root}/{p}" for p in paths] for r, paths in folder.skipped_files.items()}
    assert {r: sorted(ids) for r, ids in res.skipped_examples.items()} == expected_examples
    record = load_dataset_info(st, "lake").ingests[-1]
    assert record["skipped"] == folder.skipped and record["skipped_examples"] == res.skipped_examples

    # Every ingested file: stored byte for byte and decoded by the training/inference decoder, at its size.
    by_source = {meta["source"]: (ext, data) for ext, data, meta in _samples(st, "lake").values()}
    assert sorted(by_source) == sorted(f"{root}/{rel}" for rel in folder.valid)
    for rel, data in folder.valid.items():
        ext, stored = by_source[f"{root}/{rel}"]
        assert stored == data
        width, height = folder.sizes[rel]
        for channels in (1, 3):
            assert decode_image(stored, channels, 50_000_000).shape == (height, width, channels), rel
    assert by_source[f"{root}/a/png_named.jpg"][0] == "png" and by_source[f"{root}/b/photo.webp"][0] == "webp"

    again = ingest(st, "lake", open_source(str(folder.root)), IngestOptions(use_ray=False))
    assert (again.added, again.already_present, again.skipped) == (0, 52, folder.skipped)


# ---------------------------------------------------------------------------------------------
# Class names
# ---------------------------------------------------------------------------------------------


def test_idx_label_names_from_the_option_or_the_directory_name(tmp_path: Path) -> None:
    for name in ("fashion-mnist", "mnist", "digits"):
        write_idx_dataset(tmp_path / name, 12, 1)
    assert open_source(f"idx:{tmp_path / 'fashion-mnist'}").label_names == [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
    assert open_source(f"idx:{tmp_path / 'mnist'}").label_names == [str(d) for d in range(10)]
    assert open_source(f"idx:{tmp_path / 'digits'}").label_names is None
    write_idx_dataset(tmp_path / "FashionMNIST" / "raw", 12, 1)  # torchvision's layout
    assert open_source(f"idx:{tmp_path / 'FashionMNIST' / 'raw'}").label_names == open_source(
        f"idx:{tmp_path / 'fashion-mnist'}").label_names
    assert open_source(f"idx:{tmp_path / 'digits'}", label_names="mnist").label_names == [str(d) for d in range(10)]
    names_file = tmp_path / "classes.txt"
    names_file.write_text("\n".join(f"c{k}" for k in range(10)) + "\n\n")
    assert open_source(f"idx:{tmp_path / 'mnist'}", label_names=str(names_file)).label_names == [
        f"c{k}" for k in range(10)]
    assert open_source(f"idx:{tmp_path / 'digits'}", label_names=",".join("abcdefghij")).label_names == list(
        "abcdefghij")
    with pytest.raises(ValueError, match="labels up to 9 but 3 label names were given"):
        open_source(f"idx:{tmp_path / 'digits'}", label_names="a,b,c")
    with pytest.raises(ValueError, match="repeats \\['a'\\]"):
        open_source(f"idx:{tmp_path / 'digits'}", label_names="a,a,b,c,d,e,f,g,h,i")
    with pytest.raises(FileNotFoundError, match="--label-names file 'nope.txt' does not exist"):
        open_source(f"idx:{tmp_path / 'digits'}", label_names="nope.txt")
    with pytest.raises(ValueError, match="a folder or bucket source takes its class names from its top-level"):
        open_source(str(_empty_dir(tmp_path)), label_names="mnist")


def test_a_dataset_ingested_without_names_gets_them_when_the_labels_line_up(tmp_path: Path) -> None:
    write_idx_dataset(tmp_path / "digits", 12, 4)
    st = Storage(str(tmp_path / "store"))
    spec = f"idx:{tmp_path / 'digits'}"
    ingest(st, "d", open_source(spec), INLINE)
    before = load_dataset_info(st, "d")
    assert before.label_names is None and before.num_samples == 12

    named = ingest(st, "d", open_source(spec, label_names="fashion-mnist"), INLINE)
    after = load_dataset_info(st, "d")
    assert (named.added, named.already_present, after.num_samples) == (0, 12, 12)  # no sample twice
    assert after.label_names is not None and after.label_names[9] == "Ankle boot"
    assert after.version == before.version + 1 and after.ingests[-1]["label_names"] == "set"
    assert read_manifest(st, after).equals(read_manifest(st, before))

    ingest(st, "e", open_source(spec), INLINE)  # unnamed, then names whose labels do not line up
    other = ",".join(f"n{k}" for k in range(10))
    (tmp_path / "other").mkdir()
    for path in (tmp_path / "digits").iterdir():
        (tmp_path / "other" / path.name).write_bytes(path.read_bytes())
    ingest(st, "e", open_source(f"idx:{tmp_path / 'other'}", label_names=other, split="test"), INLINE)
    info = load_dataset_info(st, "e")
    assert info.label_names is None and info.num_samples == 16  # "none of its samples come from this source"


def test_another_collection_with_the_same_file_names_is_refused_not_skipped(tmp_path: Path) -> None:
    """MNIST and Fashion-MNIST share their IDX file names, so their ids (idx:train:N) collide: the stored
    images are compared before the present ids are skipped."""
    write_idx_dataset(tmp_path / "fm", 10, 2)
    other = tmp_path / "mnist"
    write_idx_dataset(other, 10, 2)
    (other / "train-images-idx3-ubyte.gz").unlink()
    from tests.fixtures import fake_images, write_idx

    write_idx(other / "train-images-idx3-ubyte", fake_images(10, seed=7))  # same names, other pixels
    st = Storage(str(tmp_path / "store"))
    assert ingest(st, "d", open_source(f"idx:{tmp_path / 'fm'}", split="train"), INLINE).added == 10
    with pytest.raises(ValueError, match="another collection with the same file names.*--dataset NAME"):
        ingest(st, "d", open_source(f"idx:{other}", split="train"), INLINE, source_spec=f"idx:{other}")
    assert load_dataset_info(st, "d").num_samples == 10
    again = ingest(st, "d", open_source(f"idx:{tmp_path / 'fm'}", split="train"), INLINE)  # the same folder
    assert (again.added, again.already_present) == (0, 10)
    same = open_source(f"idx:{tmp_path / 'fm'}", split="train")
    info = load_dataset_info(st, "d")
    assert isinstance(same, ArraySource)  # the same images passed because they were compared, not unchecked
    assert check_present_items_match(st, info, read_manifest(st, info), same, same.items, 10) == CHECKED_ITEMS
