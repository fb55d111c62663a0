"""The whole chain on real data on this machine: ``python -m jobs.demo`` (``make demo``).

Ingests Fashion-MNIST (Debian's ``dataset-fashion-mnist``) to a local directory, trains the CPU recipe
on an embedded local Ray (one worker of 2 threads, ``demo_settings``), infers cluster assignments for the
train split and the test split, evaluates them against the labels and writes the HTML report. Re-running
resumes: the ingest adds nothing twice and the training run continues from its last checkpoint. --config and
--set change the training (the keys of jobs.train) and are checked before anything runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from jobs import evaluate as evaluate_job
from jobs import infer as infer_job
from jobs import ingest as ingest_job
from jobs import report as report_job
from jobs import train as train_job
from jobs.common import job_parser, run_job
from jobs.options import DEFAULT_RECIPE, TRAIN_HELP, collect, train_keys
from secu.recipes import RECIPE_NAMES

logger = logging.getLogger("jobs.demo")

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
TEST_SET = "fashion-mnist-test"
DEMO_KEYS = train_keys(without=("dataset", "run_id"))


def build_parser() -> argparse.ArgumentParser:
    """Options of the demo (all have defaults)."""
    parser = job_parser("secu demo", __doc__, config_help="YAML file of training keys (as for secu train, but "
                        "dataset and run_id)", set_help=f"override {TRAIN_HELP} (not dataset or run_id)",
                        storage=False)
    parser.add_argument("--storage", default="./data", help="local directory for datasets and runs")
    parser.add_argument("--source", default=str(FASHION_MNIST), help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--run-id", default="demo-fashion-mnist", help="run id (the same id resumes)")
    parser.add_argument("--train-limit", type=int, default=0,
                        help="train on the first N training images; 0 (default) = all 60,000")
    parser.add_argument("--recipe", choices=RECIPE_NAMES, default=None, metavar="NAME",
                        help="training recipe (default fashion-mnist-cpu unless --config sets one): fashion-mnist-cpu "
                             "(12 epochs; the whole demo took 11-15 minutes on 2 cores) or fashion-mnist-cpu-long "
                             "(40 epochs; 24 minutes)")
    return parser


def demo_settings(train_limit: int, user: Mapping[str, Any]) -> list[str]:
    """The demo's own training settings (``--set`` texts) for the keys the user did not set.

    ``user`` is what ``--config``, ``--recipe`` and ``--set`` give (canonical keys). The default recipe on the
    whole training split trains on one worker of 2 torch threads at batch 128, with the other CPU for Ray
    Data's read, decode and views: one worker normalises BatchNorm over the whole batch, which 2 workers on
    CPUs cannot without a cross-rank layer, and it reached a higher test ACC and confidence than 2 workers at
    the recipe's batch 256 on every seed measured, for 1.08-1.37x the training time (docs/benchmarks.md, "The
    demo on one worker"). Another recipe, or a ``--train-limit`` subset (whose schedule ``secu.adapt``
    derives from its size), trains as measured before: 2 workers of half a CPU and one thread each."""
    if train_limit == 0 and str(user.get("recipe") or DEFAULT_RECIPE) == DEFAULT_RECIPE:
        wanted: dict[str, Any] = {"compute.num_workers": 1, "compute.cpus_per_worker": 1, "compute.torch_threads": 2,
                                  "experiment.optim.batch_size": 128}
    else:
        wanted = {"compute.num_workers": 2, "compute.cpus_per_worker": 0.5, "compute.torch_threads": 1}
    return [f"{key}={value}" for key, value in wanted.items() if key not in user]


def steps(args: argparse.Namespace) -> list[tuple[str, Callable[[list[str]], int], list[str]]]:
    """(name, job main, arguments) of every step; the training arguments are checked by ``demo`` first."""
    common = ["--storage", args.storage, "--log-level", args.log_level]
    source = f"idx:{args.source}"
    train_set = "fashion-mnist-train" if args.train_limit == 0 else f"fashion-mnist-train{args.train_limit // 1000}k"
    limit = [] if args.train_limit == 0 else ["--limit", str(args.train_limit)]
    config = [] if args.config is None else ["--config", str(args.config)]
    user = collect(DEMO_KEYS, args.config, args.overrides, {"recipe": args.recipe})
    compute = [x for o in demo_settings(args.train_limit, user) for x in ("--set", o)]
    overrides = [x for o in args.overrides for x in ("--set", o)]
    recipe = [] if args.recipe is None else ["--recipe", args.recipe]
    out: list[tuple[str, Callable[[list[str]], int], list[str]]] = [
        ("ingest", ingest_job.main, ["--source", source, "--split", "train", "--dataset", train_set, *limit, *common]),
        ("ingest", ingest_job.main, ["--source", source, "--split", "test", "--dataset", TEST_SET, *common]),
        ("train", train_job.main, [*recipe, "--dataset", train_set, "--run-id", args.run_id,
                                   *config, *compute, *overrides, *common]),
    ]
    for dataset in (train_set, TEST_SET):
        out.append(("infer", infer_job.main, ["--run-id", args.run_id, "--dataset", dataset, *common]))
        out.append(("evaluate", evaluate_job.main, ["--run-id", args.run_id, "--dataset", dataset, *common]))
    out.append(("report", report_job.main, ["--run-id", args.run_id, "--dataset", TEST_SET, *common]))
    return out


def demo(args: argparse.Namespace) -> int:
    """The job: check the training config and the source, then run every step; stop at the first failure."""
    chain = steps(args)  # reads --config and --set once: unknown keys fail here (the steps name datasets and run)
    train_argv = next(argv for name, _, argv in chain if name == "train")
    job = train_job.resolve_job(train_job.build_parser().parse_args(train_argv))  # bad keys/values fail before work
    if job.tracking.mlflow_enabled:  # the report step attaches the report and metrics to the training's MLflow run
        next(argv for name, _, argv in chain if name == "report").extend(
            ["--mlflow-uri", job.tracking.mlflow_uri, "--mlflow-experiment", job.tracking.mlflow_experiment])
    if not (Path(args.source) / "train-images-idx3-ubyte.gz").exists():
        raise FileNotFoundError(f"Fashion-MNIST is not at {args.source}: install Debian's package (apt-get install "
                                "dataset-fashion-mnist) or pass --source DIR with the four IDX files")
    started = time.perf_counter()
    import ray

    ray.init(num_cpus=None, log_to_driver=True)
    for name, step, argv in chain:
        code = step(argv)
        if code != 0:
            logger.error("demo: the %s step failed (exit code %d); see the log above", name, code)
            return code
    run_dir = Path(args.storage).resolve() / "runs" / args.run_id
    warnings = [w for path in sorted(run_dir.glob("metrics*.json"))
                for w in json.loads(path.read_text()).get("warnings", [])]
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s"
          + (f"; WARNING: {len(warnings)} collapsed head(s), see metrics*.json and the log" if warnings else ""))
    print(f"  assignments (Parquet): {run_dir}/assignments-*/")
    print(f"  metrics:               {run_dir}/metrics*.json")
    print(f"  report:                {run_dir}/report-{TEST_SET}/index.html")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run ingest, train, infer, evaluate and report."""
    return run_job(demo, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
