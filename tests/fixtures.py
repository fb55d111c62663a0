"""Reusable test fixtures and writers of small files in public dataset formats.

Fixtures (import them into a ``conftest.py``: ``from tests.fixtures import ray_cluster, moto_endpoint,
s3_bucket  # noqa: F401``):

- ``ray_cluster`` (module): a local Ray with 2 CPUs and no dashboard; workers get the fake AWS
  credentials of ``AWS_TEST_ENV`` so that they can talk to the moto server.
- ``moto_endpoint`` (module): a moto S3 server on 127.0.0.1 (a real HTTP endpoint that Ray worker
  processes reach too), with ``AWS_TEST_ENV`` set in this process while it runs.
- ``s3_bucket`` (function): a fresh, uniquely named bucket on that server.

Writers: ``write_idx`` / ``write_idx_dataset`` (Fashion-MNIST layout, gzipped), ``write_cifar10``,
``write_cifar100``, ``write_stl10``, ``image_bytes`` (an encoded image of any PIL mode).
"""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

AWS_TEST_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}
"""Fake credentials for moto (moto accepts any)."""


@pytest.fixture(scope="module")
def ray_cluster() -> Iterator[None]:
    """A local 2-CPU Ray for the module (shut down at its end)."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": dict(AWS_TEST_ENV)})
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def moto_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:PORT`` of a moto S3 server running for the module."""
    from moto.server import ThreadedMotoServer

    with pytest.MonkeyPatch.context() as mp:
        for name, value in AWS_TEST_ENV.items():
            mp.setenv(name, value)
        for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL"):
            mp.delenv(name, raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        try:
            yield f"http://{host}:{port}"
        finally:
            server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint: str) -> str:
    """A new empty bucket on the moto server."""
    import botocore.session

    name = f"test-{uuid.uuid4().hex[:12]}"
    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=moto_endpoint, region_name="us-east-1",
        aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket=name)
    return name


# ---------------------------------------------------------------------------------------------
# Writers of public on-disk formats
# ---------------------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, *, gz: bool = True) -> Path:
    """Write a uint8 array as an IDX file (magic 0x0000 08 ndim, big-endian dims)."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)
    return path


def fake_images(n: int, side: int = 28, channels: int | None = None, seed: int = 0) -> np.ndarray:
    """Random but distinct uint8 images (N x side x side [x channels])."""
    rng = np.random.default_rng(seed)
    shape = (n, side, side) if channels is None else (n, side, side, channels)
    return rng.integers(0, 256, size=shape, dtype=np.uint8)


def write_idx_dataset(directory: Path, n_train: int, n_test: int, *, gz: bool = True,
                      side: int = 28) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Fashion-MNIST layout in ``directory``; returns (train_x, train_y, test_x, test_y)."""
    directory.mkdir(parents=True, exist_ok=True)
    train_x, test_x = fake_images(n_train, side, seed=1), fake_images(n_test, side, seed=2)
    train_y = (np.arange(n_train) % 10).astype(np.uint8)
    test_y = ((np.arange(n_test) + 3) % 10).astype(np.uint8)
    write_idx(directory / "train-images-idx3-ubyte", train_x, gz=gz)
    write_idx(directory / "train-labels-idx1-ubyte", train_y, gz=gz)
    write_idx(directory / "t10k-images-idx3-ubyte", test_x, gz=gz)
    write_idx(directory / "t10k-labels-idx1-ubyte", test_y, gz=gz)
    return train_x, train_y, test_x, test_y


def _pickle(path: Path, obj: object) -> None:
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=2)


def cifar_rows(images_NHWC: np.ndarray) -> np.ndarray:
    """CIFAR's row layout: N x 3072 = R plane, G plane, B plane (each 32 x 32 row-major)."""
    return np.ascontiguousarray(images_NHWC.transpose(0, 3, 1, 2).reshape(len(images_NHWC), -1))


def write_cifar10(directory: Path, per_batch: int = 4) -> dict[str, tuple[np.ndarray, list[int]]]:
    """``cifar-10-batches-py`` layout: data_batch_1..5, test_batch, batches.meta."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        images = fake_images(per_batch, 32, 3, seed=10 + i)
        labels = [(i + j) % 10 for j in range(per_batch)]
        _pickle(directory / name, {b"batch_label": name.encode(), b"labels": labels,
                                   b"data": cifar_rows(images),
                                   b"filenames": [f"{name}_{j}.png".encode() for j in range(per_batch)]})
        out[name] = (images, labels)
    _pickle(directory / "batches.meta", {b"label_names": [f"class{k}".encode() for k in range(10)],
                                         b"num_vis": 3072})
    return out


def write_cifar100(directory: Path, n: int = 6) -> dict[str, tuple[np.ndarray, list[int], list[int]]]:
    """``cifar-100-python`` layout: train, test, meta (fine and coarse labels)."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, name in enumerate(["train", "test"]):
        images = fake_images(n, 32, 3, seed=30 + i)
        fine = [(7 * j + i) % 100 for j in range(n)]
        coarse = [f % 20 for f in fine]
        _pickle(directory / name,
                {b"data": cifar_rows(images), b"fine_labels": fine, b"coarse_labels": coarse})
        out[name] = (images, fine, coarse)
    _pickle(directory / "meta", {b"fine_label_names": [f"fine{k}".encode() for k in range(100)],
                                 b"coarse_label_names": [f"coarse{k}".encode() for k in range(20)]})
    return out


def write_stl10(directory: Path, n_train: int = 3, n_unlabeled: int = 2) -> dict[str, np.ndarray]:
    """``stl10_binary`` layout (column-major images, labels 1..10): train, test, unlabeled."""
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, n in (("train", n_train), ("test", n_train), ("unlabeled", n_unlabeled)):
        images_NHWC = fake_images(n, 96, 3, seed={"train": 50, "test": 51, "unlabeled": 52}[split])
        # The file holds each image as 3 x 96 x 96 in column-major (Fortran) order.
        raw = images_NHWC.transpose(0, 3, 2, 1)
        (directory / f"{split}_X.bin").write_bytes(np.ascontiguousarray(raw).tobytes())
        if split != "unlabeled":
            (directory / f"{split}_y.bin").write_bytes((np.arange(n) % 10 + 1).astype(np.uint8).tobytes())
        out[split] = images_NHWC
    (directory / "class_names.txt").write_text("\n".join(f"stl{k}" for k in range(10)) + "\n")
    return out


def image_bytes(mode: str, size: tuple[int, int] = (12, 10), fmt: str = "PNG", seed: int = 0) -> bytes:
    """An encoded image of the given PIL mode (random content)."""
    rng = np.random.default_rng(seed)
    width, height = size
    if mode == "I;16":
        img = Image.fromarray(rng.integers(0, 65536, size=(height, width), dtype=np.uint16))
    elif mode == "P":
        img = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).convert(
            "P", palette=Image.Palette.ADAPTIVE, colors=16)
    else:
        gray = Image.fromarray(rng.integers(0, 256, size=(height, width), dtype=np.uint8))
        rgb = Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))
        alpha = Image.fromarray(rng.integers(0, 256, size=(height, width), dtype=np.uint8))
        img = {
            "L": lambda: gray,
            "1": lambda: gray.convert("1"),
            "LA": lambda: Image.merge("LA", [gray, alpha]),
            "RGB": lambda: rgb,
            "RGBA": lambda: Image.merge("RGBA", [*rgb.split(), alpha]),
            "CMYK": lambda: rgb.convert("CMYK"),
        }[mode]()
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def file_bytes(path: str | os.PathLike[str]) -> bytes:
    """The content of a file."""
    return Path(path).read_bytes()
