"""``secu.cross_rank_bn``: two gloo processes holding unequal parts of a batch give the outputs, input and
parameter gradients and running statistics of one process with plain BatchNorm on the whole batch."""

from __future__ import annotations

import os
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from secu.cross_rank_bn import CrossRankBatchNorm, convert_cross_rank_batchnorm
from tests.secu.test_step import free_port

SIZES = (5, 3)  # rows per rank: unequal, as in an epoch's last batch
STEPS = 3


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Flatten(), nn.Linear(4 * 5 * 5, 6, bias=False), nn.BatchNorm1d(6, momentum=None),
    )
    with torch.no_grad():  # affine parameters away from (1, 0), so their gradients matter
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net


def _batch(step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(sum(SIZES), 2, 5, 5, generator=g) * 3 + 1


def _loss(y: torch.Tensor, step: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(200 + step)
    target = torch.randn(y.shape[1], generator=g)
    return ((y * target).sum(1) ** 2).sum()  # a sum over rows: the ranks' losses add up to the whole batch's


def _run(rows: slice | None) -> dict[str, list[torch.Tensor]]:
    """STEPS forward/backward passes on the whole batch (rows None) or on this rank's rows; parameter gradients
    summed over the ranks as DDP would (up to its 1 / W, which the sum loss does not need)."""
    net = _net()
    if rows is not None:
        net = convert_cross_rank_batchnorm(net)
    out: dict[str, list[torch.Tensor]] = {"y": [], "dx": [], "grads": []}
    for step in range(STEPS):
        x = _batch(step)
        x = (x if rows is None else x[rows]).requires_grad_(True)
        y = net(x)
        net.zero_grad()
        _loss(y, step).backward()
        grads = [p.grad.clone() for p in net.parameters()]
        if rows is not None:
            for g in grads:
                dist.all_reduce(g)
        out["y"].append(y.detach())
        out["dx"].append(x.grad.detach())
        out["grads"].append(torch.cat([g.flatten() for g in grads]))
        with torch.no_grad():
            for p, g in zip(net.parameters(), grads, strict=True):
                p -= 0.01 * g  # the next step sees moved parameters, as training does
    out["buffers"] = [b.clone().double() for b in net.buffers()]
    return out


def _worker(rank: int, world: int, port: int, out_path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        start = sum(SIZES[:rank])
        result = _run(slice(start, start + SIZES[rank]))
        torch.save(result, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_one_process_with_plain_batchnorm(tmp_path: Any) -> None:
    single = _run(None)
    out = str(tmp_path / "two")
    mp.spawn(_worker, args=(2, free_port(), out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    for step in range(STEPS):
        for key in ("y", "dx"):
            joined = torch.cat([ranks[0][key][step], ranks[1][key][step]])
            assert torch.allclose(joined, single[key][step], atol=1e-4, rtol=1e-4), (key, step)
        for r in range(2):
            assert torch.allclose(ranks[r]["grads"][step], single["grads"][step], atol=1e-3, rtol=1e-4), step
    for r in range(2):
        for a, b in zip(ranks[r]["buffers"], single["buffers"], strict=True):
            assert torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    # Per-rank statistics (what CPU workers had before) would not match: the comparison can fail.
    plain = _net()
    y0 = plain(_batch(0)[: SIZES[0]])
    assert not torch.allclose(y0, single["y"][0][: SIZES[0]], atol=1e-2)


def test_conversion_shares_tensors_and_keeps_the_state_dict() -> None:
    net = _net()
    params, buffers = list(net.parameters()), list(net.buffers())
    keys = list(net.state_dict())
    converted = convert_cross_rank_batchnorm(net)
    assert sum(isinstance(m, CrossRankBatchNorm) for m in converted.modules()) == 2
    assert not any(type(m) in (nn.BatchNorm1d, nn.BatchNorm2d) for m in converted.modules())
    assert all(a is b for a, b in zip(params, converted.parameters(), strict=True))
    assert all(a is b for a, b in zip(buffers, converted.buffers(), strict=True))
    assert list(converted.state_dict()) == keys
    # Without a process group (and in evaluation mode) it is plain BatchNorm.
    x = _batch(0)
    reference = _net()
    assert torch.allclose(converted(x), reference(x), atol=1e-6)
    converted.eval()
    reference.eval()
    assert torch.allclose(converted(x), reference(x), atol=1e-6)


def test_rejects_1d_input() -> None:
    with pytest.raises(ValueError, match="expects"):
        CrossRankBatchNorm(3)(torch.zeros(3))


def test_trainer_converts_cpu_batchnorm_only_when_asked() -> None:
    """CPU workers keep their own batch statistics unless ``model.sync_bn_cpu``; one worker is never converted."""
    from pipelines.training.train_loop import convert_batchnorm
    from secu.config import ModelConfig

    def kinds(model: ModelConfig, world: int) -> set[type]:
        net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4, 4), nn.BatchNorm1d(4))
        return {type(m) for m in convert_batchnorm(net, model, world, torch.device("cpu")).modules()
                if isinstance(m, nn.modules.batchnorm._BatchNorm)}

    assert kinds(ModelConfig(), 2) == {nn.BatchNorm2d, nn.BatchNorm1d}
    assert kinds(ModelConfig(sync_bn_cpu=True), 1) == {nn.BatchNorm2d, nn.BatchNorm1d}
    assert kinds(ModelConfig(sync_bn_cpu=True), 2) == {CrossRankBatchNorm}
    assert kinds(ModelConfig(sync_bn=False), 2) == {nn.BatchNorm2d, nn.BatchNorm1d}
