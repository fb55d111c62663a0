"""Clustering quality on Fashion-MNIST: SeCu (``fashion-mnist-cpu`` recipe) vs k-means on raw pixels.

Claim: SeCu clusters Fashion-MNIST far better than k-means on pixels, in the range of published deep
clustering methods.

Protocol (the same for both methods, in the same run):

- train on the train split (60,000 images; ``--quick``: the first 1,024, 1 epoch): SeCu through the
  whole pipeline (our ingest, ``pipelines.training.trainer.run_training``); k-means (sklearn ``KMeans``, k = 10,
  ``n_init`` = 10; quick: 1) fitted on the same images' raw pixels scaled to [0, 1];
- evaluate on the test split (10,000) and on all 70,000 images: SeCu by ``pipelines.outputs.inference.run_inference``
  on the ingested ``fm-test`` / ``fm-all`` datasets and ``pipelines.outputs.evaluation.evaluate_assignments``
  (ACC with Hungarian matching, NMI, ARI; per head, K = 10, 20, 30); k-means by ``predict``;
- also, for k-means, the literature protocol: fitted on all 70,000 (full mode only).

Repeats are seeds (``--seeds``, default 0 1 2; each seed trains SeCu once and fits k-means once, the
two alternating which goes first). Wall times and epochs are recorded. Published anchors (ACC/NMI on
Fashion-MNIST, all 70k): k-means 0.474 / 0.512, N2D 0.672 / 0.684, ClusterGAN 0.630 / -.

    python -m benchmarks.quality                   # about 10 minutes per seed on 2 CPU cores: 12 epochs x 60k
    python -m benchmarks.quality --seeds 0          # one seed
    python -m benchmarks.quality --quick            # smoke test
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

from benchmarks.common import (
    LoadProbe,
    Stopwatch,
    base_parser,
    ingest_fashion_mnist,
    print_table,
    require_fashion_mnist,
    start_ray,
    start_result,
    summarize,
    write_result,
)
from pipelines.storage import Storage

NAME = "quality"
ANCHORS = {
    "k-means (published)": {"acc": 0.474, "nmi": 0.512},
    "N2D (published)": {"acc": 0.672, "nmi": 0.684},
    "ClusterGAN (published)": {"acc": 0.630},
}
EVAL_SETS = ("test", "all")


def load_pixels(split: str, limit: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Raw pixels (N x 784 float32 in [0, 1]) and labels of a Fashion-MNIST split, first ``limit`` rows;
    the same order our ingest assigns ``sample_index`` in (array sources keep their order)."""
    from pipelines.dataset.sources import load_idx, parse_splits

    source = load_idx(require_fashion_mnist(), parse_splits("idx", split))
    images = np.concatenate([p.images for p in source.parts])
    labels = np.concatenate([np.asarray(p.labels) for p in source.parts])
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return images.reshape(len(images), -1).astype(np.float32) / 255.0, labels.astype(np.int64)


def run_kmeans(train_x: np.ndarray, evals: dict[str, tuple[np.ndarray, np.ndarray]], n_init: int,
               seed: int) -> dict[str, Any]:
    """Fit on ``train_x``, predict every evaluation set; ACC/NMI/ARI per set."""
    from sklearn.cluster import KMeans

    from secu.metrics import evaluate_clustering

    with Stopwatch() as fit:
        model = KMeans(n_clusters=10, n_init=n_init, random_state=seed).fit(train_x)
    out: dict[str, Any] = {"fit_s": fit.seconds, "n_init": n_init}
    for name, (x, y) in evals.items():
        out[name] = evaluate_clustering(y, model.predict(x).astype(np.int64))
    return out


def run_secu(storage: Storage, seed: int, args: Any) -> dict[str, Any]:
    """Train SeCu on ``fm-train``, infer ``fm-test`` and ``fm-all``, evaluate every head."""
    from pipelines.outputs.evaluation import evaluate_assignments
    from pipelines.outputs.inference import InferenceOptions, run_inference
    from pipelines.training.job_config import ComputeConfig, TrainJobConfig, apply_job_overrides
    from pipelines.training.trainer import run_training
    from secu.recipes import recipe

    run_id = f"quality-seed{seed}"
    job = TrainJobConfig(
        experiment=recipe("fashion-mnist-cpu"),
        compute=ComputeConfig(num_workers=args.num_workers, cpus_per_worker=args.cpus_per_worker,
                              torch_threads=args.torch_threads, log_every=50, max_failures=1),
        dataset="fm-train", run_id=run_id)
    overrides = [f"seed={seed}"]
    if args.epochs:
        # An explicit schedule is kept as given (the training job would mark these keys as set).
        overrides += [f"optim.warmup_epochs={min(args.epochs, job.experiment.optim.warmup_epochs)}",
                      f"optim.epochs={args.epochs}", "adapt.fixed=optim.epochs,optim.warmup_epochs"]
    job = apply_job_overrides(job, overrides)
    with Stopwatch() as train:
        outcome = run_training(job, storage)
    out: dict[str, Any] = {"train_s": train.seconds, "epochs": outcome.epochs_run,
                           "experiment": job.experiment.to_dict()}
    for name in EVAL_SETS:
        with Stopwatch() as infer:
            res = run_inference(storage, run_id, dataset=f"fm-{name}", options=InferenceOptions())
        evaluated = evaluate_assignments(storage, run_id, res.name)
        out[name] = {"infer_s": infer.seconds, "rows": res.rows,
                     "heads": [{k: row[k] for k in ("head", "k", "acc", "nmi", "ari")} for row in evaluated["heads"]]}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds = repeats (default 0 1 2)")
    parser.add_argument("--train-images", type=int, default=None, help="first N of the train split (default all)")
    parser.add_argument("--eval-images", type=int, default=None, help="first N of test / all (default all)")
    parser.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs (12)")
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--cpus-per-worker", type=float, default=1.0)
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--cpus", type=int, default=os.cpu_count() or 2, help="CPUs of the local Ray")
    parser.add_argument("--skip-secu", action="store_true", help="k-means only")
    args = parser.parse_args(argv)
    seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    train_n = args.train_images or (1024 if args.quick else None)
    eval_n = args.eval_images or (512 if args.quick else None)
    if args.quick:
        args.epochs = args.epochs or 1
    n_init = 1 if args.quick else 10
    result = start_result(NAME, args)
    load = LoadProbe()
    train_x, _train_y = load_pixels("train", train_n)
    evals = {name: load_pixels(name, eval_n) for name in EVAL_SETS}
    runs: list[dict[str, Any]] = []
    if not args.skip_secu:
        start_ray(args.cpus)
    with tempfile.TemporaryDirectory(prefix="secu-bench-quality-") as tmp:
        storage = Storage(os.path.join(tmp, "root"))
        if not args.skip_secu:
            shard = 10_000 if train_n is None else -(-train_n // 4)
            with Stopwatch() as ingest_sw:
                ingest_fashion_mnist(storage, "fm-train", "train", train_n, shard_size=shard)
                for name in EVAL_SETS:
                    ingest_fashion_mnist(storage, f"fm-{name}", name, eval_n, shard_size=shard)
            result["ingest_s"] = ingest_sw.seconds
        for i, seed in enumerate(seeds):
            run: dict[str, Any] = {"seed": seed}
            order = ["kmeans", "secu"] if i % 2 == 0 else ["secu", "kmeans"]
            for method in order:
                if method == "kmeans":
                    print(f"seed {seed}: k-means (n_init={n_init}) on {len(train_x):,} train images")
                    run["kmeans"] = run_kmeans(train_x, evals, n_init, seed)
                elif not args.skip_secu:
                    print(f"seed {seed}: SeCu fashion-mnist-cpu on {len(train_x):,} train images")
                    run["secu"] = run_secu(storage, seed, args)
            runs.append(run)
        if not args.quick:  # literature protocol: k-means fitted on all 70k
            x_all, y_all = evals["all"]
            with Stopwatch() as sw:
                lit = run_kmeans(x_all, {"all": (x_all, y_all)}, n_init, seeds[0])
            result["kmeans_fit_on_all"] = lit | {"wall_s": sw.seconds}
    if not args.skip_secu:
        import ray

        ray.shutdown()
    summary: dict[str, Any] = {}
    for name in EVAL_SETS:
        for metric in ("acc", "nmi", "ari"):
            summary[f"kmeans/{name}/{metric}"] = summarize([r["kmeans"][name][metric] for r in runs])
            if not args.skip_secu:
                heads = len(runs[0]["secu"][name]["heads"])
                for h in range(heads):
                    summary[f"secu/{name}/h{h}/{metric}"] = summarize(
                        [r["secu"][name]["heads"][h][metric] for r in runs])
    summary["kmeans/fit_s"] = summarize([r["kmeans"]["fit_s"] for r in runs])
    if not args.skip_secu:
        summary["secu/train_s"] = summarize([r["secu"]["train_s"] for r in runs])
        summary["secu/epochs"] = summarize([float(r["secu"]["epochs"]) for r in runs])
        for name in EVAL_SETS:
            summary[f"secu/{name}/ratio_acc_h0_to_kmeans"] = summarize(
                [r["secu"][name]["heads"][0]["acc"] / r["kmeans"][name]["acc"] for r in runs])
    result["config"] = {"seeds": seeds, "train_images": len(train_x),
                        "eval_images": {k: len(v[1]) for k, v in evals.items()}, "epochs_override": args.epochs,
                        "kmeans_n_init": n_init, "num_workers": args.num_workers,
                        "cpus_per_worker": args.cpus_per_worker, "torch_threads": args.torch_threads,
                        "ray_cpus": args.cpus, "recipe": "fashion-mnist-cpu"}
    result["figure"] = "ACC/NMI/ARI per evaluation set and head; median/min/max over seeds"
    result["baseline"] = "k-means (k=10) on raw pixels, fitted on the same train images"
    result["anchors"] = ANCHORS
    result["raw"] = runs
    result["summary"] = summary
    result["load"] = load.finish()
    rows = []
    for name in EVAL_SETS:
        km = [summary[f"kmeans/{name}/{m}"]["median"] for m in ("acc", "nmi", "ari")]
        rows.append([name, "k-means k=10 (this run)", *km])
        if not args.skip_secu:
            for h, head in enumerate(runs[0]["secu"][name]["heads"]):
                values = [summary[f"secu/{name}/h{h}/{m}"]["median"] for m in ("acc", "nmi", "ari")]
                rows.append([name, f"SeCu head {h} (K={int(head['k'])})", *values])
    for label, anchor in ANCHORS.items():
        rows.append(["all", label, anchor.get("acc", float("nan")), anchor.get("nmi", float("nan")), float("nan")])
    if "kmeans_fit_on_all" in result:
        lit = result["kmeans_fit_on_all"]["all"]
        rows.append(["all", "k-means fitted on all 70k (this run)", lit["acc"], lit["nmi"], lit["ari"]])
    under = " (UNDER LOAD)" if result["load"]["under_load"] else ""
    epochs = summary["secu/epochs"]["median"] if "secu/epochs" in summary else 0
    print_table(["eval set", "method", "ACC", "NMI", "ARI"], rows,
                title=f"{NAME}: medians over seeds {seeds}; trained on {len(train_x):,} images, SeCu "
                      f"{epochs:g} epochs{under}")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
