"""Does SeCu settle on a tiny collection? Seeds of the reclustering test's first tick, in one process.

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
(``pipelines.train_loop.cycling_heads``) would fire on the last epoch (its label-change condition is
the definition of cycling above, so it cannot fire on a run that is not cycling; what the runs test is
its batch-share condition); the median over the last
epoch's steps of the largest share of the batch that one cluster took (1/3 when balanced, 1.0 in a
round-robin cycle); the median margin between the best and the second-best center cost over all
images (two views, training mode) at the end; the largest cosine similarity between two head-0 centers.

Variants: ``reference`` (the ``fashion-mnist-cpu`` recipe as the test overrides it: width 8, ks 3 and 6),
``temperature_0.1`` (tx = tw = 0.1), ``dual_lr_0.03`` (per-step dual move 0.009, as the K = 10 reference),
``entropy_alpha_20`` (the entropy constraint; alpha scaled from the reference's 6000 for N = 50,000).

    python -m benchmarks.small_data_stability              # 12 seeds x 4 variants, about 3 minutes
    python -m benchmarks.small_data_stability --quick      # smoke test: 2 seeds, 4 epochs, 2 variants
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from benchmarks.common import LoadProbe, base_parser, print_table, start_result, summarize, write_result
from pipelines.checkpointing import build_network
from pipelines.train_loop import CYCLE_CHANGED_FRAC, cycling_heads
from secu.augment import normalize
from secu.batch_augment import BatchTwoViewAugment
from secu.config import ExperimentConfig, recipe
from secu.metrics import hungarian_acc
from secu.optim import build_optimizer, set_learning_rates
from secu.schedules import lr_schedule
from secu.state import ClusterState, LocalMemory
from secu.step import costs, secu_step
from tests.pipelines.run_builders import pattern_images

NAME = "small_data_stability"
BASELINE = "reference"
SETTLED, CYCLING, MERGED_ACC = 0.05, CYCLE_CHANGED_FRAC, 0.9


def experiment(variant: str, epochs: int, batch: int) -> ExperimentConfig:
    """The recipe as ``tests/jobs/test_recluster.py`` sets it, changed as ``variant`` says."""
    exp = recipe("fashion-mnist-cpu")
    exp.optim.epochs, exp.optim.batch_size = epochs, batch
    exp.model.cnn_width, exp.secu.ks = 8, (3, 6)
    if variant == "temperature_0.1":
        exp.secu.tx = exp.secu.tw = 0.1
    elif variant == "dual_lr_0.03":
        exp.secu.dual_lr = 0.03
    elif variant == "entropy_alpha_20":
        exp.secu.constraint, exp.secu.alpha = "entropy", 20.0
    elif variant != BASELINE:
        raise ValueError(f"unknown variant {variant!r}")
    return exp


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

    def figures(self) -> dict[str, Any]:
        """The run's JSON record, with its classification."""
        return {"settled": max(self.changed_last) < SETTLED, "cycling": self.changed_last[-1] >= CYCLING,
                "merged": self.published_acc < MERGED_ACC, **self.__dict__}


def train(variant: str, seed: int, epochs: int, n: int = 192, batch: int = 32) -> Outcome:
    """One single-process run; returns its end state."""
    torch.manual_seed(seed)
    exp = experiment(variant, epochs, batch)
    images, labels = pattern_images(n, seed)
    net = build_network(exp)
    opt = build_optimizer(net.encoder.parameters(), net.centers.parameters(), exp.optim)
    aug = BatchTwoViewAugment(exp.augment)
    mean, std = exp.augment.mean, exp.augment.std
    iters = n // batch
    lrs, clrs = lr_schedule(iters, exp.optim)
    state, memory = ClusterState.create(exp.secu.ks), LocalMemory(n, len(exp.secu.ks))
    changed, shares = [], []
    for epoch in range(epochs):
        snapshot, order, before = net.centers.snapshot(), torch.randperm(n), memory.labels_HN[0].clone()
        shares = []
        for it in range(iters):
            set_learning_rates(opt, float(lrs[epoch * iters + it]), float(clrs[epoch * iters + it]))
            ids = order[it * batch:(it + 1) * batch]
            v1, v2 = aug([images[i] for i in ids])
            res = secu_step(net, normalize(torch.from_numpy(v1), mean, std), normalize(torch.from_numpy(v2), mean, std),
                            ids, None if epoch == 0 else memory.read(ids), snapshot, state, exp.secu)
            opt.zero_grad()
            res.loss.backward()
            opt.step()
            memory.write(ids, res.labels_HB)
            state = res.state
            shares.append(float(np.bincount(res.labels_HB[0].numpy(), minlength=3).max()) / len(ids))
        state = state.at_epoch_end(exp.secu.constraint)
        changed.append(float((before != memory.labels_HN[0]).float().mean()) if epoch else 1.0)
    with torch.no_grad():
        v1, v2 = aug(list(images))
        out = net(normalize(torch.from_numpy(v1), mean, std), normalize(torch.from_numpy(v2), mean, std))
        ranked = np.sort(-costs(out)[0].numpy(), axis=1)
        net.eval()
        z, _ = net.encoder(normalize(torch.from_numpy(images[:, None]), mean, std))
        centers_DK = net.centers.normalized(0)
        published = (z @ centers_DK).argmax(dim=1).numpy()
        cos_KK = (centers_DK.T @ centers_DK).numpy()
    last = {"epoch": epochs - 1, "clusters/h0/largest_batch_share": float(np.median(shares)),
            "clusters/h0/changed_frac": changed[-1]}
    return Outcome(changed_last=changed[-3:], memory_acc=hungarian_acc(labels, memory.labels_HN[0].numpy()),
                   published_acc=hungarian_acc(labels, published),
                   published_sizes=np.bincount(published, minlength=3).tolist(),
                   largest_batch_share=float(np.median(shares)), margin=float(np.median(ranked[:, -1] - ranked[:, -2])),
                   center_cos_max=float(cos_KK[~np.eye(3, dtype=bool)].max()),
                   duals=state.duals[0].tolist(), warned=0 in cycling_heads(last, exp))


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__)
    parser.add_argument("--seeds", type=int, default=None, help="seeds per variant (default 12; quick 2)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per run (default 30; quick 4)")
    parser.add_argument("--variants", nargs="+", default=None,
                        choices=[BASELINE, "temperature_0.1", "dual_lr_0.03", "entropy_alpha_20"])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    seeds = args.seeds or (2 if args.quick else 12)
    epochs = args.epochs or (4 if args.quick else 30)
    variants = args.variants or ([BASELINE, "dual_lr_0.03"] if args.quick else
                                 [BASELINE, "temperature_0.1", "dual_lr_0.03", "entropy_alpha_20"])
    result = start_result(NAME, args)
    load = LoadProbe()
    per_variant: dict[str, Any] = {}
    rows = []
    for variant in variants:
        runs = []
        for seed in range(seeds):
            record = train(variant, seed, epochs).figures() | {"seed": seed}
            runs.append(record)
            print(f"  {variant} seed {seed}: changed {[round(c, 2) for c in record['changed_last']]}, "
                  f"memory ACC {record['memory_acc']:.3f}, published ACC {record['published_acc']:.3f} "
                  f"sizes {record['published_sizes']}, batch share {record['largest_batch_share']:.2f}, "
                  f"margin {record['margin']:.4f}, center cos {record['center_cos_max']:.2f}", flush=True)
        counts = {key: sum(bool(r[key]) for r in runs) for key in ("settled", "cycling", "merged", "warned")}
        per_variant[variant] = {"seeds": seeds, **counts, "settled_frac": counts["settled"] / seeds,
                                "margin": summarize([r["margin"] for r in runs]),
                                "largest_batch_share": summarize([r["largest_batch_share"] for r in runs]),
                                "runs": runs}
        rows.append([variant, seeds, counts["settled"], counts["cycling"], counts["merged"], counts["warned"],
                     per_variant[variant]["margin"]["median"]])
    result["config"] = {"images": 192, "classes": 3, "global_batch": 32, "epochs": epochs, "seeds": seeds,
                        "variants": variants, "settled_below": SETTLED, "cycling_from": CYCLING,
                        "merged_below_acc": MERGED_ACC}
    result["figure"] = ("runs per variant that settled / cycled / published merged clusters / got the cycle "
                        "warning, out of `seeds`")
    result["baseline"] = BASELINE
    result["variants"] = per_variant
    result["load"] = load.finish()
    print_table(["variant", "seeds", "settled", "cycling", "merged", "warned", "median margin"], rows,
                title=f"{NAME}: 192 pattern images, 3 classes, {epochs} epochs, batch 32")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
