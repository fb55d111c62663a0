"""A folder of images that a demanding user would throw at the ingest: broken files and awkward-but-valid ones.

``write_bad_input_folder(root)`` writes it and returns what the ingest must make of it: the exact count per skip
reason (``pipelines.dataset.file_check.SKIP_REASONS``) and the valid files, which must all be ingested byte for
byte and decode through ``pipelines.dataset.decode``.
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from tests.fixtures import image_bytes


@dataclass
class BadFolder:
    """What was written and what the ingest must report."""

    root: Path
    skipped: dict[str, int]
    """Expected ``IngestResult.skipped``: files per reason."""
    skipped_files: dict[str, list[str]] = field(default_factory=dict)
    """Relative paths per reason."""
    valid: dict[str, bytes] = field(default_factory=dict)
    """Relative path -> bytes of every file that must be ingested."""
    sizes: dict[str, tuple[int, int]] = field(default_factory=dict)
    """Relative path -> (width, height) of the valid files."""


def _encode(img: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _rgb(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _png_chunks(data: bytes) -> list[tuple[bytes, int, int]]:
    """(type, offset of the length field, data length) of every chunk of a PNG."""
    out, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset:offset + 4])
        out.append((data[offset + 4:offset + 8], offset, length))
        offset += 12 + length
    return out


def png_with_bad_crc(data: bytes) -> bytes:
    """The PNG with the CRC of its first IDAT chunk flipped (pixels intact: Pillow's decoder still reads it)."""
    _, offset, length = next(c for c in _png_chunks(data) if c[0] == b"IDAT")
    damaged = bytearray(data)
    damaged[offset + 8 + length] ^= 0xFF
    return bytes(damaged)


def decompression_bomb(side: int = 8000) -> bytes:
    """A valid grayscale PNG of side x side zero pixels: ~60 kB on disk, side^2 bytes once decoded."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    comp = zlib.compressobj(9)
    row = b"\0" * (side + 1)  # filter byte 0 + side pixels
    idat = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _gif() -> bytes:
    frames = [_rgb(9, 8, s).convert("P", palette=Image.Palette.ADAPTIVE, colors=8) for s in (1, 2)]
    return _encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _transparent_palette() -> bytes:
    img = _rgb(10, 6, 4).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    return _encode(img, "PNG", transparency=0)


def write_bad_input_folder(root: Path, n_good: int = 0) -> BadFolder:
    """Write the folder under ``root`` (class folders ``a`` and ``b``, one loose file) and return the expectation.

    Bad (8 files, 7 kinds): an empty ``.jpg``, text named ``.jpg``, a truncated JPEG, a PNG whose IDAT CRC is
    wrong, a decompression bomb (8000 x 8000 > the default ``max_pixels``), two non-image files (``.txt``,
    ``.csv``) and a dangling symlink. Valid (16 kinds): gray, gray + alpha, RGBA, palette, palette with
    transparency, CMYK JPEG, 16-bit PNG, ``.JPEG`` upper case, WebP, animated GIF, a PNG named ``.jpg``, a name
    with spaces, a unicode name, 1 x 1, 300 x 7, a file at the top level (no label); plus ``n_good`` plain JPEGs.
    """
    jpeg = _encode(_rgb(64, 48, 7), "JPEG", quality=90)
    bad = {
        "empty": {"a/empty.jpg": b""},
        "not_an_image": {"a/text.jpg": b"this is text, not a JPEG\n"},
        "truncated": {"b/truncated.jpg": jpeg[: len(jpeg) // 2]},
        "corrupt": {"b/crc.png": png_with_bad_crc(image_bytes("RGB", size=(20, 16), seed=5))},
        "too_large": {"b/bomb.png": decompression_bomb()},
        "non_image_file": {"notes.txt": b"some notes\n", "b/table.csv": b"a,b\n1,2\n"},
    }
    valid = {
        "a/gray.png": image_bytes("L", seed=1),
        "a/gray_alpha.png": image_bytes("LA", seed=2),
        "a/rgba.png": image_bytes("RGBA", seed=3),
        "a/palette.png": image_bytes("P", seed=4),
        "a/palette_transparent.png": _transparent_palette(),
        "b/cmyk.jpg": _encode(_rgb(16, 12, 5).convert("CMYK"), "JPEG"),
        "b/sixteen_bit.png": image_bytes("I;16", seed=6),
        "b/UPPER.JPEG": _encode(_rgb(14, 10, 7), "JPEG"),
        "b/photo.webp": _encode(_rgb(15, 11, 8), "WEBP", quality=80),
        "b/anim.gif": _gif(),
        "a/png_named.jpg": image_bytes("RGB", seed=9),
        "a/name with spaces.png": image_bytes("RGB", seed=10),
        "b/ünïcödé 名前.png": image_bytes("RGB", seed=11),
        "a/one.png": _encode(_rgb(1, 1, 12), "PNG"),
        "b/wide_300x7.png": _encode(_rgb(300, 7, 13), "PNG"),
        "loose.png": image_bytes("RGB", seed=14),
    }
    for i in range(n_good):
        valid[f"{'ab'[i % 2]}/good_{i:03d}.jpg"] = _encode(_rgb(24, 20, 100 + i), "JPEG")
    for rel, data in [*valid.items(), *(item for files in bad.values() for item in files.items())]:
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    os.symlink("no_such_file.jpg", root / "a" / "gone.jpg")
    skipped_files = {reason: sorted(files) for reason, files in bad.items()}
    skipped_files["dangling_symlink"] = ["a/gone.jpg"]
    sizes = {rel: Image.open(io.BytesIO(data)).size for rel, data in valid.items()}
    return BadFolder(root, {r: len(f) for r, f in skipped_files.items()}, skipped_files, valid, sizes)
