"""The training step: labels, state and duplicates; 2 gloo processes == 1 process (spec 3, 8)."""

from __future__ import annotations

import os
import socket
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from secu.config import SeCuConfig
from secu.network import SeCuNetwork
from secu.state import ClusterState, LocalMemory
from secu.step import first_occurrence_mask, secu_step

FEAT, KS, N = 8, (3, 5), 16


class TinyEncoder(nn.Module):
    """No BatchNorm: per-rank statistics would make 2 ranks differ from 1 by construction."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2 * 4 * 4, FEAT)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        return F.normalize(self.fc(x.flatten(1)), dim=1), None


def make_net() -> SeCuNetwork:
    torch.manual_seed(0)
    return SeCuNetwork(TinyEncoder(), FEAT, KS, generator=torch.Generator().manual_seed(1))


def make_batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(100 + step)
    v1 = torch.randn(8, 2, 4, 4, generator=gen)
    v2 = v1 + 0.1 * torch.randn(8, 2, 4, 4, generator=gen)
    ids = torch.randperm(N, generator=gen)[:8]
    return v1, v2, ids


def run_steps(cfg: SeCuConfig, rank: int, world: int, steps: int = 3) -> dict[str, Any]:
    """Run ``steps`` steps on this rank's slice of each global batch; return what must match."""
    net = make_net()
    snapshot = net.centers.snapshot()
    state = ClusterState.create(KS)
    memory = LocalMemory(N, len(KS))
    labels, losses, grads, masks, shares = [], [], [], [], []
    for step in range(steps):
        v1, v2, ids = make_batch(step)
        part = slice(rank * 8 // world, (rank + 1) * 8 // world)
        prev = None if step == 0 else memory.read(ids[part])
        res = secu_step(net, v1[part], v2[part], ids[part], prev, snapshot, state, cfg)
        net.zero_grad()
        res.loss.backward()
        grad = torch.cat([p.grad.flatten() for p in net.parameters() if p.grad is not None])
        loss = res.loss.detach().clone()
        labels_full = res.labels_HB
        if world > 1:
            dist.all_reduce(grad)
            grad /= world
            dist.all_reduce(loss)
            loss /= world
            gathered = [torch.zeros_like(res.labels_HB) for _ in range(world)]
            dist.all_gather(gathered, res.labels_HB)
            labels_full = torch.cat(gathered, dim=1)
        # Every rank writes its own first occurrences into a local replica, as the coordinator would.
        full_ids = ids
        if world > 1:
            mask_parts = [torch.zeros_like(res.write_mask_B) for _ in range(world)]
            dist.all_gather(mask_parts, res.write_mask_B)
            mask = torch.cat(mask_parts)
        else:
            mask = res.write_mask_B
        memory.write(full_ids[mask], labels_full[:, mask])
        state = res.state
        labels.append(labels_full)
        losses.append(loss)
        grads.append(grad)
        masks.append(mask)
        shares.append(res.largest_share_H)
    return {
        "labels": labels, "losses": losses, "grads": grads, "masks": masks, "shares": shares,
        "counters": state.counters, "duals": state.duals, "memory": memory.labels_HN,
    }


def _worker(rank: int, world: int, port: int, cfg: SeCuConfig, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = run_steps(cfg, rank, world)
        if rank == 0:
            torch.save(result, out_path)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize("constraint", ["size", "entropy"])
def test_two_gloo_processes_equal_one_process(constraint: str, tmp_path: Any) -> None:
    cfg = SeCuConfig(ks=KS, constraint=constraint, tx=0.1, tw=0.1, alpha=5.0, dual_lr=0.5)
    single = run_steps(cfg, rank=0, world=1)
    out = str(tmp_path / "two.pt")
    mp.spawn(_worker, args=(2, free_port(), cfg, out), nprocs=2, join=True)
    double = torch.load(out)
    for key in ("labels", "masks"):
        for a, b in zip(single[key], double[key], strict=True):
            assert torch.equal(a, b), key
    for key in ("losses", "grads"):
        for a, b in zip(single[key], double[key], strict=True):
            assert torch.allclose(a, b, atol=1e-6, rtol=1e-5), key
    for key in ("counters", "duals"):
        for a, b in zip(single[key], double[key], strict=True):
            assert torch.allclose(a, b), key
    assert torch.equal(single["memory"], double["memory"])
    # The largest batch share comes from the gathered labels: the same on both ranks and in one process.
    assert single["shares"] == double["shares"]
    for labels_HG, mask, shares_H in zip(single["labels"], single["masks"], single["shares"], strict=True):
        assert shares_H == [float(torch.bincount(row[mask]).max()) / int(mask.sum()) for row in labels_HG]
    # The state really evolved (the comparison is not between two zero tensors).
    moved = single["duals"] if constraint == "size" else single["counters"]
    assert any(float(t.abs().sum()) > 0 for t in moved)


def test_first_occurrence_mask() -> None:
    ids = torch.tensor([5, 3, 5, 7, 3, 5])
    assert first_occurrence_mask(ids).tolist() == [True, True, False, True, False, False]


@pytest.mark.parametrize("constraint", ["size", "entropy"])
def test_duplicate_ids_are_counted_once(constraint: str) -> None:
    cfg = SeCuConfig(ks=(4,), constraint=constraint, tx=0.1, tw=0.1, alpha=1.0)
    torch.manual_seed(0)
    net = SeCuNetwork(TinyEncoder(), FEAT, (4,))
    v = torch.randn(4, 2, 4, 4)
    ids_dup = torch.tensor([1, 2, 1, 1])  # padding repeats id 1
    res = secu_step(net, v, v, ids_dup, None, net.centers.snapshot(), ClusterState.create((4,)), cfg)
    assert res.write_mask_B.tolist() == [True, True, False, False]
    assert float(res.state.counters[0].sum()) == 2.0  # two distinct instances, not four
    ref = secu_step(net, v[:2], v[:2], ids_dup[:2], None, net.centers.snapshot(), ClusterState.create((4,)), cfg)
    assert torch.allclose(res.state.duals[0], ref.state.duals[0])
    assert torch.allclose(res.state.counters[0], ref.state.counters[0])


def test_largest_share_is_one_when_a_dual_takes_the_whole_batch() -> None:
    """The signature of cycling duals: a dual larger than every cost gap sends the whole batch to its cluster."""
    cfg = SeCuConfig(ks=(4,), constraint="size", tx=0.1, tw=0.1)
    torch.manual_seed(0)
    net = SeCuNetwork(TinyEncoder(), FEAT, (4,))
    v, ids = torch.randn(8, 2, 4, 4), torch.arange(8)
    balanced = secu_step(net, v, v, ids, None, net.centers.snapshot(), ClusterState.create((4,)), cfg)
    assert balanced.largest_share_H == [float(torch.bincount(balanced.labels_HB[0]).max()) / 8]
    assert balanced.largest_share_H[0] < 1.0  # the random batch spreads over more than one cluster
    state = ClusterState([torch.zeros(4, dtype=torch.float64)], [torch.tensor([0.0, 0.0, 5.0, 0.0])])
    forced = secu_step(net, v, v, ids, None, net.centers.snapshot(), state, cfg)
    assert forced.labels_HB[0].tolist() == [2] * 8 and forced.largest_share_H == [1.0]


def test_entropy_counters_equal_recount_of_memory_over_epochs() -> None:
    """Across epochs the entropy counters move labels between clusters: they must always equal a
    recount of the memory (no label counted twice, none lost)."""
    cfg = SeCuConfig(ks=(3,), constraint="entropy", tx=0.1, tw=0.1, alpha=2.0)
    torch.manual_seed(0)
    net = SeCuNetwork(TinyEncoder(), FEAT, (3,))
    state = ClusterState.create((3,))
    memory = LocalMemory(N, 1)
    data = torch.randn(N, 2, 4, 4)
    for epoch in range(3):
        snapshot = net.centers.snapshot()
        for ids in torch.randperm(N).split(5):
            prev = None if epoch == 0 else memory.read(ids)
            res = secu_step(net, data[ids], data[ids] + 0.05, ids, prev, snapshot, state, cfg)
            memory.write(ids[res.write_mask_B], res.labels_HB[:, res.write_mask_B])
            state = res.state
        recount = torch.bincount(memory.labels_HN[0].long(), minlength=3).double()
        assert torch.equal(state.counters[0], recount)
        state = state.at_epoch_end("entropy")


def test_later_epoch_trains_representation_with_stored_label() -> None:
    """3.3: with a stored label the representation target uses it, not the new label."""
    cfg = SeCuConfig(ks=(3,), constraint="size", tx=0.1, tw=0.1, tau=1.0)  # tau=1: pure one-hot target
    torch.manual_seed(0)
    net = SeCuNetwork(TinyEncoder(), FEAT, (3,))
    v = torch.randn(6, 2, 4, 4)
    ids = torch.arange(6)
    snap = net.centers.snapshot()
    res = secu_step(net, v, v, ids, None, snap, ClusterState.create((3,)), cfg)
    other = (res.labels_HB + 1) % 3
    res_prev = secu_step(net, v, v, ids, other, snap, ClusterState.create((3,)), cfg)
    z, _ = net.encoder(v)
    from secu.losses import representation_loss
    expected = representation_loss(z, z, snap[0], other[0], cfg.tx, cfg.tau) / 2
    assert abs(res_prev.loss_repr - float(expected.detach())) < 1e-5
    assert abs(res.loss_repr - res_prev.loss_repr) > 1e-3
    assert res_prev.changed_B.sum() == 6  # every stored label differs from the new one


def test_predictor_step_matches_spec_3_6() -> None:
    """ImageNet variant: divisor 4H; the predictor's representation term uses the projection's targets."""
    from secu.config import AugmentConfig, ExperimentConfig, ModelConfig
    from secu.losses import center_loss, representation_loss
    from secu.network import build_network

    torch.manual_seed(0)
    exp = ExperimentConfig(model=ModelConfig(backbone="small_cnn", in_channels=1, cnn_width=8, feat_dim=16,
                                             mlp="imagenet", predictor=True),
                           secu=SeCuConfig(ks=(3, 5), constraint="size"),
                           augment=AugmentConfig(image_size=16, channels=1, mean=(0.5,), std=(0.5,)))
    net = build_network(exp)
    gen = torch.Generator().manual_seed(5)
    v1, v2 = torch.randn(8, 1, 16, 16, generator=gen), torch.randn(8, 1, 16, 16, generator=gen)
    ids = torch.arange(8)
    prev = torch.stack([torch.arange(8) % 3, torch.arange(8) % 5])
    snapshot = net.centers.snapshot()
    res = secu_step(net, v1, v2, ids, prev, snapshot, ClusterState.create((3, 5)), exp.secu)
    out = net(v1, v2)  # BatchNorm in training mode normalises by batch statistics: the same outputs again
    want_x, want_c = 0.0, 0.0
    for h in range(2):
        z1, z2, p1, p2 = out.z1_BD.float(), out.z2_BD.float(), out.p1_BD.float(), out.p2_BD.float()
        want_x += float(representation_loss(z1, z2, snapshot[h], prev[h], exp.secu.tx, exp.secu.tau).detach())
        want_x += float(representation_loss(p1, p2, snapshot[h], prev[h], exp.secu.tx, exp.secu.tau,
                                            targets_from=(z1, z2)))
        want_c += float(center_loss(out.sims1_BK[h], out.sims2_BK[h], res.labels_HB[h], exp.secu.tw))
        want_c += float(center_loss(out.psims1_BK[h], out.psims2_BK[h], res.labels_HB[h], exp.secu.tw))
    assert abs(res.loss_repr - want_x / 8) < 1e-5
    assert abs(res.loss_center - want_c / 8) < 1e-5
    own = sum(float(representation_loss(out.p1_BD.float(), out.p2_BD.float(), snapshot[h], prev[h],
                                        exp.secu.tx, exp.secu.tau)) for h in range(2))
    proj = sum(float(representation_loss(out.z1_BD.float(), out.z2_BD.float(), snapshot[h], prev[h],
                                         exp.secu.tx, exp.secu.tau)) for h in range(2))
    assert abs(res.loss_repr - (own + proj) / 8) > 1e-4  # the superseded form gives another value
