"""Per-epoch training metrics: kept in the checkpoint and published as ``train_history.json``."""

from __future__ import annotations

import json
from typing import Any

from pipelines.storage import Storage

HISTORY_FILE = "train_history.json"


class MetricsLog:
    """An ordered list of per-epoch metric dicts. A replayed epoch replaces its earlier entry."""

    def __init__(self) -> None:
        self._rows: list[dict[str, Any]] = []

    @classmethod
    def from_list(cls, rows: list[dict[str, Any]]) -> MetricsLog:
        """Rebuild from ``to_list`` output."""
        log = cls()
        for row in rows:
            log.append(row)
        return log

    def append(self, row: dict[str, Any]) -> None:
        """Add the metrics of one epoch."""
        self._rows = [r for r in self._rows if r.get("epoch") != row.get("epoch")]
        self._rows.append(dict(row))

    def to_list(self) -> list[dict[str, Any]]:
        """JSON-serialisable rows."""
        return [dict(r) for r in self._rows]

    def write(self, storage: Storage, run_id: str) -> None:
        """Publish as ``runs/<run_id>/train_history.json`` (atomic replace)."""
        payload = json.dumps({"run_id": run_id, "epochs": self._rows}, indent=1, default=float)
        storage.write_bytes_atomic(storage.join("runs", run_id, HISTORY_FILE), payload.encode())

    @staticmethod
    def format_line(row: dict[str, Any]) -> str:
        """One log line of the most useful figures."""
        keys = ["train/loss", "train/loss_center", "train/loss_repr", "train/lr", "data/images_per_s",
                "clusters/h0/min_size_frac", "clusters/h0/max_size_frac", "clusters/h0/changed_frac",
                "clusters/h0/acc", "clusters/h0/nmi"]
        return ", ".join(f"{k}={row[k]:.4g}" for k in keys if k in row and isinstance(row[k], int | float))
