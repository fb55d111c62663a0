"""The whole chain on real data on this machine: ``python -m jobs.demo`` (``make demo``).

Ingests Fashion-MNIST (Debian's ``dataset-fashion-mnist``) to a local directory, trains the CPU recipe
with 2 workers on an embedded local Ray, infers cluster assignments for the train split and the test
split, evaluates them against the labels and writes the HTML report. Re-running resumes: the ingest
adds nothing twice and the training run continues from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from jobs import evaluate as evaluate_job
from jobs import infer as infer_job
from jobs import ingest as ingest_job
from jobs import report as report_job
from jobs import train as train_job
from jobs.common import setup_logging

logger = logging.getLogger("jobs.demo")

FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def build_parser() -> argparse.ArgumentParser:
    """Options of the demo (all have defaults)."""
    parser = argparse.ArgumentParser(prog="secu demo", description=__doc__)
    parser.add_argument("--storage", default="./data", help="local directory for datasets and runs")
    parser.add_argument("--source", default=str(FASHION_MNIST), help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--run-id", default="demo-fashion-mnist", help="run id (the same id resumes)")
    parser.add_argument("--train-limit", type=int, default=0,
                        help="train on the first N training images; 0 (default) = all 60,000")
    parser.add_argument("--recipe", default="fashion-mnist-cpu",
                        help="training recipe: fashion-mnist-cpu (12 epochs; the whole demo took 7.4 minutes on 2 "
                             "cores) or fashion-mnist-cpu-long (40 epochs; 24 minutes)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="training config overrides, e.g. optim.epochs=20")
    return parser


def _step(name: str, code: int) -> None:
    if code != 0:
        raise SystemExit(f"demo: the {name} step failed (exit code {code}); see the log above")


def main(argv: list[str] | None = None) -> int:
    """Run ingest, train, infer, evaluate and report."""
    setup_logging()
    args = build_parser().parse_args(argv)
    source = Path(args.source)
    if not (source / "train-images-idx3-ubyte.gz").exists():
        logger.error("Fashion-MNIST is not at %s: install Debian's package (apt-get install dataset-fashion-mnist) "
                     "or pass --source DIR with the four IDX files", source)
        return 2
    started = time.perf_counter()
    import ray

    ray.init(num_cpus=None, log_to_driver=True)
    storage = ["--storage", args.storage]
    train_name = "fashion-mnist-train" if args.train_limit == 0 else f"fashion-mnist-train{args.train_limit // 1000}k"
    limit = [] if args.train_limit == 0 else ["--limit", str(args.train_limit)]
    _step("ingest", ingest_job.main(["--source", f"idx:{source}", "--split", "train", "--dataset", train_name,
                                     *limit, *storage]))
    _step("ingest", ingest_job.main(["--source", f"idx:{source}", "--split", "test", "--dataset",
                                     "fashion-mnist-test", *storage]))
    overrides = [x for o in args.overrides for x in ("--set", o)]
    # Two training workers at half a CPU each leave a CPU for Ray Data's decode and augmentation tasks.
    compute = ["--set", "compute.cpus_per_worker=0.5", "--set", "compute.torch_threads=1"]
    _step("train", train_job.main(["--recipe", args.recipe, "--dataset", train_name, "--run-id",
                                   args.run_id, "--num-workers", "2", *compute, *overrides, *storage]))
    for dataset in (train_name, "fashion-mnist-test"):
        _step("infer", infer_job.main(["--run-id", args.run_id, "--dataset", dataset, *storage]))
        _step("evaluate", evaluate_job.main(["--run-id", args.run_id, "--dataset", dataset, *storage]))
    _step("report", report_job.main(["--run-id", args.run_id, "--dataset", "fashion-mnist-test", *storage]))
    run_dir = Path(args.storage).resolve() / "runs" / args.run_id
    warnings = [w for path in sorted(run_dir.glob("metrics*.json"))
                for w in json.loads(path.read_text()).get("warnings", [])]
    print(f"\ndemo finished in {time.perf_counter() - started:.0f} s"
          + (f"; WARNING: {len(warnings)} collapsed head(s), see metrics*.json and the log" if warnings else ""))
    print(f"  assignments (Parquet): {run_dir}/assignments-*/")
    print(f"  metrics:               {run_dir}/metrics*.json")
    print(f"  report:                {run_dir}/report-fashion-mnist-test/index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
