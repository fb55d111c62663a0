"""Where the jobs' figures go besides their JSON files: Ray metrics (``ray_metrics``, on by default) and an
optional MLflow run (``mlflow_run``), set by the ``tracking.*`` keys (``config``)."""
