"""SeCu as a ``secu.method.ClusteringMethod``: the network, its optimizer and schedule, the cluster state
and ``secu.step.secu_step``, stepped once per batch (SeCu, ICCV 2023; spec sections 3 and 4).

Legend: B = batch, H = heads, K = clusters of one head.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from secu import distributed
from secu.config import ExperimentConfig
from secu.method import (
    Assignment,
    Batch,
    EpochContext,
    EpochSummary,
    OneNetworkMethod,
    StepOutput,
    evaluating,
    normalized_views,
)
from secu.network import SeCuNetwork, confident_clusters
from secu.optim import build_optimizer, set_learning_rates
from secu.precision import autocast_dtype
from secu.schedules import lr_schedule
from secu.state import ClusterState
from secu.step import secu_label_step, secu_step

CENTER_KEY = "centers.weights.{head}"
"""Key of head h's center matrix W_h (D x K) in the network's state dict (``secu.centers.Centers``)."""


class SeCuMethod(OneNetworkMethod[SeCuNetwork]):
    """SeCu's per-step training with the per-iteration schedules of ``iters_per_epoch`` steps an epoch."""

    name = "secu"

    def __init__(self, exp: ExperimentConfig, net: SeCuNetwork, iters_per_epoch: int,
                 device: torch.device | None = None) -> None:
        self.exp = exp
        self.base = net
        self.net: nn.Module = net
        self.device = device or torch.device("cpu")
        self.iters_per_epoch = iters_per_epoch
        self.lrs, self.clrs = lr_schedule(iters_per_epoch, exp.optim)
        self.state = ClusterState.create(exp.secu.ks)
        self.global_step = 0
        self.use_amp = self.device.type == "cuda" and exp.optim.mixed_precision
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.use_amp)
        self.amp_dtype = autocast_dtype(self.device)
        self.epoch = 0
        self._begin_sums()

    def _build_optimizer(self) -> torch.optim.Optimizer:
        return build_optimizer(self.base.encoder.parameters(), self.base.centers.parameters(), self.exp.optim)

    def _begin_sums(self) -> None:
        self.snapshot: list[torch.Tensor] = []
        self.steps = 0
        self.sums = [0.0, 0.0, 0.0]  # loss, center term, representation term
        self.shares_HS: list[list[float]] = [[] for _ in self.exp.secu.ks]

    def wrap_networks(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        """The encoder and centers are one network (one DDP wrapper); the optimizer keeps its parameters."""
        self.net = wrap(self.net)

    def before_epoch(self, epoch: int, context: EpochContext) -> None:
        """Training mode and the epoch-start snapshot P_h of the centers (spec 3.5)."""
        self.epoch = epoch
        self._begin_sums()
        self.net.train()
        self.snapshot = [p.to(self.device) for p in self.base.centers.snapshot()]

    def _schedule_index(self) -> int:
        return min(self.epoch * self.iters_per_epoch + self.steps, len(self.lrs) - 1)

    def train_step(self, batch: Batch, stored_HB: torch.Tensor) -> StepOutput:
        """``secu_step`` on the two views, then one optimizer step at this iteration's lr and clr."""
        t = self._schedule_index()
        set_learning_rates(self.optimizer, float(self.lrs[t]), float(self.clrs[t]))
        ids = batch["sample_index"].long()
        view1, view2 = normalized_views(batch, self.exp.augment.mean, self.exp.augment.std, self.device)
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
            result = secu_step(self.net, view1, view2, ids.to(self.device), stored_HB.to(self.device),
                               self.snapshot, self.state, self.exp.secu)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(result.loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.state = result.state
        for i, value in enumerate((float(result.loss.detach()), result.loss_center, result.loss_repr)):
            self.sums[i] += value
        for h, share in enumerate(result.largest_share_H):
            self.shares_HS[h].append(share)
        self.steps += 1
        self.global_step += 1
        return StepOutput(labels_HB=result.labels_HB, write_mask_B=result.write_mask_B)

    def label_step(self, batch: Batch, stored_HB: torch.Tensor) -> StepOutput:
        """``secu_label_step`` on the two views with the network in eval mode: labels and counters, no loss."""
        view1, view2 = normalized_views(batch, self.exp.augment.mean, self.exp.augment.std, self.device)
        with evaluating(self.base), torch.autocast(device_type=self.device.type, dtype=self.amp_dtype,
                                                   enabled=self.use_amp):
            labels_HB, write_mask_B, self.state = secu_label_step(
                self.base, view1, view2, batch["sample_index"].long().to(self.device), stored_HB, self.state,
                self.exp.secu)
        return StepOutput(labels_HB=labels_HB, write_mask_B=write_mask_B)

    def progress(self) -> str:
        """Mean loss terms so far in this epoch and the current learning rates."""
        n, t = max(self.steps, 1), self._schedule_index()
        return (f"loss {self.sums[0] / n:.4f} (center {self.sums[1] / n:.4f}, repr {self.sums[2] / n:.4f}) "
                f"lr {self.lrs[t]:.4g} clr {self.clrs[t]:.4g}")

    def after_epoch(self) -> EpochSummary:
        """Loss terms averaged over steps and ranks, the schedule's end-of-epoch rates, the median largest
        batch share per head; the state carried on (``ClusterState.at_epoch_end``)."""
        terms = distributed.all_reduce_mean(torch.tensor(self.sums, dtype=torch.float64) / max(self.steps, 1))
        end = min((self.epoch + 1) * self.iters_per_epoch, len(self.lrs)) - 1
        metrics = {
            "train/loss": float(terms[0]),
            "train/loss_center": float(terms[1]),
            "train/loss_repr": float(terms[2]),
            "train/lr": float(self.lrs[end]),
            "train/clr": float(self.clrs[end]),
            "train/steps": self.steps,
        }
        # Identical on every rank: computed from the labels gathered in every step.
        metrics.update({f"clusters/h{h}/largest_batch_share": float(np.median(s)) if s else 0.0
                        for h, s in enumerate(self.shares_HS)})
        if not np.isfinite(metrics["train/loss"]):
            raise FloatingPointError(
                f"epoch {self.epoch}: the training loss is {metrics['train/loss']}; lower optim.lr or optim.clr")
        summary = EpochSummary(metrics=metrics, cluster_state=self.state)
        self.state = self.state.at_epoch_end(self.exp.secu.constraint)
        return summary

    def _cluster_state(self) -> ClusterState | None:
        return self.state

    def _load_cluster_state(self, state: ClusterState | None) -> None:
        if state is None:
            raise ValueError("a SeCu checkpoint without cluster state (counters and duals): not a SeCu run's")
        self.state = state

    def cluster_axes(self, head: int) -> dict[str, int]:
        """Head h's center matrix W_h (D x K): one column per cluster."""
        return {CENTER_KEY.format(head=head): 1}

    def center_key(self, head: int) -> str | None:
        return CENTER_KEY.format(head=head)

    @torch.no_grad()
    def assign(self, images: torch.Tensor) -> Assignment:
        """argmax_k of z C_h (spec 7), the softmax probability at the center temperature tw, the cosine."""
        sims_HBK, z_BD = self.base.assign(images.to(self.device))
        triples = [confident_clusters(s_BK, self.exp.secu.tw) for s_BK in sims_HBK]
        return Assignment(clusters_HB=torch.stack([c for c, _, _ in triples]),
                          confidence_HB=torch.stack([p for _, p, _ in triples]),
                          similarity_HB=torch.stack([s for _, _, s in triples]), embedding_BD=z_BD)
