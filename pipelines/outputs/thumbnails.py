"""The report's thumbnails: images read from a dataset's shards by key, resized, written as PNG files.

``extract_all`` reads the shards that hold the wanted keys in parallel (each tar streamed once, reading
stops when all of its keys were found) and writes ``<out_dir>/<thumb_name(key)>``. In the same pass it
hands the encoded bytes of other keys to a ``collect`` callback (the embedding map's sample). An image
that cannot be decoded, or a missing or corrupt shard, is logged and left out: the report shows it as
missing.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tarfile
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from pipelines.dataset.info import dataset_dir
from pipelines.storage import Storage, join

logger = logging.getLogger(__name__)

_MEMBER_RE = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
_IMAGE_EXTS = {"png", "jpg", "jpeg", "ppm", "pgm", "pbm", "pnm", "bmp", "webp", "tif", "tiff", "gif"}


def thumb_name(key: str) -> str:
    """File name of a key's thumbnail under ``thumbs/`` (characters unsafe in a URL replaced by ``_``)."""
    return re.sub(r"[^A-Za-z0-9_.-]", "_", key) + ".png"


def thumbnail(data: bytes, px: int) -> bytes:
    """PNG bytes of encoded image ``data`` at longest side ``px``.

    Images smaller than ``px`` are enlarged by an integer factor (nearest neighbour, pixels stay crisp);
    larger ones are shrunk (Lanczos). Modes other than L and RGB are converted to RGB.
    """
    with Image.open(io.BytesIO(data)) as opened:
        opened.load()
        image: Image.Image = opened
        if image.mode not in ("L", "RGB"):
            image = image.convert("RGB")
        w, h = image.size
        if max(w, h) < px:  # tiny images (28 px): enlarge by an integer factor, keep the pixels crisp
            f = max(1, px // max(w, h))
            image = image.resize((w * f, h * f), Image.Resampling.NEAREST)
        else:
            image.thumbnail((px, px), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        image.save(buf, format="PNG", optimize=True)
        return buf.getvalue()


Collect = Callable[[str, bytes], None]
"""Receives (key, encoded image bytes) of a key asked for in ``extra``."""


def extract_thumbnails(storage: Storage, shard_rel: str, keys: set[str], out_dir: str, px: int,
                       extra: set[str] | None = None, collect: Collect | None = None) -> set[str]:
    """Write ``out_dir/<key>.png`` for the image members of ``keys`` in one shard; returns the keys found.

    The bytes of the members of ``extra`` go to ``collect``. The tar is streamed once and reading stops
    when every key was found.
    """
    extra = extra if collect is not None and extra else set()
    found: set[str] = set()
    collected: set[str] = set()
    with storage.filesystem.open_input_stream(storage.path(shard_rel)) as stream, \
            tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            match = _MEMBER_RE.match(member.name)
            if not member.isfile() or match is None:
                continue
            key, ext = match.group(1), match.group(2).lower()
            thumb, other = key in keys and key not in found, key in extra and key not in collected
            if not (thumb or other) or ext not in _IMAGE_EXTS:
                continue
            handle = tar.extractfile(member)
            if handle is None:
                continue
            data = handle.read()
            if other:
                assert collect is not None
                collect(key, data)
                collected.add(key)
            if not thumb:
                if found == keys and collected == extra:
                    break
                continue
            try:
                png = thumbnail(data, px)
            except (OSError, ValueError) as err:  # undecodable image: shown as missing on the page
                logger.warning("cannot decode %s in %s: %s", member.name, shard_rel, err)
                continue
            with open(os.path.join(out_dir, thumb_name(key)), "wb") as out:
                out.write(png)
            found.add(key)
            if found == keys and collected == extra:
                break
    return found


def extract_all(storage: Storage, dataset: str, wanted: Mapping[str, set[str]], out_dir: str, px: int,
                threads: int, extra: Mapping[str, set[str]] | None = None, collect: Collect | None = None) -> set[str]:
    """Thumbnails of ``wanted`` (shard name -> keys) of ``dataset``, ``threads`` shards at a time; the bytes
    of ``extra`` (shard name -> keys) go to ``collect`` (called from the reading threads).

    Returns the keys whose thumbnail was written; a shard that cannot be read loses only its own keys.
    """
    base = join(dataset_dir(dataset), "shards")
    extra = extra or {}

    def one(shard: str) -> set[str]:
        keys = set(wanted.get(shard, set()))
        try:
            return extract_thumbnails(storage, join(base, shard), keys, out_dir, px, set(extra.get(shard, set())),
                                      collect)
        except (OSError, tarfile.TarError) as err:  # a missing/corrupt shard: its images show as missing
            logger.warning("cannot read thumbnails from shard %s: %s", storage.uri(base, shard), err)
            return set()

    found: set[str] = set()
    with ThreadPoolExecutor(threads) as pool:
        for keys in pool.map(one, sorted(set(wanted) | set(extra))):
            found |= keys
    return found
