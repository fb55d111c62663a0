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


def progress_line(epoch: int, epochs: int, steps: int, steps_per_epoch: int, global_batch: int,
                  epoch_elapsed_s: float, seconds_per_epoch: float | None) -> str:
    """``epoch 3/12 step 50/234 (21%), 812 img/s, epoch left 3m47s, run left 41m``: where a run stands, for the
    training log line every ``compute.log_every`` steps.

    Args:
        epoch: the running epoch (0-based); ``epochs``: the run's total.
        steps: steps done in this epoch; ``steps_per_epoch``: steps an epoch makes (per rank).
        global_batch: images per step over all ranks.
        epoch_elapsed_s: seconds since the epoch began.
        seconds_per_epoch: the mean length of this run's finished epochs (None before the first one ends: the
            run's time left is then extrapolated from this epoch's pace).
    """
    rate = steps / max(epoch_elapsed_s, 1e-9)
    epoch_left = max(0, steps_per_epoch - steps) / max(rate, 1e-9)
    per_epoch = seconds_per_epoch if seconds_per_epoch is not None else steps_per_epoch / max(rate, 1e-9)
    run_left = epoch_left + per_epoch * max(0, epochs - epoch - 1)
    share = 100 * steps / max(steps_per_epoch, 1)
    return (f"epoch {epoch + 1}/{epochs} step {steps}/{steps_per_epoch} ({share:.0f}%), "
            f"{rate * global_batch:.0f} img/s, epoch left {_duration(epoch_left)}, run left {_duration(run_left)}")


def _duration(seconds: float) -> str:
    """``42s``, ``3m47s``, ``1h05m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"
