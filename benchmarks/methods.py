"""SeCu, ProPos, DRC and PFCA side by side on Fashion-MNIST, each given the same wall-clock budget; k-means on
raw pixels as the baseline of the same run.

Claim checked (docs/benchmarks.md, "Methods"): which method clusters Fashion-MNIST best on this machine for a
fixed amount of training time, and by how much.

Protocol:

- Data: a class-balanced random subset of ``--train-n`` Fashion-MNIST training images (drawn by the seed) to
  train on; the whole 10,000-image test split to score on (head 0, K = 10, ACC / NMI / ARI).
- Methods: the CPU recipe of each (``fashion-mnist-cpu`` and ``fashion-mnist-cpu-<method>``): the same
  ``small_cnn`` encoder (width 16) wherever the method has an encoder (PFCA's classifier Q included), the same
  views and batch 256 (PFCA: 100, the paper's).
- Budget: every run gets one CPU thread (two runs in parallel on 2 cores) and ``--budget-s`` seconds of
  training. The schedule is sized to it before training (``secu.adapt`` is off for every method): 10 timed
  steps (after 3 untimed) give the seconds per step, a method with a feature pass (ProPos' k-means) adds
  the timed cost of one pass, and the epochs are the budget over the cost of an epoch (at least 2).
  The training time each run really took is reported next to its figures.
- Per epoch, outside the timed training, a fixed 2,000-image subset of the test split is scored (the
  per-epoch ACC chart); the final figures are on the whole test split.
- k-means: scikit-learn, k-means++, 10 inits, fit on the same training pixels (scaled to [0, 1]) of each
  seed, test images assigned to the nearest center.

No setting was chosen by the label metrics; they are reported only.

    python -m benchmarks.methods                                  # 4 methods x 3 seeds, 300 s each (~45 min)
    python -m benchmarks.methods --methods secu drc --seeds 1     # some of them
    python -m benchmarks.methods --quick                          # smoke test: ProPos and DRC (about 1 minute)
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any

import numpy as np
import torch

from benchmarks.common import LoadProbe, _jsonable, base_parser, print_table, start_result, summarize, write_result

NAME = "methods"
BASELINE = "kmeans"
METHODS = ("secu", "propos", "drc", "pfca")


def recipe_of(method: str) -> str:
    """The CPU recipe of ``method``."""
    return "fashion-mnist-cpu" if method == "secu" else f"fashion-mnist-cpu-{method}"


def fashion(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (N x 28 x 28 uint8) and labels of ``split``."""
    from benchmarks.common import require_fashion_mnist
    from pipelines.dataset.sources import load_idx

    part = load_idx(require_fashion_mnist(), [split]).parts[0]
    assert part.labels is not None
    return part.images, part.labels


def balanced_subset(labels: np.ndarray, n: int, seed: int) -> np.ndarray:
    """Indices of ``n`` images, the same number from every class, drawn by ``seed``."""
    rng = np.random.default_rng(seed)
    classes = np.unique(labels)
    per = n // len(classes)
    return np.sort(np.concatenate([rng.choice(np.flatnonzero(labels == c), per, replace=False) for c in classes]))


def _seconds_per_epoch(exp: Any, images: np.ndarray) -> float:
    """The measured cost of one epoch of ``exp``'s method on ``images``: 10 timed steps (after 3 untimed) and,
    for a method with a feature pass, one timed pass (the k-means labelling of every image)."""
    from secu.augment import EvalTransform
    from secu.batch_augment import BatchTwoViewAugment
    from secu.epoch import run_epoch
    from secu.local_train import epoch_batches, feature_batches
    from secu.method import EpochContext
    from secu.methods import build_method
    from secu.state import LocalMemory

    batch = exp.optim.batch_size
    iters = len(images) // batch
    method = build_method(exp, iters)
    aug, transform = BatchTwoViewAugment(exp.augment), EvalTransform(exp.augment)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(exp.seed))
    memory = LocalMemory(len(images), exp.secu.num_heads)
    times = []
    # The timed steps get a feature pass over 256 images (a method may run its pass at any epoch end): small.
    tiny = EpochContext(feature_batches=lambda: feature_batches(images[:256], transform))
    for count in (3, 10):
        sub = order[: count * batch]
        t0 = time.perf_counter()
        run_epoch(method, epoch_batches(images, sub, aug, batch, 0, exp.seed, method.batch_inputs, transform),
                  memory, 0, batch_size=batch, context=tiny)
        times.append(time.perf_counter() - t0)
    per_epoch = times[1] / 10 * iters
    if method.needs_feature_pass:
        t0 = time.perf_counter()
        context = EpochContext(feature_batches=lambda: feature_batches(images, transform))
        for _ in method.label_pass(exp.optim.epochs - 1, context):
            pass
        per_epoch += time.perf_counter() - t0
    return per_epoch


def experiment(method: str, seed: int, budget_s: float, images: np.ndarray, quick: bool) -> tuple[Any, float]:
    """The method's CPU recipe with its epochs sized to the budget; and the measured seconds per epoch."""
    import dataclasses

    from secu.recipes import recipe

    exp = recipe(recipe_of(method))
    exp = dataclasses.replace(exp, seed=seed, adapt=dataclasses.replace(exp.adapt, enabled=False))
    per_epoch = _seconds_per_epoch(exp, images)
    epochs = max(2, int(budget_s // per_epoch))
    warmup = min(epochs, max(exp.optim.init_epochs + 1, round(epochs * exp.optim.warmup_epochs / exp.optim.epochs)))
    optim = dataclasses.replace(exp.optim, epochs=epochs, warmup_epochs=warmup)
    return dataclasses.replace(exp, optim=optim), per_epoch


def kmeans_figures(train: np.ndarray, test: np.ndarray, y_test: np.ndarray, k: int, seed: int) -> dict[str, float]:
    """k-means++ (10 inits) fit on the training pixels in [0, 1]; the test images go to the nearest center."""
    from sklearn.cluster import KMeans

    from secu.metrics import evaluate_clustering

    def flat(x: np.ndarray) -> np.ndarray:
        return x.reshape(len(x), -1).astype(np.float32) / 255.0

    model = KMeans(n_clusters=k, n_init=10, random_state=seed).fit(flat(train))
    return evaluate_clustering(y_test, model.predict(flat(test)).astype(np.int64))


def one_run(method: str, seed: int, budget_s: float, train_n: int, quick: bool) -> dict[str, Any]:
    """Train one method with one seed within the budget; score it per epoch and at the end on the test split."""
    from secu.local_train import predict, train_in_memory
    from secu.metrics import evaluate_clustering

    torch.set_num_threads(1)
    x_train, y_train = fashion("train")
    x_test, y_test = fashion("test")
    if quick:
        x_test, y_test = x_test[:500], y_test[:500]
    chosen = balanced_subset(y_train, train_n, seed)
    images = x_train[chosen]
    exp, per_epoch = experiment(method, seed, budget_s, images, quick)
    k = exp.secu.ks[0]
    per_epoch_acc: list[float] = []
    eval_s = [0.0]
    probe = np.random.default_rng(0).choice(len(x_test), min(2000, len(x_test)), replace=False)

    def score(epoch: int, trained: Any) -> None:
        t0 = time.perf_counter()
        pred = predict(trained, x_test[probe], exp)[0][0]
        per_epoch_acc.append(evaluate_clustering(y_test[probe], pred)["acc"])
        eval_s[0] += time.perf_counter() - t0

    t0 = time.perf_counter()
    run = train_in_memory(images, exp, on_epoch=score)
    train_s = time.perf_counter() - t0 - eval_s[0]
    pred = predict(run.method, x_test, exp)[0][0]
    sizes = np.bincount(pred, minlength=k)
    last = run.history[-1]
    return {"method": method, "seed": seed, "train_n": len(images), "k": k, "epochs": exp.optim.epochs,
            "batch_size": exp.optim.batch_size, "planned_s_per_epoch": per_epoch, "train_s": train_s,
            "steps": int(sum(h["train/steps"] for h in run.history)),
            "test": evaluate_clustering(y_test, pred) | {"empty": int((sizes == 0).sum()),
                                                          "largest_frac": float(sizes.max() / len(pred))},
            "per_epoch_acc": per_epoch_acc, "last_loss": last.get("train/loss")}


def kmeans_run(seed: int, train_n: int, quick: bool) -> dict[str, Any]:
    """The baseline of one seed: k-means on the same training subset, scored on the same test images."""
    x_train, y_train = fashion("train")
    x_test, y_test = fashion("test")
    if quick:
        x_test, y_test = x_test[:500], y_test[:500]
    return {"method": BASELINE, "seed": seed,
            "test": kmeans_figures(x_train[balanced_subset(y_train, train_n, seed)], x_test, y_test, 10, seed)}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and range over seeds of the test figures, training seconds and epochs."""
    out: dict[str, Any] = {m: summarize([r["test"][m] for r in runs]) for m in ("acc", "nmi", "ari")}
    out["train_s"] = summarize([r["train_s"] for r in runs])
    out["epochs"] = summarize([r["epochs"] for r in runs])
    out["empty"] = max(r["test"]["empty"] for r in runs)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__)
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS,
                        help="default: all four (quick: propos and drc, the feature-pass and the plain path)")
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3; quick 1)")
    parser.add_argument("--budget-s", type=float, default=None, help="training seconds per run (default 300)")
    parser.add_argument("--train-n", type=int, default=None, help="training images (default 20000)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (processes of 1 thread)")
    args = parser.parse_args(argv)
    seeds = args.seeds or (1 if args.quick else 3)
    args.methods = args.methods or (["propos", "drc"] if args.quick else list(METHODS))
    budget = args.budget_s or (8.0 if args.quick else 300.0)
    train_n = args.train_n or (600 if args.quick else 20000)
    result = start_result(NAME, args)
    load = LoadProbe()
    done_path = args.out.with_suffix(".runs.jsonl")  # a rerun with the same --out keeps the finished runs
    done = {(r["method"], r["seed"]): r for r in map(json.loads, done_path.read_text().splitlines())} \
        if done_path.exists() else {}
    done_path.parent.mkdir(parents=True, exist_ok=True)
    tasks = [(m, s) for s in range(seeds) for m in (*args.methods, BASELINE)]
    records: dict[str, list[dict[str, Any]]] = {m: [] for m in (*args.methods, BASELINE)}
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool, done_path.open("a") as log:
        futures = {t: pool.submit(one_run, *t, budget, train_n, args.quick) if t[0] != BASELINE
                   else pool.submit(kmeans_run, t[1], train_n, args.quick) for t in tasks if t not in done}
        for t in tasks:
            rec = done[t] if t in done else futures[t].result()
            if t not in done:
                log.write(json.dumps(_jsonable(rec)) + "\n")
                log.flush()
            records[t[0]].append(rec)
            trained = f"{rec['epochs']} epochs ({rec['train_s']:.0f} s): " if t[0] != BASELINE else ""
            print(f"  {t[0]} seed {t[1]}: {trained}ACC {rec['test']['acc']:.3f} NMI {rec['test']['nmi']:.3f} "
                  f"ARI {rec['test']['ari']:.3f}", flush=True)
    summaries = {m: summary(runs) for m, runs in records.items() if m != BASELINE}
    summaries[BASELINE] = {m: summarize([r["test"][m] for r in records[BASELINE]]) for m in ("acc", "nmi", "ari")}
    table = [[m, s["acc"]["median"], f"{s['acc']['min']:.3f}-{s['acc']['max']:.3f}", s["nmi"]["median"],
              s["ari"]["median"], s.get("epochs", {}).get("median", ""), s.get("train_s", {}).get("median", "")]
             for m, s in summaries.items()]
    result["config"] = {"methods": args.methods, "seeds": seeds, "budget_s": budget, "train_n": train_n,
                        "threads_per_run": 1, "parallel_runs": args.jobs, "test": "Fashion-MNIST test split",
                        "recipes": {m: recipe_of(m) for m in args.methods}, "adapt": "off (the budget sets epochs)"}
    result["figure"] = "head-0 ACC/NMI/ARI on the test split after the same training time; k-means on pixels"
    result["baseline"] = BASELINE
    result["summary"] = summaries
    result["runs"] = records
    result["load"] = load.finish()
    print_table(["method", "ACC", "ACC range", "NMI", "ARI", "epochs", "train s"], table,
                title=f"{NAME}: medians over {seeds} seeds, {budget:.0f} s of training each")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
