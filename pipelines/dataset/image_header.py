"""Encoded images at ingest: the file extensions taken for images, what a header tells (``probe_image``), and
the PNG encoding of array sources."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = frozenset(
    {"jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff", "ppm", "pgm", "pbm", "pnm"}
)
"""File name extensions (lower case) that a folder or bucket source treats as images."""

_FORMAT_EXT = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "GIF": "gif", "BMP": "bmp", "WEBP": "webp",
               "TIFF": "tiff", "PPM": "ppm"}
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F", "La"})

@dataclass(frozen=True)
class ImageHeader:
    """What a cheap header read tells about an encoded image."""

    ext: str
    """Member extension for its encoding (jpg, png, ...)."""
    channels: int
    """1 for grayscale modes, 3 otherwise."""
    pixels: int


def probe_image(data: bytes) -> ImageHeader:
    """Identify an encoded image from its header; raises ValueError when it is not an image."""
    if not data:
        raise ValueError("empty file")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data)) as img:
                fmt, mode, (width, height) = img.format or "", img.mode, img.size
        except Image.DecompressionBombError:
            return ImageHeader("unknown", 3, 1 << 62)
        except (OSError, SyntaxError, ValueError) as err:  # PIL's "cannot identify image file" etc.
            raise ValueError(f"not a readable image ({err})") from err
    ext = _FORMAT_EXT.get(fmt, fmt.lower() or "bin")
    return ImageHeader(ext, 1 if mode in _GRAY_MODES else 3, int(width) * int(height))


def encode_png(array_HWC: np.ndarray) -> bytes:
    """Encode a uint8 HxW or HxWx3 array as PNG."""
    img = Image.fromarray(np.ascontiguousarray(array_HWC))
    buf = io.BytesIO()
    img.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()
