"""The report's map of the embeddings: a few thousand images placed in 2-D, coloured by cluster.

Where the embeddings come from, in this order:

1. the published assignments' ``embedding`` column (inference with ``--with-embeddings``): read for
   the sampled rows;
2. else the checkpoint that produced the assignments (``_SUCCESS``'s ``checkpoint``), loaded on the
   CPU: the sampled images (decoded from the shards in the same pass that cuts the thumbnails) go
   through the evaluation transform and ``method.assign``, whose ``embedding_BD`` is what inference
   writes into that column. A small CNN does 2,000 Fashion-MNIST images in about a second;
3. else no map, and ``MapData.note`` says why (no embedding column and the checkpoint is gone, or
   the method gives no embedding).

The sample (``sample_rows``) is stratified by cluster, so small clusters appear on the map too. The
2-D layout is t-SNE (scikit-learn, after PCA to 50 dimensions; neighbourhoods are kept, so clusters
read as islands) or PCA (the two directions of largest variance; global, linear, instant).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from pipelines.dataset.decode import decode_image
from pipelines.outputs.assignments import read_assignment_rows
from pipelines.outputs.schema import EMBEDDING_COLUMN
from pipelines.storage import Storage
from pipelines.training.checkpointing import checkpoint_at, load_checkpoint
from secu.augment import EvalTransform, eval_batch, normalize

logger = logging.getLogger(__name__)

MAP_METHODS = ("tsne", "pca", "none")
_MAX_PIXELS = 50_000_000
"""Images larger than this are left off the map (as ingest refuses them by default)."""


@dataclass
class MapData:
    """The map's points, or why there is no map."""

    rows: np.ndarray
    """Assignment rows shown (empty without a map)."""
    xy_N2: np.ndarray
    """2-D position per shown row."""
    source: str
    """Where the embeddings came from, in words (for the page)."""
    layout: str
    """``t-SNE`` or ``PCA``."""
    seconds: float
    """Time spent embedding and laying out."""
    note: str = ""
    """Why there is no map (empty when there is one)."""


def no_map(note: str) -> MapData:
    """A ``MapData`` without points, saying why."""
    return MapData(np.zeros(0, dtype=np.int64), np.zeros((0, 2)), "", "", 0.0, note)


def sample_rows(pred_N: np.ndarray, k: int, points: int, seed: int, floor: int = 5) -> np.ndarray:
    """``points`` row indices (a few more when small clusters need their floor): each cluster in proportion
    to its size (largest remainders round), but at least ``floor`` of it (all of a smaller cluster), so that
    every non-empty cluster shows on the map; sorted. With many clusters the floor shrinks (to 1) so that
    the floors take at most half of ``points``."""
    n = pred_N.size
    if n <= points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    sizes_K = np.bincount(pred_N, minlength=k)
    floor = max(1, min(floor, points // max(2 * int(np.count_nonzero(sizes_K)), 1)))
    exact_K = points * sizes_K / n
    quota_K = np.floor(exact_K).astype(np.int64)
    quota_K[np.argsort(-(exact_K - quota_K), kind="stable")[:points - int(quota_K.sum())]] += 1
    quota_K = np.minimum(sizes_K, np.maximum(quota_K, floor))
    order = np.argsort(pred_N, kind="stable")
    bounds = np.searchsorted(pred_N[order], np.arange(k + 1))
    picked = [rng.choice(order[bounds[c]:bounds[c + 1]], size=int(quota_K[c]), replace=False)
              for c in range(k) if quota_K[c]]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=np.int64)


def embeddings_from_column(storage: Storage, run_id: str, name: str, rows: np.ndarray) -> np.ndarray:
    """The published ``embedding`` of ``rows`` (float32 N x D), read from the row groups that hold them only."""
    column = read_assignment_rows(storage, run_id, name, EMBEDDING_COLUMN, rows)
    dim = column.type.list_size
    return np.asarray(column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim), dtype=np.float32)


class CheckpointEmbedder:
    """The checkpoint's method on the CPU, turning encoded images into its embeddings (as inference does)."""

    def __init__(self, storage: Storage, label: str, threads: int = 2) -> None:
        """Load the checkpoint that ``_SUCCESS`` names (``label``: relative to the storage root, or a path).

        Raises:
            FileNotFoundError: The checkpoint is gone or incomplete.
        """
        path = label if label.startswith("s3://") or label.startswith("/") else storage.uri(label)
        ref = checkpoint_at(path, storage)
        loaded = load_checkpoint(ref, device=torch.device("cpu"))
        self.method = loaded.method
        self.threads = max(1, threads)
        exp = loaded.job.experiment
        self.channels = exp.augment.channels
        self.mean, self.std = exp.augment.mean, exp.augment.std
        self.transform = EvalTransform(exp.augment)
        self.label = ref.label

    def view(self, data: bytes) -> np.ndarray | None:
        """The evaluation view (uint8 C x S x S) of encoded image ``data``; None when it cannot be decoded."""
        try:
            return eval_batch(self.transform, [decode_image(data, self.channels, _MAX_PIXELS)])[0]
        except ValueError:
            return None

    @torch.no_grad()
    def embed(self, views: list[np.ndarray], batch: int = 256) -> np.ndarray:
        """Embeddings (float32 N x D) of evaluation views.

        Raises:
            ValueError: The method gives no embedding.
        """
        out = []
        previous = torch.get_num_threads()
        torch.set_num_threads(self.threads)  # the caller's setting comes back below
        try:
            for i in range(0, len(views), batch):
                x = normalize(torch.from_numpy(np.stack(views[i:i + batch])), self.mean, self.std)
                z = self.method.assign(x).embedding_BD
                if z is None:
                    raise ValueError(f"method {self.method.name} gives no embedding")
                out.append(z.float().numpy())
        finally:
            torch.set_num_threads(previous)
        return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def layout_2d(emb_ND: np.ndarray, layout: str, seed: int) -> np.ndarray:
    """2-D positions of the embeddings: ``tsne`` or ``pca``."""
    x = emb_ND.astype(np.float64) - emb_ND.mean(axis=0, keepdims=True)
    if layout == "pca" or x.shape[0] < 4:
        _, _, vt = np.linalg.svd(x, full_matrices=False)
        xy = x @ vt[:2].T
        return xy if xy.shape[1] == 2 else np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    if x.shape[1] > 50 and x.shape[0] > 50:
        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    perplexity = float(min(30.0, (x.shape[0] - 1) / 3))
    # 500 iterations (250 of them early exaggeration) settle a few thousand points; 1000 doubles the time.
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", max_iter=500, random_state=seed)
    return np.asarray(tsne.fit_transform(x))


def build_map(embed: Callable[[], tuple[np.ndarray, np.ndarray, str]], layout: str, seed: int) -> MapData:
    """Lay out the embeddings that ``embed()`` returns as (rows kept, embeddings, source in words)."""
    started = time.monotonic()
    kept, emb, source = embed()
    if kept.size < 3:
        return no_map(f"only {kept.size} images could be embedded ({source})")
    embedded = time.monotonic()
    xy = layout_2d(emb, layout, seed)
    seconds = time.monotonic() - started
    logger.info("embedding map: %d images, embeddings %s (%.1f s), %s (%.1f s)", kept.size, source,
                embedded - started, layout, seconds - (embedded - started))
    return MapData(kept, xy, source, "t-SNE" if layout == "tsne" and kept.size >= 4 else "PCA", seconds)
