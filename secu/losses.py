"""SeCu's two losses for one head (SeCu, ICCV 2023, Sec. 3.2; spec 3.4 and 3.5).

Legend: B = local batch, D = feature dim, K = clusters of the head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def hardness_aware_logits(sims_BK: torch.Tensor, labels_B: torch.Tensor, temperature: float) -> torch.Tensor:
    """Logits s / t where only the entry of the assigned cluster carries gradient.

    The value equals ``sims_BK / temperature``; the gradient of a cross-entropy on these logits
    reaches only the assigned center, scaled by (1 - p_y): hard instances pull harder and no center
    is pushed away by instances of other clusters. This is the "stable" part of the method.
    """
    onehot_BK = F.one_hot(labels_B.long(), sims_BK.shape[1]).to(sims_BK.dtype)
    live_BK = sims_BK * onehot_BK
    return (sims_BK.detach() * (1 - onehot_BK) + live_BK) / temperature


def center_loss(
    sims1_BK: torch.Tensor, sims2_BK: torch.Tensor, labels_B: torch.Tensor, tw: float
) -> torch.Tensor:
    """Loss_c = CE(L1, y) + CE(L2, y) with hardness-aware logits L = s / tw (mean over the batch).

    ``sims`` are stopgrad(z) C_h, so the gradient reaches the centers only.
    """
    l1 = hardness_aware_logits(sims1_BK, labels_B, tw)
    l2 = hardness_aware_logits(sims2_BK, labels_B, tw)
    return F.cross_entropy(l1, labels_B.long()) + F.cross_entropy(l2, labels_B.long())


def representation_loss(
    z1_BD: torch.Tensor,
    z2_BD: torch.Tensor,
    snapshot_DK: torch.Tensor,
    labels_B: torch.Tensor,
    tx: float,
    tau: float,
    targets_from: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Loss_x: cross-view soft targets mixed with the stored label, against frozen epoch-start centers.

    X = z P / tx; T1 = (1 - tau) softmax(X2) + tau onehot(y), T2 likewise with X1 (targets detached);
    Loss_x = -mean sum T1 log softmax(X1) - mean sum T2 log softmax(X2).

    ``targets_from``: the features (two views) whose logits build T1 and T2 when they are not ``z1, z2``
    themselves. The ImageNet predictor (spec 3.6) passes the projection features: its outputs learn to
    match the projection's cross-view targets, not targets made from its own logits.
    """
    snap = snapshot_DK.detach().to(z1_BD.dtype)
    x1_BK = z1_BD @ snap / tx
    x2_BK = z2_BD @ snap / tx
    onehot_BK = F.one_hot(labels_B.long(), snap.shape[1]).to(x1_BK.dtype)
    with torch.no_grad():
        if targets_from is None:
            tx1_BK, tx2_BK = x1_BK, x2_BK
        else:
            tx1_BK = targets_from[0].to(z1_BD.dtype) @ snap / tx
            tx2_BK = targets_from[1].to(z1_BD.dtype) @ snap / tx
        t1_BK = (1 - tau) * F.softmax(tx2_BK, dim=1) + tau * onehot_BK
        t2_BK = (1 - tau) * F.softmax(tx1_BK, dim=1) + tau * onehot_BK
    loss1 = -(t1_BK * F.log_softmax(x1_BK, dim=1)).sum(dim=1).mean()
    loss2 = -(t2_BK * F.log_softmax(x2_BK, dim=1)).sum(dim=1).mean()
    return loss1 + loss2
