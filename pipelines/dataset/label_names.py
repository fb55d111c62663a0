"""Class names: where an ingest takes them from (``--label-names``, the source) and how they join a dataset's.

IDX files (MNIST, Fashion-MNIST) hold integer labels only and do not say which set they are, so the
names come from, in this order:

1. ``--label-names`` (``open_source(..., label_names=...)``): ``fashion-mnist`` or ``mnist`` (the published names,
   ``PUBLISHED``), a text file with one name per line (``classes.txt``), or a comma list (``a,b,c``);
2. for ``idx:DIR`` without the option, the directory's name (and its parent's when the name is a generic
   ``raw``, ``processed``, ``data`` or ``idx``, as in torchvision's ``FashionMNIST/raw``): one that contains
   ``fashion`` gives Fashion-MNIST's names, else one that contains ``mnist`` gives MNIST's (``0`` .. ``9``);
3. none: ``dataset.json`` then has ``label_names: null`` and reports show label numbers.

CIFAR-10/100 (``batches.meta`` / ``meta``), STL-10 (``class_names.txt``) and folder trees (the
sub-folder names) carry their names; ``--label-names`` replaces the names of the first two and is refused
for a folder tree, whose names are its folders.

Joining a dataset (``merge_label_names``): a source's names are appended to the dataset's (its labels
renumbered); a dataset ingested without names (``label_names: null``) takes the source's when its labels
line up with them (every label has a name; the samples from this source carry the labels it gives), so
that re-running the ingest of the same source with names adds the names and no samples.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

import pyarrow as pa

from pipelines.dataset.info import DatasetInfo

logger = logging.getLogger(__name__)

PUBLISHED: dict[str, tuple[str, ...]] = {
    "fashion-mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                      "Bag", "Ankle boot"),
    "mnist": tuple(str(d) for d in range(10)),
}
"""Names of the label sets the ingest knows, as their datasets publish them (index = integer label)."""
_GENERIC_DIRS = frozenset({"raw", "processed", "data", "idx"})


def parse_label_names(spec: str) -> tuple[list[str], str]:
    """The names a ``--label-names`` value gives, and where they came from (for the log).

    Raises:
        FileNotFoundError: ``spec`` looks like a file name (ends in ``.txt``) that does not exist.
        ValueError: The names are empty or repeat.
    """
    spec = spec.strip()
    if spec.lower() in PUBLISHED:
        names, origin = list(PUBLISHED[spec.lower()]), f"the published {spec.lower()} names"
    elif os.path.isfile(spec) or spec.endswith(".txt"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"--label-names file {spec!r} does not exist: give a text file with one "
                                    f"name per line, {' or '.join(PUBLISHED)}, or a comma list")
        with open(spec, encoding="utf-8") as handle:
            names, origin = [line.strip() for line in handle if line.strip()], f"file {spec}"
    else:
        names, origin = [n.strip() for n in spec.split(",")], "--label-names"
    if not names or any(not n for n in names):
        raise ValueError(f"--label-names {spec!r} gives an empty name: use {', '.join(PUBLISHED)}, a file with "
                         "one name per line, or a comma list such as cat,dog")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--label-names {spec!r} repeats {repeated}: every class needs its own name")
    return names, origin


def detect_label_set(directory: str) -> str | None:
    """The ``PUBLISHED`` set an IDX directory's name suggests (``fashion-mnist``, ``mnist``), or None."""
    parts = os.path.normpath(os.path.abspath(directory)).lower().split(os.sep)
    parts = parts[-2:] if parts[-1] in _GENERIC_DIRS else parts[-1:]
    if any("fashion" in p for p in parts):
        return "fashion-mnist"
    if any("mnist" in p for p in parts):
        return "mnist"
    return None


def check_fit(names: Sequence[str], labels_max: int, what: str) -> None:
    """Raise ValueError when ``names`` cannot name every label up to ``labels_max``."""
    if labels_max >= len(names):
        raise ValueError(f"{what} has labels up to {labels_max} but {len(names)} label names were given: "
                         f"give at least {labels_max + 1} (--label-names)")


def choose_label_names(kind: str, path: str, spec: str | None, own: list[str] | None,
                       labels_max: int | None) -> list[str] | None:
    """The class names of an array source of ``kind`` at ``path``: ``--label-names`` (``spec``), else the
    source's own (``own``), else for IDX the directory name's set; the choice is logged.

    Raises:
        ValueError: The names are fewer than the source's labels (``labels_max`` the largest), empty or repeated.
    """
    names, origin = own, "the source's files"
    if spec is not None:
        names, origin = parse_label_names(spec)
    elif kind == "idx" and names is None:
        detected = detect_label_set(path)
        if detected is None:
            logger.info("idx source %s: no label names (IDX files carry none and the directory name does not "
                        "say fashion-mnist or mnist); pass --label-names to name the classes", path)
            return None
        names, origin = list(PUBLISHED[detected]), f"{detected}, from the directory name"
    if names is None:
        return None
    if labels_max is not None:
        check_fit(names, labels_max, f"{kind} source {path}")
    logger.info("%s source %s: label names from %s (%d: %s%s); --label-names chooses others", kind, path, origin,
                len(names), ", ".join(names[:10]), " ..." if len(names) > 10 else "")
    return names


def merge_label_names(info: DatasetInfo, names: list[str] | None, source_labels: Mapping[str, int | None],
                      manifest: pa.Table) -> tuple[list[str] | None, dict[int, int] | None]:
    """The dataset's label names after ingesting a source, and the map from the source's labels to the
    dataset's (None when they keep their numbers).

    Args:
        info: The dataset before the ingest.
        names: The source's label names (None when it has none).
        source_labels: The label of every item of the source, by source id.
        manifest: The dataset's committed rows.
    """
    if names is None:
        return info.label_names, None
    if info.label_names is None:
        misfit = _names_misfit(manifest, source_labels, names) if info.num_samples else None
        if misfit is not None:
            logger.warning("dataset %s has unnamed labels and %s: the source's class names are not recorded",
                           info.name, misfit)
            return None, None
        if info.num_samples:
            logger.info("dataset %s: its labels line up with this source's, which names them: label_names set "
                        "to %s", info.name, names)
        return list(names), None
    merged = list(info.label_names) + [n for n in names if n not in info.label_names]
    return merged, {i: merged.index(n) for i, n in enumerate(names)}


def _names_misfit(manifest: pa.Table, given: Mapping[str, int | None], names: list[str]) -> str | None:
    """Why the dataset's (unnamed) labels do not line up with a source's named ones; None when they do."""
    labels = [v for v in manifest["label"].to_pylist() if v is not None]
    if labels and max(labels) >= len(names):
        return f"labels up to {max(labels)} for {len(names)} names"
    pairs = [(given[sid], lab) for sid, lab in zip(manifest["source"].to_pylist(), manifest["label"].to_pylist(),
                                                   strict=True) if sid in given]
    if not pairs:
        return "none of its samples come from this source"
    differ = sum(1 for mine, theirs in pairs if mine != theirs)
    if differ:
        return f"{differ} of its {len(pairs)} samples from this source have other labels than the source gives"
    return None
