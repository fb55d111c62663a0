"""The check every file of a folder or bucket source passes before it gets a sample id, and the reasons it fails.

A file is either ingested, and then decodes in training and inference exactly as it did here, or skipped and
counted under one reason (the keys of ``skipped`` in a ``dataset.json`` ingest record, of
``IngestResult.skipped`` and of the job's summary):

- ``non_image_file``: a name without an image extension (``.txt``, ``.csv``, none) or a hidden name (starting
  with ``.``); found by the listing (``FileTreeSource.scan``), never read;
- ``dangling_symlink``: a symbolic link to nothing (local folders); found by the listing;
- ``unreadable``: reading failed (permission denied, or the file went away between listing and reading);
- ``empty``: zero bytes;
- ``not_an_image``: an image extension, but Pillow recognises no image format in the bytes (text named
  ``.jpg``);
- ``too_large``: the header gives more pixels than ``max_pixels`` (a decompression bomb); never decoded;
- ``truncated``: the image data ends early (a cut-off JPEG or PNG);
- ``corrupt``: damaged data: a PNG chunk whose CRC does not match (Pillow's decoder does not look at them,
  ``Image.verify`` does), a broken compressed stream, any other decoder error.

The check, and its cost: the whole file is read, its header parsed (``probe_image``), ``Image.verify()`` run
(for PNG every chunk's CRC; formats without a verifier pass), then the image is decoded in full by
``pipelines.dataset.decode.decode_image``, the function the training and inference streams decode with, so
"ingested" means "decodes there". Decoding happens only below ``max_pixels``, so a task holds at most
``max_pixels`` x 4 bytes of pixels; it runs in the file-check tasks (one per shard of files, in parallel on
Ray), about the cost of one more epoch's decode (on one core of the build machine: 0.2 ms for a 28 x 28 PNG,
13 ms for a 1 MP JPEG, 45 ms for a 1 MP PNG). Each file is read twice (here and when its shard is written):
the page cache serves the second read of a local file; an S3 source pays a second GET per file.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence

from PIL import Image

from pipelines.dataset.decode import decode_image
from pipelines.dataset.image_header import ImageHeader, probe_image
from pipelines.storage import Storage

SKIP_REASONS = ("non_image_file", "dangling_symlink", "unreadable", "empty", "not_an_image", "too_large",
                "truncated", "corrupt")
"""Every reason a file of a folder or bucket source is not ingested (order of the module doc)."""


def _failure(text: str) -> str:
    low = text.lower()
    if low.startswith("too_large"):
        return "too_large"
    return "truncated" if "truncat" in low or "eoferror" in low else "corrupt"


def check_image_bytes(data: bytes, max_pixels: int) -> ImageHeader | str:
    """The header of a usable image, or the reason (``SKIP_REASONS``) it is not usable."""
    if not data:
        return "empty"
    try:
        header = probe_image(data)
    except ValueError:
        return "not_an_image"
    if header.pixels > max_pixels:
        return "too_large"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                img.verify()
        except Exception as err:  # noqa: BLE001 - any failure of the verifier means damaged data
            return _failure(f"{type(err).__name__}: {err}")
    try:
        decode_image(data, header.channels, max_pixels)
    except ValueError as err:
        return _failure(str(err))
    return header


def probe_files(root: Storage, refs: Sequence[str], max_pixels: int) -> list[ImageHeader | str]:
    """``check_image_bytes`` of each file (paths relative to ``root``); runs in a task, one per shard of files."""
    out: list[ImageHeader | str] = []
    for ref in refs:
        try:
            data = root.read_bytes(ref)
        except (PermissionError, FileNotFoundError, IsADirectoryError):
            out.append("unreadable")
            continue
        out.append(check_image_bytes(data, max_pixels))
    return out
