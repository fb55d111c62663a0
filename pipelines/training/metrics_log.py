"""Per-epoch training metrics: kept in the checkpoint and published as ``train_history.json``."""

from __future__ import annotations

import json
from dataclasses import dataclass
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


@dataclass(frozen=True)
class Progress:
    """Where a run stands at a step: the figures of the training log line every ``compute.log_every`` steps."""

    epoch: int
    """The running epoch (0-based)."""
    epochs: int
    steps: int
    """Steps done in this epoch."""
    steps_per_epoch: int
    images_per_s: float
    """This epoch's pace over all ranks."""
    epoch_left_s: float
    run_left_s: float

    def line(self) -> str:
        """``epoch 3/12 step 50/234 (21%), 812 img/s, epoch left 3m47s, run left 41m``."""
        share = 100 * self.steps / max(self.steps_per_epoch, 1)
        return (f"epoch {self.epoch + 1}/{self.epochs} step {self.steps}/{self.steps_per_epoch} ({share:.0f}%), "
                f"{self.images_per_s:.0f} img/s, epoch left {_duration(self.epoch_left_s)}, "
                f"run left {_duration(self.run_left_s)}")

    def figures(self) -> dict[str, float]:
        """The same as metric keys (``pipelines.tracking``): epoch, step, images/s and the time left."""
        return {"epoch": self.epoch, "train/steps": self.steps, "data/images_per_s": self.images_per_s,
                "time/epoch_left_s": self.epoch_left_s, "time/run_left_s": self.run_left_s}


def progress(epoch: int, epochs: int, steps: int, steps_per_epoch: int, global_batch: int,
             epoch_elapsed_s: float, seconds_per_epoch: float | None) -> Progress:
    """Where a run stands after ``steps`` steps of ``epoch``.

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
    return Progress(epoch=epoch, epochs=epochs, steps=steps, steps_per_epoch=steps_per_epoch,
                    images_per_s=rate * global_batch, epoch_left_s=epoch_left, run_left_s=run_left)


def progress_line(epoch: int, epochs: int, steps: int, steps_per_epoch: int, global_batch: int,
                  epoch_elapsed_s: float, seconds_per_epoch: float | None) -> str:
    """``epoch 3/12 step 50/234 (21%), 812 img/s, epoch left 3m47s, run left 41m`` (``progress(...).line()``)."""
    return progress(epoch, epochs, steps, steps_per_epoch, global_batch, epoch_elapsed_s, seconds_per_epoch).line()


def _duration(seconds: float) -> str:
    """``42s``, ``3m47s``, ``1h05m``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"
