"""ProPos (``secu.propos``): both losses against plain loops written from the formulas, 2 gloo processes == 1
process for k-means (unequal parts), the k-means label pass (unequal numbers of feature batches) and the
prototype loss (value and DDP gradient), and a short run on easy patterns that learns, keeps several clusters
and resumes to the same assignment."""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from pipelines.dataset.synthetic import pattern_images
from secu.augment import EvalTransform, eval_batch, normalize
from secu.config import AugmentConfig, ExperimentConfig, ModelConfig, OptimConfig, SeCuConfig
from secu.kmeans import kmeans
from secu.local_train import LocalRun, predict, train_in_memory
from secu.method import Batch, EpochContext
from secu.method_configs import ProPosConfig
from secu.methods import build_method
from secu.propos import (
    CENTER_KEY,
    ProPosMethod,
    ProPosNetwork,
    alignment_loss,
    cluster_sums,
    cosine_momentum,
    global_prototype_loss,
    prototype_scattering_loss,
)


@contextmanager
def one_thread() -> Iterator[None]:
    """One intra-op thread: these networks are tiny, and on a loaded 2-core machine two threads spin-wait
    (a run took 15x longer with two)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_exp(epochs: int = 4, width: int = 4, ks: tuple[int, ...] = (3,)) -> ExperimentConfig:
    return ExperimentConfig(
        method="propos",
        model=ModelConfig(backbone="small_cnn", in_channels=1, cnn_width=width, feat_dim=32, hidden_dim=64),
        secu=SeCuConfig(ks=ks),
        optim=OptimConfig(lr=0.1, epochs=epochs, warmup_epochs=2, batch_size=32, mixed_precision=False),
        augment=AugmentConfig(image_size=28, channels=1, mean=(0.5,), std=(0.25,), min_crop=0.5, blur_p=(0.0, 0.0)),
        propos=ProPosConfig(predictor_hidden=64, warmup_epochs=1, kmeans_iters=50),
    )


# --- the losses against plain loops ---------------------------------------------------------------------------

def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return sum((a[d] * b[d] for d in range(len(a))), torch.zeros((), dtype=a.dtype))


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt(dot(v, v))


def reference_psl(online: torch.Tensor, target: torch.Tensor, labels: list[int], k: int, t: float) -> torch.Tensor:
    """L_psl by the formula, one cluster and one sample at a time."""
    protos, tprotos = {}, {}
    for c in range(k):
        members = [i for i, lab in enumerate(labels) if lab == c]
        if members:
            protos[c] = unit(sum((online[i] for i in members), torch.zeros_like(online[0])) / len(members))
            tprotos[c] = unit(sum((target[i] for i in members), torch.zeros_like(target[0])) / len(members))
    terms = []
    for c in protos:
        pos = torch.exp(dot(protos[c], tprotos[c]) / t)
        neg = sum((torch.exp(dot(protos[c], protos[j]) / t) for j in protos if j != c), torch.zeros(()))
        terms.append(-torch.log(pos / (pos + neg)))
    return sum(terms, torch.zeros(())) / len(terms)


def test_alignment_loss_matches_a_loop() -> None:
    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(7, 5, generator=gen), torch.randn(7, 5, generator=gen)
    ref = sum(2 - 2 * dot(pred[i], target[i]) / torch.sqrt(dot(pred[i], pred[i]) * dot(target[i], target[i]))
              for i in range(7)) / 7
    assert math.isclose(float(alignment_loss(pred, target)), float(ref), rel_tol=1e-5)


def test_prototype_loss_matches_a_loop_in_value_and_gradient() -> None:
    gen = torch.Generator().manual_seed(1)
    online = F.normalize(torch.randn(14, 6, generator=gen), dim=1).requires_grad_(True)
    target = F.normalize(torch.randn(14, 6, generator=gen), dim=1)
    labels = [0, 1, 4, -1, 0, 1, 1, 4, -1, 0, 2, 4, 0, 1]  # cluster 3 absent, -1: no label yet
    sums, counts = cluster_sums(online, torch.tensor(labels), 5)
    tsums, _ = cluster_sums(target, torch.tensor(labels), 5)
    ours = prototype_scattering_loss(sums, tsums, counts, 0.5)
    (grad,) = torch.autograd.grad(ours, online)
    ref_online = online.detach().clone().requires_grad_(True)
    ref = reference_psl(ref_online, target, labels, 5, 0.5)
    (ref_grad,) = torch.autograd.grad(ref, ref_online)
    assert math.isclose(float(ours.detach()), float(ref.detach()), rel_tol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)
    assert float(grad[[3, 8]].abs().sum()) == 0.0  # unlabelled rows get no gradient


def test_prototype_loss_without_negatives_is_zero() -> None:
    feats = torch.randn(4, 3, requires_grad=True)
    none = torch.full((4,), -1)
    for labels in (none, torch.zeros(4, dtype=torch.long)):
        loss, _ = global_prototype_loss(feats, feats.detach(), labels, 3, 0.5)
        assert float(loss.detach()) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="secu.ks"):
        cluster_sums(feats, torch.tensor([0, 1, 5, 2]), 3)


def test_momentum_schedule_and_ema_update() -> None:
    assert cosine_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 50, 100) == pytest.approx(0.995)
    assert cosine_momentum(0.99, 100, 100) == pytest.approx(1.0)
    torch.manual_seed(0)
    net = ProPosNetwork(tiny_exp())
    with torch.no_grad():
        for p in net.online.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in net.target.parameters()]
    net.update_target(0.9)
    for b, p_t, p_o in zip(before, net.target.parameters(), net.online.encoder.parameters(), strict=True):
        torch.testing.assert_close(p_t, 0.9 * b + 0.1 * p_o)
        assert not p_t.requires_grad


# --- 2 gloo processes == 1 process -------------------------------------------------------------------------------

SPLIT, FEATURE_BATCHES, RANK0_BATCHES = 70, 5, 3
PSL_K = 4


def points() -> torch.Tensor:
    gen = torch.Generator().manual_seed(4)
    return (2.0 * torch.randn(4, 6, generator=gen, dtype=torch.float64))[torch.arange(120) % 4] + torch.randn(
        120, 6, generator=gen, dtype=torch.float64)


def feature_batches(lo: int, hi: int) -> Iterator[Batch]:
    """Feature batches lo..hi-1 of 12 pattern images each (the evaluation transform)."""
    images, _ = pattern_images(12 * FEATURE_BATCHES, seed=3)
    transform = EvalTransform(tiny_exp().augment)
    for b in range(lo, hi):
        yield {"sample_index": torch.arange(12 * b, 12 * b + 12),
               "image": torch.from_numpy(eval_batch(transform, list(images[12 * b:12 * b + 12])))}


def psl_inputs() -> tuple[nn.Linear, torch.Tensor, torch.Tensor, torch.Tensor]:
    torch.manual_seed(7)
    linear = nn.Linear(6, 8)
    gen = torch.Generator().manual_seed(8)
    x, target = torch.randn(12, 6, generator=gen), F.normalize(torch.randn(12, 8, generator=gen), dim=1)
    labels = torch.tensor([0, 1, -1, 0, 1, 1, 2, 0, -1, 2, 1, 0])  # cluster 2 only in the second half, 3 absent
    return linear, x, target, labels


def run_parts(rank: int, world: int) -> dict[str, Any]:
    """k-means, the label pass and the prototype loss on this rank's part; all of it in one process when world=1."""
    out: dict[str, Any] = {}
    x_ND = points()
    part = x_ND if world == 1 else (x_ND[:SPLIT] if rank == 0 else x_ND[SPLIT:])
    for metric in ("cosine", "euclidean"):
        res = kmeans(part, 4, metric=metric, max_iters=100, tol=1e-12, init_sample=500, seed=3)
        out[metric] = (res.centers_KD, res.labels_N, res.iters, res.inertia)
    exp = tiny_exp(ks=(3, 5))
    method = ProPosMethod(exp, iters_per_epoch=1)
    lo, hi = (0, FEATURE_BATCHES) if world == 1 else ((0, RANK0_BATCHES) if rank == 0 else (RANK0_BATCHES,
                                                                                              FEATURE_BATCHES))
    pairs = method.label_pass(exp.optim.epochs - 1, EpochContext(feature_batches=lambda: feature_batches(lo, hi)))
    out["pass"] = ([p for p in pairs], [method.state_dict()["network"][CENTER_KEY.format(head=h)] for h in (0, 1)],
                   dict(method.kmeans_metrics))
    linear, x, target, labels = psl_inputs()
    rows = slice(0, 12) if world == 1 else slice(6 * rank, 6 * rank + 6)
    model: nn.Module = linear if world == 1 else nn.parallel.DistributedDataParallel(linear)
    feats = F.normalize(model(x[rows]), dim=1)
    feats.retain_grad()
    loss, backward = global_prototype_loss(feats, target[rows], labels[rows], PSL_K, 0.5)
    backward.backward()
    assert linear.weight.grad is not None and linear.bias.grad is not None
    out["psl"] = (loss.detach(), feats.grad, linear.weight.grad.clone(), linear.bias.grad.clone())
    return out


def _worker(rank: int, world: int, port: int, out_path: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(run_parts(rank, world), f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The results of one process and of each of two gloo processes (one spawn for all three tests)."""
    with one_thread():
        single = run_parts(0, 1)
    out = str(tmp_path_factory.mktemp("propos") / "parts")
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    return single, [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]


def test_two_processes_kmeans_with_unequal_parts_equals_one(
        one_and_two: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    single, parts = one_and_two
    for metric in ("cosine", "euclidean"):
        centers, labels, iters, inertia = single[metric]
        assert iters > 1
        for part in parts:
            torch.testing.assert_close(part[metric][0], centers, rtol=0, atol=1e-12)  # identical on every rank
            assert part[metric][2] == iters and math.isclose(part[metric][3], inertia, rel_tol=1e-12), metric
        assert torch.equal(torch.cat([parts[0][metric][1], parts[1][metric][1]]), labels), metric


def test_two_processes_label_pass_equals_one(one_and_two: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    single, parts = one_and_two
    pairs, centers, metrics = single["pass"]
    ids = np.concatenate([i for i, _ in pairs])
    labels_HN = np.concatenate([lab for _, lab in pairs], axis=1)
    assert np.array_equal(ids, np.arange(12 * FEATURE_BATCHES)) and labels_HN.shape == (2, 12 * FEATURE_BATCHES)
    assert len(set(labels_HN[1].tolist())) > 1
    assert [len(parts[r]["pass"][0]) for r in range(2)] == [RANK0_BATCHES, FEATURE_BATCHES - RANK0_BATCHES]
    two_ids = np.concatenate([i for r in range(2) for i, _ in parts[r]["pass"][0]])
    two_labels = np.concatenate([lab for r in range(2) for _, lab in parts[r]["pass"][0]], axis=1)
    assert np.array_equal(two_ids, ids) and np.array_equal(two_labels, labels_HN)
    for part in parts:
        for a, b in zip(part["pass"][1], centers, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        assert part["pass"][2] == pytest.approx(metrics)


def test_two_processes_prototype_loss_and_ddp_gradient_equal_one(
        one_and_two: tuple[dict[str, Any], list[dict[str, Any]]]) -> None:
    single, parts = one_and_two
    loss, feat_grad, w_grad, b_grad = single["psl"]
    for rank, part in enumerate(parts):
        assert float(part["psl"][0]) == pytest.approx(float(loss), rel=1e-6)
        # The feature gradient of the back-propagated term is R times the 1-process one: DDP divides by R.
        torch.testing.assert_close(part["psl"][1] / 2, feat_grad[6 * rank:6 * rank + 6], rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(part["psl"][2], w_grad, rtol=1e-5, atol=1e-7)  # after DDP's averaging
        torch.testing.assert_close(part["psl"][3], b_grad, rtol=1e-5, atol=1e-7)


# --- the method: a short run, resume, errors ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained() -> tuple[ExperimentConfig, LocalRun, np.ndarray, np.ndarray]:
    exp = tiny_exp()
    images, classes = pattern_images(192, seed=0)
    with one_thread():
        return exp, train_in_memory(images, exp), images, classes


def test_short_run_lowers_the_objective_and_keeps_several_clusters(
        trained: tuple[ExperimentConfig, LocalRun, np.ndarray, np.ndarray]) -> None:
    exp, run, images, classes = trained
    first, last = run.history[0], run.history[-1]
    assert first["train/loss_psl"] == 0.0  # no k-means labels before the first pass
    assert last["train/loss"] < first["train/loss"]
    assert last["train/loss_psl"] < run.history[1]["train/loss_psl"]  # the first epoch with labels
    assert last["train/steps"] == 192 // 32 and last["propos/kmeans_iters"] >= 1
    assert 0.0 < last["propos/kmeans_inertia"] <= 1.0
    labels, conf = predict(run.method, images, exp)
    assert labels.shape == (1, 192) and len(np.unique(labels[0])) > 1
    assert ((conf > 0) & (conf <= 1)).all()


def test_resume_gives_the_same_assignment(trained: tuple[ExperimentConfig, LocalRun, np.ndarray, np.ndarray]) -> None:
    exp, run, images, _ = trained
    x = normalize(torch.from_numpy(eval_batch(EvalTransform(exp.augment), list(images[:40]))),
                  exp.augment.mean, exp.augment.std)
    want = run.method.eval().assign(x)
    state = run.method.state_dict()
    assert set(state) == {"network", "optimizer", "cluster_state", "global_step"} and state["cluster_state"] is None
    assert state["network"][run.method.center_key(0) or ""].shape == (32, 3)
    for saved in (state, {k: v for k, v in state.items() if k != "optimizer"}):  # resume and warm start
        fresh = build_method(exp, 192 // 32)
        fresh.load_state_dict(saved)
        got = fresh.eval().assign(x)
        assert torch.equal(got.clusters_HB, want.clusters_HB)
        torch.testing.assert_close(got.confidence_HB, want.confidence_HB)
        assert got.embedding_BD is not None and want.embedding_BD is not None
        torch.testing.assert_close(got.embedding_BD, want.embedding_BD)


def test_errors_and_the_skipped_pass() -> None:
    exp = tiny_exp()
    method = ProPosMethod(exp, iters_per_epoch=1)
    with pytest.raises(RuntimeError, match="no k-means centers"):
        method.eval().assign(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match="feature_batches"):
        method.label_pass(exp.optim.epochs - 1, EpochContext())
    exp2 = tiny_exp()
    exp2.propos.reassign = 2
    assert list(ProPosMethod(exp2, 1).label_pass(0, EpochContext())) == []  # no pass after epoch 0 of 4
    assert method.cluster_axes(0) == {CENTER_KEY.format(head=0): 1}
    method.sums = [float("nan"), 0.0, 0.0]
    with pytest.raises(FloatingPointError, match="optim.lr"):
        method.after_epoch()


@pytest.mark.parametrize("optimizer", ["sgd", "lars"])
def test_a_step_sets_both_learning_rates_and_moves_the_target(optimizer: str) -> None:
    exp = tiny_exp()
    exp.optim.optimizer = optimizer
    method = ProPosMethod(exp, iters_per_epoch=4)
    method.before_epoch(0, EpochContext())
    target_before = [p.clone() for p in method.base.target.parameters()]
    gen = torch.Generator().manual_seed(0)
    views = {v: torch.randint(0, 256, (8, 1, 28, 28), generator=gen, dtype=torch.uint8) for v in ("view1", "view2")}
    with one_thread():
        out = method.train_step({"sample_index": torch.arange(8), **views}, torch.full((1, 8), -1))
    assert out.labels_HB is None
    lr = float(method.lrs[0])
    assert [g["lr"] for g in method.optimizer.param_groups] == [lr, lr * exp.propos.predictor_lr_mult]
    assert any(not torch.equal(a, b) for a, b in zip(target_before, method.base.target.parameters(), strict=True))
    assert math.isfinite(method.sums[1]) and method.sums[2] == 0.0  # no labels yet: L_psl = 0
