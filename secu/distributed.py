"""Collective helpers: with ``secu.cross_rank_bn`` (BatchNorm over all ranks), the only places in ``secu/`` that
talk to ``torch.distributed``.

Every helper is the identity when no process group is initialised, so the algorithm runs unchanged
in one process. Losses and solvers never call these; the training step gathers what they need and
passes the gathered tensors in.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True when a process group is initialised and has more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    """Number of ranks (1 without a process group)."""
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_distributed() else 0


def _collective_device(t: torch.Tensor) -> torch.device:
    # NCCL only moves CUDA tensors; gloo only CPU tensors.
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0, in rank order.

    Ranks may hold different numbers of rows (the last batch of an epoch); rows are padded to the
    largest count for the collective and the padding is removed again. No gradient flows.
    """
    if not is_distributed():
        return t.detach()
    device = _collective_device(t)
    local = t.detach().to(device)
    n_local = torch.tensor([local.shape[0]], dtype=torch.long, device=device)
    counts = [torch.zeros_like(n_local) for _ in range(world_size())]
    dist.all_gather(counts, n_local)
    sizes = [int(c.item()) for c in counts]
    n_max = max(sizes)
    if local.shape[0] < n_max:
        pad = torch.zeros((n_max - local.shape[0], *local.shape[1:]), dtype=local.dtype, device=device)
        local = torch.cat([local, pad], dim=0)
    parts = [torch.empty_like(local) for _ in sizes]
    dist.all_gather(parts, local)
    out = torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)], dim=0)
    return out.to(t.device)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks (a new tensor; the input is unchanged)."""
    if not is_distributed():
        return t.detach().clone()
    device = _collective_device(t)
    out = t.detach().to(device).clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    """Mean of ``t`` over ranks (a new tensor)."""
    return all_reduce_sum(t) / world_size()


def broadcast_object(obj: object, src: int = 0) -> object:
    """Rank ``src``'s ``obj`` on every rank (picklable objects; ``obj`` itself without a process group)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def all_gather_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Concatenate ``t`` from every rank along dim 0 (rank order) with the gradient flowing back to this rank's
    part: a loss over the gathered rows, summed over ranks by DDP's averaging, gets the gradient of the loss
    over the global batch (each rank holds the same number of rows)."""
    if not is_distributed():
        return t
    parts = [torch.zeros_like(t) for _ in range(world_size())]
    dist.all_gather(parts, t.detach().contiguous())
    parts[rank()] = t  # only the local part carries autograd history
    return torch.cat(parts, dim=0)


def all_reduce_sum_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over ranks where the gradient reaches this rank's ``t`` unchanged (the other ranks' terms are
    constants here; they receive their own gradient in their own backward pass)."""
    if not is_distributed():
        return t
    total = all_reduce_sum(t.detach())
    return t + (total - t.detach())
