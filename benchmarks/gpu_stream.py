"""The 224 px training stream with views on the device, on a GPU (step ``stream_224`` of ``benchmarks.gpu_check``).

The stream is the product's (``pipelines.dataset.streams.build_train_dataset(views_on_device=True)``: Ray Data
reads the shards and decodes to fixed-size canvases) and the views are made by the function a training
worker runs (``pipelines.dataset.streams.device_views``), here on GPU 0 of this process; the images are
``benchmarks.common``'s synthetic 500 x 375 JPEGs, the views the ``imagenet1k`` recipe's (224 px), as in
``benchmarks.data_pipeline``'s ``ray_data_decode_only`` variant, whose epoch function is the reference here.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Figures, Stopwatch, alternate, ingest_folder, summarize, write_synthetic_jpegs
from benchmarks.data_pipeline import epoch_ray_data

STREAM_RECIPE = "imagenet1k"
VIEW_SIZE = 224


def epoch_views_on_device(ds: Any, augment: Any, batch_size: int, device: torch.device, epoch: int) -> Figures:
    """One epoch of the decode-only stream ``ds`` through ``device_views`` on ``device``, as a training worker
    consumes it (``iter_torch_batches`` on the CPU, canvases moved to the device); the views of the first batch
    are checked to be uint8 B x 3 x 224 x 224 on the device."""
    from pipelines.dataset.streams import device_views

    rows = 0
    with Stopwatch() as sw:
        batches = ds.iter_torch_batches(batch_size=batch_size, dtypes=None, device="cpu")
        for batch in device_views(batches, augment, seed=0, rank=0, epoch=epoch, device=device):
            if rows == 0:
                check_views(batch["view1"], batch["view2"], device)
            rows += int(batch["sample_index"].shape[0])
        torch.cuda.synchronize(device)  # the views are computed asynchronously: the epoch ends when they are done
    return {"images": float(rows), "seconds": sw.seconds, "images_per_s": rows / max(sw.seconds, 1e-9)}


def check_views(view1: torch.Tensor, view2: torch.Tensor, device: torch.device) -> None:
    """RuntimeError unless both views are uint8 B x 3 x 224 x 224 tensors on ``device``."""
    for view in (view1, view2):
        if view.device.type != device.type or view.dtype != torch.uint8 or tuple(view.shape[1:]) != (3, VIEW_SIZE,
                                                                                                      VIEW_SIZE):
            raise RuntimeError(f"device_views gave {view.dtype} {tuple(view.shape)} on {view.device}, expected "
                               f"uint8 B x 3 x {VIEW_SIZE} x {VIEW_SIZE} on {device}")


def device_views_cost(ds: Any, augment: Any, batch_size: int, device: torch.device, repeats: int) -> dict[str, float]:
    """GPU wall ms per image of ``BatchTwoViewAugment.views_of_canvas`` alone, over the first two batches of
    the stream already on the device (the GPU counterpart of ``data_pipeline.worker_views_cost``)."""
    import time

    from secu.batch_augment import BatchTwoViewAugment

    batches = []
    for batch in ds.iter_torch_batches(batch_size=batch_size, dtypes=None, device="cpu"):
        batches.append((batch["canvas"].to(device), batch["height"], batch["width"]))
        if len(batches) == 2:
            break
    aug = BatchTwoViewAugment(augment, batched=True)
    per_round, n = [], 0
    for rnd in range(repeats + 1):  # the first round warms up
        torch.cuda.synchronize(device)
        t0, n = time.perf_counter(), 0
        for i, (canvas, heights, widths) in enumerate(batches):
            aug.views_of_canvas(canvas, heights, widths, seed=1000 + 100 * rnd + i)
            n += int(canvas.shape[0])
        torch.cuda.synchronize(device)
        if rnd:
            per_round.append(1e3 * (time.perf_counter() - t0) / max(n, 1))
    return summarize(per_round) | {"images": float(n)}


def stream_step(root: str, work: Path, dataset: str, args: argparse.Namespace) -> dict[str, Any]:
    """Write and ingest the JPEGs (once per --storage), then alternate ``decode_only`` and ``views_on_device``
    epochs; figures, the views' GPU cost and this process' peak CUDA memory."""
    from pipelines.dataset.info import load_dataset_info
    from pipelines.dataset.streams import build_train_dataset
    from pipelines.storage import Storage
    from secu.recipes import recipe

    storage = Storage(root)
    with Stopwatch() as setup:
        folder = work / f"jpegs-{args.jpeg_images}"
        if len(list(folder.rglob("*.jpg"))) != args.jpeg_images:
            write_synthetic_jpegs(folder, args.jpeg_images)
        ingest_folder(storage, dataset, folder, shard_size=-(-args.jpeg_images // 8))
    augment = recipe(STREAM_RECIPE).augment
    device = torch.device("cuda", 0)
    torch.cuda.reset_peak_memory_stats(device)
    ds = build_train_dataset(storage, dataset, augment, seed=0, views_on_device=True)
    epochs = [0]

    def on_device() -> Figures:
        epochs[0] += 1
        return epoch_views_on_device(ds, augment, args.stream_batch_size, device, epochs[0])

    rounds = alternate({"decode_only": lambda: epoch_ray_data(ds, args.stream_batch_size),
                        "views_on_device": on_device}, args.repeats, args.warmup)
    summary = rounds.summary("images_per_s")
    return {"images": load_dataset_info(storage, dataset).num_samples, "setup_s": setup.seconds,
            "source": "synthetic 500x375 JPEG, quality 90", "recipe_views": STREAM_RECIPE,
            "view_size": augment.image_size, "batch_size": args.stream_batch_size, "device": str(device),
            "images_per_s": summary, "raw": rounds.raw, "order": rounds.order,
            "ratio_views_on_device_to_decode_only": summary["views_on_device"]["median"]
            / summary["decode_only"]["median"],
            "device_views_ms_per_image": device_views_cost(ds, augment, args.stream_batch_size, device, args.repeats),
            "cuda_max_memory_allocated_mib": torch.cuda.max_memory_allocated(device) / 2**20,
            "cuda_max_memory_reserved_mib": torch.cuda.max_memory_reserved(device) / 2**20}

