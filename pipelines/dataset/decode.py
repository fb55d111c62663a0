"""Decoding of the samples read from WebDataset shards: encoded bytes -> uint8 H x W x C pixels.

``decode`` is the first Ray Data stage of ``pipelines.dataset.streams``: it parses the rows that
``pipelines.dataset.shard_reader`` produces (image bytes under ``IMAGE_FIELD``, the sample's ``json``
metadata, key and shard), decodes every image and drops, and counts, the samples that cannot be used
(reasons in ``pipelines.dataset.bad_input``). ``decode_image`` and ``pil_to_array`` decode one image.

Decoding, whatever PIL mode the image has (documented choices):

- ``L`` as is; ``1`` -> 0/255; ``I;16*`` and ``I`` (16-bit) scaled to 8 bits (x * 255 / 65535,
  rounded; values outside 0..65535 clipped); ``F`` clipped to 0..255 (or scaled by 255 when its
  maximum is at most 1);
- ``RGB`` as is; ``CMYK``, ``YCbCr``, ``LAB``, ``HSV`` converted to RGB by PIL;
- alpha (``LA``, ``RGBA``, ``PA``, ``P`` with transparency): composited on black, i.e. colour times
  alpha, so transparent pixels become black (dropping alpha instead would expose whatever colour the
  encoder left under transparent pixels);
- ``P`` without transparency: its palette colours (RGB);
- then to the configured channels: grayscale replicated to 3 channels, colour to luminance
  (ITU-R 601-2, PIL's ``L`` conversion) for 1 channel;
- EXIF orientation is applied (phone JPEGs); multi-frame images give their first frame.
"""

from __future__ import annotations

import io
import json
import os
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import ray
from PIL import Image, ImageOps

from pipelines.dataset.bad_input import BadInputError, BadInputPolicy, BadSample
from pipelines.dataset.image_header import IMAGE_EXTENSIONS
from pipelines.dataset.info import parse_key

IMAGE_FIELD = "img"
"""Every image member (``.png``, ``.jpg``, ...) is renamed to this field while reading."""

__all__ = ["IMAGE_FIELD", "decode", "decode_image", "pil_to_array", "rename_member"]


# ---------------------------------------------------------------------------------------------
# Decoding one image
# ---------------------------------------------------------------------------------------------


class _TooLarge(ValueError):
    pass


def _scale_to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    if mode == "F":
        values = array.astype(np.float64)
        if values.size and np.nanmax(values) <= 1.0:
            values = values * 255.0
        return np.clip(np.nan_to_num(values), 0, 255).round().astype(np.uint8)
    wide = np.clip(array.astype(np.int64), 0, 65535)
    return ((wide * 255 + 32767) // 65535).astype(np.uint8)


def _composite_on_black(array: np.ndarray) -> np.ndarray:
    alpha = array[..., -1:].astype(np.uint16)
    return ((array[..., :-1].astype(np.uint16) * alpha + 127) // 255).astype(np.uint8)


def _luminance(rgb_HWC: np.ndarray) -> np.ndarray:
    return np.asarray(Image.fromarray(rgb_HWC).convert("L"))


def pil_to_array(img: Image.Image, channels: int) -> np.ndarray:
    """A decoded PIL image of any mode as a uint8 H x W x ``channels`` array (rules in the module doc)."""
    mode = img.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        gray = _scale_to_uint8(np.asarray(img), "F" if mode == "F" else "I")
    elif mode in ("L", "1"):
        gray = np.asarray(img.convert("L") if mode == "1" else img)
    elif mode in ("LA", "La"):
        gray = _composite_on_black(np.asarray(img.convert("LA")))[..., 0]
    else:
        if mode in ("RGBA", "RGBa", "PA") or (mode == "P" and "transparency" in img.info):
            rgb = _composite_on_black(np.asarray(img.convert("RGBA")))
        else:
            rgb = np.asarray(img if mode == "RGB" else img.convert("RGB"))
        if channels == 3:
            return np.ascontiguousarray(rgb)
        return _luminance(np.ascontiguousarray(rgb))[:, :, None]
    gray = np.ascontiguousarray(gray)
    if channels == 1:
        return gray[:, :, None]
    return np.repeat(gray[:, :, None], 3, axis=2)


def decode_image(data: bytes, channels: int, max_pixels: int) -> np.ndarray:
    """Decode encoded image bytes to uint8 H x W x ``channels``.

    Raises:
        ValueError: ``str(err)`` starting with the bad-input reason (``empty``, ``too_large``,
            ``undecodable``) followed by details.
    """
    if not data:
        raise ValueError("empty")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise _TooLarge(f"too_large: {width}x{height} pixels > max_pixels={max_pixels}")
                img.load()
                exif_formats = ("JPEG", "MPO", "TIFF", "WEBP")
                oriented = ImageOps.exif_transpose(img) if img.format in exif_formats else img
                return pil_to_array(oriented, channels)
        except _TooLarge as err:
            raise ValueError(str(err)) from None
        except Image.DecompressionBombError as err:
            raise ValueError(f"too_large: {err}") from None
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise ValueError(f"undecodable: {type(err).__name__}: {err}") from None


# ---------------------------------------------------------------------------------------------
# Parsing the rows of a read batch; the ``decode`` stage
# ---------------------------------------------------------------------------------------------


def rename_member(fname: str) -> str:
    """``s000001_0000002.JPEG`` -> ``s000001_0000002.img``; other members keep their name."""
    slash = fname.rfind("/")
    dot = fname.find(".", slash + 1)
    if dot < 0:
        return fname
    if fname[dot + 1:].lower() in IMAGE_EXTENSIONS:
        return fname[:dot] + "." + IMAGE_FIELD
    return fname


def _as_bytes(value: Any) -> bytes | None:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        return value.tobytes()
    return None


def _parse_meta(meta: bytes | None) -> dict[str, Any]:
    """The sample's ``<key>.json`` as a dict ({} when absent or unreadable)."""
    if meta is None:
        return {}
    try:
        value = json.loads(meta)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _sample_index(meta: dict[str, Any], key: str, shard: str, shard_first: Mapping[str, int]) -> int | None:
    value = meta.get("sample_index")
    if isinstance(value, int) and value >= 0:
        return value
    parsed = parse_key(key)  # no usable id in the json: the key names the position in the shard
    if parsed is not None and shard in shard_first:
        return shard_first[shard] + parsed[1]
    return None


def _label(meta: dict[str, Any]) -> int:
    value = meta.get("label")
    return int(value) if isinstance(value, int) else -1


def decode(batch: dict[str, np.ndarray], *, channels: int, policy: BadInputPolicy,
           shard_first: Mapping[str, int], counter: Any) -> dict[str, np.ndarray]:
    """Stage ``decode``: raw rows -> ``image`` (uint8 H x W x C), ids, labels; bad rows dropped, counted."""
    keys = [str(k) for k in batch["__key__"]]
    shards = [os.path.basename(str(u)) for u in batch["__url__"]]
    n = len(keys)
    images_col = batch.get(IMAGE_FIELD, np.full(n, None, dtype=object))
    json_col = batch.get("json", np.full(n, None, dtype=object))
    images: list[np.ndarray] = []
    out_index, out_key, out_shard, out_label, out_source = [], [], [], [], []
    bad: list[BadSample] = []
    for i in range(n):
        data, meta = _as_bytes(images_col[i]), _parse_meta(_as_bytes(json_col[i]))
        if data is None:
            bad.append(BadSample(shards[i], keys[i], "non_image_member"))
            continue
        index = _sample_index(meta, keys[i], shards[i], shard_first)
        if index is None:
            bad.append(BadSample(shards[i], keys[i], "bad_metadata", "no sample_index in json or key"))
            continue
        try:
            image = decode_image(data, channels, policy.max_pixels)
        except ValueError as err:
            reason, _, detail = str(err).partition(": ")
            bad.append(BadSample(shards[i], keys[i], reason, detail[:200]))
            continue
        images.append(image)
        out_index.append(index)
        out_key.append(keys[i])
        out_shard.append(shards[i])
        out_label.append(_label(meta))
        out_source.append(str(meta.get("source", "")))
    if counter is not None and ray.get(counter.record.remote(len(images), bad)):
        report = ray.get(counter.report.remote())  # a BadInputReport
        raise BadInputError(f"too much bad input: {report.summary()}. First: {report.examples}. Fix or "
                            "re-ingest the damaged images, or raise max_bad_fraction")
    image_col: np.ndarray
    if images and all(im.shape == images[0].shape for im in images):
        image_col = np.stack(images)
    else:
        image_col = np.empty(len(images), dtype=object)
        image_col[:] = images
    return {
        "image": image_col,
        "sample_index": np.asarray(out_index, dtype=np.int64),
        "key": np.asarray(out_key, dtype=object),
        "shard": np.asarray(out_shard, dtype=object),
        "label": np.asarray(out_label, dtype=np.int64),
        "source": np.asarray(out_source, dtype=object),
    }
