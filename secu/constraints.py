"""Assignment solvers under SeCu's global constraints (SeCu, ICCV 2023, Sec. 3.3; spec 3.2).

Pure functions: they take the cost of a batch and the current counters or duals, and return labels
or new counters/duals. They never communicate; the caller passes globally gathered labels to the
update rules so that every rank computes identical state.

Legend: B = local batch, G = global batch (all ranks, duplicates removed), K = clusters of one head.
``cost_BK`` is o = -(s1 + s2) / 2, the negated mean similarity of the two views to the centers.
``prev_labels`` hold -1 for instances without a stored label (first epoch, or new images).
"""

from __future__ import annotations

import torch


def count_labels(labels: torch.Tensor, k: int) -> torch.Tensor:
    """Number of entries of ``labels`` in each of ``k`` clusters (float64); entries < 0 are ignored."""
    valid = labels[labels >= 0].long()
    return torch.bincount(valid, minlength=k).to(torch.float64)[:k]


# --------------------------------------------------------------------------------------------- size


def size_assign(cost_BK: torch.Tensor, duals_K: torch.Tensor) -> torch.Tensor:
    """Labels under the size constraint: y = argmin_k (o_k - rho_k)."""
    return torch.argmin(cost_BK.double() - duals_K.to(cost_BK.device, torch.float64), dim=1)


def size_update_duals(
    duals_K: torch.Tensor, labels_G: torch.Tensor, dual_lr: float, lratio: float
) -> torch.Tensor:
    """Dual ascent on the lower bound |cluster k| >= lratio * G / K.

    rho_k <- rho_k - dual_lr * c_k / G + dual_lr * lratio / K, clamped at 0 when lratio < 1
    (the bound is an inequality, so its multiplier is non-negative). rho is never reset.
    """
    k = duals_K.shape[0]
    g = int((labels_G >= 0).sum())
    if g == 0:
        return duals_K.clone()
    counts_K = count_labels(labels_G, k).to(duals_K.device)
    duals = duals_K.double() - dual_lr * counts_K / g + dual_lr * (lratio / k)
    if lratio < 1:
        duals = duals.clamp_min(0.0)
    return duals.to(duals_K.dtype)


# ------------------------------------------------------------------------------------------ entropy


def _phi(p: torch.Tensor) -> torch.Tensor:
    """phi(p) = p log p with phi(0) = 0 (negative entropy contribution)."""
    return torch.where(p > 0, p * torch.log(p.clamp_min(1e-300)), torch.zeros_like(p))


def entropy_delta(counters_K: torch.Tensor, prev_labels_B: torch.Tensor | None, batch: int) -> torch.Tensor:
    """Change of sum_k phi(n_k / S) caused by putting each instance into cluster k (B x K, float64).

    Instances without a stored label (``prev_labels_B`` is None or the entry is -1) are added:
    p = n / (S + 1) and delta_k = phi(p_k + 1/(S+1)) - phi(p_k). Instances with a stored label l are
    moved: p = n / S, delta_k = [phi(p_l - 1/S) - phi(p_l)] + [phi(p_k + 1/S) - phi(p_k)] for k != l,
    and delta_l = 0. All instances use the same counters (no sequential updates in a batch).
    """
    n_K = counters_K.to(torch.float64)
    k = n_K.shape[0]
    s = float(n_K.sum())
    if s <= 0:
        return torch.zeros((batch, k), dtype=torch.float64, device=counters_K.device)
    p_add = n_K / (s + 1.0)
    add_K = _phi(p_add + 1.0 / (s + 1.0)) - _phi(p_add)
    delta_BK = add_K.expand(batch, k).clone()
    if prev_labels_B is None:
        return delta_BK
    prev = prev_labels_B.to(counters_K.device).long()
    has_prev = prev >= 0
    if bool(has_prev.any()):
        p_move = n_K / s
        gain_K = _phi(p_move + 1.0 / s) - _phi(p_move)
        # Leaving cluster l: p_l - 1/S can be -0.0 by rounding; clamp before phi.
        loss_K = _phi((p_move - 1.0 / s).clamp_min(0.0)) - _phi(p_move)
        l_idx = prev[has_prev]
        move_BK = loss_K[l_idx].unsqueeze(1) + gain_K.unsqueeze(0)
        move_BK[torch.arange(l_idx.shape[0], device=move_BK.device), l_idx] = 0.0
        delta_BK[has_prev] = move_BK
    return delta_BK


def entropy_assign(
    cost_BK: torch.Tensor, counters_K: torch.Tensor, alpha: float, prev_labels_B: torch.Tensor | None
) -> torch.Tensor:
    """Labels under the entropy constraint: y = argmin_k (o_k + alpha * delta_k).

    With empty counters (S = 0, the very first step) this is y = argmin_k o_k.
    """
    delta_BK = entropy_delta(counters_K, prev_labels_B, cost_BK.shape[0]).to(cost_BK.device)
    return torch.argmin(cost_BK.double() + alpha * delta_BK, dim=1)


def entropy_update_counters(
    counters_K: torch.Tensor, new_labels_G: torch.Tensor, prev_labels_G: torch.Tensor | None
) -> torch.Tensor:
    """n <- n + counts(new labels) - counts(their stored labels); counters persist across epochs."""
    k = counters_K.shape[0]
    out = counters_K.double() + count_labels(new_labels_G, k).to(counters_K.device)
    if prev_labels_G is not None:
        out = out - count_labels(prev_labels_G, k).to(counters_K.device)
    return out.to(counters_K.dtype)
