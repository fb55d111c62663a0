"""Schedule adaptation to the collection's size (secu.adapt), the init-epochs schedule and the collapse
messages (secu.diagnose): rules checked against values worked out by hand."""

import numpy as np
import pytest

from secu.adapt import adapt_to_collection
from secu.config import ExperimentConfig, OptimConfig
from secu.diagnose import collapse_message, collapse_messages, largest_share_limit
from secu.overrides import apply_overrides
from secu.recipes import recipe
from secu.schedules import encoder_lr, lr_schedule


def test_sixty_thousand_images_keep_the_cpu_recipe() -> None:
    # 60,000 // 256 = 234 steps per epoch (>= 64), 2,808 steps (>= 2,500), warm-up 234 steps (>= 120).
    exp = recipe("fashion-mnist-cpu")
    adapted = adapt_to_collection(exp, 60_000, num_workers=2)
    assert adapted.changes == []
    assert adapted.experiment == exp


@pytest.mark.parametrize("name", ["cifar10", "cifar100-20", "stl10", "imagenet1k"])
def test_reference_recipes_at_their_size_are_unchanged(name: str) -> None:
    exp = recipe(name)
    n = {"cifar10": 50_000, "cifar100-20": 50_000, "stl10": 105_000, "imagenet1k": 1_281_167}[name]
    assert adapt_to_collection(exp, n, num_workers=8).changes == []


def test_two_thousand_images() -> None:
    # 2000 // 256 = 7 < 64 -> 128 (15) -> 64 (31); the floor is max(64, 2 * 30) = 64, so it stops at 64.
    # 31 steps per epoch: warm-up 1 + ceil(120 / 31) = 5 epochs; epochs max(12, ceil(2500 / 31) = 81, 5 + 10).
    adapted = adapt_to_collection(recipe("fashion-mnist-cpu"), 2000, num_workers=2)
    o = adapted.experiment.optim
    assert (o.batch_size, o.epochs, o.warmup_epochs) == (64, 81, 5)
    assert any("2511 steps in all" in c for c in adapted.changes)
    assert "optim.batch_size 256 -> 64" in adapted.describe(2000)


def test_batch_floor_follows_the_largest_head_and_the_workers() -> None:
    exp = apply_overrides(recipe("fashion-mnist-cpu"), ["secu.ks=[10,100]"])
    assert adapt_to_collection(exp, 500, num_workers=1).experiment.optim.batch_size == 256  # floor 200
    exp = apply_overrides(recipe("fashion-mnist-cpu"), ["adapt.min_batch=2", "secu.ks=[3]"])
    # floor max(2, 2 * 3, 2 * 3 workers) = 6: 256 -> ... -> 8 (300 // 8 = 37 < 64, but 4 < 6), then a
    # multiple of the 3 workers: 6.
    assert adapt_to_collection(exp, 300, num_workers=3).experiment.optim.batch_size == 6


def test_user_set_keys_are_kept() -> None:
    exp = apply_overrides(recipe("fashion-mnist-cpu"), ["optim.batch_size=32", "optim.epochs=30",
                                                        "adapt.fixed=optim.batch_size,optim.epochs"])
    assert exp.adapt.fixed == ("optim.batch_size", "optim.epochs")
    o = adapt_to_collection(exp, 192).experiment.optim
    # 192 // 32 = 6 steps per epoch: only the warm-up adapts, to 1 + ceil(120 / 6) = 21 epochs.
    assert (o.batch_size, o.epochs, o.warmup_epochs) == (32, 30, 21)


def test_disabled_and_idempotent() -> None:
    exp = apply_overrides(recipe("fashion-mnist-cpu"), ["adapt.enabled=false"])
    assert adapt_to_collection(exp, 500).experiment == exp
    once = adapt_to_collection(recipe("fashion-mnist-cpu"), 3000, num_workers=2).experiment
    assert adapt_to_collection(once, 3000, num_workers=2).changes == []


def test_adapted_config_round_trips() -> None:
    adapted = adapt_to_collection(recipe("fashion-mnist-cpu"), 1000).experiment
    assert ExperimentConfig.from_dict(adapted.to_dict()) == adapted


def test_init_epochs_schedule() -> None:
    # Z = 3 epochs at lr 0, then a linear warm-up over epochs 3..4 (2 I steps), then the cosine.
    cfg = OptimConfig(lr=0.2, epochs=10, warmup_epochs=5, init_epochs=3)
    i = 4
    assert [encoder_lr(t, i, cfg) for t in (0, 11)] == [0.0, 0.0]
    assert encoder_lr(12, i, cfg) == pytest.approx(0.2 / 8)  # max(1, 0) / (5 I - 3 I)
    assert encoder_lr(19, i, cfg) == pytest.approx(0.2 * 7 / 8)
    assert encoder_lr(20, i, cfg) == pytest.approx(0.2)
    enc, _ = lr_schedule(i, cfg)
    np.testing.assert_allclose(enc, [encoder_lr(t, i, cfg) for t in range(40)], rtol=1e-12)
    with pytest.raises(ValueError, match="init_epochs"):
        OptimConfig(epochs=10, warmup_epochs=2, init_epochs=3)


def test_collapse_messages() -> None:
    assert largest_share_limit(10) == 0.5 and largest_share_limit(3) == 1.0
    assert collapse_message(0, [100] * 10, where="x") is None
    msg = collapse_message(1, [0, 0, 50, 50, 900, 0, 0, 0, 0, 0], where="the published output")
    assert msg is not None
    assert "head 1 (K=10)" in msg and "7 of its 10 clusters are empty" in msg
    assert "largest cluster holds 90% of the 1000 images" in msg and "adapt.enabled" in msg
    only_big = collapse_message(0, [460, 60, 60, 60, 60, 60, 60, 60, 60, 60], where="x")
    assert only_big is None  # 46 % of the images in one cluster is not over the 50 % limit
    assert len(collapse_messages([[1, 1], [0, 2]], where="x")) == 1


def test_entropy_weight_scales_with_the_collection() -> None:
    exp = apply_overrides(recipe("cifar10-entropy"), ["adapt.fixed=optim.batch_size,optim.epochs,optim.warmup_epochs"])
    assert adapt_to_collection(exp, 50_000).experiment.secu.alpha == 6000.0  # 0.12 x 50,000: the reference
    assert adapt_to_collection(exp, 192).experiment.secu.alpha == pytest.approx(0.12 * 192)
    assert adapt_to_collection(recipe("imagenet1k-entropy"), 1_281_167).changes == []  # 1e5 < 0.12 N
    kept = apply_overrides(exp, ["adapt.fixed=secu.alpha"])
    assert adapt_to_collection(kept, 192).experiment.secu.alpha == 6000.0
    assert adapt_to_collection(recipe("fashion-mnist-cpu"), 192).experiment.secu.alpha == 6000.0  # size constraint
