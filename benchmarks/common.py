"""Shared helpers of the benchmark scripts: machine facts, timing, summaries, tables, JSON, test data.

Every benchmark follows the same shape (``../shared/docs/benchmarks.md``): build the inputs, run
ours and the baseline alternately (``alternate``: a warm-up round, then at least three measured
rounds, the order reversed every round so that a slow drift of the machine hits both sides alike),
summarise each figure (``summarize``: median, min, max, quartiles), print a table (``print_table``)
and write one JSON file (``write_result``) holding the machine, device, versions, config, every raw
figure, the medians and the ratios to the baseline.

The build machines are shared: ``LoadProbe`` records how busy the CPUs were just before and during a
run, so that a figure taken under load says so in its JSON (``load.under_load``).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import io
import json
import logging
import math
import os
import platform
import statistics
import sys
import tarfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

RESULTS_DIR = Path(__file__).resolve().parent / "results"
"""Default location of the JSON files (git-ignored)."""

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
"""Where Debian's ``dataset-fashion-mnist`` package puts the IDX files."""

_PACKAGES = ("torch", "torchvision", "ray", "pyarrow", "numpy", "pillow", "webdataset", "scikit-learn")

Figures = dict[str, float]
"""What one measured call returns, e.g. ``{"images": 2048, "seconds": 3.1, "images_per_s": 660.6}``."""


# ---------------------------------------------------------------------------------------------
# Machine, device, versions, load
# ---------------------------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float:
    try:
        with open("/proc/meminfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    return round(int(line.split()[1]) / (1 << 20), 1)
    except OSError:
        pass
    return float("nan")


def machine_info() -> dict[str, Any]:
    """CPU model, cores (logical, and usable by this process), RAM, OS."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": _cpu_model(),
        "cores_logical": os.cpu_count(),
        "cores_usable": usable,
        "ram_gib": _ram_gib(),
        "platform": platform.platform(),
    }


def device_info() -> dict[str, Any]:
    """The accelerator torch sees, or ``cpu``."""
    import torch

    if torch.cuda.is_available():
        return {"device": "cuda", "name": torch.cuda.get_device_name(0), "count": torch.cuda.device_count()}
    return {"device": "cpu", "name": _cpu_model(), "count": 0}


def versions() -> dict[str, str]:
    """Python and the versions of the packages the figures depend on."""
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def _cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies over all CPUs from /proc/stat."""
    with open("/proc/stat", encoding="utf-8") as handle:
        values = [float(v) for v in handle.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0.0)
    return sum(values) - idle, sum(values)


class LoadProbe:
    """How busy the machine was: CPU use by everything during a 1 s look before the run, the load
    average at start and end, and the CPU use of the whole machine over the run.

    ``under_load`` is True when other processes kept more than a quarter of the cores busy before the
    run started, or the 1-minute load average exceeded the core count: figures then carry noise.
    """

    def __init__(self, look_s: float = 1.0) -> None:
        """Take the look before the run (sleeps ``look_s``)."""
        self.cores = os.cpu_count() or 1
        self.load_start = os.getloadavg()
        try:
            b0, t0 = _cpu_times()
            time.sleep(look_s)
            b1, t1 = _cpu_times()
            self.busy_before = (b1 - b0) / max(t1 - t0, 1e-9)
            self._start = _cpu_times()
        except OSError:
            self.busy_before, self._start = float("nan"), (0.0, 0.0)

    def finish(self) -> dict[str, Any]:
        """The load record for the JSON file."""
        try:
            b, t = _cpu_times()
            busy_during = (b - self._start[0]) / max(t - self._start[1], 1e-9)
        except OSError:
            busy_during = float("nan")
        load_end = os.getloadavg()
        under = (self.busy_before > 0.25) or (self.load_start[0] > self.cores)
        return {
            "busy_fraction_before": round(self.busy_before, 3),
            "busy_fraction_during": round(busy_during, 3),
            "loadavg_start": [round(x, 2) for x in self.load_start],
            "loadavg_end": [round(x, 2) for x in load_end],
            "under_load": bool(under),
            "note": ("other processes were using the CPUs when this ran: absolute figures are noisy, ratios "
                     "measured side by side less so") if under else "machine quiet at the start",
        }


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def tree_cpu_seconds(root: int | None = None) -> dict[int, float]:
    """CPU seconds (user + system, reaped children included) of process ``root`` (default: this one) and
    all its live descendants, by pid.

    Read from /proc. A local Ray started by this process (GCS, raylet, its workers), DataLoader workers
    and pool processes are all descendants, so the difference of two readings is the CPU a variant
    consumed, daemons included, whatever else runs on the machine: a figure that load barely moves.
    Returns an empty dict where /proc is unavailable.
    """
    root = os.getpid() if root is None else root
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    try:
        names = os.listdir("/proc")
    except OSError:
        return {}
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="utf-8") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue  # the process ended meanwhile
        # fields[0] is the state (field 3 of stat); ppid is field 4, utime/stime fields 14/15, and
        # cutime/cstime (16/17) hold the CPU of children that ended and were reaped.
        parent[int(name)] = int(fields[1])
        cpu[int(name)] = sum(int(v) for v in fields[11:15]) / _TICKS
    tree, frontier = {root}, [root]
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in tree:
                tree.add(child)
                frontier.append(child)
    return {pid: cpu[pid] for pid in tree if pid in cpu}


def cpu_used(before: Mapping[int, float], after: Mapping[int, float]) -> float:
    """CPU seconds used between two ``tree_cpu_seconds`` readings (new processes count whole)."""
    return sum(max(0.0, value - before.get(pid, 0.0)) for pid, value in after.items())



class Stopwatch:
    """``with Stopwatch() as sw: ...; sw.seconds``."""

    seconds: float = 0.0

    def __enter__(self) -> Stopwatch:
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._t0


def summarize(values: Sequence[float]) -> dict[str, float]:
    """Median, min, max, quartiles (inclusive method) and count of ``values``."""
    if not values:
        raise ValueError("summarize needs at least one value")
    data = sorted(float(v) for v in values)
    q1, _, q3 = statistics.quantiles(data, n=4, method="inclusive") if len(data) > 1 else (data[0],) * 3
    return {"median": statistics.median(data), "min": data[0], "max": data[-1], "q1": q1, "q3": q3,
            "n": float(len(data))}


@dataclass
class Rounds:
    """Raw figures of alternating rounds: ``raw[variant]`` is one ``Figures`` per call, in call order."""

    raw: dict[str, list[Figures]] = field(default_factory=dict)
    order: list[str] = field(default_factory=list)
    """Variant names in the order they ran (shows the alternation)."""

    def measured(self, variant: str, key: str) -> list[float]:
        """The values of ``key`` of the measured (non-warm-up) calls of ``variant``."""
        return [r[key] for r in self.raw.get(variant, []) if not r.get("warmup") and key in r]

    def summary(self, key: str) -> dict[str, dict[str, float]]:
        """``summarize`` of ``key`` for every variant that has measured calls."""
        return {name: summarize(self.measured(name, key)) for name in self.raw if self.measured(name, key)}


def alternate(variants: Mapping[str, Callable[[], Figures]], repeats: int, warmup: int = 1,
              log: Callable[[str], None] | None = print) -> Rounds:
    """Run every variant once per round, ``warmup`` rounds unrecorded then ``repeats`` measured ones.

    The order is reversed every other round (A B C, C B A, A B C, ...). Each call's figures get a
    ``warmup`` flag (1.0 for warm-up rounds), its ``round``, and ``tree_cpu_s``: the CPU seconds this
    process and its descendants (a local Ray included) used during the call (``tree_cpu_seconds``), unless
    the variant reports its own (one that times only part of its call, after an untimed set-up).
    """
    if repeats < 1:
        raise ValueError(f"repeats={repeats} must be >= 1")
    names = list(variants)
    rounds = Rounds({name: [] for name in names})
    for rnd in range(warmup + repeats):
        for name in names if rnd % 2 == 0 else reversed(names):
            cpu_before = tree_cpu_seconds()
            figures = dict(variants[name]())
            figures.setdefault("tree_cpu_s", cpu_used(cpu_before, tree_cpu_seconds()))
            figures["warmup"] = float(rnd < warmup)
            figures["round"] = float(rnd)
            rounds.raw[name].append(figures)
            rounds.order.append(name)
            if log is not None:
                shown = ", ".join(f"{k}={v:.4g}" for k, v in figures.items() if k not in ("warmup", "round"))
                log(f"  [{'warm-up' if rnd < warmup else f'round {rnd - warmup + 1}'}] {name}: {shown}")
    return rounds


def ratios(summary: Mapping[str, Mapping[str, float]], baseline: str) -> dict[str, float]:
    """Median of every variant divided by the baseline's median."""
    base = summary[baseline]["median"]
    return {name: (s["median"] / base if base else float("nan")) for name, s in summary.items()}


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> None:
    """A plain-text table; floats are printed with 4 significant digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "-"
            return f"{value:.4g}" if abs(value) < 1e5 else f"{value:.3e}"
        return str(value)

    text = [[cell(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in text)) if text else len(str(h)) for i, h in enumerate(headers)]
    if title:
        print(f"\n{title}")
    print("  ".join(str(h).rjust(w) for h, w in zip(headers, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in text:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf; a missing figure is null
    if isinstance(value, Path):
        return str(value)
    return value


def base_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """The options every benchmark has: ``--quick``, ``--out``, ``--repeats``, ``--warmup``."""
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{name}", description=doc,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small inputs, for the smoke test (< 1 minute)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / f"{name}.json", help="JSON file to write")
    parser.add_argument("--repeats", type=int, default=3, help="measured rounds after the warm-up (>= 3)")
    parser.add_argument("--warmup", type=int, default=1, help="unrecorded rounds first")
    return parser


def start_result(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The common head of a result: benchmark, date, command, machine, device, versions."""
    return {
        "benchmark": name,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join([os.path.basename(sys.executable), "-m", f"benchmarks.{name}", *sys.argv[1:]]),
        "quick": bool(getattr(args, "quick", False)),
        "machine": machine_info(),
        "device": device_info(),
        "versions": versions(),
    }


def write_result(path: Path, result: Mapping[str, Any]) -> None:
    """Write ``result`` as JSON (NaN and inf become null), creating the directory."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_jsonable(result), indent=1, sort_keys=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    print(f"\nwritten: {path}")


# ---------------------------------------------------------------------------------------------
# Ray and data
# ---------------------------------------------------------------------------------------------


def start_ray(num_cpus: int) -> None:
    """A fresh local Ray (never an existing cluster) with ``num_cpus`` CPUs, no dashboard, quiet."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    import ray.data

    if ray.is_initialized():
        ray.shutdown()
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    # Ray Data logs every execution start at INFO; the tables are what matters here.
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def require_fashion_mnist() -> str:
    """The Fashion-MNIST directory, or FileNotFoundError saying how to install it."""
    if not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")):
        raise FileNotFoundError(
            f"Fashion-MNIST is not in {FASHION_MNIST_DIR}: apt-get install -y dataset-fashion-mnist")
    return FASHION_MNIST_DIR


def ingest_fashion_mnist(storage: Any, dataset: str, split: str, limit: int | None, shard_size: int) -> Any:
    """Ingest the first ``limit`` images of a Fashion-MNIST split (``train``, ``test``, ``all``) with our ingest."""
    from pipelines.dataset.ingest import IngestOptions, ingest
    from pipelines.dataset.sources import open_source

    source = open_source(f"idx:{require_fashion_mnist()}", split=split)
    import ray

    options = IngestOptions(shard_size=shard_size, limit=limit, use_ray=ray.is_initialized())
    return ingest(storage, dataset, source, options, source_spec=f"idx:{FASHION_MNIST_DIR}", split=split)


def synthetic_photo(rng: np.random.Generator, width: int = 500, height: int = 375) -> np.ndarray:
    """An ImageNet-like uint8 H x W x 3 picture: smooth colour regions, mid-frequency texture, grain.

    At 500 x 375 and JPEG quality 90 these encode to roughly 45-60 KB, close to a real photo of that
    size (pure noise would be 3x larger and decode slower; a flat image far smaller and faster).
    """
    from PIL import Image

    low = Image.fromarray(rng.integers(0, 256, size=(15, 20, 3), dtype=np.uint8)).resize((width, height),
                                                                                          Image.Resampling.BICUBIC)
    mid = Image.fromarray(rng.integers(0, 256, size=(75, 100, 3), dtype=np.uint8)).resize((width, height),
                                                                                           Image.Resampling.BILINEAR)
    grain = rng.integers(-6, 7, size=(height, width, 3), dtype=np.int16)
    pixels = (np.asarray(low, dtype=np.int16) * 7 + np.asarray(mid, dtype=np.int16) * 3) // 10 + grain
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_synthetic_jpegs(directory: Path, n: int, *, classes: int = 10, width: int = 500, height: int = 375,
                          quality: int = 90, seed: int = 0) -> int:
    """Write ``n`` synthetic JPEGs into ``directory/class_XX/img_XXXXXX.jpg``; returns the bytes written."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    total = 0
    for i in range(n):
        folder = directory / f"class_{i % classes:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(synthetic_photo(rng, width, height)).save(buf, format="JPEG", quality=quality)
        (folder / f"img_{i:06d}.jpg").write_bytes(buf.getvalue())
        total += buf.tell()
    return total


def ingest_folder(storage: Any, dataset: str, folder: Path, shard_size: int) -> Any:
    """Ingest an image folder (class sub-folders) with our ingest (the image-folder source)."""
    import ray

    from pipelines.dataset.ingest import IngestOptions, ingest
    from pipelines.dataset.sources import open_source

    source = open_source(f"folder:{folder}")
    return ingest(storage, dataset, source, IngestOptions(shard_size=shard_size, use_ray=ray.is_initialized()),
                  source_spec=f"folder:{folder}")


SHARD_IMAGE_EXTS = ("png", "jpg", "jpeg")


def iter_shard_samples(path: str) -> Iterator[tuple[str, bytes, bytes]]:
    """(key, image bytes, json bytes) of every sample of one of our shards, streamed with ``tarfile``."""
    pending: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path, mode="r|") as tar:
        for member in tar:
            handle = tar.extractfile(member) if member.isfile() else None
            if handle is None:
                continue
            key, _, ext = member.name.partition(".")
            sample = pending.setdefault(key, {})
            sample[ext.lower()] = handle.read()
            image_ext = next((e for e in SHARD_IMAGE_EXTS if e in sample), None)
            if "json" in sample and image_ext is not None:
                del pending[key]
                yield key, sample[image_ext], sample["json"]


def shard_paths(storage: Any, dataset: str) -> list[str]:
    """Local paths of the committed shards of ``dataset`` (local storage only)."""
    from pipelines.dataset.info import dataset_dir, load_dataset_info

    info = load_dataset_info(storage, dataset)
    return [storage.path(dataset_dir(dataset), "shards", s.name) for s in info.shards]
