"""Inference throughput: Ray Data batch inference to Parquet vs a plain single-process torch loop.

Both run the same network (a freshly initialised checkpoint of the recipe: throughput does not
depend on training), the same decoding (``pipelines.data.decode_image``), the same evaluation
transform and the same row construction (``Assigner``), and both write the same Parquet schema.
They alternate, after one warm-up each; the table shows medians and spreads of images/s.

    python benchmarks/inference_throughput.py --storage /tmp/fm --dataset fashion-mnist
    python benchmarks/inference_throughput.py --quick        # 2000 synthetic images, for smoke tests

Writes ``benchmarks/results/inference_throughput.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipelines.checkpoint_lookup import find_latest_checkpoint  # noqa: E402
from pipelines.data import decode_image  # noqa: E402
from pipelines.dataset_info import dataset_dir, load_dataset_info  # noqa: E402
from pipelines.inference import Assigner, InferenceOptions, run_inference  # noqa: E402
from pipelines.storage import StorageConfig, join  # noqa: E402
from secu.augment import EvalTransform  # noqa: E402

RUN_ID = "bench-inference"


def ensure_checkpoint(storage: StorageConfig, dataset: str, recipe_name: str) -> None:
    """A freshly initialised checkpoint under runs/bench-inference (written once)."""
    from pipelines.checkpointing import TrainingState, build_network, save_checkpoint
    from pipelines.job_config import ComputeConfig, TrainJobConfig
    from secu.config import recipe
    from secu.state import ClusterState

    rel = join("runs", RUN_ID, "checkpoints", "checkpoint_fresh")
    if storage.exists(join(rel, "secu_checkpoint.json")):
        return
    job = TrainJobConfig(experiment=recipe(recipe_name), compute=ComputeConfig(num_workers=1), dataset=dataset,
                         run_id=RUN_ID)
    net = build_network(job.experiment)
    state = TrainingState(network=net.state_dict(), optimizer={}, cluster_state=ClusterState.create(
        job.experiment.secu.ks), epoch=0, global_step=0, job=job.to_dict())
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, state, {})
        for name in os.listdir(tmp):
            with open(os.path.join(tmp, name), "rb") as handle:
                storage.write_bytes_atomic(join(rel, name), handle.read())


def make_synthetic(storage: StorageConfig, dataset: str, n: int) -> None:
    """Ingest ``n`` random 28x28 grayscale images (Fashion-MNIST's shape) in shards of 10,000."""
    from pipelines.ingest import IngestOptions, ingest
    from pipelines.sources import ArrayPart, ArraySource

    images = np.random.default_rng(0).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = np.arange(n) % 10
    ingest(storage, dataset, ArraySource("synthetic", [ArrayPart("train", images, labels)]),
           IngestOptions(shard_size=10_000, use_ray=False), split="train")


def baseline(storage: StorageConfig, dataset: str, batch_size: int, limit: int | None) -> tuple[int, float]:
    """Single process: stream the tars, decode, transform, run the model, write one Parquet file."""
    ref = find_latest_checkpoint(storage, RUN_ID)
    start = time.perf_counter()
    assigner = Assigner(ref, RUN_ID, torch_threads=os.cpu_count() or 1)
    transform = EvalTransform(assigner_augment(ref))
    info = load_dataset_info(storage, dataset)
    rows = 0
    with tempfile.TemporaryDirectory() as tmp:
        writer = pq.ParquetWriter(os.path.join(tmp, "part-00000.parquet"), assigner.schema, compression="zstd")
        batch: dict[str, list[Any]] = {"image": [], "sample_index": [], "key": [], "shard": []}

        def flush() -> None:
            nonlocal rows
            if not batch["key"]:
                return
            table = assigner({"image": np.stack(batch["image"]), "sample_index": np.asarray(batch["sample_index"]),
                              "key": np.asarray(batch["key"], dtype=object),
                              "shard": np.asarray(batch["shard"], dtype=object)})
            writer.write_table(table)
            rows += table.num_rows
            for values in batch.values():
                values.clear()

        for shard in info.shards:
            path = storage.path(dataset_dir(dataset), "shards", shard.name)
            with storage.filesystem.open_input_stream(path) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
                for member in tar:
                    key, _, ext = member.name.partition(".")
                    handle = tar.extractfile(member) if member.isfile() and ext != "json" else None
                    if handle is None:
                        continue
                    image = decode_image(handle.read(), transform.cfg.channels, 50_000_000)
                    batch["image"].append(transform(image).numpy())
                    batch["key"].append(key)
                    batch["shard"].append(shard.name)
                    batch["sample_index"].append(-1)  # ids come from the json member; not needed for timing
                    if len(batch["key"]) >= batch_size:
                        flush()
                    if limit is not None and rows + len(batch["key"]) >= limit:
                        break
            if limit is not None and rows + len(batch["key"]) >= limit:
                break
        flush()
        writer.close()
    return rows, time.perf_counter() - start


def assigner_augment(ref: Any) -> Any:
    from pipelines.checkpoint_lookup import load_checkpoint

    return load_checkpoint(ref).job.experiment.augment


def ours(storage: StorageConfig, dataset: str, options: InferenceOptions) -> tuple[int, float]:
    start = time.perf_counter()
    result = run_inference(storage, RUN_ID, dataset=dataset, options=options)
    return result.rows, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--storage", default=None,
                        help="root holding --dataset; default: a temporary root with synthetic 28x28 images")
    parser.add_argument("--synthetic", type=int, default=20_000, help="images of the synthetic dataset")
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--recipe", default="fashion-mnist-cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true",
                        help="one repeat, no warm-up, 2000 synthetic images unless --storage is given")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "inference_throughput.json"))
    args = parser.parse_args(argv)
    import ray

    tmp = None
    if args.storage is None:
        tmp = tempfile.TemporaryDirectory(prefix="secu-bench-")
        storage = StorageConfig(tmp.name)
        make_synthetic(storage, args.dataset, 2000 if args.quick else args.synthetic)
    else:
        storage = StorageConfig(args.storage)
    ensure_checkpoint(storage, args.dataset, args.recipe)
    if not ray.is_initialized():
        ray.init(include_dashboard=False, log_to_driver=False)
    repeats = 1 if args.quick else args.repeats
    limit = 5000 if args.quick and args.storage else None
    raw: dict[str, list[dict[str, float]]] = {}
    variants = {f"ray_data_actors{c}": InferenceOptions(batch_size=args.batch_size, concurrency=c)
                for c in args.concurrency}
    for rep in range(repeats + (0 if args.quick else 1)):
        for name, options in variants.items():
            rows, secs = ours(storage, args.dataset, options)
            raw.setdefault(name, []).append({"rows": rows, "seconds": secs, "images_per_s": rows / secs,
                                             "warmup": float(rep == 0 and not args.quick)})
        rows, secs = baseline(storage, args.dataset, args.batch_size, limit)
        raw.setdefault("plain_torch_loop", []).append({"rows": rows, "seconds": secs, "images_per_s": rows / secs,
                                                       "warmup": float(rep == 0 and not args.quick)})
    summary = {}
    for name, runs in raw.items():
        rates = [r["images_per_s"] for r in runs if not r["warmup"]]
        summary[name] = {"median_images_per_s": statistics.median(rates), "min": min(rates), "max": max(rates),
                         "runs": len(rates)}
    base = summary["plain_torch_loop"]["median_images_per_s"]
    for name in summary:
        summary[name]["ratio_to_plain_loop"] = summary[name]["median_images_per_s"] / base
    result = {
        "benchmark": "inference_throughput", "dataset": args.dataset, "recipe": args.recipe,
        "batch_size": args.batch_size, "quick": args.quick, "cpus": os.cpu_count(), "device": "cpu",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "ray": ray.__version__, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "storage": args.storage or f"synthetic ({2000 if args.quick else args.synthetic} images)",
        "load_average": os.getloadavg(), "summary": summary, "raw": raw,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'variant':<22}{'images/s (median)':>20}{'min':>10}{'max':>10}{'ratio':>8}")
    for name, s in summary.items():
        print(f"{name:<22}{s['median_images_per_s']:>20.0f}{s['min']:>10.0f}{s['max']:>10.0f}"
              f"{s['ratio_to_plain_loop']:>8.2f}")
    print(f"written to {args.out}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
