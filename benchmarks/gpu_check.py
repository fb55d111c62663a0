"""``make gpu-check``: the product's GPU path in one command, in under 8 minutes, on a machine with a CUDA GPU.

Every step goes through the product's own entry points, on a local Ray that this command starts (never an
existing cluster) with every visible GPU, and on a local storage (a temporary directory unless --storage):

1. ``ingest``: the first --train-images of the Fashion-MNIST train split and the first --test-images of its
   test split (``jobs.ingest``);
2. ``train``: the ``fashion-mnist-resnet18`` recipe (ResNet-18, global batch 128) for --epochs epochs with
   ``jobs.train --use-gpu``: one Ray Train worker per visible GPU (--num-gpus), NCCL, mixed precision,
   SyncBatchNorm (the trainer converts the network only with two or more workers) and
   ``augment.views_on_device=true``; epoch times and images/s from the run's ``train_history.json``;
3. ``inference``: the test split through the trained run on the GPUs (``jobs.infer --use-gpu yes``) and its
   evaluation (``jobs.evaluate``): images/s from the output's ``_SUCCESS``, the test ACC of the head with
   K = 10 from its metrics file;
4. ``stream_224``: --jpeg-images synthetic 500 x 375 JPEGs (``benchmarks.common.write_synthetic_jpegs``,
   ingested as an image folder) through the training stream with views on the device at 224 px (the
   ``imagenet1k`` recipe's views): Ray Data reads and decodes, ``pipelines.dataset.streams.device_views``
   makes both views on GPU 0 in this process, as a training worker does. Alternating rounds (--warmup,
   --repeats) against the same stream consumed on the CPU without views (``decode_only``, the stream's own
   rate, ``benchmarks.data_pipeline.epoch_ray_data``), plus the GPU time of the views alone per image.

Peak GPU memory per step: ``benchmarks.gpu_memory`` (sampled from nvidia-smi, or torch.cuda.mem_get_info;
the workers and actors are other processes); the stream step also has ``torch.cuda.max_memory_allocated``
of this process. The JSON (--out) holds the GPU, torch and CUDA versions, every step's figures,
``figures`` (the headline ones), ``wall_s`` and ``within_budget`` (wall_s <= --budget-s, 480 s: recorded,
never a failure).

Exit codes: 0 every step passed; 1 a step failed (the JSON is written and names it); 2 a bad option, a bad
--set or Fashion-MNIST missing; 3 no CUDA GPU visible to torch (checked first: Ray is not imported, nothing
runs, nothing is written).

    make gpu-check                                   # or: python -m benchmarks.gpu_check
    make gpu-check GPU_CHECK_ARGS='--epochs 3 --out /tmp/gpu_check.json'
    python -m benchmarks.gpu_check --quick           # 2 epochs of 5,000 images: a smoke run of the GPU path
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import FASHION_MNIST_DIR, base_parser, summarize
from benchmarks.gpu_memory import GpuMemorySampler

logger = logging.getLogger("benchmarks.gpu_check")

NAME = "gpu_check"
EXIT_OK, EXIT_STEP_FAILED, EXIT_SETUP, EXIT_NO_GPU = 0, 1, 2, 3
BUDGET_S = 480.0
"""The issue's budget: under 8 minutes from start to JSON (the install of the virtualenv not included)."""
RECIPE = "fashion-mnist-resnet18"
SIZES = {"train_images": 20_000, "test_images": 10_000, "epochs": 5, "jpeg_images": 1_600}
QUICK_SIZES = {"train_images": 5_000, "test_images": 2_000, "epochs": 2, "jpeg_images": 256}
STEPS = ("ray", "ingest", "train", "inference", "stream_224")


# ---------------------------------------------------------------------------------------------
# Options and the no-GPU exit
# ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The options (``base_parser``'s --quick, --out, --repeats, --warmup and the check's own)."""
    parser = base_parser(NAME, __doc__)
    parser.add_argument("--train-images", type=int, default=None, help="first N of the train split (default 20000)")
    parser.add_argument("--test-images", type=int, default=None, help="first N of the test split (default 10000)")
    parser.add_argument("--epochs", type=int, default=None,
                        help="training epochs (default 5; >= 2: epoch 0 only initialises the centers)")
    parser.add_argument("--jpeg-images", type=int, default=None, help="synthetic JPEGs of the 224 px stream "
                        "(default 1600)")
    parser.add_argument("--stream-batch-size", type=int, default=256, help="batch of the 224 px stream")
    parser.add_argument("--num-gpus", type=int, default=0, help="training workers, one GPU each (default 0 = every "
                        "GPU torch sees)")
    parser.add_argument("--source", default=FASHION_MNIST_DIR, help="folder with the Fashion-MNIST IDX files")
    parser.add_argument("--storage", type=Path, default=None, metavar="DIR",
                        help="keep datasets and the run in DIR (default: a temporary directory, deleted at the end)")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="wall-time budget recorded in the JSON "
                        "(default 480 = 8 minutes; exceeding it is reported, not a failure)")
    parser.add_argument("--memory-interval-s", type=float, default=0.5, help="GPU memory sampling interval")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a training key for jobs.train, e.g. optim.batch_size=256; repeatable")
    parser.add_argument("--log-level", type=str.upper, default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"))
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parsed and checked options, the sizes resolved (--quick picks ``QUICK_SIZES``); exit 2 on a bad one."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for key, default in (QUICK_SIZES if args.quick else SIZES).items():
        if getattr(args, key) is None:
            setattr(args, key, default)
    if args.epochs < 2:
        parser.error(f"--epochs {args.epochs}: use 2 or more (epoch 0 only initialises the centers, lr = 0)")
    if not 1 <= args.test_images <= 10_000:
        parser.error(f"--test-images {args.test_images}: the test split has 10,000 images")
    for key in ("train_images", "jpeg_images", "stream_batch_size", "repeats"):
        if getattr(args, key) < 1:
            parser.error(f"--{key.replace('_', '-')} must be >= 1")
    if args.num_gpus < 0 or args.warmup < 0 or args.budget_s <= 0 or args.memory_interval_s <= 0:
        parser.error("--num-gpus and --warmup must be >= 0, --budget-s and --memory-interval-s positive")
    return args


def no_gpu_message(cuda_visible_devices: str | None, torch_cuda: str | None) -> str:
    """What to say when torch sees no CUDA GPU: why, what the check needs, what to run on CPU instead."""
    why = []
    if torch_cuda is None:
        why.append("this torch is a CPU-only build (torch.version.cuda is None)")
    if cuda_visible_devices is not None and not cuda_visible_devices.strip():
        why.append("CUDA_VISIBLE_DEVICES is set to an empty value, which hides every GPU")
    elif cuda_visible_devices is not None:
        why.append(f"CUDA_VISIBLE_DEVICES={cuda_visible_devices}")
    return (f"gpu-check: no CUDA GPU found: torch.cuda.is_available() is False"
            f"{' (' + '; '.join(why) + ')' if why else ''}. Nothing was run.\n"
            "It needs a CUDA GPU visible to torch: a machine with an NVIDIA GPU and its driver (nvidia-smi lists "
            "it), e.g. a node of a Ray cluster with GPUs, and a CUDA build of torch.\n"
            "On a machine without a GPU run `make test` (ruff, mypy and the tests) or `make demo` (the whole "
            "chain on Fashion-MNIST on the CPUs) instead.")


def main(argv: Sequence[str] | None = None) -> int:
    """Check for a GPU (exit 3 without one, before Ray is imported), then run the check."""
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print(no_gpu_message(os.environ.get("CUDA_VISIBLE_DEVICES"), torch.version.cuda), file=sys.stderr)
        return EXIT_NO_GPU
    return run_check(args, torch.cuda.device_count())


# ---------------------------------------------------------------------------------------------
# The product's commands
# ---------------------------------------------------------------------------------------------


def dataset_names(args: argparse.Namespace) -> dict[str, str]:
    """Dataset names carrying their sizes, so that a kept --storage never mixes two sizes."""
    return {"train": f"gpu-check-fm-train{args.train_images}", "test": f"gpu-check-fm-test{args.test_images}",
            "jpeg": f"gpu-check-jpeg{args.jpeg_images}"}


def job_argvs(args: argparse.Namespace, root: str, run_id: str, workers: int) -> dict[str, list[list[str]]]:
    """The arguments of every job the check runs: ingest (train, test), train, infer, evaluate."""
    names = dataset_names(args)
    common = ["--storage", root, "--log-level", args.log_level]
    source = f"idx:{args.source}"
    warmup = 2 if args.epochs >= 3 else 1  # one epoch of warm-up after epoch 0 when there is room for it
    train = ["--recipe", RECIPE, "--dataset", names["train"], "--run-id", run_id, "--use-gpu",
             "--num-workers", str(workers), "--set", "augment.views_on_device=true",
             "--set", f"optim.epochs={args.epochs}", "--set", f"optim.warmup_epochs={warmup}",
             "--set", "compute.max_failures=0", *[x for o in args.overrides for x in ("--set", o)], *common]
    return {
        "ingest": [["--source", source, "--split", split, "--dataset", names[split], "--limit", str(n),
                    "--shard-size", str(-(-n // 8)), "--ray", "on", *common]
                   for split, n in (("train", args.train_images), ("test", args.test_images))],
        "train": [train],
        "infer": [["--run-id", run_id, "--dataset", names["test"], "--use-gpu", "yes", *common]],
        "evaluate": [["--run-id", run_id, "--dataset", names["test"], *common]],
    }


def training_setup(train_argv: list[str], train_images: int) -> dict[str, Any]:
    """What the training will run, resolved by ``jobs.train`` itself (a bad --set fails here, before any work)
    and adapted to the collection's size as the trainer will (``secu.adapt``)."""
    from jobs import train as train_job
    from secu.adapt import adapt_to_collection

    job = train_job.resolve_job(train_job.build_parser().parse_args(train_argv))
    exp = adapt_to_collection(job.experiment, train_images, job.compute.num_workers).experiment
    workers = job.compute.num_workers
    return {"recipe": RECIPE, "backbone": exp.model.backbone, "ks": list(exp.secu.ks), "num_workers": workers,
            "use_gpu": job.compute.use_gpu, "backend": "nccl" if job.compute.use_gpu else "gloo",
            "mixed_precision": exp.optim.mixed_precision, "sync_batchnorm": exp.model.sync_bn and workers > 1,
            "views_on_device": exp.augment.views_on_device_for(job.compute.use_gpu),
            "epochs": exp.optim.epochs, "warmup_epochs": exp.optim.warmup_epochs,
            "global_batch": exp.optim.batch_size, "image_size": exp.augment.image_size}


def call_job(main: Callable[[list[str]], int], argv: list[str], what: str) -> None:
    """Run a job's ``main``; a nonzero exit is an error naming the command."""
    code = main(argv)
    if code != 0:
        raise RuntimeError(f"`{what} {' '.join(argv)}` exited with code {code} (its error is in the log above)")


# ---------------------------------------------------------------------------------------------
# Steps
# ---------------------------------------------------------------------------------------------


@dataclass
class Step:
    """One step's outcome: ``passed``, ``failed`` or ``not run`` (an earlier step it needs failed)."""

    name: str
    status: str = "not run"
    seconds: float | None = None
    figures: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    gpu_memory: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "seconds": self.seconds, "error": self.error, "figures": self.figures,
                "gpu_memory": self.gpu_memory}


def run_step(name: str, body: Callable[[], dict[str, Any]], sampler: GpuMemorySampler | None,
             needs: Sequence[Step] = ()) -> Step:
    """Run ``body`` as step ``name`` unless a step it ``needs`` did not pass; an exception fails the step."""
    step = Step(name)
    missing = [s.name for s in needs if s.status != "passed"]
    if missing:
        step.error = f"not run: needs {', '.join(missing)}"
        return step
    logger.info("gpu-check: step %s", name)
    t0, wall0 = time.monotonic(), time.perf_counter()
    try:
        step.figures = body()
        step.status = "passed"
    except Exception as err:  # the check goes on with the steps that do not need this one, and says why
        logger.exception("gpu-check: step %s failed", name)
        step.status, step.error = "failed", f"{type(err).__name__}: {' '.join(str(err).split())[:2000]}"
    step.seconds = time.perf_counter() - wall0
    if sampler is not None:
        sampler.sample()  # a short step still gets a look at its end
        step.gpu_memory = sampler.window(t0, time.monotonic())
    return step


def start_local_ray(gpus: int, workers: int) -> dict[str, Any]:
    """A fresh local Ray with every CPU and the ``gpus`` visible GPUs; worker output reaches this log."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import ray.data

    ray.init(address="local", num_cpus=os.cpu_count(), num_gpus=gpus, include_dashboard=False, log_to_driver=True)
    ray.data.DataContext.get_current().enable_progress_bars = False
    resources = ray.cluster_resources()
    if resources.get("GPU", 0) < workers:
        raise RuntimeError(f"the local Ray has {resources.get('GPU', 0)} GPUs, fewer than the {workers} training "
                           "workers: check CUDA_VISIBLE_DEVICES and --num-gpus")
    return {"cpus": resources.get("CPU"), "gpus": resources.get("GPU")}


def ingest_step(argvs: list[list[str]], root: str, names: Mapping[str, str]) -> dict[str, Any]:
    from jobs import ingest as ingest_job
    from pipelines.dataset.info import load_dataset_info
    from pipelines.storage import Storage

    for argv in argvs:
        call_job(ingest_job.main, argv, "secu ingest")
    storage = Storage(root)
    return {"num_samples": {names[k]: load_dataset_info(storage, names[k]).num_samples for k in ("train", "test")}}


def training_figures(history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Epoch times and images/s of a run's ``train_history.json`` epochs; the medians leave out epoch 0 (it
    carries the start: Ray Data's first blocks, cuDNN's choice of kernels) when there are later epochs."""
    if not history:
        raise ValueError("the run's train_history.json holds no epoch")
    epoch_s = [float(row["time/epoch_s"]) for row in history]
    rate = [float(row["data/images_per_s"]) for row in history]
    later = slice(1, None) if len(history) > 1 else slice(None)
    acc = history[-1].get("clusters/h0/acc")
    return {"epochs": len(history), "images_per_epoch": float(history[-1]["data/images"]), "epoch_s": epoch_s,
            "images_per_s": rate, "first_epoch_s": epoch_s[0], "epoch_s_after_first": summarize(epoch_s[later]),
            "images_per_s_after_first": summarize(rate[later]),
            "train_memory_acc_h0_last_epoch": None if acc is None else float(acc)}


def train_step(argv: list[str], root: str, run_id: str) -> dict[str, Any]:
    from jobs import train as train_job
    from pipelines.storage import Storage
    from pipelines.training.metrics_log import HISTORY_FILE

    call_job(train_job.main, argv, "secu train")
    storage = Storage(root)
    history = json.loads(storage.read_bytes(storage.join("runs", run_id, HISTORY_FILE)))["epochs"]
    return training_figures(history)


def inference_figures(marker: Mapping[str, Any], metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Throughput from an output's ``_SUCCESS`` and the test figures of its primary head (K = classes) from
    its metrics file."""
    protocol = metrics["protocol"]
    primary = int(protocol["primary_head"])
    head = metrics["heads"][primary]
    return {"rows": int(protocol["rows"]), "images_per_s": float(marker["images_per_s"]),
            "execution_s": float(marker["seconds"]), "device": marker.get("device"), "actors": marker.get("actors"),
            "checkpoint_epoch": protocol.get("checkpoint_epoch"), "acc_head": primary, "acc_head_k": int(head["k"]),
            "test_acc": float(head["acc"]), "test_nmi": float(head["nmi"]), "test_ari": float(head["ari"]),
            "heads": [{k: row[k] for k in ("head", "k", "acc", "nmi")} for row in metrics["heads"]]}


def inference_step(argvs: dict[str, list[list[str]]], root: str, run_id: str, test_set: str) -> dict[str, Any]:
    from jobs import evaluate as evaluate_job
    from jobs import infer as infer_job
    from pipelines.outputs.assignments import DEFAULT_NAME, read_marker
    from pipelines.outputs.evaluation import metrics_file
    from pipelines.storage import Storage

    call_job(infer_job.main, argvs["infer"][0], "secu infer")
    call_job(evaluate_job.main, argvs["evaluate"][0], "secu evaluate")
    storage = Storage(root)
    name = f"{DEFAULT_NAME}-{test_set}"  # a dataset other than the training one is published under this name
    metrics = json.loads(storage.read_bytes(storage.join("runs", run_id, metrics_file(name))))
    return inference_figures(read_marker(storage, run_id, name), metrics)


# ---------------------------------------------------------------------------------------------
# The result
# ---------------------------------------------------------------------------------------------


def _get(step: Step | None, *path: str) -> Any:
    value: Any = step.figures if step is not None and step.status == "passed" else None
    for key in path:
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def memory_figure(steps: Sequence[Step]) -> tuple[dict[str, float | None], str | None]:
    """Peak MiB per step (this process tree's own use where nvidia-smi could tell, else device-wide above the
    baseline) and which of the two it is."""
    ours = all((s.gpu_memory or {}).get("max_our_processes_mib") is not None for s in steps if s.gpu_memory)
    key = "max_our_processes_mib" if ours else "max_above_baseline_mib"
    by_step = {s.name: (s.gpu_memory or {}).get(key) for s in steps if s.gpu_memory}
    measured = [v for v in by_step.values() if v is not None]
    kind = None if not measured else ("this process tree's compute processes (nvidia-smi used_memory)" if ours
                                      else "device-wide memory used above the baseline taken before Ray started")
    return by_step, kind


def assemble_result(steps: Sequence[Step], wall_s: float, budget_s: float, workers: int) -> dict[str, Any]:
    """The check's part of the JSON: every step, the headline figures, the budget, problems and notes."""
    by = {s.name: s for s in steps}
    train, infer, stream = by.get("train"), by.get("inference"), by.get("stream_224")
    memory_by_step, memory_kind = memory_figure(steps)
    measured = [v for v in memory_by_step.values() if v is not None]
    figures = {
        "train_images_per_s": _get(train, "images_per_s_after_first", "median"),
        "train_epoch_s": _get(train, "epoch_s_after_first", "median"),
        "train_first_epoch_s": _get(train, "first_epoch_s"),
        "stream_224_views_on_device_images_per_s": _get(stream, "images_per_s", "views_on_device", "median"),
        "stream_224_decode_only_images_per_s": _get(stream, "images_per_s", "decode_only", "median"),
        "inference_images_per_s": _get(infer, "images_per_s"),
        "test_acc": _get(infer, "test_acc"),
        "peak_gpu_memory_mib": max(measured) if measured else None,
        "peak_gpu_memory_mib_by_step": memory_by_step,
        "peak_gpu_memory_measured_as": memory_kind,
    }
    failed = [s.name for s in steps if s.status == "failed"]
    not_run = [name for name in STEPS if name not in by or by[name].status == "not run"]
    within = wall_s <= budget_s
    problems = []
    if failed:
        problems.append(f"failed: {', '.join(failed)} (see steps.<name>.error and the log)")
    if not_run:
        problems.append(f"not run: {', '.join(not_run)}")
    if not within:
        problems.append(f"took {wall_s:.0f} s, over the {budget_s:.0f} s budget")
    if infer is not None and infer.status == "passed" and _get(infer, "device") != "gpu":
        problems.append(f"inference ran on {_get(infer, 'device')!r}, not on the GPUs")
    notes = []
    if workers == 1:
        notes.append("one GPU: NCCL ran with a single rank and SyncBatchNorm was not used (the trainer converts "
                     "the network only with two or more workers); a machine with 2+ GPUs exercises both")
    return {"ok": not failed and not not_run, "steps": {s.name: s.to_dict() for s in steps}, "figures": figures,
            "wall_s": wall_s, "budget_s": budget_s, "within_budget": within, "problems": problems, "notes": notes}


def gpu_facts(workers: int) -> dict[str, Any]:
    """The GPUs torch sees, the versions of torch, CUDA, cuDNN, NCCL and the driver."""
    import torch

    count = torch.cuda.device_count()
    props = torch.cuda.get_device_properties(0)
    try:
        nccl = ".".join(str(v) for v in torch.cuda.nccl.version())
    except (AttributeError, RuntimeError, TypeError):
        nccl = None
    try:
        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10, check=True).stdout.split("\n")[0].strip()
    except (OSError, subprocess.SubprocessError):
        driver = None
    return {"name": torch.cuda.get_device_name(0), "names": [torch.cuda.get_device_name(i) for i in range(count)],
            "count_visible": count, "used_for_training": workers, "total_memory_mib": props.total_memory / 2**20,
            "capability": f"{props.major}.{props.minor}", "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version(), "nccl": nccl, "driver": driver,
            "bf16_supported": torch.cuda.is_bf16_supported(),
            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}


@contextlib.contextmanager
def work_dir(keep: Path | None) -> Iterator[Path]:
    """``keep`` (created), or a temporary directory deleted afterwards."""
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        yield keep.resolve()
        return
    with tempfile.TemporaryDirectory(prefix="secu-gpu-check-") as tmp:
        yield Path(tmp)


def run_check(args: argparse.Namespace, visible: int) -> int:
    """Everything after the GPU check; returns the exit code."""
    from benchmarks.common import LoadProbe, start_result, write_result
    from benchmarks.gpu_stream import stream_step
    from jobs.common import setup_logging

    setup_logging(args.log_level)
    workers = args.num_gpus or visible
    if workers > visible:
        print(f"gpu-check: --num-gpus {workers} but torch sees {visible} GPU(s)", file=sys.stderr)
        return EXIT_SETUP
    if not (Path(args.source) / "train-images-idx3-ubyte.gz").is_file():
        print(f"gpu-check: Fashion-MNIST is not in {args.source}: apt-get install dataset-fashion-mnist, or pass "
              "--source DIR with its four IDX files", file=sys.stderr)
        return EXIT_SETUP
    started = time.perf_counter()
    run_id = f"gpu-check-{time.strftime('%Y%m%d-%H%M%S')}"
    names = dataset_names(args)
    with work_dir(args.storage) as work:
        root = str(work / "root")
        argvs = job_argvs(args, root, run_id, workers)
        try:
            setup = training_setup(argvs["train"][0], args.train_images)
        except (ValueError, FileNotFoundError) as err:
            print(f"gpu-check: the training settings are not valid: {err}", file=sys.stderr)
            return EXIT_SETUP
        result = start_result(NAME, args) | {"gpu": gpu_facts(workers)}
        load = LoadProbe()
        sampler = GpuMemorySampler(args.memory_interval_s).start()
        try:
            ray_step = run_step("ray", lambda: start_local_ray(visible, workers), sampler)
            ingest = run_step("ingest", lambda: ingest_step(argvs["ingest"], root, names), sampler, [ray_step])
            train = run_step("train", lambda: train_step(argvs["train"][0], root, run_id), sampler, [ingest])
            infer = run_step("inference", lambda: inference_step(argvs, root, run_id, names["test"]), sampler,
                             [train])
            stream = run_step("stream_224", lambda: stream_step(root, work, names["jpeg"], args), sampler,
                              [ray_step])
        finally:
            sampler.stop()
            if "ray" in sys.modules:
                import ray

                ray.shutdown()
    wall_s = time.perf_counter() - started
    result |= {
        "config": {"train_images": args.train_images, "test_images": args.test_images, "epochs": args.epochs,
                   "jpeg_images": args.jpeg_images, "stream_batch_size": args.stream_batch_size,
                   "repeats": args.repeats, "warmup": args.warmup, "overrides": list(args.overrides),
                   "run_id": run_id, "storage": str(args.storage) if args.storage else "temporary",
                   "training": setup, "commands": {k: [" ".join(a) for a in v] for k, v in argvs.items()}},
        "figure": ("images/s: training = data/images_per_s of the epochs after the first (median), stream = images "
                   "per second of one epoch of the 224 px stream (median of the measured rounds), inference = the "
                   "Ray execution of jobs.infer (_SUCCESS); epoch time = time/epoch_s; test ACC = the primary "
                   "head (K = 10) on the test split; peak GPU memory: see gpu_memory"),
        "baseline": "none: a one-shot check of the GPU path (the stream's decode_only variant is its reference)",
        "gpu_memory": sampler.describe(),
        "load": load.finish(),
    } | assemble_result([ray_step, ingest, train, infer, stream], wall_s, args.budget_s, workers)
    write_result(args.out, result)
    print_summary(result)
    return EXIT_OK if result["ok"] else EXIT_STEP_FAILED


def print_summary(result: Mapping[str, Any]) -> None:
    from benchmarks.common import print_table

    rows: list[list[Any]] = [[k, v] for k, v in result["figures"].items() if not isinstance(v, dict)]
    rows += [[f"step {name}", f"{s['status']} ({s['seconds'] or 0:.0f} s)"] for name, s in result["steps"].items()]
    rows.append(["wall_s", f"{result['wall_s']:.0f} (budget {result['budget_s']:.0f}, "
                           f"within: {result['within_budget']})"])
    print_table(["figure", "value"], rows, title=f"{NAME} on {result['gpu']['name']}")
    for line in [*result["problems"], *result["notes"]]:
        print(line)


if __name__ == "__main__":
    raise SystemExit(main())
