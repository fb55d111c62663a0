"""BatchNorm whose batch statistics span every rank, on CPU (gloo) as well as on GPUs.

Why: BatchNorm normalises with the statistics of the batch it sees. With W workers each sees B / W images,
so a multi-worker run normalises over smaller batches than one process at the same global batch, and the
network it trains is a different one. torch's ``nn.SyncBatchNorm`` fixes that on GPUs only (it refuses CPU
tensors), so CPU runs on Ray Train (gloo) kept per-worker statistics. ``CrossRankBatchNorm`` computes the
mean and variance over the union of the ranks' batches and back-propagates through them, so W processes
holding parts of a batch compute the outputs, gradients and running statistics of one process holding the
whole batch (tested, unequal parts included).

Math, for channel c over the N = sum_r n_r values of all ranks (images x pixels):
    mean = sum x / N,  var = sum (x - mean)^2 / N  (from each rank's local mean and variance, in float64),
    y = (x - mean) / sqrt(var + eps) * weight + bias,
    dx = weight / sqrt(var + eps) * (dy - sum dy / N - xhat * sum(dy * xhat) / N), sums over all ranks.
Two all-reduces per layer and step (forward: 3 C + 1 numbers, backward: 2 C), on a process group of their
own so they never interleave with DDP's gradient buckets. Evaluation mode uses the running statistics, as
BatchNorm does; with one rank the layer is plain BatchNorm.

Legend: C = channels, N = values per channel over all ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = ["CrossRankBatchNorm", "convert_cross_rank_batchnorm"]


def _reduce_dims(x: torch.Tensor) -> list[int]:
    return [0, *range(2, x.dim())]


def _channel_shape(x: torch.Tensor) -> list[int]:
    return [1, x.shape[1]] + [1] * (x.dim() - 2)


def _global_stats(x: torch.Tensor, group: Any) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(mean_C, biased var_C, N) over the rows of every rank; a rank with no rows contributes nothing."""
    c = x.shape[1]
    n_local = x.numel() // c if c else 0
    packed = torch.zeros(3 * c + 1, dtype=torch.float64)
    if n_local:
        var_C, mean_C = torch.var_mean(x.detach(), dim=_reduce_dims(x), unbiased=False)
        mean64, var64 = mean_C.double().cpu(), var_C.double().cpu()
        # n m, n v and n m^2 sum over ranks to N mean, sum of within-rank squares and the between-rank term.
        packed[:c], packed[c:2 * c], packed[2 * c:3 * c] = n_local * mean64, n_local * var64, n_local * mean64 ** 2
        packed[-1] = n_local
    dist.all_reduce(packed, group=group)
    n_total = int(packed[-1].item())
    mean = packed[:c] / n_total
    var = (packed[c:2 * c] + packed[2 * c:3 * c]) / n_total - mean ** 2
    return mean.to(x.dtype).to(x.device), var.clamp_min(0).to(x.dtype).to(x.device), n_total


class _CrossRankBatchNormFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, mean: torch.Tensor,
                var: torch.Tensor, n_total: int, eps: float, group: Any) -> torch.Tensor:
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean, invstd)
        ctx.n_total, ctx.group = n_total, group
        return F.batch_norm(x, mean, var, weight, bias, training=False, eps=eps)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        shape, dims = _channel_shape(x), _reduce_dims(x)
        xhat = (x - mean.view(shape)) * invstd.view(shape)
        sum_dy_C = dy.sum(dims)
        sum_dy_xhat_C = (dy * xhat).sum(dims)
        totals = torch.cat([sum_dy_C, sum_dy_xhat_C]).double().cpu()
        dist.all_reduce(totals, group=ctx.group)
        c = x.shape[1]
        mean_dy = (totals[:c] / ctx.n_total).to(dy.dtype).to(dy.device)
        mean_dy_xhat = (totals[c:] / ctx.n_total).to(dy.dtype).to(dy.device)
        scale = (weight * invstd).view(shape)
        dx = scale * (dy - mean_dy.view(shape) - xhat * mean_dy_xhat.view(shape))
        # The affine parameters' gradients stay local: DDP averages them over the ranks like any other.
        return dx, sum_dy_xhat_C, sum_dy_C, None, None, None, None, None


class CrossRankBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the union of the ranks' batches (module docstring). Same parameters and buffers, hence
    the same ``state_dict``, as the ``BatchNorm*d`` it replaces; needs ``affine`` and running statistics."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 group: Any = None) -> None:
        super().__init__(num_features, eps, momentum, affine=True, track_running_stats=True)
        self.group = group

    def _check_input_dim(self, input: torch.Tensor) -> None:  # noqa: A002 (torch's signature)
        if input.dim() < 2:
            raise ValueError(f"CrossRankBatchNorm expects (B, C, ...) input, got {input.dim()}D")

    def forward(self, input: torch.Tensor) -> torch.Tensor:  # noqa: A002
        self._check_input_dim(input)
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size(self.group) > 1
        if not (self.training and distributed):
            return super().forward(input)
        mean, var, n_total = _global_stats(input, self.group)
        if n_total < 2:
            raise ValueError(f"CrossRankBatchNorm: {n_total} value(s) per channel over all ranks; "
                             "batch statistics need at least 2 (use a larger batch)")
        tracked, running_mean, running_var = self.num_batches_tracked, self.running_mean, self.running_var
        if tracked is None or running_mean is None or running_var is None:  # track_running_stats is always on here
            raise RuntimeError("CrossRankBatchNorm lost its running-statistics buffers")
        with torch.no_grad():
            tracked.add_(1)
            factor = (1.0 / float(tracked)) if self.momentum is None else self.momentum
            running_mean.mul_(1 - factor).add_(mean, alpha=factor)
            running_var.mul_(1 - factor).add_(var * (n_total / (n_total - 1)), alpha=factor)
        return _CrossRankBatchNormFn.apply(input, self.weight, self.bias, mean, var, n_total, self.eps, self.group)


def convert_cross_rank_batchnorm(module: nn.Module, group: Any = None) -> nn.Module:
    """Replace every affine, tracking ``BatchNorm1d/2d/3d`` in ``module`` by a ``CrossRankBatchNorm`` that shares
    its parameters and buffers (an optimizer built before the conversion keeps stepping the same tensors).

    Args:
        module: the network (converted in place; the return value is the root, replaced if it is itself a
            BatchNorm).
        group: the process group of the statistics; None creates a gloo group of all ranks, which every rank
            must then call in the same order (a collective).
    """
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.new_group(backend="gloo")
    return _convert(module, group)


def _convert(module: nn.Module, group: Any) -> nn.Module:
    bn_types = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
    if isinstance(module, bn_types) and module.affine and module.track_running_stats:
        out = CrossRankBatchNorm(module.num_features, module.eps, module.momentum, group)
        out.weight, out.bias = module.weight, module.bias
        out.running_mean, out.running_var = module.running_mean, module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.train(module.training)
        return out
    for name, child in module.named_children():
        module.add_module(name, _convert(child, group))
    return module
