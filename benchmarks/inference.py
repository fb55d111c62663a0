"""Batch inference: our Ray Data inference to Parquet vs a plain single-process torch loop.

Claim: ``pipelines.outputs.inference.run_inference`` (read the tars, decode + evaluation transform in CPU
tasks, ``Assigner`` actors, ``write_parquet`` into a staging prefix, verify, publish ``_SUCCESS``)
is at least as fast end to end as the loop a user would write by hand.

- ``ray_data``: ``run_inference`` on a local Ray with ``--cpus`` CPUs and its default options (on CPUs the
  model runs in the read tasks, ``model_in=tasks``), on the Ray of the previous rounds: its worker processes
  have torch imported and the model loaded, as for a second inference in the same driver (a reclustering
  loop, the demo's test split). Timed end to end (checkpoint load, planning, tasks, writing, verification,
  publishing); ``execution_images_per_s`` is the Ray part alone.
- ``ray_data_fresh_ray``: the same on a Ray restarted just before (the restart untimed): every worker
  process imports torch and loads the model, as in a new job on a new cluster.
- ``ray_data_actors``: ``model_in=actors`` (a pool of Assigner actors, half the CPUs; the read tasks decode),
  the previous default on CPUs and still the one with GPUs; every run starts its actors.
- ``plain_loop``: one process with ``--cpus`` torch threads: read every shard with ``tarfile``,
  ``pipelines.dataset.decode.decode_image``, ``EvalTransform``, batches of 256 through the same network and
  the same row construction (``Assigner``), one ``pyarrow.parquet.ParquetWriter`` with the same
  schema and compression.

The network is a freshly initialised checkpoint of the recipe (throughput does not depend on
training). Data: the first N images of the Fashion-MNIST train split, ingested by our ingest.
The script checks that both outputs have the same schema and row count.

    python -m benchmarks.inference                 # 20,000 images
    python -m benchmarks.inference --quick         # 1,000 images
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch

from benchmarks.common import (
    Figures,
    LoadProbe,
    Stopwatch,
    alternate,
    base_parser,
    cpu_used,
    ingest_fashion_mnist,
    iter_shard_samples,
    print_table,
    ratios,
    start_ray,
    start_result,
    tree_cpu_seconds,
    write_result,
)
from pipelines.storage import Storage, join

NAME = "inference"
BASELINE = "plain_loop"
RUN_ID = "bench-inference"
DATASET = "fm"


def write_fresh_checkpoint(storage: Storage, recipe_name: str) -> str:
    """A freshly initialised checkpoint under ``runs/<RUN_ID>/checkpoints/``; returns its rel path."""
    from pipelines.training.checkpointing import TrainingState, save_checkpoint
    from pipelines.training.coordinator_state import CoordinatorState, ShardState
    from pipelines.training.job_config import ComputeConfig, TrainJobConfig
    from secu.network import build_network
    from secu.recipes import recipe
    from secu.state import ClusterState

    job = TrainJobConfig(experiment=recipe(recipe_name), compute=ComputeConfig(num_workers=1), dataset=DATASET,
                         run_id=RUN_ID)
    net = build_network(job.experiment)
    state = TrainingState(network=net.state_dict(), optimizer={},
                          cluster_state=ClusterState.create(job.experiment.secu.ks), epoch=0, global_step=0,
                          job=job.to_dict())
    rel = join("runs", RUN_ID, "checkpoints", "checkpoint_fresh")
    ks = tuple(job.experiment.secu.ks)
    empty = CoordinatorState(ranges=((0, 1),), ks=ks, shards=(ShardState(
        lo=0, hi=1, ks=ks, epoch=0, prev_HN=np.full((len(ks), 1), -1, dtype=np.int16)),))
    save_checkpoint(storage.path(rel), state, empty)
    return rel


def ours(storage: Storage, options: Any, restart_cpus: int = 0) -> Figures:
    """One ``run_inference``; with ``restart_cpus`` on a Ray restarted (untimed, its CPU not counted) first."""
    from pipelines.outputs.inference import run_inference

    if restart_cpus:
        start_ray(restart_cpus)
    cpu_before = tree_cpu_seconds()
    with Stopwatch() as sw:
        res = run_inference(storage, RUN_ID, dataset=DATASET, options=options)
    return {"rows": float(res.rows), "seconds": sw.seconds, "images_per_s": res.rows / sw.seconds,
            "execution_s": res.seconds, "execution_images_per_s": res.images_per_s,
            "tree_cpu_s": cpu_used(cpu_before, tree_cpu_seconds())}


def plain_loop(storage: Storage, out_dir: str, batch_size: int, threads: int) -> Figures:
    """Single process: tars -> decode -> eval transform -> model -> rows -> one Parquet file."""
    from pipelines.dataset.decode import decode_image
    from pipelines.dataset.info import dataset_dir, load_dataset_info
    from pipelines.outputs.assigner import Assigner
    from pipelines.outputs.image_sources import load_source_lookup
    from pipelines.training.checkpointing import find_latest_checkpoint, load_checkpoint
    from secu.augment import EvalTransform

    with Stopwatch() as sw:
        ref = find_latest_checkpoint(storage, RUN_ID)
        assigner = Assigner(ref, RUN_ID, torch_threads=threads, sources=load_source_lookup(storage, DATASET))
        transform = EvalTransform(load_checkpoint(ref).job.experiment.augment)
        info = load_dataset_info(storage, DATASET)
        rows = 0
        path = os.path.join(out_dir, "part-00000.parquet")
        pending: dict[str, list[Any]] = {"image": [], "sample_index": [], "key": [], "shard": []}
        with pq.ParquetWriter(path, assigner.schema, compression="zstd") as writer:

            def flush() -> None:
                nonlocal rows
                if not pending["key"]:
                    return
                table = assigner({"image": np.stack(pending["image"]),
                                  "sample_index": np.asarray(pending["sample_index"], dtype=np.int64),
                                  "key": np.asarray(pending["key"], dtype=object),
                                  "shard": np.asarray(pending["shard"], dtype=object)})
                writer.write_table(table)
                rows += table.num_rows
                for values in pending.values():
                    values.clear()

            for shard in info.shards:
                for key, data, meta in iter_shard_samples(storage.path(dataset_dir(DATASET), "shards", shard.name)):
                    pixels = decode_image(data, transform.cfg.channels, 50_000_000)
                    pending["image"].append(transform(pixels).numpy())
                    pending["sample_index"].append(int(json.loads(meta)["sample_index"]))
                    pending["key"].append(key)
                    pending["shard"].append(shard.name)
                    if len(pending["key"]) >= batch_size:
                        flush()
            flush()
    return {"rows": float(rows), "seconds": sw.seconds, "images_per_s": rows / sw.seconds}


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__)
    parser.add_argument("--images", type=int, default=None, help="Fashion-MNIST images (default 20000)")
    parser.add_argument("--shard-size", type=int, default=None, help="images per shard (default N / 4)")
    parser.add_argument("--recipe", default="fashion-mnist-cpu")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2,
                        help="Ray CPUs for ours; torch threads of the plain loop")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="InferenceOptions of ours, e.g. concurrency=2 or cpus_per_actor=0.5")
    args = parser.parse_args(argv)
    from pipelines.outputs.inference import InferenceOptions

    n = args.images or (1000 if args.quick else 20_000)
    if args.quick:  # the smoke test: four variants, one of them restarting Ray, once each after the warm-up
        args.repeats = 1
    result = start_result(NAME, args)
    load = LoadProbe()
    start_ray(args.cpus)
    with tempfile.TemporaryDirectory(prefix="secu-bench-infer-") as tmp:
        storage = Storage(os.path.join(tmp, "root"))
        ingest_fashion_mnist(storage, DATASET, "train", n, shard_size=args.shard_size or -(-n // 4))
        write_fresh_checkpoint(storage, args.recipe)
        plain_dir = os.path.join(tmp, "plain")
        os.makedirs(plain_dir)
        from secu.overrides import apply_overrides

        options = apply_overrides(InferenceOptions(batch_size=args.batch_size), args.overrides)
        actors = apply_overrides(InferenceOptions(batch_size=args.batch_size), [*args.overrides, "model_in=actors"])
        threads = torch.get_num_threads()
        rounds = alternate({"ray_data": lambda: ours(storage, options),
                            "ray_data_fresh_ray": lambda: ours(storage, options, restart_cpus=args.cpus),
                            "ray_data_actors": lambda: ours(storage, actors),
                            "plain_loop": lambda: plain_loop(storage, plain_dir, args.batch_size, args.cpus)},
                           args.repeats, args.warmup)
        torch.set_num_threads(threads)
        from pipelines.outputs.assignments import read_assignments

        ours_table = read_assignments(storage, RUN_ID)
        plain_table = pq.read_table(os.path.join(plain_dir, "part-00000.parquet"))
        same_schema = ours_table.schema.remove_metadata().equals(plain_table.schema.remove_metadata())
        if not same_schema or ours_table.num_rows != plain_table.num_rows:
            raise RuntimeError(f"outputs differ: schema equal {same_schema}, rows {ours_table.num_rows} vs "
                               f"{plain_table.num_rows}")
        checks = {"same_schema": same_schema, "rows_ours": ours_table.num_rows, "rows_plain": plain_table.num_rows}
    import ray

    ray.shutdown()
    for runs in rounds.raw.values():
        for r in runs:
            r["cpu_ms_per_image"] = 1e3 * r["tree_cpu_s"] / max(r["rows"], 1.0)
    summary = rounds.summary("images_per_s")
    result["config"] = {"images": n, "recipe": args.recipe, "batch_size": args.batch_size, "cpus": args.cpus,
                        "inference_options": vars(options) if hasattr(options, "__dict__") else str(options),
                        "actor_options": vars(actors),
                        "repeats": args.repeats, "warmup": args.warmup}
    result["figure"] = ("images/s end to end (median over rounds); ratio = median / plain_loop median; "
                        "cpu_ms_per_image: CPU of this process and its descendants (local Ray included) per image")
    result["baseline"] = BASELINE
    result["raw"] = rounds.raw
    result["order"] = rounds.order
    result["images_per_s"] = summary
    result["execution_images_per_s"] = rounds.summary("execution_images_per_s")
    result["ratio_to_plain_loop"] = ratios(summary, BASELINE)
    result["cpu_ms_per_image"] = rounds.summary("cpu_ms_per_image")
    result["checks"] = checks
    result["load"] = load.finish()
    under = " (UNDER LOAD)" if result["load"]["under_load"] else ""
    print_table(["variant", "images/s median", "min", "max", "x plain loop", "CPU ms/image"],
                [[k, s["median"], s["min"], s["max"], result["ratio_to_plain_loop"][k],
                  result["cpu_ms_per_image"][k]["median"]] for k, s in summary.items()],
                title=f"{NAME}: {n:,} Fashion-MNIST images, {args.cpus} CPUs{under}")
    ex = result["execution_images_per_s"].get("ray_data")
    if ex:
        print(f"ray_data without start-up/verify/publish (Ray execution only): {ex['median']:.4g} images/s")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
