"""One SeCu training step for all heads (SeCu, ICCV 2023, Sec. 3; spec section 3).

The step takes two views, the batch's sample ids, the labels stored for them in the previous epoch
(-1 where there is none), the epoch-start center snapshot and the cluster state; it returns the
loss to back-propagate, the new labels and the updated state. It does not step the optimiser and
does not touch the assignment memory: the caller writes ``labels_HB[:, write_mask_B]``.

Cross-rank communication is one all-gather of (sample id, rank, stored labels, new labels) per step,
through ``secu.distributed``; every rank then applies the same update rules to the same gathered
labels, so counters and duals stay identical on every rank and equal a one-process run with the
same global batch.

Legend: B = local batch, G = global batch, H = heads, K = clusters of one head, D = feature dim.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from secu import constraints, distributed
from secu.config import SeCuConfig
from secu.losses import center_loss, representation_loss
from secu.network import ViewOutputs
from secu.state import ClusterState


@dataclass
class StepResult:
    """What one step produces."""

    loss: torch.Tensor
    """Total loss (with gradient) = (sum_h Loss_x + Loss_c) / (2H) (4H with a predictor)."""
    loss_center: float
    """sum_h Loss_c,h / (2H) on this rank (detached)."""
    loss_repr: float
    """sum_h Loss_x,h / (2H) on this rank (detached)."""
    labels_HB: torch.Tensor
    """New labels of this rank's instances (int64)."""
    write_mask_B: torch.Tensor
    """True where this rank holds the first occurrence of an id in the global batch: only those
    entries may be written to the memory (a duplicate must not overwrite or be counted twice)."""
    state: ClusterState
    """Counters and duals after this step (identical on every rank)."""
    changed_B: torch.Tensor
    """Per instance, how many heads changed label vs the stored one (instances with a stored label)."""
    largest_share_H: list[float]
    """Per head, the largest fraction of the global batch (duplicates removed) that went to one cluster:
    about 1/K when the batch spreads over the clusters, near 1 when the size-constraint duals cycle and
    send each step's whole batch to one cluster in turn (identical on every rank)."""


def first_occurrence_mask(ids_G: torch.Tensor) -> torch.Tensor:
    """True at the first position of every distinct id in ``ids_G``."""
    g = ids_G.shape[0]
    if g == 0:
        return torch.zeros(0, dtype=torch.bool, device=ids_G.device)
    _, inverse = torch.unique(ids_G, return_inverse=True)
    first = torch.full((int(inverse.max()) + 1,), g, dtype=torch.long, device=ids_G.device)
    first = first.scatter_reduce(0, inverse, torch.arange(g, device=ids_G.device), reduce="amin")
    mask = torch.zeros(g, dtype=torch.bool, device=ids_G.device)
    mask[first] = True
    return mask


def _assign(cost_BK: torch.Tensor, head: int, prev_B: torch.Tensor, state: ClusterState,
            cfg: SeCuConfig) -> torch.Tensor:
    if cfg.constraint == "size":
        return constraints.size_assign(cost_BK, state.duals[head])
    return constraints.entropy_assign(cost_BK, state.counters[head], cfg.alpha, prev_B)


def _assign_heads(cost_BK: list[torch.Tensor], prev_HB: torch.Tensor, state: ClusterState,
                  cfg: SeCuConfig) -> torch.Tensor:
    """The labels int64 [H, B] of every head under the constraint, on the costs' device."""
    return torch.stack([_assign(cost_BK[h], h, prev_HB[h], state, cfg).to(prev_HB.device)
                        for h in range(cfg.num_heads)])


def _update_state(head: int, new_G: torch.Tensor, prev_G: torch.Tensor, state: ClusterState,
                  cfg: SeCuConfig) -> tuple[torch.Tensor, torch.Tensor]:
    counters, duals = state.counters[head], state.duals[head]
    if cfg.constraint == "size":
        duals = constraints.size_update_duals(duals, new_G, cfg.dual_lr, cfg.lratio)
        # Under the size constraint the counters only log this epoch's assignments.
        counters = counters + constraints.count_labels(new_G, counters.shape[0]).to(counters.device)
    else:
        counters = constraints.entropy_update_counters(counters, new_G, prev_G)
    return counters, duals


def costs(out: ViewOutputs) -> list[torch.Tensor]:
    """Per head, o = -(s1 + s2) / 2, or the mean of four similarities with a predictor (detached)."""
    result = []
    for h in range(len(out.sims1_BK)):
        if out.psims1_BK is not None and out.psims2_BK is not None:
            sims = (out.sims1_BK[h] + out.sims2_BK[h] + out.psims1_BK[h] + out.psims2_BK[h]) / 4
        else:
            sims = (out.sims1_BK[h] + out.sims2_BK[h]) / 2
        result.append(-sims.detach().float())
    return result


def secu_step(
    net: nn.Module,
    view1: torch.Tensor,
    view2: torch.Tensor,
    sample_index_B: torch.Tensor,
    prev_labels_HB: torch.Tensor | None,
    snapshot_DK: list[torch.Tensor],
    state: ClusterState,
    cfg: SeCuConfig,
) -> StepResult:
    """One step of SeCu for all heads.

    Args:
        net: a ``SeCuNetwork`` (possibly wrapped by DDP) whose forward returns ``ViewOutputs``.
        view1, view2: the two augmented views, normalised, B x C x S x S.
        sample_index_B: the stable ids of the batch's instances.
        prev_labels_HB: labels stored in the previous epoch; -1 where an instance has none.
            ``None`` in the first epoch (no instance has a label).
        snapshot_DK: per head the epoch-start normalised centers P_h (frozen).
        state: counters and duals before this step (not modified).
        cfg: the SeCu hyperparameters.
    """
    heads = cfg.num_heads
    device = view1.device
    b = sample_index_B.shape[0]
    prev_HB = (
        torch.full((heads, b), -1, dtype=torch.long, device=device)
        if prev_labels_HB is None
        else prev_labels_HB.to(device=device, dtype=torch.long)
    )
    out: ViewOutputs = net(view1, view2)
    cost_BK = costs(out)

    # 3.2: new labels on this rank against the current (global, identical) state.
    labels_HB = _assign_heads(cost_BK, prev_HB, state, cfg)

    write_mask_B, new_state, largest_share_H = _gather_and_update(sample_index_B, prev_HB, labels_HB, state, cfg)

    # 3.3: the representation learns from the stored label when there is one.
    repr_HB = torch.where(prev_HB >= 0, prev_HB, labels_HB)
    loss_c, loss_x = _losses(out, labels_HB, repr_HB, snapshot_DK, cfg)
    changed_B = ((prev_HB >= 0) & (prev_HB != labels_HB)).sum(dim=0)
    return StepResult(
        loss=loss_c + loss_x,
        loss_center=float(loss_c.detach()),
        loss_repr=float(loss_x.detach()),
        labels_HB=labels_HB,
        write_mask_B=write_mask_B,
        state=new_state,
        changed_B=changed_B,
        largest_share_H=largest_share_H,
    )


@torch.no_grad()
def secu_label_step(
    net: nn.Module,
    view1: torch.Tensor,
    view2: torch.Tensor,
    sample_index_B: torch.Tensor,
    prev_labels_HB: torch.Tensor,
    state: ClusterState,
    cfg: SeCuConfig,
) -> tuple[torch.Tensor, torch.Tensor, ClusterState]:
    """The assignment of 3.2 for a batch too short to train on (the last of an epoch), without a loss.

    Same labels and counter update as ``secu_step`` (one all-gather, identical on every rank), so that every
    image gets its label of the epoch and the counters equal a recount of the memory; the duals are left
    as they are, since a dual step over a few images would move them by a noisy estimate of the sizes.
    Call it with ``net`` unwrapped and in eval mode (BatchNorm's running statistics: a batch of a few rows,
    or one, has no batch statistics worth using).

    Returns:
        This rank's new labels int64 [H, B], its write mask [B] and the state after the counter update.
    """
    prev_HB = prev_labels_HB.to(device=view1.device, dtype=torch.long)
    labels_HB = _assign_heads(costs(net(view1, view2)), prev_HB, state, cfg)
    write_mask_B, updated, _ = _gather_and_update(sample_index_B, prev_HB, labels_HB, state, cfg)
    return labels_HB, write_mask_B, ClusterState(counters=updated.counters, duals=[d.clone() for d in state.duals])


def _gather_and_update(sample_index_B: torch.Tensor, prev_HB: torch.Tensor, labels_HB: torch.Tensor,
                       state: ClusterState, cfg: SeCuConfig) -> tuple[torch.Tensor, ClusterState, list[float]]:
    """One all-gather of (id, rank, stored labels, new labels) over the global batch, then the same state
    update on every rank from the first occurrence of each id. Returns this rank's write mask, the new state
    and the per-head largest batch share."""
    heads, b, device = cfg.num_heads, sample_index_B.shape[0], labels_HB.device
    rank_col = torch.full((1, b), distributed.rank(), dtype=torch.long, device=device)
    packed_CB = torch.cat([sample_index_B.to(device).long().view(1, b), rank_col, prev_HB, labels_HB])
    gathered_GC = distributed.all_gather_cat(packed_CB.T.contiguous())
    ids_G, ranks_G = gathered_GC[:, 0], gathered_GC[:, 1]
    prev_HG, new_HG = gathered_GC[:, 2:2 + heads].T, gathered_GC[:, 2 + heads:].T
    unique_G = first_occurrence_mask(ids_G)
    write_mask_B = unique_G[ranks_G == distributed.rank()]

    counters, duals, largest_share_H = [], [], []
    for h in range(heads):
        new_h = new_HG[h][unique_G]
        c, d = _update_state(h, new_h, prev_HG[h][unique_G], state, cfg)
        counters.append(c)
        duals.append(d)
        largest_share_H.append(float(torch.bincount(new_h).max()) / new_h.shape[0] if new_h.numel() else 0.0)
    return write_mask_B, ClusterState(counters=counters, duals=duals), largest_share_H


def _losses(out: ViewOutputs, labels_HB: torch.Tensor, repr_HB: torch.Tensor, snapshot_DK: list[torch.Tensor],
            cfg: SeCuConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum_h Loss_c,h, sum_h Loss_x,h) / (2H), or / (4H) with the predictor's terms (spec 3.4-3.6)."""
    heads, device = cfg.num_heads, labels_HB.device
    loss_c = out.z1_BD.new_zeros((), dtype=torch.float32)
    loss_x = out.z1_BD.new_zeros((), dtype=torch.float32)
    for h in range(heads):
        snap = snapshot_DK[h].to(device)
        loss_c = loss_c + center_loss(out.sims1_BK[h], out.sims2_BK[h], labels_HB[h], cfg.tw)
        loss_x = loss_x + representation_loss(
            out.z1_BD.float(), out.z2_BD.float(), snap, repr_HB[h], cfg.tx, cfg.tau
        )
        if out.psims1_BK is not None and out.psims2_BK is not None:
            assert out.p1_BD is not None and out.p2_BD is not None
            loss_c = loss_c + center_loss(out.psims1_BK[h], out.psims2_BK[h], labels_HB[h], cfg.tw)
            # Spec 3.6: the predictor matches the cross-view targets of the projection's logits.
            loss_x = loss_x + representation_loss(
                out.p1_BD.float(), out.p2_BD.float(), snap, repr_HB[h], cfg.tx, cfg.tau,
                targets_from=(out.z1_BD.float(), out.z2_BD.float()),
            )
    divisor = (4 if out.psims1_BK is not None else 2) * heads
    return loss_c / divisor, loss_x / divisor
