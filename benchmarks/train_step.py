"""Training step: one SeCu step vs the same encoder and batch with a plain two-view loss.

Claim: SeCu's clustering machinery (H heads of centers, the size constraint, the hardness-aware
center loss, the representation loss against stored labels, and the per-instance memory) costs a
small fraction of a training step; the encoder dominates.

- ``secu``: per step, what ``secu.epoch.run_epoch`` does: read the stored labels of the batch from a
  ``LocalMemory`` (steady state: every instance has a label from the previous epoch),
  ``SeCuMethod.train_step`` (normalisation, ``secu.step.secu_step``: both views through the encoder,
  similarities to every head's centers, constrained assignment, dual update, both losses; backward,
  optimizer step of encoder + centers), write the new labels into the memory.
- ``plain``: the same encoder architecture and initial weights, the same views, a symmetric cosine
  loss between the two views' embeddings, -mean(z1 . z2), backward, optimizer step (same optimizer).

- ``secu_heads_only``: SeCu's own machinery alone, the same step on fixed features in place of the
  encoder's output (heads, constraint, both losses, backward into the features and centers, center
  update, memory read/write): its time is the absolute cost SeCu adds, measurable even when the
  difference of two noisy step times is not.

Both include the uint8 -> float normalisation of the views. Blocks of ``--steps`` steps alternate
(after a warm-up block each); a block's figure is its median step time; the table shows the median
and spread over the blocks. Single process, no Ray, ``--threads`` torch threads (default 1: on a
shared machine, more intra-op threads mostly measure the other processes). ``--quick`` uses batches
of 64 and 2 steps per block: a smoke test, not a measurement.

Configs: ``fashion-mnist-cpu`` (small CNN, 3 heads, batch 256, 1 x 28 x 28);
``cifar-smallcnn`` (the cifar10 recipe's 10 heads and batch 128 at 3 x 32 x 32, on the small CNN);
``cifar10-resnet18`` (the cifar10 recipe as published: ResNet-18, 10 heads, batch 128; slow on a CPU,
left out of ``--quick``).

    python -m benchmarks.train_step
    python -m benchmarks.train_step --quick
"""

from __future__ import annotations

import functools
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import (
    Figures,
    LoadProbe,
    alternate,
    base_parser,
    print_table,
    ratios,
    start_result,
    write_result,
)
from secu.augment import normalize
from secu.config import ExperimentConfig
from secu.method import EpochContext
from secu.model import Encoder
from secu.network import SeCuNetwork
from secu.optim import build_optimizer
from secu.overrides import apply_overrides
from secu.recipes import recipe
from secu.secu_method import SeCuMethod
from secu.state import ClusterState, LocalMemory
from secu.step import secu_step

NAME = "train_step"
BASELINE = "plain"


def configs(quick: bool) -> dict[str, ExperimentConfig]:
    """The measured configurations."""
    out = {
        "fashion-mnist-cpu": recipe("fashion-mnist-cpu"),
        "cifar-smallcnn": apply_overrides(recipe("cifar10"), ["model.backbone=small_cnn", "model.cnn_width=32"]),
    }
    if not quick:
        out["cifar10-resnet18"] = recipe("cifar10")
    return out


@dataclass
class Batch:
    """One fixed batch: uint8 views and ids (the step's cost does not depend on the pixels)."""

    view1: torch.Tensor
    view2: torch.Tensor
    ids: torch.Tensor


def make_batch(exp: ExperimentConfig, batch: int, num_samples: int, seed: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, exp.augment.channels, exp.augment.image_size, exp.augment.image_size)
    return Batch(torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen),
                 torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen),
                 torch.randperm(num_samples, generator=gen)[:batch])


class SeCuRunner:
    """The SeCu side: ``SeCuMethod.train_step`` (the product's step: normalisation, ``secu_step``, optimizer at
    the schedule's rate) with the label exchange of ``secu.epoch.run_epoch`` against a filled memory."""

    def __init__(self, exp: ExperimentConfig, num_samples: int, encoder: nn.Module | None = None) -> None:
        torch.manual_seed(exp.seed)
        self.exp = exp
        self.net = SeCuNetwork(encoder or Encoder(exp.model), exp.model.feat_dim, exp.secu.ks,
                               generator=torch.Generator().manual_seed(exp.seed + 1))
        self.state = ClusterState.create(exp.secu.ks)
        self.memory = LocalMemory(num_samples, exp.secu.num_heads)
        gen = torch.Generator().manual_seed(1)
        for h, k in enumerate(exp.secu.ks):  # steady state: labels from a previous epoch everywhere
            self.memory.labels_HN[h] = torch.randint(0, k, (num_samples,), generator=gen, dtype=torch.int32)
        self.snapshot = self.net.centers.snapshot()

    @functools.cached_property
    def method(self) -> SeCuMethod:
        """Built on first use: the heads-only runner below has no encoder parameters to optimise."""
        method = SeCuMethod(self.exp, self.net, iters_per_epoch=1000)
        method.before_epoch(2, EpochContext())  # past the lr-0 epoch: a warm-up step like any other
        return method

    def step(self, b: Batch) -> None:
        ids = b.ids.numpy()
        out = self.method.train_step({"sample_index": b.ids, "view1": b.view1, "view2": b.view2},
                                     torch.from_numpy(self.memory.labels_for(ids)))
        assert out.labels_HB is not None and out.write_mask_B is not None
        mask = out.write_mask_B.numpy()
        self.memory.write_async(ids[mask], out.labels_HB[:, torch.from_numpy(mask)].numpy(), epoch=2)


class _NormalizeOnly(nn.Module):
    """Stands in for the encoder: the "views" are already features; returns them L2-normalised."""

    def forward(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, None]:
        return F.normalize(x_BD, dim=1), None


class HeadsOnlyRunner(SeCuRunner):
    """SeCu's own machinery without the encoder: ``secu_step`` on fixed B x D features that need a gradient
    (heads, constraint, losses, backward into features and centers, center update, memory). It calls the step
    directly because its inputs are features, not images (no normalisation, no encoder parameters)."""

    def __init__(self, exp: ExperimentConfig, num_samples: int, batch: int) -> None:
        super().__init__(exp, num_samples, encoder=_NormalizeOnly())
        gen = torch.Generator().manual_seed(2)
        self.f1 = torch.randn(batch, exp.model.feat_dim, generator=gen, requires_grad=True)
        self.f2 = torch.randn(batch, exp.model.feat_dim, generator=gen, requires_grad=True)
        o = self.exp.optim  # no encoder parameters: the centers' group alone, as the recipe's optimizer has it
        self.opt = torch.optim.SGD(self.net.centers.parameters(), lr=o.clr, momentum=o.momentum,
                                   weight_decay=o.weight_decay)

    def step(self, b: Batch) -> None:
        self.f1.grad, self.f2.grad = None, None
        prev = self.memory.read(b.ids).long()
        result = secu_step(self.net, self.f1, self.f2, b.ids, prev, self.snapshot, self.state, self.exp.secu)
        self.opt.zero_grad(set_to_none=True)
        result.loss.backward()
        self.opt.step()
        self.state = result.state
        mask = result.write_mask_B
        self.memory.write(b.ids[mask], result.labels_HB[:, mask])


class PlainRunner:
    """The baseline: the same encoder (same initial weights) with a symmetric cosine two-view loss."""

    def __init__(self, exp: ExperimentConfig) -> None:
        torch.manual_seed(exp.seed)
        self.exp = exp
        self.encoder = Encoder(exp.model)
        self.opt = build_optimizer(self.encoder.parameters(), [], exp.optim)

    def step(self, b: Batch) -> None:
        aug = self.exp.augment
        z1, _ = self.encoder(normalize(b.view1, aug.mean, aug.std))
        z2, _ = self.encoder(normalize(b.view2, aug.mean, aug.std))
        loss = -(z1 * z2).sum(dim=1).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def block(step: Callable[[Batch], None], b: Batch, steps: int) -> Figures:
    """``steps`` timed steps; the block's figure is the median step time."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step(b)
        times.append(time.perf_counter() - t0)
    out: Figures = {"step_ms": 1e3 * statistics.median(times), "mean_step_ms": 1e3 * statistics.fmean(times),
                    "steps": float(steps)}
    out.update({f"step_{i}_ms": 1e3 * t for i, t in enumerate(times)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__)
    parser.add_argument("--steps", type=int, default=None, help="steps per block (default 10; quick 3)")
    parser.add_argument("--resnet-steps", type=int, default=2, help="steps per block for cifar10-resnet18")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine more threads mostly measure contention)")
    parser.add_argument("--batch", type=int, default=None,
                        help="override every config's batch (default: the recipe's; quick: 64)")
    parser.add_argument("--num-samples", type=int, default=60_000, help="N of the label memory")
    args = parser.parse_args(argv)
    steps = args.steps or (2 if args.quick else 10)
    batch_override = args.batch or (64 if args.quick else None)
    torch.set_num_threads(args.threads)
    result = start_result(NAME, args)
    load = LoadProbe()
    per_config: dict[str, Any] = {}
    for name, exp in configs(args.quick).items():
        batch = batch_override or exp.optim.batch_size
        n_steps = args.resnet_steps if exp.model.backbone.startswith("resnet") else steps
        b = make_batch(exp, batch, args.num_samples)
        secu, plain = SeCuRunner(exp, args.num_samples), PlainRunner(exp)
        heads_only = HeadsOnlyRunner(exp, args.num_samples, batch)
        print(f"\n{name}: {exp.model.backbone}, heads {list(exp.secu.ks)}, batch {batch}, "
              f"{exp.augment.channels}x{exp.augment.image_size}x{exp.augment.image_size}, {n_steps} steps per block")
        rounds = alternate({"secu": functools.partial(block, secu.step, b, n_steps),
                            "plain": functools.partial(block, plain.step, b, n_steps),
                            "secu_heads_only": functools.partial(block, heads_only.step, b, n_steps)},
                           args.repeats, args.warmup)
        for runs in rounds.raw.values():
            for r in runs:
                r["cpu_ms_per_step"] = 1e3 * r["tree_cpu_s"] / r["steps"]
        summary = rounds.summary("step_ms")
        ratio = ratios(summary, BASELINE)["secu"]
        per_config[name] = {
            "backbone": exp.model.backbone, "heads": list(exp.secu.ks), "batch": batch,
            "view_shape": [exp.augment.channels, exp.augment.image_size, exp.augment.image_size],
            "steps_per_block": n_steps, "experiment": exp.to_dict(),
            "raw": rounds.raw, "order": rounds.order, "step_ms": summary,
            "cpu_ms_per_step": rounds.summary("cpu_ms_per_step"),
            "ratio_secu_to_plain": ratio, "overhead_pct": 100.0 * (ratio - 1.0),
            "overhead_pct_cpu": 100.0 * (ratios(rounds.summary("cpu_ms_per_step"), BASELINE)["secu"] - 1.0),
            "heads_only_pct_of_plain": 100.0 * summary["secu_heads_only"]["median"] / summary[BASELINE]["median"],
            "images_per_s": {k: 1e3 * batch / s["median"] for k, s in summary.items()},
        }
    result["config"] = {"threads": torch.get_num_threads(), "steps_per_block": steps, "batch_override": batch_override,
                        "repeats": args.repeats,
                        "warmup": args.warmup, "num_samples": args.num_samples, "configs": list(per_config)}
    result["figure"] = ("median step time (ms) of each block, median/min/max over blocks; "
                        "overhead_pct = 100 * (secu / plain - 1); overhead_pct_cpu the same on CPU time; "
                        "heads_only_pct_of_plain = 100 * secu_heads_only / plain")
    result["baseline"] = BASELINE
    result["configs"] = per_config
    result["load"] = load.finish()
    rows = []
    for name, data in per_config.items():
        s, p = data["step_ms"]["secu"], data["step_ms"]["plain"]
        rows.append([name, len(data["heads"]), data["batch"], s["median"], f"{s['min']:.4g}-{s['max']:.4g}",
                     p["median"], f"{p['min']:.4g}-{p['max']:.4g}", data["ratio_secu_to_plain"],
                     data["overhead_pct"], data["overhead_pct_cpu"], data["step_ms"]["secu_heads_only"]["median"],
                     data["heads_only_pct_of_plain"]])
    under = " (UNDER LOAD)" if result["load"]["under_load"] else ""
    print_table(["config", "heads", "batch", "secu ms", "secu range", "plain ms", "plain range", "ratio",
                 "overhead %", "overhead % (CPU time)", "heads-only ms", "heads-only % of plain"], rows,
                title=f"{NAME}: {torch.get_num_threads()} torch threads{under}")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
