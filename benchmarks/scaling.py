"""Scaling: training throughput with 1, 2, 4 Ray Train workers on the same data vs ideal linear.

Claim: adding training workers adds throughput close to linearly (when each worker gets its own
cores, or GPU).

Every run is a real ``pipelines.training.trainer.run_training`` (Ray Data stream, ``TorchTrainer`` with gloo
on CPU, the coordinator actor, checkpoints) of the ``fashion-mnist-cpu`` recipe with a short schedule
(``--epochs``, default 2) on the first N images of the Fashion-MNIST train split. The figure is the
last epoch's ``data/images_per_s`` as the training loop reports it (images of all workers / the
epoch's wall time); the first epoch also carries start-up and is kept as raw data only. Worker counts
alternate within each round. Efficiency at W workers = throughput(W) / (W x throughput(1)).

Each worker gets ``--cpus-per-worker`` logical CPUs (Ray's bookkeeping, leaving CPUs for the data
stream) and ``--torch-threads`` threads. On a machine with fewer cores than W x threads plus the data
pipeline's processes, workers share cores (oversubscription): the efficiency then measures the
machine, not the code, and the output says so.

    python -m benchmarks.scaling
    python -m benchmarks.scaling --quick     # 1 and 2 workers, 1 epoch, one round (smoke test only)
    python -m benchmarks.scaling --workers 2 --compare-sync-bn   # + each W > 1 with cross-rank BatchNorm

``--compare-sync-bn`` adds, for every W > 1, a variant with ``model.sync_bn_cpu=true`` (BatchNorm over the global
batch on CPU workers, ``secu.cross_rank_bn``) in the same rounds, and reports its cost as the ratio of the two.
"""

from __future__ import annotations

import json
import os
import tempfile
from typing import Any

from benchmarks.common import (
    Figures,
    LoadProbe,
    Stopwatch,
    alternate,
    base_parser,
    ingest_fashion_mnist,
    print_table,
    start_ray,
    start_result,
    write_result,
)
from pipelines.storage import Storage

NAME = "scaling"
DATASET = "fm"


def train_once(storage: Storage, workers: int, args: Any, counter: list[int], cross_rank_bn: bool = False) -> Figures:
    """One short training run with ``workers`` Ray Train workers; figures from its reported metrics.
    ``cross_rank_bn``: BatchNorm over the global batch (``model.sync_bn_cpu``), not each worker's own."""
    from pipelines.training.job_config import ComputeConfig, TrainJobConfig, apply_job_overrides
    from pipelines.training.trainer import run_training
    from secu.recipes import recipe

    counter[0] += 1
    run_id = f"scaling-w{workers}-{counter[0]}"
    job = TrainJobConfig(
        experiment=recipe("fashion-mnist-cpu"),
        compute=ComputeConfig(num_workers=workers, cpus_per_worker=args.cpus_per_worker,
                              torch_threads=args.torch_threads, log_every=10_000, max_failures=0),
        dataset=DATASET, run_id=run_id)
    # A throughput claim: the schedule is the benchmark's, never adapted to the data set's size.
    job = apply_job_overrides(job, ["optim.warmup_epochs=1", f"optim.epochs={args.epochs}",
                                    f"optim.batch_size={args.batch_size}", "adapt.enabled=false",
                                    f"model.sync_bn_cpu={str(cross_rank_bn).lower()}"])
    with Stopwatch() as sw:
        outcome = run_training(job, storage)
    history = json.loads(storage.read_bytes(storage.join("runs", run_id, "train_history.json")))["epochs"]
    last = history[-1]
    out: Figures = {"images_per_s": float(last["data/images_per_s"]), "epoch_s": float(last["time/epoch_s"]),
                    "images": float(last["data/images"]), "wall_s": sw.seconds, "epochs": float(outcome.epochs_run)}
    for row in history:
        out[f"epoch{int(row['epoch'])}_images_per_s"] = float(row["data/images_per_s"])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__)
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="worker counts (default 1 2 4)")
    parser.add_argument("--images", type=int, default=None, help="Fashion-MNIST images (default 12288)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 2; quick 1)")
    parser.add_argument("--batch-size", type=int, default=256, help="global batch (split among workers)")
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray")
    parser.add_argument("--cpus-per-worker", type=float, default=0.25, help="logical CPUs per training worker")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads per training worker")
    parser.add_argument("--compare-sync-bn", action="store_true",
                        help="also run every W > 1 with cross-rank BatchNorm (model.sync_bn_cpu=true)")
    args = parser.parse_args(argv)
    if args.quick:
        args.workers = args.workers or [1, 2]
        args.warmup, args.repeats = 0, 1
    workers = args.workers or [1, 2, 4]
    n = args.images or (512 if args.quick else 12_288)
    args.epochs = args.epochs or (1 if args.quick else 2)
    cores = os.cpu_count() or 1
    result = start_result(NAME, args)
    load = LoadProbe()
    start_ray(args.cpus)
    counter = [0]
    with tempfile.TemporaryDirectory(prefix="secu-bench-scaling-") as tmp:
        storage = Storage(os.path.join(tmp, "root"))
        ingest_fashion_mnist(storage, DATASET, "train", n, shard_size=-(-n // 8))
        variants = {f"W{w}": (lambda w=w: train_once(storage, w, args, counter)) for w in workers}
        if args.compare_sync_bn:
            variants.update({f"W{w}-cross-rank-bn": (lambda w=w: train_once(storage, w, args, counter, True))
                             for w in workers if w > 1})
        rounds = alternate(variants, args.repeats, args.warmup)
    import ray

    ray.shutdown()
    summary = rounds.summary("images_per_s")
    base = summary[f"W{workers[0]}"]["median"] / workers[0]
    scaling: dict[str, Any] = {}
    for w in workers:
        s = summary[f"W{w}"]
        oversubscribed = w * args.torch_threads + 1 > cores  # +1: the data pipeline needs a core too
        scaling[f"W{w}"] = {"images_per_s": s, "ideal_images_per_s": base * w,
                            "speedup": s["median"] / summary[f"W{workers[0]}"]["median"] * workers[0],
                            "efficiency": s["median"] / (base * w), "oversubscribed": oversubscribed}
    result["config"] = {"workers": workers, "images": n, "epochs": args.epochs, "batch_size": args.batch_size,
                        "ray_cpus": args.cpus, "cpus_per_worker": args.cpus_per_worker,
                        "torch_threads": args.torch_threads, "recipe": "fashion-mnist-cpu",
                        "repeats": args.repeats, "warmup": args.warmup, "cores": cores}
    result["figure"] = ("data/images_per_s of the last epoch as reported by the training loop; efficiency = "
                        "throughput(W) / (W * throughput(1))")
    result["baseline"] = "ideal linear from W=1"
    result["raw"] = rounds.raw
    result["order"] = rounds.order
    result["scaling"] = scaling
    result["sync_bn"] = {
        f"W{w}": {"cross_rank_bn_images_per_s": summary[f"W{w}-cross-rank-bn"],
                  "ratio_cross_rank_to_local": summary[f"W{w}-cross-rank-bn"]["median"] / summary[f"W{w}"]["median"]}
        for w in workers if f"W{w}-cross-rank-bn" in summary}
    result["load"] = load.finish()
    notes = [f"{w} BatchNorm over the global batch / per-worker: {v['ratio_cross_rank_to_local']:.3f}x "
             f"({v['cross_rank_bn_images_per_s']['median']:.0f} vs {summary[w]['median']:.0f} images/s)"
             for w, v in result["sync_bn"].items()]
    over = [w for w in workers if scaling[f"W{w}"]["oversubscribed"]]
    if over:
        notes.append(f"OVERSUBSCRIBED: with W in {over}, W x {args.torch_threads} torch threads plus the data "
                     f"pipeline exceed the {cores} cores of this machine; their efficiency measures core sharing")
    if args.quick:
        notes.append("QUICK: one round without warm-up, 1 epoch; a smoke test, not a measurement")
    if result["load"]["under_load"]:
        notes.append(f"UNDER LOAD: loadavg {result['load']['loadavg_start']} at the start")
    result["notes"] = notes
    print_table(["workers", "images/s median", "min", "max", "ideal", "efficiency", "oversubscribed"],
                [[w, v["images_per_s"]["median"], v["images_per_s"]["min"], v["images_per_s"]["max"],
                  v["ideal_images_per_s"], v["efficiency"], str(v["oversubscribed"])] for w, v in scaling.items()],
                title=f"{NAME}: {n:,} images, {args.epochs} epoch(s), {args.cpus} Ray CPUs on {cores} cores")
    for note in notes:
        print(note)
    write_result(args.out, result)
    from benchmarks.plot_png import scaling_png

    scaling_png(args.out.with_suffix(".png"), result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
