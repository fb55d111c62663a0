"""PFCA (``secu.pfca``, ``secu.pfca_networks``): the three losses against references written from the formulas,
the update schedule and beta, 2 gloo processes against one process stepping with the averaged gradients, and a
short in-memory run that lowers the classifier's loss without collapsing, with a state-dict round trip."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipelines.dataset.synthetic import pattern_images
from secu import pfca
from secu.augment import normalize
from secu.config import ExperimentConfig
from secu.local_train import predict, train_in_memory
from secu.method import EpochContext
from secu.method_configs import PFCAConfig
from secu.methods import build_method
from secu.overrides import apply_overrides
from secu.pfca import (
    CLASSIFIER,
    CRITIC,
    GENERATOR,
    PFCAMethod,
    beta_schedule,
    classifier_loss,
    critic_loss,
    draw,
    generator_loss,
    gradient_penalty,
)
from secu.pfca_networks import CLUSTER_AXES, PFCANetworks

BASE = ["method=pfca", "secu.ks=[3]", "model.backbone=small_cnn", "model.cnn_width=8", "model.in_channels=1",
        "augment.channels=1", "augment.mean=[0.5]", "augment.std=[0.25]", "augment.image_size=28",
        "optim.mixed_precision=false", "optim.warmup_epochs=1", "pfca.width=8", "pfca.z_dim=16"]


def experiment(*overrides: str) -> ExperimentConfig:
    """The tiny Fashion-MNIST-like PFCA experiment of these tests, with ``overrides`` on top."""
    return apply_overrides(ExperimentConfig(), [*BASE, *overrides])


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread: the small networks run several times faster so on a shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def uint8_batch(n: int, seed: int = 0) -> dict[str, torch.Tensor]:
    images, _ = pattern_images(n, seed)
    return {"sample_index": torch.arange(n), "image": torch.from_numpy(images[:, None].copy())}


class TinyCritic(nn.Module):
    """A smooth (tanh) critic on 1 x 4 x 4 inputs, so the gradient penalty depends on its parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(1)


def reference_penalty(critic: nn.Module, real: torch.Tensor, fake: torch.Tensor, eps: torch.Tensor,
                      h: float = 1e-6) -> float:
    """(||grad D(x^_i)|| - 1)^2 averaged over samples, the gradient by central differences, one sample at a time."""
    total = 0.0
    with torch.no_grad():
        for i in range(real.shape[0]):
            x_hat = (eps[i] * real[i] + (1 - eps[i]) * fake[i]).flatten()
            grad = []
            for j in range(x_hat.numel()):
                step = torch.zeros_like(x_hat)
                step[j] = h
                up = float(critic((x_hat + step).view(1, 1, 4, 4))[0])
                down = float(critic((x_hat - step).view(1, 1, 4, 4))[0])
                grad.append((up - down) / (2 * h))
            total += (math.sqrt(sum(g * g for g in grad)) - 1) ** 2
    return total / real.shape[0]


def reference_ce(logits: torch.Tensor, c: torch.Tensor) -> float:
    """Mean of -log softmax(logits_i)[c_i], written out."""
    rows = logits.tolist()
    terms = [math.log(sum(math.exp(v) for v in row)) - row[int(k)] for row, k in zip(rows, c, strict=True)]
    return sum(terms) / len(rows)


def test_critic_loss_and_gradient_penalty_match_the_formula() -> None:
    torch.manual_seed(0)
    critic = TinyCritic().double()
    real, fake = torch.randn(5, 1, 4, 4, dtype=torch.float64), torch.randn(5, 1, 4, 4, dtype=torch.float64)
    eps = torch.rand(5, dtype=torch.float64)
    terms = critic_loss(critic, real, fake, eps, gp_weight=10.0)
    gp = reference_penalty(critic, real, fake, eps)
    with torch.no_grad():
        d_real = sum(float(critic(real[i:i + 1])[0]) for i in range(5)) / 5
        d_fake = sum(float(critic(fake[i:i + 1])[0]) for i in range(5)) / 5
    assert float(terms.gp.detach()) == pytest.approx(gp, rel=1e-6)
    assert float(terms.wasserstein) == pytest.approx(d_real - d_fake, rel=1e-9)
    assert float(terms.loss.detach()) == pytest.approx(d_fake - d_real + 10.0 * gp, rel=1e-6)


def test_gradient_penalty_gradient_reaches_the_critic_parameters() -> None:
    """The double backward: d gp / d theta by autograd equals the finite difference of gp in theta."""
    torch.manual_seed(1)
    critic = TinyCritic().double()
    real, fake = torch.randn(4, 1, 4, 4, dtype=torch.float64), torch.randn(4, 1, 4, 4, dtype=torch.float64)
    eps = torch.rand(4, dtype=torch.float64)
    weight = critic.net[1].weight
    (grad,) = torch.autograd.grad(gradient_penalty(critic, real, fake, eps), weight)
    h = 1e-6
    for index in [(0, 0), (3, 7), (7, 15)]:
        with torch.no_grad():
            weight[index] += h
        up = float(gradient_penalty(critic, real, fake, eps).detach())
        with torch.no_grad():
            weight[index] -= 2 * h
        down = float(gradient_penalty(critic, real, fake, eps).detach())
        with torch.no_grad():
            weight[index] += h
        assert float(grad[index]) == pytest.approx((up - down) / (2 * h), rel=1e-5, abs=1e-8)
    assert float(grad.abs().sum()) > 0


def test_generator_and_classifier_losses_match_the_formula() -> None:
    torch.manual_seed(2)
    scores, logits, c = torch.randn(6, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64), torch.tensor(
        [0, 2, 1, 1, 0, 2])
    ce = reference_ce(logits, c)
    loss, ce_term = generator_loss(scores, logits, c, beta=2.5)
    assert float(ce_term) == pytest.approx(ce, rel=1e-12)
    assert float(loss) == pytest.approx(-float(scores.mean()) + 2.5 * ce, rel=1e-12)
    assert float(classifier_loss(logits, c)) == pytest.approx(ce, rel=1e-12)


def test_beta_schedule_grows_every_beta_every_steps_and_stops_at_the_cap() -> None:
    cfg = PFCAConfig(beta=1.0, beta_growth=1.2, beta_every=1000, beta_max=100.0)
    assert beta_schedule(999, cfg) == 1.0
    assert beta_schedule(1000, cfg) == pytest.approx(1.2)
    assert beta_schedule(2500, cfg) == pytest.approx(1.44)
    assert beta_schedule(10**9, cfg) == 100.0  # no overflow far past the cap
    assert beta_schedule(10**9, PFCAConfig(beta=0.0)) == 0.0


def test_schedule_counts_updates_and_grows_beta_at_the_right_generator_step(monkeypatch: Any) -> None:
    exp = experiment("pfca.critic_iters=2", "pfca.classifier_iters=3", "pfca.beta=1", "pfca.beta_growth=2",
                     "pfca.beta_every=2", "pfca.beta_max=4", "optim.batch_size=8")
    method = PFCAMethod(exp, iters_per_epoch=13)
    used: list[tuple[int, float]] = []

    def recording(scores: torch.Tensor, logits: torch.Tensor, c: torch.Tensor, beta: float) -> Any:
        used.append((method.global_step, beta))
        return generator_loss(scores, logits, c, beta)

    monkeypatch.setattr(pfca, "generator_loss", recording)
    batch = uint8_batch(8)
    method.before_epoch(0, EpochContext())
    for _ in range(13):
        out = method.train_step(batch, torch.full((1, 8), -1))
    assert out.labels_HB is not None and out.labels_HB.dtype == torch.int64 and out.labels_HB.shape == (1, 8)
    # Steps t = 1, 3, ..., 11 (0-based) update G; beta doubles every 2 generator steps, capped at 4.
    assert used == [(1, 1.0), (3, 1.0), (5, 2.0), (7, 2.0), (9, 4.0), (11, 4.0)]
    adam_steps = {name: int(opt.state[method.params[name][0]]["step"]) for name, opt in method.optimizers.items()}
    assert adam_steps == {"critic": 13, "generator": 6, "classifier": 18}
    metrics = method.after_epoch().metrics
    assert metrics["train/steps"] == 13 and metrics["train/beta"] == 4.0
    expected = {"train/loss", "train/loss_critic", "train/loss_gp", "train/loss_classifier", "train/wasserstein",
                "train/beta", "train/steps", "clusters/h0/largest_batch_share"}
    assert set(metrics) == expected and all(math.isfinite(v) for v in metrics.values())


def test_non_finite_loss_raises_naming_the_fix() -> None:
    method = PFCAMethod(experiment("optim.batch_size=8"), iters_per_epoch=1)
    with torch.no_grad():
        for p in method.nets.critic.parameters():
            p.fill_(float("nan"))
    method.before_epoch(0, EpochContext())
    method.train_step(uint8_batch(8), torch.full((1, 8), -1))
    with pytest.raises(FloatingPointError, match="pfca.lr"):
        method.after_epoch()


@pytest.mark.parametrize(("side", "channels"), [(8, 1), (9, 3), (28, 1), (32, 3), (96, 3)])
def test_networks_fit_any_image_side(side: int, channels: int) -> None:
    mean, std = [0.5] * channels, [0.25] * channels
    exp = experiment(f"augment.image_size={side}", f"augment.channels={channels}", f"model.in_channels={channels}",
                     f"augment.mean={mean}", f"augment.std={std}")
    nets = PFCANetworks(exp)
    with torch.no_grad():
        fake = nets.generator(torch.randn(4, 16), torch.tensor([0, 1, 2, 0]))
    assert fake.shape == (4, channels, side, side)
    assert float(fake.min()) >= -2.0 and float(fake.max()) <= 2.0  # (p - 0.5) / 0.25 with p in [0, 1]
    assert nets.critic(fake).shape == (4,) and nets.classifier(fake).shape == (4, 3)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in nets.critic.modules())
    state = nets.state_dict()
    assert all(state[key].shape[axis] == 3 for key, axis in CLUSTER_AXES.items())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _parameters(method: PFCAMethod) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in method.nets.named_parameters()}


def _worker(rank: int, world: int, port: int, exp: ExperimentConfig, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        method = PFCAMethod(exp, iters_per_epoch=1)
        batch = uint8_batch(exp.optim.batch_size)
        half = exp.optim.batch_size // world
        part = {k: v[rank * half:(rank + 1) * half] for k, v in batch.items()}
        method.before_epoch(0, EpochContext())
        method.train_step(part, torch.full((1, half), -1))
        buffers = {k: v.clone() for k, v in method.nets.named_buffers()}
        torch.save({"params": _parameters(method), "buffers": buffers, "metrics": method.after_epoch().metrics},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _averaged_reference(exp: ExperimentConfig) -> dict[str, torch.Tensor]:
    """One process: each update's gradient computed on both halves with each rank's draws, averaged, stepped."""
    method = PFCAMethod(exp, iters_per_epoch=1)
    nets, cfg, half = method.nets, exp.pfca, exp.optim.batch_size // 2
    real = normalize(uint8_batch(exp.optim.batch_size)["image"], exp.augment.mean, exp.augment.std)
    nets.train()

    def draws(rank: int, purpose: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return draw(exp.seed, rank, 0, purpose, half, 3, cfg.z_dim, torch.device("cpu"))

    def critic(rank: int) -> torch.Tensor:
        z, c, eps = draws(rank, CRITIC)
        with torch.no_grad():
            fake = nets.generator(z, c)
        return critic_loss(nets.critic, real[rank * half:(rank + 1) * half], fake, eps, cfg.gp_weight).loss

    def generator(rank: int) -> torch.Tensor:
        z, c, _ = draws(rank, GENERATOR)
        fake = nets.generator(z, c)
        return generator_loss(nets.critic(fake), nets.classifier(fake), c, cfg.beta)[0]

    def classifier(purpose: int) -> Any:
        def loss(rank: int) -> torch.Tensor:
            z, c, _ = draws(rank, purpose)
            with torch.no_grad():
                fake = nets.generator(z, c)
            return classifier_loss(nets.classifier(fake), c)
        return loss

    steps = [("critic", critic), ("generator", generator)]
    steps += [("classifier", classifier(CLASSIFIER + i)) for i in range(cfg.classifier_iters)]
    for name, loss_of in steps:
        params = method.params[name]
        per_rank = [torch.autograd.grad(loss_of(rank), params) for rank in (0, 1)]
        for p, g0, g1 in zip(params, *per_rank, strict=True):
            p.grad = (g0 + g1) / 2
        method.optimizers[name].step()
        method.optimizers[name].zero_grad(set_to_none=True)
    return _parameters(method)


def test_two_gloo_processes_equal_one_process_with_averaged_gradients(tmp_path: Path) -> None:
    exp = experiment("pfca.critic_iters=1", "pfca.classifier_iters=2", "pfca.lr=1e-3", "optim.batch_size=16")
    mp.spawn(_worker, args=(2, _free_port(), exp, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    for kind in ("params", "buffers"):
        for key, value in ranks[0][kind].items():
            assert torch.equal(value, ranks[1][kind][key]), (kind, key)
    assert ranks[0]["metrics"] == ranks[1]["metrics"]
    reference = _averaged_reference(exp)
    initial = _parameters(PFCAMethod(exp, iters_per_epoch=1))
    for key, value in reference.items():
        assert torch.allclose(ranks[0]["params"][key], value, atol=1e-6, rtol=1e-5), key
    assert all(not torch.equal(initial[k], reference[k]) for k in ("critic.out.weight", "generator.noise.weight",
                                                                   "classifier.head.weight"))
    # The ranks drew different noise.
    assert not torch.equal(draw(0, 0, 0, CRITIC, 4, 3, 16, torch.device("cpu"))[0],
                           draw(0, 1, 0, CRITIC, 4, 3, 16, torch.device("cpu"))[0])


def test_short_run_lowers_classifier_loss_without_collapse_and_resumes() -> None:
    exp = experiment("pfca.critic_iters=1", "pfca.lr=1e-3", "optim.batch_size=32", "optim.epochs=6")
    images, _ = pattern_images(320, seed=0)
    run = train_in_memory(images, exp)
    first, last = run.history[0], run.history[-1]
    assert last["train/loss_classifier"] < 0.85 * first["train/loss_classifier"], [
        h["train/loss_classifier"] for h in run.history]
    assert all(math.isfinite(h["train/loss"]) for h in run.history)
    labels, confidence = predict(run.method, images, exp)
    assert len(np.unique(labels[0])) > 1, np.bincount(labels[0], minlength=3)
    assert labels.shape == (1, 320) and float(confidence.min()) >= 1 / 3 - 1e-6

    state = run.method.state_dict()
    assert set(state) == {"network", "optimizer", "cluster_state", "global_step"}
    assert state["cluster_state"] is None and state["global_step"] == 6 * 10
    assert set(state["optimizer"]) == {"generator", "critic", "classifier"}
    assert all(v.device.type == "cpu" for v in state["network"].values())
    fresh = build_method(exp, 10)
    fresh.load_state_dict(state)
    x = normalize(uint8_batch(64, seed=3)["image"], exp.augment.mean, exp.augment.std)
    a, b = run.method.eval().assign(x), fresh.eval().assign(x)
    assert torch.equal(a.clusters_HB, b.clusters_HB)
    for name in ("confidence_HB", "similarity_HB", "embedding_BD"):
        assert torch.allclose(getattr(a, name), getattr(b, name), atol=1e-6), name
    assert a.embedding_BD is not None and torch.allclose(a.embedding_BD.norm(dim=1), torch.ones(64), atol=1e-5)
    # The next step is the same too (optimizers and global step restored: same draws, same Adam state).
    batch = uint8_batch(32, seed=4)
    for method in (run.method, fresh):
        method.before_epoch(6, EpochContext())
        method.train_step(batch, torch.full((1, 32), -1))
    assert isinstance(fresh, PFCAMethod)
    assert all(torch.equal(v, _parameters(fresh)[k]) for k, v in _parameters(run.method).items())
    warm = build_method(exp, 10)
    warm.load_state_dict({"network": state["network"], "cluster_state": None})
    assert torch.equal(warm.eval().assign(x).clusters_HB, a.clusters_HB)
