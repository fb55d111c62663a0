"""The paged label lookup of a ``CoordinatorClient`` (``compute.label_fetch`` ``pages``): a worker fetches the
previous epoch's labels page by page, only the pages of the ids it reads, on first use, from the shard actors
that own them, and keeps the most recently used pages.

Legend: H = heads, B = ids of a lookup, P = ids of a page.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray

from pipelines.training.id_ranges import check_in_range

DEFAULT_PAGE_IDS = 1 << 16
"""Ids per page of a paged lookup (128 KiB per int16 head): several shards of ingest's 10,000 images."""

DEFAULT_MAX_PAGES = 64
"""Pages a client keeps (least recently used first out): 4.2M ids, 8 MiB per int16 head."""


class LabelPages:
    """One client's page cache: ``lookup`` fetches missing pages in one round trip, then answers locally."""

    def __init__(self, page_ids: int = DEFAULT_PAGE_IDS, max_pages: int = DEFAULT_MAX_PAGES) -> None:
        if page_ids < 1 or max_pages < 1:
            raise ValueError(f"page_ids={page_ids} and max_pages={max_pages} must be >= 1")
        self.page_ids, self.max_pages = int(page_ids), int(max_pages)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self.fetches = 0
        """Pages fetched since this cache was made."""

    def clear(self) -> None:
        """Forgets every page (a new epoch: the labels it held are the older epoch's)."""
        self._cache.clear()

    @property
    def nbytes(self) -> int:
        """Bytes of the cached pages."""
        return sum(a.nbytes for a in self._cache.values())

    def lookup(self, ids_B: np.ndarray, handles: Sequence[Any], ranges: Sequence[tuple[int, int]], epoch: int,
               heads: int) -> np.ndarray:
        """Labels int64 [H, B] of ``ids_B`` in the previous epoch of ``epoch``, from the shards ``handles``
        owning ``ranges``; ``StaleEpochError`` (from a shard) when a page is missing and the shards are past it."""
        check_in_range(ids_B, ranges[0][0], ranges[-1][1])
        page_B = ids_B // self.page_ids
        pages = np.unique(page_B)
        missing = [int(p) for p in pages if int(p) not in self._cache]
        if missing:
            self._fetch(missing, handles, ranges, epoch)
        out_HB = np.empty((heads, ids_B.size), dtype=np.int64)
        for page in pages.tolist():
            labels_HP = self._cache[page]
            self._cache.move_to_end(page)
            if pages.size == 1:
                out_HB[:] = labels_HP[:, ids_B - page * self.page_ids]
            else:
                pos = np.flatnonzero(page_B == page)
                out_HB[:, pos] = labels_HP[:, ids_B[pos] - page * self.page_ids]
        while len(self._cache) > self.max_pages:  # after the lookup: this batch's pages stay
            self._cache.popitem(last=False)
        return out_HB

    def _fetch(self, pages: list[int], handles: Sequence[Any], ranges: Sequence[tuple[int, int]], epoch: int) -> None:
        """Fetches pages from the shards that own them, in one round trip (a page may span two shards)."""
        total = ranges[-1][1]
        requests: list[tuple[int, ray.ObjectRef]] = []
        for page in pages:
            lo, hi = page * self.page_ids, min((page + 1) * self.page_ids, total)
            for handle, (a, b) in zip(handles, ranges, strict=True):
                if a < hi and lo < b:
                    requests.append((page, handle.published_range.remote(max(a, lo), min(b, hi), epoch)))
        parts = ray.get([ref for _, ref in requests])
        by_page: dict[int, list[np.ndarray]] = {}
        for (page, _), part in zip(requests, parts, strict=True):
            by_page.setdefault(page, []).append(part)
        for page, pieces in by_page.items():
            self._cache[page] = pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=1)
        self.fetches += len(pages)
