"""Synthetic images for tests, benchmarks and demos: three visibly different 28x28 patterns.

``pattern_images(n, seed)`` gives ``n`` uint8 grayscale images (N x 28 x 28) and their labels
``0, 1, 2, 0, 1, 2, ...``: horizontal stripes, vertical stripes and a checkerboard, each drawn at
intensity 200 plus uniform noise in 0..54, so every class is easy to tell apart by eye and by a
small network, while no two images are identical. Only numpy is needed; ingest them with
``pipelines.dataset.sources.ArraySource`` (names in ``PATTERN_NAMES``).
"""

from __future__ import annotations

import numpy as np

PATTERN_NAMES = ("stripes-h", "stripes-v", "checker")
"""Class name of labels 0, 1, 2."""


def pattern_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 28x28 uint8 grayscale images of three visibly different patterns, and their labels 0..2."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    yy, xx = np.mgrid[0:28, 0:28]
    bases = [((yy // 4) % 2) * 200, ((xx // 4) % 2) * 200, (((yy // 7) + (xx // 7)) % 2) * 200]
    images = np.stack([bases[c] + rng.integers(0, 55, size=(28, 28)) for c in labels]).astype(np.uint8)
    return images, labels.astype(np.int64)
