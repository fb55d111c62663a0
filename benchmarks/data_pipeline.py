"""Training input pipeline: Ray Data vs webdataset + DataLoader vs plain processes, in images/s.

Claim: our training stream (``pipelines.dataset.streams.build_train_dataset``: read the committed tars, decode,
two augmented views) delivers images about as fast as the loader a user would pick instead, and
close to what plain processes achieve on the same cores.

Variants, all on the same shards (written by our ingest into a temporary root), with W worker
processes (``--workers``, default the core count) and the same transforms (``BatchTwoViewAugment`` of
the recipe, the training path's batched augmentation, applied to batches of ``--batch-size`` decoded
images; decoding with ``pipelines.dataset.decode.decode_image``):

- ``ray_data``: ``build_train_dataset`` on a local Ray with W CPUs, one epoch through
  ``iter_torch_batches(batch_size)`` (what the training loop consumes; views reach this process);
- ``ray_data_decode_only``: the same with ``views_on_device=True`` (``augment.views_on_device``): the stream
  only reads and decodes to fixed-size canvases (``decoded_for_device``), which reach this process; the
  views are then the training worker's work, measured separately as ``worker_views_cpu_ms_per_image``:
  CPU time of ``BatchTwoViewAugment.views_of_canvas`` on 1 thread over the first two batches of the
  stream, per image (on a GPU worker that work runs on the device instead);
- ``wds_dataloader``: ``webdataset.WebDataset(shards)`` -> decode -> ``batched`` ->
  ``BatchTwoViewAugment`` -> ``torch.utils.data.DataLoader(num_workers=W, persistent_workers=True)``
  (views reach this process);
- ``pool_decode_augment``: W plain processes, each reading whole shards, decoding and augmenting,
  returning only a count: the same work without any framework or transfer of views (the ceiling for
  the full work);
- ``pool_raw_pil``: W plain processes decoding with bare PIL only (``Image.open().convert()``), no
  augmentation: the decode ceiling.

Image kinds: Fashion-MNIST PNGs (28 x 28 grayscale, a subset of the train split, recipe
``fashion-mnist-cpu``) and synthetic ImageNet-like JPEGs (500 x 375, quality 90, written by this
script; views of the ``imagenet1k`` recipe at 224 px).

    python -m benchmarks.data_pipeline                 # 20,000 PNGs + 1,600 JPEGs
    python -m benchmarks.data_pipeline --quick         # 256 PNGs + 16 JPEGs (smoke test)
    python -m benchmarks.data_pipeline --kinds synthetic_jpeg --variants ray_data ray_data_decode_only \
        --out docs/results/data_pipeline_views_on_device.json    # views on the device vs in the stream
"""

from __future__ import annotations

import functools
import io
import os
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import (
    SHARD_IMAGE_EXTS,
    Figures,
    LoadProbe,
    Rounds,
    Stopwatch,
    alternate,
    base_parser,
    ingest_fashion_mnist,
    ingest_folder,
    iter_shard_samples,
    print_table,
    ratios,
    shard_paths,
    start_ray,
    start_result,
    summarize,
    write_result,
    write_synthetic_jpegs,
)
from secu.batch_augment import BatchTwoViewAugment
from secu.config import AugmentConfig
from secu.recipes import recipe

NAME = "data_pipeline"
BASELINE = "wds_dataloader"
VARIANTS = ("ray_data", "ray_data_decode_only", "wds_dataloader", "pool_decode_augment", "pool_raw_pil")


# ---------------------------------------------------------------------------------------------
# Work done in worker processes (module level: picklable)
# ---------------------------------------------------------------------------------------------


def _init_worker() -> None:
    torch.set_num_threads(1)  # as DataLoader workers and Ray tasks with num_cpus=1


def decode_augment_shard(path: str, cfg: AugmentConfig, batch_size: int = 256) -> int:
    """Decode every image of one shard and augment them in batches; returns the count (views are dropped)."""
    from pipelines.dataset.decode import decode_image

    aug = _two_views(cfg)
    n, pending = 0, []
    for _, data, _ in iter_shard_samples(path):
        pending.append(decode_image(data, cfg.channels, 50_000_000))
        if len(pending) == batch_size:
            aug(pending)
            n, pending = n + len(pending), []
    if pending:
        aug(pending)
        n += len(pending)
    return n


def raw_pil_shard(path: str, channels: int) -> int:
    """Decode every image of one shard with bare PIL (no augmentation); returns the count."""
    from PIL import Image

    mode = "L" if channels == 1 else "RGB"
    n = 0
    for _, data, _ in iter_shard_samples(path):
        with Image.open(io.BytesIO(data)) as img:
            np.asarray(img.convert(mode))
        n += 1
    return n


_AUG_CACHE: dict[str, BatchTwoViewAugment] = {}


def _two_views(cfg: AugmentConfig) -> BatchTwoViewAugment:
    key = repr(asdict(cfg))
    if key not in _AUG_CACHE:
        _AUG_CACHE[key] = BatchTwoViewAugment(cfg)
    return _AUG_CACHE[key]


class WdsDecode:
    """webdataset map function: raw sample dict -> (decoded image, sample_index)."""

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg

    def __call__(self, sample: dict[str, Any]) -> tuple[np.ndarray, int]:
        import json

        from pipelines.dataset.decode import decode_image

        data = next(sample[e] for e in SHARD_IMAGE_EXTS if e in sample)
        return decode_image(data, self.cfg.channels, 50_000_000), int(json.loads(sample["json"])["sample_index"])


def _unzip(samples: list[tuple[np.ndarray, int]]) -> tuple[Any, ...]:
    return tuple(zip(*samples, strict=True))


class WdsAugment:
    """webdataset map function on a batch (list of images, list of ids) -> (views1, views2, ids)."""

    def __init__(self, cfg: AugmentConfig) -> None:
        self.cfg = cfg

    def __call__(self, batch: tuple[list[np.ndarray], list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        images, ids = batch
        view1, view2 = _two_views(self.cfg)(list(images))
        return torch.from_numpy(view1), torch.from_numpy(view2), torch.as_tensor(list(ids), dtype=torch.int64)


def build_wds_loader(paths: list[str], cfg: AugmentConfig, batch_size: int, workers: int) -> Any:
    """webdataset + DataLoader with the same transforms, W persistent workers, batches of ``batch_size``."""
    import webdataset as wds

    dataset = (wds.WebDataset(paths, shardshuffle=False, empty_check=False)
               .map(WdsDecode(cfg))
               .batched(batch_size, collation_fn=_unzip, partial=True)
               .map(WdsAugment(cfg)))
    return torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, persistent_workers=True,
                                       prefetch_factor=2)


# ---------------------------------------------------------------------------------------------
# One epoch of each variant
# ---------------------------------------------------------------------------------------------


def _figures(images: int, seconds: float) -> Figures:
    return {"images": float(images), "seconds": seconds, "images_per_s": images / max(seconds, 1e-9)}


def epoch_ray_data(ds: Any, batch_size: int) -> Figures:
    rows = 0
    with Stopwatch() as sw:
        for batch in ds.iter_torch_batches(batch_size=batch_size, dtypes=None, device="cpu"):
            rows += int(batch["sample_index"].shape[0])
    return _figures(rows, sw.seconds)


def epoch_loader(loader: Any) -> Figures:
    rows = 0
    with Stopwatch() as sw:
        for _view1, _view2, ids in loader:
            rows += int(ids.shape[0])
    return _figures(rows, sw.seconds)


def epoch_pool(pool: ProcessPoolExecutor, fn: Any, paths: list[str], arg: Any) -> Figures:
    with Stopwatch() as sw:
        rows = sum(pool.map(fn, paths, [arg] * len(paths)))
    return _figures(rows, sw.seconds)


def worker_views_cost(ds: Any, cfg: AugmentConfig, batch_size: int, repeats: int) -> dict[str, float]:
    """CPU ms per image of the training worker's views (``views_of_canvas``, 1 torch thread) over the first
    two batches of the decode-only stream ``ds``, median and range over ``repeats`` rounds."""
    batches = []
    for batch in ds.iter_torch_batches(batch_size=batch_size, dtypes=None, device="cpu"):
        batches.append(batch)
        if len(batches) == 2:
            break
    aug = BatchTwoViewAugment(cfg, batched=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        per_round = []
        for rnd in range(repeats + 1):  # the first round warms up
            t0, n = time.process_time(), 0
            for i, b in enumerate(batches):
                aug.views_of_canvas(b["canvas"], b["height"], b["width"], seed=100 * rnd + i)
                n += int(b["sample_index"].shape[0])
            if rnd:
                per_round.append(1e3 * (time.process_time() - t0) / n)
    finally:
        torch.set_num_threads(threads)
    return summarize(per_round) | {"images": float(n), "threads": 1.0}


def measure_kind(kind: str, storage: Any, dataset: str, cfg: AugmentConfig, args: Any,
                 pool: ProcessPoolExecutor) -> tuple[Rounds, dict[str, Any]]:
    """The chosen variants (``--variants``) on one image kind, alternating."""
    from pipelines.dataset.streams import build_train_dataset

    paths = shard_paths(storage, dataset)
    ds = build_train_dataset(storage, dataset, cfg, seed=0)
    decoded = build_train_dataset(storage, dataset, cfg, seed=0, views_on_device=True)
    loader = build_wds_loader(paths, cfg, args.batch_size, args.workers) if "wds_dataloader" in args.variants \
        else None
    variants = {
        "ray_data": lambda: epoch_ray_data(ds, args.batch_size),
        "ray_data_decode_only": lambda: epoch_ray_data(decoded, args.batch_size),
        "wds_dataloader": lambda: epoch_loader(loader),
        "pool_decode_augment": lambda: epoch_pool(
            pool, functools.partial(decode_augment_shard, batch_size=args.batch_size), paths, cfg),
        "pool_raw_pil": lambda: epoch_pool(pool, raw_pil_shard, paths, cfg.channels),
    }
    variants = {name: fn for name, fn in variants.items() if name in args.variants}
    print(f"\n{kind}: {len(paths)} shards, views {cfg.channels} x {cfg.image_size} x {cfg.image_size}")
    rounds = alternate(variants, args.repeats, args.warmup)
    for runs in rounds.raw.values():
        for r in runs:
            r["cpu_ms_per_image"] = 1e3 * r["tree_cpu_s"] / max(r["images"], 1.0)
    extra: dict[str, Any] = {"shards": len(paths), "augment": asdict(cfg)}
    if "ray_data_decode_only" in variants:
        extra["worker_views_cpu_ms_per_image"] = worker_views_cost(decoded, cfg, args.batch_size, args.repeats)
    # Ray Data's own per-operator breakdown of the last epoch (wall and CPU time of read, decode +
    # augment, and the iterator's wait), kept to see where its time goes.
    if "ray_data" in variants:
        extra["ray_data_stats_last_epoch"] = ds.stats()
    return rounds, extra


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 2,
                        help="worker processes of every variant (Ray CPUs, DataLoader workers, pool size)")
    parser.add_argument("--png-images", type=int, default=None, help="Fashion-MNIST images (default 20000)")
    parser.add_argument("--jpeg-images", type=int, default=None, help="synthetic JPEGs (default 1600)")
    parser.add_argument("--shards", type=int, default=8, help="shards per image kind")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--kinds", nargs="+", default=["fashion_mnist_png", "synthetic_jpeg"],
                        choices=["fashion_mnist_png", "synthetic_jpeg"])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS,
                        help="the variants to run (default all)")
    args = parser.parse_args(argv)
    png_n = args.png_images or (256 if args.quick else 20_000)
    jpeg_n = args.jpeg_images or (16 if args.quick else 1600)
    shards = 4 if args.quick else args.shards
    result = start_result(NAME, args)
    load = LoadProbe()
    start_ray(args.workers)
    kinds: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="secu-bench-data-") as tmp, \
            ProcessPoolExecutor(args.workers, initializer=_init_worker) as pool:
        from pipelines.storage import Storage

        storage = Storage(os.path.join(tmp, "root"))
        setups: dict[str, tuple[str, AugmentConfig, dict[str, Any]]] = {}
        if "fashion_mnist_png" in args.kinds:
            with Stopwatch() as sw:
                ingest_fashion_mnist(storage, "fm", "train", png_n, shard_size=-(-png_n // shards))
            setups["fashion_mnist_png"] = ("fm", recipe("fashion-mnist-cpu").augment,
                                           {"images": png_n, "source": "Fashion-MNIST train split, first N",
                                            "ingest_s": sw.seconds})
        if "synthetic_jpeg" in args.kinds:
            folder = Path(tmp) / "jpegs"
            with Stopwatch() as sw:
                nbytes = write_synthetic_jpegs(folder, jpeg_n)
                ingest_folder(storage, "jpeg", folder, shard_size=-(-jpeg_n // shards))
            setups["synthetic_jpeg"] = ("jpeg", recipe("imagenet1k").augment,
                                        {"images": jpeg_n, "source": "synthetic 500x375 JPEG, quality 90",
                                         "mean_file_kb": nbytes / jpeg_n / 1e3, "write_and_ingest_s": sw.seconds})
        for kind, (dataset, cfg, info) in setups.items():
            rounds, extra = measure_kind(kind, storage, dataset, cfg, args, pool)
            summary = rounds.summary("images_per_s")
            kinds[kind] = info | extra | {"raw": rounds.raw, "order": rounds.order,
                                          "images_per_s": summary,
                                          "cpu_ms_per_image": rounds.summary("cpu_ms_per_image")}
            for base in (BASELINE, "pool_decode_augment", "pool_raw_pil", "ray_data"):
                if base in summary:  # the baselines that ran (--variants)
                    kinds[kind][f"ratio_to_{base}"] = ratios(summary, base)
    import ray

    ray.shutdown()
    result["config"] = {"workers": args.workers, "batch_size": args.batch_size, "shards_per_kind": shards,
                        "variants": list(args.variants),
                        "repeats": args.repeats, "warmup": args.warmup, "png_images": png_n, "jpeg_images": jpeg_n}
    result["figure"] = ("images/s over one epoch (median of the measured rounds); ratio = median / baseline median; "
                        "cpu_ms_per_image = CPU time of this process and all its descendants (Ray daemons and "
                        "workers, DataLoader workers, pool processes) per image: barely moved by other load")
    result["baseline"] = BASELINE
    result["kinds"] = kinds
    result["load"] = load.finish()
    rows = []
    nan = float("nan")
    for kind, data in kinds.items():
        for name, s in data["images_per_s"].items():
            rows.append([kind, name, s["median"], s["min"], s["max"],
                         data.get("ratio_to_wds_dataloader", {}).get(name, nan),
                         data.get("ratio_to_pool_decode_augment", {}).get(name, nan),
                         data["cpu_ms_per_image"][name]["median"]])
        if "worker_views_cpu_ms_per_image" in data:
            w = data["worker_views_cpu_ms_per_image"]
            rows.append([kind, "worker views (views_of_canvas, 1 thread)", nan, nan, nan, nan, nan, w["median"]])
    load_note = f" (UNDER LOAD: loadavg {result['load']['loadavg_start']})" if result["load"]["under_load"] else ""
    print_table(["images", "variant", "images/s median", "min", "max", "x wds+DataLoader", "x plain pool",
                 "CPU ms/image"], rows,
                title=f"{NAME}: {args.workers} worker processes each{load_note}")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
