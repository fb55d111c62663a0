"""The ``tracking.*`` keys of the training jobs: Ray metrics on or off, and the optional MLflow run.

No Ray and no MLflow import here: the config is read wherever a job config is (checkpoints, the CLI).
"""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

_EXPERIMENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _./-]{0,249}$")


@dataclass
class TrackingConfig:
    """Where a training run's figures are exported (``--set tracking.mlflow_uri=...``)."""

    ray_metrics: bool = True
    """Export the figures as Ray metrics named ``secu_*`` (the Ray dashboard, and any Prometheus that scrapes
    the nodes' metrics endpoints as ``ray_secu_*``). Cheap: set on rank 0 only, no per-step round trip."""
    mlflow_uri: str = ""
    """An MLflow tracking URI (``http://mlflow:5000``, ``databricks``, ``sqlite:///mlflow.db``, ``file:///dir``);
    empty = no MLflow (the default). Needs ``pip install 'secu-ray[mlflow]'`` on the driver and on the training
    workers. Credentials go in MLflow's environment variables (``MLFLOW_TRACKING_TOKEN``, ...), never here."""
    mlflow_experiment: str = "secu"
    """The MLflow experiment the run is logged under (created when missing)."""

    def __post_init__(self) -> None:
        uri = self.mlflow_uri.strip()
        if uri != self.mlflow_uri or any(c.isspace() for c in uri):
            raise ValueError(f"tracking.mlflow_uri={self.mlflow_uri!r} holds spaces: give the URI alone")
        if urllib.parse.urlsplit(uri).password is not None:
            raise ValueError(
                "tracking.mlflow_uri holds a password (user:password@host): the config is logged and saved with "
                "the run, so give the URI without it and set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
                "(or MLFLOW_TRACKING_TOKEN) in the environment of the driver and the workers")
        if not _EXPERIMENT.match(self.mlflow_experiment):
            raise ValueError(f"tracking.mlflow_experiment={self.mlflow_experiment!r}: use letters, digits, spaces, "
                             "'_', '.', '/' or '-', starting with a letter or digit")

    @property
    def mlflow_enabled(self) -> bool:
        """True when a run is logged to MLflow."""
        return bool(self.mlflow_uri)
