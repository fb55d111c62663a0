"""Ingest time and training-stream read throughput on Fashion-MNIST (this machine, local storage).

    python benchmarks/data_pipeline.py --out /tmp/secu-bench [--source idx:/usr/share/datasets/fashion-mnist]

1. ingest all 70,000 images (``--split all``) into ``<out>/store`` with Ray tasks (one per shard);
2. ingest the 60,000-image train split as its own dataset;
3. iterate the training dataset (decode + two views, recipe ``fashion-mnist-cpu``) with
   ``iter_batches(batch_size=256)`` for ``--epochs`` epochs and report images/s per epoch.

Writes ``<out>/data_pipeline.json`` and prints a table. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

import ray

from jobs.common import setup_logging
from pipelines.data import build_train_dataset
from pipelines.ingest import IngestOptions, ingest
from pipelines.sources import open_source
from pipelines.storage import StorageConfig
from secu.config import recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--source", default="idx:/usr/share/datasets/fashion-mnist")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--shard-size", type=int, default=10_000)
    args = parser.parse_args()
    setup_logging()
    shutil.rmtree(args.out / "store", ignore_errors=True)
    storage = StorageConfig(str(args.out / "store"))
    result: dict[str, object] = {"cpus": os.cpu_count(), "load_avg_start": os.getloadavg()}

    t0 = time.perf_counter()
    ray.init(include_dashboard=False)
    result["ray_init_s"] = time.perf_counter() - t0
    options = IngestOptions(shard_size=args.shard_size, use_ray=True)
    all_split = ingest(storage, "fashion-mnist", open_source(args.source, split="all"), options)
    result["ingest_all_s"] = all_split.seconds
    result["ingest_all_images"] = all_split.added
    train = ingest(storage, "fm-train", open_source(args.source, split="train"), options)
    result["ingest_train_s"] = train.seconds

    ds = build_train_dataset(storage, "fm-train", recipe("fashion-mnist-cpu").augment, seed=0)
    epochs = []
    for _ in range(args.epochs):
        start, rows = time.perf_counter(), 0
        for batch in ds.iter_batches(batch_size=256):
            rows += len(batch["sample_index"])
        seconds = time.perf_counter() - start
        epochs.append({"images": rows, "seconds": seconds, "images_per_s": rows / seconds})
    result["read_epochs"] = epochs
    result["load_avg_end"] = os.getloadavg()
    (args.out / "data_pipeline.json").write_text(json.dumps(result, indent=1))
    print(f"{'measure':<44}{'value':>14}")
    print(f"{'ray.init (s)':<44}{result['ray_init_s']:>14.1f}")
    print(f"{'ingest 70,000 images, split all (s)':<44}{all_split.seconds:>14.1f}")
    print(f"{'  = images/s':<44}{all_split.added / all_split.seconds:>14.0f}")
    print(f"{'ingest 60,000 images, split train (s)':<44}{train.seconds:>14.1f}")
    for i, epoch in enumerate(epochs):
        print(f"{f'read epoch {i}: decode + 2 views (images/s)':<44}{epoch['images_per_s']:>14.0f}")
    print(f"load average start/end: {result['load_avg_start']} / {result['load_avg_end']}")


if __name__ == "__main__":
    main()
