"""Does SeCu settle on a tiny collection? Seeds of the reclustering test's first tick, in one process.

Since the schedule adapts to the collection (``secu.adapt``; docs/benchmarks.md "Robustness"), the
variant ``adapted`` is what the reclustering test trains: its batch (32) and epochs (30) are set by the
test, so only the warm-up adapts, to 1 + ceil(120 / 6) = 21 epochs (120 steps). ``paper_schedule`` is the
recipe's schedule as before (warm-up over epoch 1 only: 6 steps), the reference of the table below it.

Claim checked (docs/benchmarks.md, "Small-data stability"): on 192 pattern images of 3 classes (the data
of ``tests/jobs/test_recluster.py``), 6 steps of 32 images per epoch and 30 epochs, SeCu under the size
constraint does not reliably settle. In a share of the seeds the duals lock into a cycle: every step
sends (almost) its whole batch to one cluster, the next step to another, so the stored labels change
every epoch and two classes can end on one center. The per-step move of a dual is up to
dual_lr * lratio / K (0.03 for K = 3: more than three times the largest of the reference recipes,
0.009 for K = 10), and the cost margins between centers here are smaller than that.

Each run trains the real parts (``secu.step.secu_step``, the small CNN, SGD with the recipe's learning
rate schedule, ``BatchTwoViewAugment``) in one process with a global batch of 32, the same numbers the
test's two Ray workers use (16 each). A run is:

- settled: fewer than 5 % of the stored head-0 labels changed in each of its last 3 epochs;
- cycling: at least 25 % changed in its last epoch;
- merged: the published labels (argmax of the non-augmented image against the centers, as inference
  does) have ACC < 0.9 against the 3 classes, i.e. two classes share a center.

Also recorded per run: whether the training loop's warning for cycling duals
(``secu.diagnose.cycling_heads``) would fire on the last epoch (its label-change condition is
the definition of cycling above, so it cannot fire on a run that is not cycling; what the runs test is
its batch-share condition); the median over the last
epoch's steps of the largest share of the batch that one cluster took (1/3 when balanced, 1.0 in a
round-robin cycle); the median margin between the best and the second-best center cost over all
images (two views, training mode) at the end; the largest cosine similarity between two head-0 centers.

Variants: ``adapted`` (the ``fashion-mnist-cpu`` recipe as the test sets it: width 8, ks 3 and 6, batch
32, 30 epochs; warm-up adapted), ``paper_schedule`` (the same with ``adapt.enabled=false``),
``temperature_0.1`` (tx = tw = 0.1, paper schedule), ``dual_lr_0.03`` (per-step dual move 0.009, as the
K = 10 reference; paper schedule), ``entropy_alpha_20`` (the entropy constraint; alpha scaled from the
reference's 6000 for N = 50,000; paper schedule). Each seed also seeds the network's initialisation.

    python -m benchmarks.small_data_stability                  # 24 seeds x adapted, paper_schedule (~4 min)
    python -m benchmarks.small_data_stability --variants adapted temperature_0.1 --seeds 12
    python -m benchmarks.small_data_stability --quick          # smoke test: 2 seeds, 4 epochs, 2 variants
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from benchmarks.common import LoadProbe, base_parser, print_table, start_result, summarize, write_result
from pipelines.dataset.synthetic import pattern_images
from secu.adapt import adapt_to_collection
from secu.augment import normalize
from secu.batch_augment import BatchTwoViewAugment
from secu.config import ExperimentConfig
from secu.diagnose import CYCLE_CHANGED_FRAC, cycling_heads
from secu.local_train import predict, train_in_memory
from secu.metrics import hungarian_acc
from secu.overrides import apply_overrides
from secu.recipes import recipe
from secu.step import costs

NAME = "small_data_stability"
BASELINE = "paper_schedule"
VARIANTS = ("adapted", "paper_schedule", "temperature_0.1", "dual_lr_0.03", "entropy_alpha_20",
            "adapted_temperature_0.1", "adapted_lratio_0.5", "adapted_entropy_alpha_20", "adapted_dual_lr_0.03",
            "adapted_entropy")
SETTLED, CYCLING, MERGED_ACC = 0.05, CYCLE_CHANGED_FRAC, 0.9


def experiment(variant: str, epochs: int, batch: int, seed: int, n: int = 192) -> ExperimentConfig:
    """The recipe as ``tests/jobs/test_recluster.py`` sets it, changed as ``variant`` says."""
    exp = apply_overrides(recipe("fashion-mnist-cpu"), [
        f"optim.epochs={epochs}", f"optim.batch_size={batch}", "model.cnn_width=8", "secu.ks=[3,6]", f"seed={seed}",
        "adapt.fixed=optim.batch_size,optim.epochs"])
    if not variant.startswith("adapted"):
        exp.adapt.enabled = False
    change = variant.removeprefix("adapted").removeprefix("_")
    if change == "temperature_0.1":
        exp.secu.tx = exp.secu.tw = 0.1
    elif change == "dual_lr_0.03":
        exp.secu.dual_lr = 0.03
    elif change == "lratio_0.5":
        exp.secu.lratio = 0.5
    elif change == "entropy_alpha_20":
        exp.secu.constraint, exp.secu.alpha = "entropy", 20.0
    elif change == "entropy":  # the recipe's alpha, adapted to N (0.12 x 192 = 23.04)
        exp.secu.constraint = "entropy"
    elif variant not in ("adapted", "paper_schedule"):
        raise ValueError(f"unknown variant {variant!r}")
    return adapt_to_collection(exp, n).experiment


@dataclass
class Outcome:
    """What one seed of one variant ended with."""

    changed_last: list[float]
    """Fraction of stored head-0 labels that changed, in each of the last 3 epochs."""
    memory_acc: float
    published_acc: float
    published_sizes: list[int]
    largest_batch_share: float
    margin: float
    center_cos_max: float
    """Largest cosine similarity between two head-0 centers (1.0: two centers on the same point)."""
    duals: list[float]
    warned: bool
    """Whether the training loop's cycle warning (``cycling_heads``) would fire on the last epoch."""
    warmup_epochs: int

    def figures(self) -> dict[str, Any]:
        """The run's JSON record, with its classification."""
        return {"settled": max(self.changed_last) < SETTLED, "cycling": self.changed_last[-1] >= CYCLING,
                "merged": self.published_acc < MERGED_ACC, **self.__dict__}


def train(variant: str, seed: int, epochs: int, n: int = 192, batch: int = 32) -> Outcome:
    """One single-process run (``secu.local_train``); returns its end state."""
    exp = experiment(variant, epochs, batch, seed, n)
    images, labels = pattern_images(n, seed)
    run = train_in_memory(images, exp)
    net = run.net
    aug = BatchTwoViewAugment(exp.augment)
    mean, std = exp.augment.mean, exp.augment.std
    with torch.no_grad():
        v1, v2 = aug(list(images), seed=seed)
        out = net(normalize(torch.from_numpy(v1), mean, std), normalize(torch.from_numpy(v2), mean, std))
        ranked = np.sort(-costs(out)[0].numpy(), axis=1)
        centers_DK = net.centers.normalized(0)
        cos_KK = (centers_DK.T @ centers_DK).numpy()
    published = predict(run.method, images, exp)[0][0]
    changed = [m["clusters/h0/changed_frac"] for m in run.history]
    last = run.history[-1]
    return Outcome(changed_last=changed[-3:], memory_acc=hungarian_acc(labels, run.memory.labels_HN[0].numpy()),
                   published_acc=hungarian_acc(labels, published),
                   published_sizes=np.bincount(published, minlength=3).tolist(),
                   largest_batch_share=last["clusters/h0/largest_batch_share"],
                   margin=float(np.median(ranked[:, -1] - ranked[:, -2])),
                   center_cos_max=float(cos_KK[~np.eye(3, dtype=bool)].max()),
                   duals=run.state.duals[0].tolist(), warned=0 in cycling_heads(last, exp),
                   warmup_epochs=exp.optim.warmup_epochs)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__)
    parser.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 24; quick 2)")
    parser.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 30; quick 4)")
    parser.add_argument("--variants", nargs="+", default=None, choices=VARIANTS)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = args.seeds or (2 if args.quick else 24)
    epochs = args.epochs or (4 if args.quick else 30)
    variants = args.variants or ["adapted", BASELINE]
    result = start_result(NAME, args)
    load = LoadProbe()
    per_variant: dict[str, Any] = {}
    rows = []
    for variant in variants:
        runs = []
        for seed in range(args.first_seed, args.first_seed + seeds):
            record = train(variant, seed, epochs).figures() | {"seed": seed}
            runs.append(record)
            print(f"  {variant} seed {seed}: changed {[round(c, 2) for c in record['changed_last']]}, "
                  f"memory ACC {record['memory_acc']:.3f}, published ACC {record['published_acc']:.3f} "
                  f"sizes {record['published_sizes']}, batch share {record['largest_batch_share']:.2f}, "
                  f"margin {record['margin']:.4f}, center cos {record['center_cos_max']:.2f}", flush=True)
        counts = {key: sum(bool(r[key]) for r in runs) for key in ("settled", "cycling", "merged", "warned")}
        per_variant[variant] = {"seeds": seeds, **counts, "settled_frac": counts["settled"] / seeds,
                                "warmup_epochs": runs[0]["warmup_epochs"],
                                "margin": summarize([r["margin"] for r in runs]),
                                "largest_batch_share": summarize([r["largest_batch_share"] for r in runs]),
                                "runs": runs}
        rows.append([variant, seeds, runs[0]["warmup_epochs"], counts["settled"], counts["cycling"], counts["merged"],
                     counts["warned"], per_variant[variant]["margin"]["median"]])
    result["config"] = {"images": 192, "classes": 3, "global_batch": 32, "epochs": epochs, "seeds": seeds,
                        "first_seed": args.first_seed, "variants": variants, "settled_below": SETTLED,
                        "cycling_from": CYCLING, "merged_below_acc": MERGED_ACC}
    result["figure"] = ("runs per variant that settled / cycled / published merged clusters / got the cycle "
                        "warning, out of `seeds`")
    result["baseline"] = BASELINE
    result["variants"] = per_variant
    result["load"] = load.finish()
    print_table(["variant", "seeds", "warm-up epochs", "settled", "cycling", "merged", "warned", "median margin"],
                rows, title=f"{NAME}: 192 pattern images, 3 classes, {epochs} epochs, batch 32")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
