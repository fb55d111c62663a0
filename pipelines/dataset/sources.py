"""Image sources that the ingest job turns into WebDataset shards.

Two kinds:

- ``ArraySource``: images already decoded into arrays in a file format of a public dataset
  (Fashion-MNIST/MNIST IDX, CIFAR-10/100 python batches, STL-10 binaries). The driver reads (or
  memory-maps) them and hands each shard task its slice; the images are stored as PNG.
- ``FileTreeSource``: encoded image files under a local folder or an ``s3://`` prefix; each shard
  task reads its files itself and stores the bytes unchanged (original encoding kept).

Every item has a ``source_id`` that identifies it across runs (``idx:train:12345``,
``cifar10:data_batch_1:7``, ``stl10:unlabeled:99``, an absolute path or ``s3://bucket/key``); ingest
skips ids that the dataset already holds, so re-running an ingest adds nothing twice.

Spec strings (``--source``): ``idx:DIR``, ``cifar10:DIR``, ``cifar100:DIR`` (fine labels),
``cifar100-20:DIR`` (the 20 coarse super-classes), ``stl10:DIR``, ``folder:DIR`` or a plain directory,
``s3://bucket/prefix``. Class names: ``pipelines.dataset.label_names``.
"""

from __future__ import annotations

import gzip
import logging
import os
import pickle
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipelines.dataset.image_header import IMAGE_EXTENSIONS
from pipelines.dataset.label_names import choose_label_names
from pipelines.storage import Storage

logger = logging.getLogger(__name__)

ARRAY_KINDS = ("idx", "cifar10", "cifar100", "cifar100-20", "stl10")
SPLITS = {
    "idx": ("train", "test"),
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "cifar100-20": ("train", "test"),
    "stl10": ("train", "test", "unlabeled"),
}


@dataclass(frozen=True)
class SourceItem:
    """One image of a source."""

    source_id: str
    """Identity across runs (what the manifest's ``source`` column holds)."""
    label: int | None
    """Integer class where the source has one (index into the source's ``label_names`` if any)."""
    ref: str | int
    """Where to find it: a path relative to the tree root, or a row of the array source."""


# ---------------------------------------------------------------------------------------------
# Array sources
# ---------------------------------------------------------------------------------------------


@dataclass
class ArrayPart:
    """One split file of an array source."""

    tag: str
    """Name used in source ids (``train``, ``data_batch_1``, ``unlabeled``)."""
    images: np.ndarray
    """N x H x W (grayscale) or N x H x W x 3 uint8; may be a memory map."""
    labels: np.ndarray | None
    """N integer labels, or None (STL-10 unlabeled)."""


@dataclass
class ArraySource:
    """Images given as arrays (IDX, CIFAR, STL-10)."""

    kind: str
    parts: list[ArrayPart]
    label_names: list[str] | None = None
    items: list[SourceItem] = field(init=False)
    _offsets: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        items: list[SourceItem] = []
        offsets = [0]
        for part in self.parts:
            if part.images.dtype != np.uint8 or part.images.ndim not in (3, 4):
                raise ValueError(f"{self.kind}:{part.tag}: expected N x H x W [x C] uint8 images")
            for row in range(len(part.images)):
                label = None if part.labels is None else int(part.labels[row])
                items.append(SourceItem(f"{self.kind}:{part.tag}:{row}", label, offsets[-1] + row))
            offsets.append(offsets[-1] + len(part.images))
        self.items = items
        self._offsets = np.asarray(offsets, dtype=np.int64)

    @property
    def description(self) -> str:
        return f"{self.kind} ({', '.join(p.tag for p in self.parts)})"

    @property
    def channels(self) -> int:
        return 1 if self.parts[0].images.ndim == 3 else int(self.parts[0].images.shape[-1])

    def rows(self, refs: Sequence[int]) -> list[np.ndarray]:
        """The images of the given global rows, as contiguous arrays (copied out of memory maps)."""
        out = []
        for ref in refs:
            part_no = int(np.searchsorted(self._offsets, ref, side="right")) - 1
            out.append(np.array(self.parts[part_no].images[ref - int(self._offsets[part_no])]))
        return out


def _open_maybe_gz(path: str) -> bytes:
    with open(path, "rb") as handle:
        head = handle.read(2)
    opener: Any = gzip.open if head == b"\x1f\x8b" else open
    with opener(path, "rb") as handle:
        data: bytes = handle.read()
    return data


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (gzipped or not): ``idx3`` gives N x H x W uint8, ``idx1`` gives N labels."""
    data = _open_maybe_gz(path)
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    expected = int(np.prod(dims))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != expected:
        raise ValueError(f"{path}: header says {dims} ({expected} bytes) but the file holds {body.size}")
    return body.reshape(dims)


def _find(directory: str, names: Sequence[str]) -> str | None:
    for name in names:
        for candidate in (name, name + ".gz"):
            path = os.path.join(directory, candidate)
            if os.path.isfile(path):
                return path
    return None


def load_idx(directory: str, splits: Sequence[str]) -> ArraySource:
    """Fashion-MNIST / MNIST: ``train-images-idx3-ubyte[.gz]`` + labels, ``t10k-...`` for test."""
    parts = []
    for split in splits:
        prefix = {"train": "train", "test": "t10k"}[split]
        images_path = _find(directory, [f"{prefix}-images-idx3-ubyte", f"{prefix}-images.idx3-ubyte"])
        labels_path = _find(directory, [f"{prefix}-labels-idx1-ubyte", f"{prefix}-labels.idx1-ubyte"])
        if images_path is None:
            raise FileNotFoundError(
                f"no {prefix}-images-idx3-ubyte[.gz] in {directory}: point --source idx:DIR at the folder "
                "with the IDX files (e.g. /usr/share/datasets/fashion-mnist)"
            )
        images = read_idx(images_path)
        if images.ndim != 3:
            raise ValueError(f"{images_path}: expected a 3-d image array, got shape {images.shape}")
        labels = read_idx(labels_path) if labels_path else None
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{labels_path} has {len(labels)} labels for {len(images)} images")
        parts.append(ArrayPart(split, images, labels))
    return ArraySource("idx", parts)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """CIFAR batches are pickled dicts of numpy arrays; refuse anything else (no code execution)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                ("numpy._core.multiarray", "scalar"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"CIFAR batch refers to {module}.{name}: not a CIFAR python batch")
        return super().find_class(module, name)


def _unpickle(path: str) -> dict[bytes, Any]:
    with open(path, "rb") as handle:
        data = _NumpyOnlyUnpickler(handle, encoding="bytes").load()
    if not isinstance(data, dict) or b"data" not in data:
        raise ValueError(f"{path} is not a CIFAR python batch (no b'data' entry)")
    return data


def _names(values: Sequence[Any]) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in values]


def load_cifar(directory: str, kind: str, splits: Sequence[str]) -> ArraySource:
    """CIFAR-10 (``data_batch_1..5``, ``test_batch``) or CIFAR-100 (``train``, ``test``) python batches.

    ``cifar100`` uses the 100 fine labels, ``cifar100-20`` the 20 coarse super-classes.
    """
    if kind == "cifar10":
        files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        label_key, meta_file, meta_key = b"labels", "batches.meta", b"label_names"
    else:
        files = {"train": ["train"], "test": ["test"]}
        coarse = kind == "cifar100-20"
        label_key = b"coarse_labels" if coarse else b"fine_labels"
        meta_file, meta_key = "meta", (b"coarse_label_names" if coarse else b"fine_label_names")
    parts = []
    for split in splits:
        for name in files[split]:
            path = os.path.join(directory, name)
            if not os.path.isfile(path):
                raise FileNotFoundError(
                    f"{path} is missing: point --source {kind}:DIR at the extracted "
                    f"{'cifar-10-batches-py' if kind == 'cifar10' else 'cifar-100-python'} folder"
                )
            batch = _unpickle(path)
            flat = np.asarray(batch[b"data"], dtype=np.uint8)
            if flat.ndim != 2 or flat.shape[1] != 3 * 32 * 32:
                raise ValueError(f"{path}: b'data' has shape {flat.shape}, expected N x 3072")
            if label_key not in batch:
                raise ValueError(f"{path} has no {label_key!r} entry: is this a {kind} batch?")
            images = flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            parts.append(ArrayPart(name, np.ascontiguousarray(images), np.asarray(batch[label_key])))
    label_names = None
    meta_path = os.path.join(directory, meta_file)
    if os.path.isfile(meta_path):
        with open(meta_path, "rb") as handle:
            meta = _NumpyOnlyUnpickler(handle, encoding="bytes").load()
        if meta_key in meta:
            label_names = _names(meta[meta_key])
    return ArraySource(kind, parts, label_names)


_STL_SIDE = 96
_STL_BYTES = _STL_SIDE * _STL_SIDE * 3


def load_stl10(directory: str, splits: Sequence[str]) -> ArraySource:
    """STL-10 binaries: ``{train,test}_X.bin`` + ``_y.bin`` (1..10 stored, 0..9 given), ``unlabeled_X.bin``.

    Images are stored column-major (3 x 96 x 96 per image, transposed); they are memory-mapped, so the
    100,000 unlabeled images are never read whole.
    """
    parts = []
    for split in splits:
        x_path = os.path.join(directory, f"{split}_X.bin")
        if not os.path.isfile(x_path):
            raise FileNotFoundError(
                f"{x_path} is missing: point --source stl10:DIR at the stl10_binary folder")
        size = os.path.getsize(x_path)
        if size % _STL_BYTES:
            raise ValueError(f"{x_path}: {size} bytes is not a multiple of 96*96*3")
        raw = np.memmap(x_path, dtype=np.uint8, mode="r", shape=(size // _STL_BYTES, 3, _STL_SIDE, _STL_SIDE))
        images = raw.transpose(0, 3, 2, 1)  # column-major C x W x H -> H x W x C, as the reference loader
        labels = None
        y_path = os.path.join(directory, f"{split}_y.bin")
        if split != "unlabeled":
            if not os.path.isfile(y_path):
                raise FileNotFoundError(f"{y_path} is missing (labels of {split}_X.bin)")
            labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1
            if len(labels) != len(images) or (len(labels) and labels.min() < 0):
                raise ValueError(f"{y_path}: expected {len(images)} labels in 1..10")
        parts.append(ArrayPart(split, images, labels))
    label_names = None
    names_path = os.path.join(directory, "class_names.txt")
    if os.path.isfile(names_path):
        with open(names_path, encoding="utf-8") as handle:
            label_names = [line.strip() for line in handle if line.strip()]
    return ArraySource("stl10", parts, label_names)


# ---------------------------------------------------------------------------------------------
# File trees (local folder or S3 prefix)
# ---------------------------------------------------------------------------------------------


@dataclass
class FileTreeSource:
    """Encoded images under a folder or prefix; top-level sub-folders are classes (optional labels)."""

    root: Storage
    items: list[SourceItem]
    label_names: list[str] | None
    skipped: dict[str, list[str]] = field(default_factory=dict)
    """Files the listing already rules out, by reason (``non_image_file``, ``dangling_symlink``): their ids."""

    @property
    def description(self) -> str:
        return f"files under {self.root.root}"

    @classmethod
    def scan(cls, root: Storage) -> FileTreeSource:
        """List image files recursively (sorted); files directly under the root get no label.

        A file whose name has no image extension (``IMAGE_EXTENSIONS``), or is hidden (starts with ``.``), is
        a ``non_image_file``; in a local folder a symbolic link to nothing is a ``dangling_symlink`` (the
        listing alone would not show it). Both are recorded in ``skipped``, never silently left out.
        """
        root.check_reachable()
        entries = root.list("", recursive=True)
        if not entries and not root.exists(""):
            raise FileNotFoundError(f"source {root.root} does not exist: check --source")
        images: list[str] = []
        skipped: dict[str, list[str]] = {}
        for entry in entries:
            name = entry.path.rsplit("/", 1)[-1]
            ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
            if name.startswith(".") or ext not in IMAGE_EXTENSIONS:
                skipped.setdefault("non_image_file", []).append(root.uri(entry.path))
                continue
            images.append(entry.path)
        if not root.is_s3:
            dangling = _dangling_links(root.path(""))
            if dangling:
                skipped["dangling_symlink"] = [root.uri(p) for p in dangling]
        classes = sorted({p.split("/", 1)[0] for p in images if "/" in p})
        class_of = {c: i for i, c in enumerate(classes)}
        items = [
            SourceItem(root.uri(p), class_of[p.split("/", 1)[0]] if "/" in p else None, p) for p in images
        ]
        for reason, ids in skipped.items():
            logger.info("source %s: %d files skipped (%s), e.g. %s", root.root, len(ids), reason, ids[0])
        return cls(root, items, classes or None, skipped)


def _dangling_links(top: str) -> list[str]:
    """Paths (relative to ``top``, ``/``-separated, sorted) of symbolic links whose target does not exist."""
    found = []
    for dirpath, dirnames, filenames in os.walk(top):
        for name in filenames + dirnames:
            path = os.path.join(dirpath, name)
            if os.path.islink(path) and not os.path.exists(path):
                found.append(os.path.relpath(path, top).replace(os.sep, "/"))
    return sorted(found)


Source = ArraySource | FileTreeSource


def parse_splits(kind: str, split: str) -> list[str]:
    """``train``, ``test``, ``unlabeled``, comma lists, or ``all`` (every split the format has)."""
    allowed = SPLITS[kind]
    if split == "all":
        return list(allowed)
    chosen = [s.strip() for s in split.split(",") if s.strip()]
    bad = [s for s in chosen if s not in allowed]
    if not chosen or bad:
        raise ValueError(
            f"--split {split!r} is not valid for {kind}: use {', '.join(allowed)}, a comma list, or all")
    return chosen


def open_source(spec: str, *, split: str = "train", s3_endpoint: str | None = None,
                s3_region: str = "us-east-1", label_names: str | None = None) -> Source:
    """Open the source named by a ``--source`` spec (see the module docstring).

    ``label_names`` is the ``--label-names`` value (``pipelines.dataset.label_names``): it names the
    classes of an array source; an IDX source without it takes the names its directory name suggests.
    """
    kind, sep, path = spec.partition(":")
    if not sep or kind not in (*ARRAY_KINDS, "folder"):  # a plain path or s3://bucket/prefix
        kind, path = "folder", spec
    if kind == "folder":
        if label_names is not None:
            raise ValueError("--label-names is for array sources (idx, cifar, stl10): a folder or bucket source "
                             "takes its class names from its top-level sub-folders")
        if path.startswith("s3://"):
            return FileTreeSource.scan(Storage(path, s3_endpoint, s3_region))
        if not os.path.isdir(path):
            raise FileNotFoundError(f"source folder {path!r} does not exist: check --source")
        return FileTreeSource.scan(Storage(path))
    if not os.path.isdir(path):
        raise FileNotFoundError(f"source directory {path!r} for {kind} does not exist: check --source")
    splits = parse_splits(kind, split)
    source: ArraySource
    if kind == "idx":
        source = load_idx(path, splits)
    elif kind == "stl10":
        source = load_stl10(path, splits)
    else:
        source = load_cifar(path, kind, splits)
    labelled = [p.labels for p in source.parts if p.labels is not None and len(p.labels)]
    source.label_names = choose_label_names(kind, path, label_names, source.label_names,
                                            max(int(np.max(lab)) for lab in labelled) if labelled else None)
    return source
