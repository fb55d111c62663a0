"""Two-view augmentation: the batched implementation vs torchvision's v2 transforms image by image.

Claim: ``secu.batch_augment.BatchTwoViewAugment``'s batched path produces the SeCu views several
times faster than the per-image torchvision pipeline (``secu.augment.TwoViewAugment`` via
``augment_batch``) on small images, with the same distributions (checked in
``tests/secu/test_batch_augment.py``, not here). On large views it is slower, which is why the
training path uses it only up to ``BATCHED_MAX_SIDE`` (64 px); the batched path is forced here.

Inputs: Fashion-MNIST-sized grayscale 28 x 28 images (recipe ``fashion-mnist-cpu``), CIFAR-sized RGB
32 x 32 (recipe ``cifar10``) and ImageNet-like RGB 375 x 500 -> 224 views (recipe ``imagenet1k``;
left out of ``--quick``), random pixels, batches of ``--batch`` images. One process, ``--threads``
torch threads (default 1, as a Ray Data task). Each round times ``--calls`` calls of each variant;
the figure is the median call time; medians and spread over the rounds.

    python -m benchmarks.augment
    python -m benchmarks.augment --quick
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

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
from secu.augment import TwoViewAugment, augment_batch
from secu.batch_augment import BatchTwoViewAugment
from secu.recipes import recipe

NAME = "augment"
BASELINE = "per_image_torchvision"


def timed(fn: Callable[[], Any], calls: int, batch: int) -> Figures:
    """``calls`` timed calls; the figure is the median call time."""
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    ms = 1e3 * statistics.median(times)
    return {"ms_per_batch": ms, "images_per_s": 1e3 * batch / ms, "calls": float(calls)}


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__)
    parser.add_argument("--batch", type=int, default=None, help="images per call (default 256; quick 64)")
    parser.add_argument("--calls", type=int, default=None, help="calls per round (default 5; quick 2)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    batch = args.batch or (64 if args.quick else 256)
    calls = args.calls or (2 if args.quick else 5)
    result = start_result(NAME, args)
    load = LoadProbe()
    kinds = {"gray_28": ("fashion-mnist-cpu", (28, 28)), "rgb_32": ("cifar10", (32, 32, 3))}
    if not args.quick:
        kinds["rgb_375x500_to_224"] = ("imagenet1k", (375, 500, 3))
    rng = np.random.default_rng(0)
    per_kind: dict[str, Any] = {}
    rows = []
    for kind, (recipe_name, shape) in kinds.items():
        cfg = recipe(recipe_name).augment
        images = [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(batch)]
        per_image, batched = TwoViewAugment(cfg), BatchTwoViewAugment(cfg, batched=True)
        n_calls = max(1, calls // 2) if shape[0] > 100 else calls
        print(f"\n{kind}: {shape} -> {cfg.channels} x {cfg.image_size} x {cfg.image_size}, batch {batch}")
        rounds = alternate({
            "batched": lambda b=batched, im=images, c=n_calls: timed(lambda: b(im, seed=1), c, batch),
            BASELINE: lambda a=per_image, im=images, c=n_calls: timed(lambda: augment_batch(a, im, seed=1), c, batch),
        }, args.repeats, args.warmup)
        summary = rounds.summary("ms_per_batch")
        speedup = 1.0 / ratios(summary, BASELINE)["batched"]
        per_kind[kind] = {"recipe": recipe_name, "input_shape": list(shape), "view_side": cfg.image_size,
                          "ms_per_batch": summary, "images_per_s": rounds.summary("images_per_s"),
                          "speedup_batched": speedup, "raw": rounds.raw, "order": rounds.order}
        b, p = summary["batched"], summary[BASELINE]
        rows.append([kind, batch, b["median"], f"{b['min']:.4g}-{b['max']:.4g}", p["median"],
                     f"{p['min']:.4g}-{p['max']:.4g}", speedup])
    result["config"] = {"batch": batch, "calls": calls, "threads": args.threads, "repeats": args.repeats,
                        "warmup": args.warmup, "kinds": {k: v[0] for k, v in kinds.items()}}
    result["figure"] = ("median time of one call on a batch (ms), median/min/max over rounds; "
                        "speedup = per-image / batched")
    result["baseline"] = BASELINE
    result["kinds"] = per_kind
    result["load"] = load.finish()
    under = " (UNDER LOAD)" if result["load"]["under_load"] else ""
    print_table(["images", "batch", "batched ms", "range", "per-image ms", "range", "speedup"], rows,
                title=f"{NAME}: two views per image, {args.threads} torch thread(s){under}")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
