"""Does the default recipe cluster any collection, from a few hundred images up? Against k-means, same run.

Claim checked (docs/benchmarks.md, "Robustness"): the ``fashion-mnist-cpu`` recipe with no manual
setting (its schedule adapted to the collection by ``secu.adapt``, as the training job does) gives, on
every row, ACC and NMI at or above k-means on the same pixels, no empty cluster in head 0 and (on
balanced rows) no cluster over 3 N / K.

Rows (``--rows`` picks some; each is trained with 3 seeds, the seed also draws the subset):

- ``fm-N``: a class-balanced random subset of N Fashion-MNIST training images, N = 500 .. 60,000;
- ``fm-lt-R-N``: long-tailed subsets of about N images whose class sizes fall exponentially from the
  largest class to the smallest by the imbalance ratio R (the CIFAR-10-LT profile, Cao et al. 2019):
  class c (in a random order of the classes) keeps n_max * R^(-c / 9) images;
- ``pattern-K``: the reclustering test's 192 pattern images (3 classes), heads K (K = 3: the test's
  heads 3 and 6; K = 10: the recipe's heads 10, 20, 30).

Each run trains in one process (``secu.local_train``: the same step, network, optimizer, schedule and
batched augmentation as a Ray worker; 1 thread), publishes labels as inference does (argmax of the
evaluation view against the centers) and is scored on head 0. k-means: scikit-learn, k-means++, 10
inits, on the raw pixels scaled to [0, 1], same images, same K. Label metrics are reported only; no
setting was chosen by them.

    python -m benchmarks.robustness                          # every row, 3 seeds (about 2 hours on 2 cores)
    python -m benchmarks.robustness --rows fm-500 fm-2000    # some rows
    python -m benchmarks.robustness --quick                  # smoke test: one tiny row, 1 seed, short
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import torch

from benchmarks.common import LoadProbe, _jsonable, base_parser, print_table, start_result, summarize, write_result

NAME = "robustness"
BASELINE = "kmeans"
ROWS = ("fm-500", "fm-1000", "fm-2000", "fm-5000", "fm-10000", "fm-60000", "fm-lt-10-2000", "fm-lt-50-5000",
        "pattern-3", "pattern-10")


def _fashion_train() -> tuple[np.ndarray, np.ndarray]:
    from benchmarks.common import require_fashion_mnist
    from pipelines.dataset.sources import load_idx

    part = load_idx(require_fashion_mnist(), ["train"]).parts[0]
    assert part.labels is not None
    return part.images, part.labels


def long_tail_counts(total: int, classes: int, ratio: float) -> np.ndarray:
    """Class sizes falling exponentially by ``ratio`` from the largest to the smallest, summing to ~total."""
    shape = ratio ** (-np.arange(classes) / (classes - 1))
    return np.maximum(1, np.round(total * shape / shape.sum())).astype(int)


def row_data(row: str, seed: int) -> tuple[np.ndarray, np.ndarray, bool]:
    """Images, labels and whether the row is class-balanced."""
    rng = np.random.default_rng(seed)
    if row.startswith("pattern-"):
        from pipelines.dataset.synthetic import pattern_images

        images, labels = pattern_images(192, seed)
        return images, labels, True
    images, labels = _fashion_train()
    if row.startswith("fm-lt-"):
        _, _, ratio, total = row.split("-")
        counts = long_tail_counts(int(total), 10, float(ratio))
        order = rng.permutation(10)
        pick = np.concatenate([rng.choice(np.flatnonzero(labels == c), counts[i], replace=False)
                               for i, c in enumerate(order)])
        return images[pick], labels[pick], False
    n = int(row.split("-")[1])
    if n >= len(images):
        return images, labels, True
    per = n // 10
    pick = np.concatenate([rng.choice(np.flatnonzero(labels == c), per, replace=False) for c in range(10)])
    pick = rng.permutation(pick)
    return images[pick], labels[pick], True


def experiment(row: str, seed: int, num_samples: int, quick: bool, overrides: tuple[str, ...] = ()
               ) -> tuple[Any, list[str]]:
    """The default recipe for this row (with ``overrides``, none by default), adapted to its size as the
    training job adapts it."""
    from secu.adapt import adapt_to_collection
    from secu.overrides import apply_overrides
    from secu.recipes import recipe

    exp = recipe("fashion-mnist-cpu")
    exp.seed = seed
    if row == "pattern-3":
        exp.secu.ks = (3, 6)
    exp = apply_overrides(exp, overrides)
    if quick:
        exp.adapt.min_steps, exp.adapt.min_warmup_steps = 12, 4
    adapted = adapt_to_collection(exp, num_samples)
    return adapted.experiment, adapted.changes


def kmeans_labels(images: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means++ (10 inits) on the raw pixels in [0, 1]."""
    from sklearn.cluster import KMeans

    x = images.reshape(len(images), -1).astype(np.float32) / 255.0
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(x)


def head_figures(y: np.ndarray, pred: np.ndarray, k: int) -> dict[str, float]:
    """ACC / NMI / ARI, empty clusters and the largest cluster over N / K."""
    from secu.metrics import evaluate_clustering

    sizes = np.bincount(pred, minlength=k)
    return evaluate_clustering(y, pred) | {"empty": float((sizes == 0).sum()),
                                           "largest_over_fair": float(sizes.max() / (len(pred) / k)),
                                           "largest_frac": float(sizes.max() / len(pred))}


def one_run(row: str, seed: int, quick: bool, overrides: tuple[str, ...] = (), self_label: bool = False
            ) -> dict[str, Any]:
    """Train one seed of one row and score it and k-means (and, with ``self_label``, the run after the
    self-labeling stage with the config's ``self_label.*``); returns the JSON record."""
    from secu.diagnose import collapse_message
    from secu.local_train import predict, self_label_in_memory, train_in_memory

    torch.set_num_threads(1)
    images, labels, balanced = row_data(row, seed)
    if quick:
        images, labels = images[:256], labels[:256]
    exp, changes = experiment(row, seed, len(images), quick, overrides)
    k = exp.secu.ks[0]
    t0 = time.perf_counter()
    run = train_in_memory(images, exp)
    train_s = time.perf_counter() - t0
    pred_HN, _ = predict(run.method, images, exp)
    t1 = time.perf_counter()
    km = kmeans_labels(images, k, seed)
    kmeans_s = time.perf_counter() - t1
    last = run.history[-1]
    secu = head_figures(labels, pred_HN[0], k)
    extra: dict[str, Any] = {}
    if self_label:
        t2 = time.perf_counter()
        sl_history = self_label_in_memory(run.net, images, exp)
        extra = {"secu_self_label": head_figures(labels, predict(run.method, images, exp)[0][0], k),
                 "self_label_s": time.perf_counter() - t2, "self_label_history": sl_history}
    memory = head_figures(labels, run.memory.labels_HN[0].numpy().astype(np.int64), k)
    return {"row": row, "seed": seed, "n": len(images), "balanced": balanced, "k": k,
            "class_sizes": np.bincount(labels).tolist(), "adapted": changes,
            "batch_size": exp.optim.batch_size, "epochs": exp.optim.epochs, "warmup_epochs": exp.optim.warmup_epochs,
            "steps": int(sum(h["train/steps"] for h in run.history)), "train_s": train_s, "kmeans_s": kmeans_s,
            "secu": secu, "secu_memory": memory, "kmeans": head_figures(labels, km, k),
            "last_changed_frac": last["clusters/h0/changed_frac"],
            "last_batch_share": last["clusters/h0/largest_batch_share"],
            "warning": collapse_message(0, np.bincount(pred_HN[0], minlength=k), where="the published labels"),
            "published_sizes": np.bincount(pred_HN[0], minlength=k).tolist(), **extra}


def row_summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians and ranges over the seeds, and whether the row meets the targets on every seed."""
    out: dict[str, Any] = {"n": runs[0]["n"], "seeds": len(runs), "balanced": runs[0]["balanced"]}
    for who in ("secu", "kmeans", "secu_memory", "secu_self_label"):
        if who not in runs[0]:
            continue
        out[who] = {m: summarize([r[who][m] for r in runs])
                    for m in ("acc", "nmi", "ari", "empty", "largest_over_fair")}
    out["train_s"] = summarize([r["train_s"] for r in runs])
    beats = [r["secu"]["acc"] >= r["kmeans"]["acc"] and r["secu"]["nmi"] >= r["kmeans"]["nmi"] for r in runs]
    healthy = [r["secu"]["empty"] == 0 and (not r["balanced"] or r["secu"]["largest_over_fair"] <= 3.0) for r in runs]
    out["seeds_at_or_above_kmeans"] = int(sum(beats))
    out["seeds_without_collapse"] = int(sum(healthy))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__)
    parser.add_argument("--rows", nargs="+", default=None, choices=ROWS)
    parser.add_argument("--seeds", type=int, default=None, help="seeds per row (default 3; quick 1)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes of 1 thread)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="change the recipe before adaptation (diagnosis only; the claim is without any), "
                             "e.g. --set adapt.enabled=false --set optim.epochs=50")
    parser.add_argument("--self-label", action="store_true",
                        help="also run the self-labeling stage after each training and score it")
    args = parser.parse_args(argv)
    rows = args.rows or (["pattern-3"] if args.quick else list(ROWS))
    seeds = args.seeds or (1 if args.quick else 3)
    result = start_result(NAME, args)
    load = LoadProbe()
    tasks = [(row, seed) for row in rows for seed in range(seeds)]
    records: dict[str, list[dict[str, Any]]] = {row: [] for row in rows}
    # Every finished run is appended to <out>.runs.jsonl at once, and a rerun with the same --out takes the
    # runs recorded there instead of training them again (a long run that dies loses nothing).
    done_path = args.out.with_suffix(".runs.jsonl")
    done = {(r["row"], r["seed"]): r for r in map(json.loads, done_path.read_text().splitlines())} \
        if done_path.exists() else {}
    done_path.parent.mkdir(parents=True, exist_ok=True)
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool, done_path.open("a") as log:
        futures = {(row, seed): pool.submit(one_run, row, seed, args.quick, tuple(args.overrides), args.self_label)
                   for row, seed in tasks if (row, seed) not in done}
        for row, seed in tasks:
            if (row, seed) in done:
                records[row].append(done[(row, seed)])
                continue
            rec = futures[(row, seed)].result()
            log.write(json.dumps(_jsonable(rec)) + "\n")
            log.flush()
            records[row].append(rec)
            print(f"  {row} seed {seed}: N {rec['n']}, batch {rec['batch_size']}, {rec['epochs']} epochs "
                  f"({rec['steps']} steps, {rec['train_s']:.0f} s): SeCu ACC {rec['secu']['acc']:.3f} NMI "
                  f"{rec['secu']['nmi']:.3f} empty {rec['secu']['empty']:.0f} largest/fair "
                  f"{rec['secu']['largest_over_fair']:.2f} | k-means ACC {rec['kmeans']['acc']:.3f} NMI "
                  f"{rec['kmeans']['nmi']:.3f}" + (f" | self-labeled ACC {rec['secu_self_label']['acc']:.3f} NMI "
                                                   f"{rec['secu_self_label']['nmi']:.3f}" if args.self_label else ""),
                  flush=True)
    summaries = {row: row_summary(runs) for row, runs in records.items()}
    table = [[row, s["n"], s["seeds"], s["secu"]["acc"]["median"], s["kmeans"]["acc"]["median"],
              s["secu"]["nmi"]["median"], s["kmeans"]["nmi"]["median"], s["secu"]["empty"]["max"],
              s["secu"]["largest_over_fair"]["max"], s["seeds_at_or_above_kmeans"], s["seeds_without_collapse"]]
             for row, s in summaries.items()]
    result["config"] = {"recipe": "fashion-mnist-cpu", "adapted": "secu.adapt defaults", "rows": rows, "seeds": seeds,
                        "overrides": list(args.overrides), "self_label": args.self_label,
                        "threads_per_run": 1, "kmeans": "scikit-learn KMeans, k-means++, n_init=10, raw pixels / 255",
                        "long_tail_profile": "class c keeps n_max * R^(-c/9), classes in a random order per seed"}
    result["figure"] = "head-0 ACC/NMI of SeCu (published labels) vs k-means on the same pixels, per row and seed"
    result["baseline"] = BASELINE
    result["rows"] = summaries
    result["runs"] = records
    result["load"] = load.finish()
    print_table(["row", "N", "seeds", "SeCu ACC", "k-means ACC", "SeCu NMI", "k-means NMI", "max empty",
                 "max largest/fair", ">= k-means", "no collapse"], table,
                title=f"{NAME}: medians over seeds (head 0)")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
