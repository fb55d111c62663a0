"""The clustering methods by name (``ExperimentConfig.method``) and the one way to build one.

| name | module | what it trains |
|---|---|---|
| ``secu`` | ``secu.secu_method`` | encoder + centers, hardness-aware center loss, size/entropy constraint (ICCV 2023) |
| ``propos`` | ``secu.propos`` | BYOL online/target encoders, prototype scattering over k-means labels (TPAMI 2022) |
| ``drc`` | ``secu.drc`` | a K-way head, contrast over samples and over clusters, a size penalty (2020) |
| ``pfca`` | ``secu.pfca`` | a conditional WGAN-GP generator and the classifier that assigns clusters (2021) |

Every method is a ``secu.method.ClusteringMethod``; the epoch (``secu.epoch.run_epoch``), the Ray worker,
checkpoints, inference and reclustering only ever see that interface.
"""

from __future__ import annotations

import importlib

import torch

from secu.config import ExperimentConfig
from secu.method import ClusteringMethod
from secu.method_configs import METHODS

_CLASSES = {"secu": ("secu.secu_method", "SeCuMethod"), "propos": ("secu.propos", "ProPosMethod"),
            "drc": ("secu.drc", "DRCMethod"), "pfca": ("secu.pfca", "PFCAMethod")}
assert tuple(_CLASSES) == METHODS

DISPLAY_NAMES = {"secu": "SeCu", "propos": "ProPos", "drc": "DRC", "pfca": "PFCA"}
"""How reports and logs write each method's name."""

INFERENCE_RULES = {
    "secu": "cluster = argmax_k z . C_h; confidence = softmax(z . C_h / tw) of that cluster",
    "propos": "cluster = argmax_k cos(target projection, k-means center k); confidence = softmax(cos / temperature)",
    "drc": "cluster = argmax_k of the head's softmax (assignment probability); confidence = that probability",
    "pfca": "cluster = argmax_k Q(x) (the classifier); confidence = softmax(Q(x)) of that cluster",
}
"""How each method's ``assign`` turns an image into a cluster and a confidence (for the metrics' protocol)."""


def method_class(name: str) -> type[ClusteringMethod]:
    """The class of the method ``name`` (imported on first use)."""
    if name not in _CLASSES:
        raise ValueError(f"method={name!r}: choose one of {METHODS}")
    module, cls = _CLASSES[name]
    found: type[ClusteringMethod] = getattr(importlib.import_module(module), cls)
    return found


def build_method(exp: ExperimentConfig, iters_per_epoch: int, device: torch.device | None = None
                 ) -> ClusteringMethod:
    """The method of ``exp`` with its networks initialised from ``exp.seed`` (the same on every rank).

    Args:
        exp: the experiment; ``exp.method`` names the method.
        iters_per_epoch: optimizer steps per epoch on this rank (the per-iteration schedules need it).
        device: where the networks live (CPU when None).
    """
    if exp.method == "secu":
        from secu.network import build_network
        from secu.secu_method import SeCuMethod

        return SeCuMethod(exp, build_network(exp), iters_per_epoch, device)
    return method_class(exp.method)(exp, iters_per_epoch, device)  # type: ignore[call-arg]
