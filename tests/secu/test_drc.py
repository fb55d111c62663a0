"""DRC (``secu.drc``): each loss term against a plain-loop reference, 2 gloo processes == 1 process on the
concatenated batch (loss, AF gradients, DDP parameter gradients, whole method steps), a short training run
on synthetic patterns, and the state-dict round trip."""

from __future__ import annotations

import dataclasses
import math
import os
import socket
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipelines.dataset.synthetic import pattern_images
from secu.config import ExperimentConfig
from secu.drc import (
    DRCMethod,
    DRCNetwork,
    backward_scale,
    cluster_contrast,
    drc_objective,
    gathered_objective,
    sample_contrast,
    size_penalty,
)
from secu.local_train import predict, train_in_memory
from secu.method import EpochContext
from secu.method_configs import DRCConfig
from secu.overrides import apply_overrides

KS, G, S = (3, 5), 8, 8
CFG = DRCConfig(t_sample=0.5, t_cluster=0.7, lambda_size=0.3)


# --------------------------------------------------------------------------------------------------
# 1. The loss terms against plain loops written from the formulas
# --------------------------------------------------------------------------------------------------


def _cos(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def ref_info_nce(rows1: list[list[float]], rows2: list[list[float]], t: float) -> float:
    """Mean over both directions and every row i of -log(exp(cos(a_i, b_i)/t) / sum_j exp(cos(a_i, b_j)/t))."""
    total = 0.0
    for a, b in ((rows1, rows2), (rows2, rows1)):
        for i in range(len(a)):
            den = sum(math.exp(_cos(a[i], b[j]) / t) for j in range(len(b)))
            total += -math.log(math.exp(_cos(a[i], b[i]) / t) / den) / len(a)
    return total / 2


def ref_size(p: list[list[float]]) -> float:
    n, k = len(p), len(p[0])
    return sum(sum(p[i][c] for i in range(n)) ** 2 for c in range(k)) / n


def _columns(p: list[list[float]]) -> list[list[float]]:
    return [[row[c] for row in p] for c in range(len(p[0]))]


def _random_af(seed: int, k: int, n: int = G) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, k, generator=gen), 2 * torch.randn(n, k, generator=gen)


def test_each_term_matches_a_plain_loop_reference() -> None:
    af1, af2 = _random_af(0, 5, n=7)
    p1, p2 = torch.softmax(af1, 1), torch.softmax(af2, 1)
    assert float(sample_contrast(af1, af2, 0.3)) == pytest.approx(ref_info_nce(af1.tolist(), af2.tolist(), 0.3),
                                                                   rel=1e-5)
    assert float(cluster_contrast(p1, p2, 0.7)) == pytest.approx(
        ref_info_nce(_columns(p1.tolist()), _columns(p2.tolist()), 0.7), rel=1e-5)
    assert float(size_penalty(p1)) == pytest.approx(ref_size(p1.tolist()), rel=1e-5)
    # The size penalty spans G / K (equal sizes) to G (one cluster).
    assert float(size_penalty(torch.full((6, 3), 1 / 3))) == pytest.approx(2.0)
    assert float(size_penalty(torch.eye(3)[[0] * 6])) == pytest.approx(6.0)


def test_objective_is_the_head_mean_of_the_weighted_terms() -> None:
    heads = [_random_af(1 + h, k) for h, k in enumerate(KS)]
    terms = drc_objective([a for a, _ in heads], [b for _, b in heads], CFG)
    want, shares = 0.0, []
    for af1, af2 in heads:
        p1, p2 = torch.softmax(af1, 1).tolist(), torch.softmax(af2, 1).tolist()
        want += (ref_info_nce(af1.tolist(), af2.tolist(), CFG.t_sample)
                 + ref_info_nce(_columns(p1), _columns(p2), CFG.t_cluster)
                 + CFG.lambda_size * (ref_size(p1) + ref_size(p2)) / 2)
        shares.append(float(torch.bincount(af1.argmax(1)).max()) / G)
    assert float(terms.loss) == pytest.approx(want / len(KS), rel=1e-5)
    assert terms.largest_share_H == shares


# --------------------------------------------------------------------------------------------------
# 2. Two gloo processes == one process on the concatenated batch
# --------------------------------------------------------------------------------------------------


def tiny_exp() -> ExperimentConfig:
    return apply_overrides(ExperimentConfig(), [
        "method=drc", "model.backbone=small_cnn", "model.in_channels=1", "augment.channels=1", "augment.mean=[0.5]",
        "augment.std=[0.25]", f"augment.image_size={S}", "optim.mixed_precision=false", "optim.epochs=2",
        "optim.warmup_epochs=1", "optim.lr=0.5", "secu.ks=[3,5]", "drc.t_sample=0.5", "drc.t_cluster=0.7",
        "drc.lambda_size=0.3"])


def tiny_network() -> DRCNetwork:
    """No BatchNorm: per-rank statistics would make 2 ranks differ from 1 by construction."""
    torch.manual_seed(0)
    return DRCNetwork(nn.Sequential(nn.Flatten(), nn.Linear(S * S, 6), nn.Tanh()), 6, KS)


def _views(step: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(10 + step)
    return {"view1": torch.randint(0, 256, (G, 1, S, S), generator=gen, dtype=torch.uint8),
            "view2": torch.randint(0, 256, (G, 1, S, S), generator=gen, dtype=torch.uint8),
            "sample_index": torch.arange(G)}


def _gather_rows(t: torch.Tensor, world: int) -> torch.Tensor:
    if world == 1:
        return t
    parts = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _grad(t: torch.Tensor) -> torch.Tensor:
    assert t.grad is not None
    return t.grad


def run_ranks(rank: int, world: int) -> dict[str, Any]:
    """On this rank's half of the global batch: the loss and AF gradients, the DDP parameter gradients with
    and without the backward scale, and two whole method steps; everything gathered to compare."""
    part = slice(rank * G // world, (rank + 1) * G // world)
    out: dict[str, Any] = {}
    leaves = [_random_af(20 + h, k) for h, k in enumerate(KS)]
    af1 = [a[part].clone().requires_grad_() for a, _ in leaves]
    af2 = [b[part].clone().requires_grad_() for _, b in leaves]
    terms = gathered_objective(af1, af2, CFG)
    terms.loss.backward()  # the plain local gradient of L (no scale): what this rank's rows receive
    out["loss"] = float(terms.loss.detach())
    out["af_grads"] = [_gather_rows(_grad(t), world) for t in af1 + af2]
    for scaled in (True, False):
        net = DistributedDataParallel(tiny_network()) if world > 1 else tiny_network()
        batch = _views(0)
        x1, x2 = (batch[v][part].float() / 255 for v in ("view1", "view2"))
        af1_HBK, af2_HBK = net(x1, x2)
        obj = gathered_objective(af1_HBK, af2_HBK, CFG)
        (obj.loss * (backward_scale() if scaled else 1)).backward()
        out[f"param_grads_scaled={scaled}"] = [_grad(p).clone() for p in net.parameters()]
    method = DRCMethod(tiny_exp(), iters_per_epoch=2, network=tiny_network())
    if world > 1:
        method.wrap_networks(DistributedDataParallel)
    method.before_epoch(0, EpochContext())
    labels = []
    for step in range(2):
        batch = {k: v[part] for k, v in _views(step).items()}
        step_labels = method.train_step(batch, torch.full((2, G // world), -1)).labels_HB
        assert step_labels is not None
        labels.append(_gather_rows(step_labels.T, world).T)
    out["labels"] = labels
    out["metrics"] = method.after_epoch().metrics
    out["params"] = {k: v.clone() for k, v in method.state_dict()["network"].items()}
    return out


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.save(run_ranks(rank, world), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _close(a: list[torch.Tensor], b: list[torch.Tensor], scale: float = 1.0, atol: float = 1e-6) -> bool:
    return all(torch.allclose(x, y * scale, atol=atol, rtol=1e-5) for x, y in zip(a, b, strict=True))


def test_two_gloo_processes_equal_one_process(tmp_path: Any) -> None:
    single = run_ranks(0, 1)
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for double in ranks:
        assert double["loss"] == pytest.approx(single["loss"], rel=1e-6)
        # Each rank's rows get the one-process gradient of the global loss (the gather keeps the local part).
        assert _close(double["af_grads"], single["af_grads"])
        # DDP averages the ranks' partial gradients: the loss times W gives the one-process gradient ...
        assert _close(double["param_grads_scaled=True"], single["param_grads_scaled=True"])
        # ... and without the factor it would be 1 / W of it.
        assert _close(double["param_grads_scaled=False"], single["param_grads_scaled=True"], scale=0.5)
        assert not _close(double["param_grads_scaled=False"], single["param_grads_scaled=True"])
        # Whole method steps (normalisation, the scale, SGD with momentum and weight decay) agree as well.
        # (float32 sums in another order over two steps at lr 0.5: a looser absolute tolerance)
        assert _close(list(double["params"].values()), list(single["params"].values()), atol=1e-5)
        assert all(torch.equal(a, b) for a, b in zip(double["labels"], single["labels"], strict=True))
        for key, value in single["metrics"].items():
            assert double["metrics"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key
    # The steps moved the network (the comparison is not between two untouched copies).
    start = tiny_network().state_dict()
    assert any(not torch.allclose(start[k], v) for k, v in single["params"].items())


# --------------------------------------------------------------------------------------------------
# 3. Training on synthetic patterns, the method's outputs, resume
# --------------------------------------------------------------------------------------------------


def pattern_exp() -> ExperimentConfig:
    base = ExperimentConfig(method="drc")
    exp = apply_overrides(base, [
        "model.backbone=small_cnn", "model.in_channels=1", "model.cnn_width=8", "augment.channels=1",
        "augment.mean=[0.5]", "augment.std=[0.25]", "augment.image_size=28", "optim.mixed_precision=false",
        "optim.epochs=5", "optim.warmup_epochs=1", "optim.batch_size=64", "optim.lr=0.1", "secu.ks=[3]"])
    # The recommended setting (secu.drc's docstring). With drc's defaults of the time (1, 1, 1) this run
    # collapses to one cluster and its objective rises: the size term, G times the squared soft sizes,
    # outweighs the contrast terms.
    return dataclasses.replace(exp, drc=DRCConfig(t_sample=0.5, t_cluster=1.0, lambda_size=0.1))


@pytest.fixture
def one_thread() -> Any:
    """One intra-op thread: two would oversubscribe the 2-core test machine when anything else runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_training_on_patterns_lowers_the_objective_and_resumes(one_thread: Any) -> None:
    images, _ = pattern_images(384, seed=0)
    exp = pattern_exp()
    run = train_in_memory(images, exp)
    first, last = run.history[0], run.history[-1]
    assert last["train/loss"] < first["train/loss"]
    expected = {"train/loss", "train/loss_sample", "train/loss_cluster", "train/loss_size", "train/lr",
                "train/steps", "clusters/h0/largest_batch_share"}
    assert expected <= set(last)
    assert last["train/steps"] == 384 // 64
    labels, conf = predict(run.method, images, exp)
    assert len(np.unique(labels[0])) > 1, np.bincount(labels[0])
    assert ((conf >= 1 / 3 - 1e-6) & (conf <= 1)).all()

    state = run.method.state_dict()
    assert state["cluster_state"] is None and state["global_step"] == 5 * (384 // 64)
    for key in run.method.cluster_axes(0):
        assert state["network"][key].shape[0] == 3
    fresh = DRCMethod(exp, iters_per_epoch=384 // 64)
    fresh.load_state_dict(state)
    assert fresh.global_step == state["global_step"]
    fresh.eval()
    x = torch.randn(16, 1, 28, 28)
    a, b = run.method.eval().assign(x), fresh.assign(x)
    assert torch.equal(a.clusters_HB, b.clusters_HB)
    assert torch.allclose(a.confidence_HB, b.confidence_HB) and torch.allclose(a.similarity_HB, b.similarity_HB)
    assert a.embedding_BD is not None and b.embedding_BD is not None
    assert torch.allclose(a.embedding_BD, b.embedding_BD)
    warm = DRCMethod(exp, iters_per_epoch=1)
    warm.load_state_dict({"network": state["network"], "cluster_state": None})  # a warm start: no optimizer
    assert torch.equal(warm.eval().assign(x).clusters_HB, a.clusters_HB)


def test_assign_is_argmax_probability_logit_and_normalised_feature() -> None:
    method = DRCMethod(tiny_exp(), iters_per_epoch=1, network=tiny_network())
    method.eval()
    x = torch.randn(5, 1, S, S)
    out = method.assign(x)
    logits, feats = method.base.infer(x)
    for h in range(len(KS)):
        assert torch.equal(out.clusters_HB[h], logits[h].argmax(1))
        assert torch.allclose(out.confidence_HB[h], torch.softmax(logits[h], 1).max(1).values)
        assert torch.allclose(out.similarity_HB[h], logits[h].max(1).values)
    assert out.embedding_BD is not None
    assert torch.allclose(out.embedding_BD.norm(dim=1), torch.ones(5))
    assert torch.allclose(out.embedding_BD, feats / feats.norm(dim=1, keepdim=True))
    assert method.center_key(0) is None
    assert method.cluster_axes(1) == {"heads.1.weight": 0, "heads.1.bias": 0}


def test_a_non_finite_loss_names_the_fix() -> None:
    method = DRCMethod(tiny_exp(), iters_per_epoch=1, network=tiny_network())
    method.sums[0], method.steps = float("nan"), 1
    with pytest.raises(FloatingPointError, match="optim.lr"):
        method.after_epoch()
