"""Configs: validation, recipes equal the reference table, overrides and round trips."""

import pytest

from secu.config import ExperimentConfig
from secu.overrides import apply_overrides
from secu.recipes import RECIPE_NAMES, recipe


def test_reference_table_cifar10() -> None:
    cfg = recipe("cifar10")
    assert cfg.model.backbone == "resnet18_cifar"
    assert cfg.optim.epochs == 401 and cfg.optim.batch_size == 128
    assert (cfg.optim.optimizer, cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.clr) == ("sgd", 0.2, 1e-4, 1.2)
    assert cfg.secu.ks == tuple(range(10, 101, 10))
    assert (cfg.secu.tx, cfg.secu.tw, cfg.secu.tau, cfg.secu.dual_lr, cfg.secu.lratio) == (0.05, 0.05, 0.2, 0.1, 0.9)
    assert cfg.augment.min_crop == 0.3
    assert recipe("cifar10-entropy").secu.constraint == "entropy"
    assert recipe("cifar10-entropy").secu.alpha == 6000


def test_reference_table_others() -> None:
    c100 = recipe("cifar100-20")
    assert c100.secu.ks == tuple(range(20, 201, 20)) and c100.optim.clr == 0.8 and c100.optim.epochs == 801
    assert c100.augment.min_crop == 0.2
    stl = recipe("stl10")
    assert stl.model.backbone == "resnet18_stl" and stl.secu.tw == 1.0 and stl.augment.image_size == 96
    inet = recipe("imagenet1k")
    assert inet.model.backbone == "resnet50" and inet.model.predictor and inet.model.mlp == "imagenet"
    assert (inet.optim.optimizer, inet.optim.lr, inet.optim.weight_decay, inet.optim.clr) == ("lars", 1.6, 1e-6, 4.2)
    assert inet.optim.batch_size == 1024 and inet.optim.epochs == 1001
    assert inet.secu.ks == tuple(range(1000, 10001, 1000))
    assert (inet.secu.dual_lr, inet.secu.lratio) == (20.0, 0.4)
    assert inet.augment.image_size == 224 and inet.augment.min_crop == 0.08
    inet_e = recipe("imagenet1k-entropy")
    assert inet_e.secu.alpha == 1e5 and inet_e.optim.center_lr_schedule == "cosine_rise"


@pytest.mark.parametrize("name", RECIPE_NAMES)
def test_every_recipe_round_trips(name: str) -> None:
    cfg = recipe(name)
    assert ExperimentConfig.from_dict(cfg.to_dict()) == cfg


def test_overrides_are_typed_and_validated() -> None:
    cfg = apply_overrides(recipe("fashion-mnist-cpu"), ["optim.lr=0.05", "secu.ks=[10,20]", "model.sync_bn=false"])
    assert cfg.optim.lr == 0.05 and cfg.secu.ks == (10, 20) and cfg.model.sync_bn is False
    with pytest.raises(ValueError, match="unknown config key 'optim.lrr'"):
        apply_overrides(cfg, ["optim.lrr=1"])
    with pytest.raises(ValueError, match="secu.constraint"):
        apply_overrides(cfg, ["secu.constraint=balanced"])
    with pytest.raises(ValueError, match="cannot use 'abc'"):
        apply_overrides(cfg, ["optim.epochs=abc"])
    with pytest.raises(ValueError, match="key.sub=value"):
        apply_overrides(cfg, ["optim.lr"])
    with pytest.raises(ValueError, match="model.sync_bn_cpu=true needs model.sync_bn=true"):
        apply_overrides(cfg, ["model.sync_bn_cpu=true"])  # cfg has sync_bn=false


def test_bad_values_fail_with_the_field_named() -> None:
    with pytest.raises(ValueError, match="secu.ks"):
        ExperimentConfig.from_dict({"secu": {"ks": [1]}})
    with pytest.raises(ValueError, match="augment.channels"):
        ExperimentConfig.from_dict({"model": {"in_channels": 1}})
    with pytest.raises(ValueError, match="unknown recipe"):
        recipe("cifar11")


def test_overrides_that_must_change_together_are_validated_once() -> None:
    from secu.recipes import recipe

    cfg = apply_overrides(recipe("fashion-mnist-cpu"), ["model.in_channels=3", "augment.channels=3",
                                                        "augment.mean=[0.5,0.5,0.5]", "augment.std=[0.2,0.2,0.2]"])
    assert (cfg.model.in_channels, cfg.augment.channels) == (3, 3)
    assert apply_overrides(cfg, ["optim.lr=0.1", "optim.lr=0.3"]).optim.lr == 0.3  # the last value wins
    with pytest.raises(ValueError, match="differs from augment.channels"):
        apply_overrides(recipe("fashion-mnist-cpu"), ["model.in_channels=3"])
