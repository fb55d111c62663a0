"""Peak GPU memory of work that runs in other processes (Ray Train workers, inference actors), by sampling.

``torch.cuda.max_memory_allocated`` in the driver sees only the driver's own tensors; the training workers
and the inference actors are other processes, and neither reports its memory. So a thread samples the
GPUs every ``interval_s`` while the check runs, and every step reads the peak of its own time window:

- ``nvidia-smi`` (preferred): ``memory.used`` of every GPU (device-wide: every process on the GPU, the
  CUDA contexts included), and, per GPU, the sum of ``used_memory`` of the compute processes that belong
  to this process' tree (the local Ray that this process started, its workers and actors, found through
  /proc). In a container whose PID namespace hides the host's PIDs nvidia-smi reports PIDs that match
  nothing here; that figure is then null and only the device-wide one remains.
- ``torch.cuda.mem_get_info`` (when nvidia-smi is missing): total - free of every visible GPU, device-wide,
  from this process (it creates a CUDA context on every visible GPU, part of the baseline).

The baseline is the first sample, taken before Ray starts: ``above_baseline`` is what the check added. A
sample can miss a short spike between two samples, but not the peak of a process that lives on after it:
torch's caching allocator keeps what it reserved until the process ends, so a worker's device memory only
grows while it runs.
"""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from benchmarks.common import tree_cpu_seconds

NVIDIA_SMI_GPUS = ["nvidia-smi", "--query-gpu=index,uuid,memory.used,memory.total", "--format=csv,noheader,nounits"]
NVIDIA_SMI_APPS = ["nvidia-smi", "--query-compute-apps=gpu_uuid,pid,used_memory", "--format=csv,noheader,nounits"]


@dataclass(frozen=True)
class MemorySample:
    """One look at the GPUs: MiB used per GPU (device-wide) and, where known, by this process tree's processes."""

    t: float
    """``time.monotonic()`` of the sample."""
    used_mib: dict[str, float]
    ours_mib: dict[str, float] | None = None


def _rows(text: str) -> list[list[str]]:
    return [[cell.strip() for cell in line.split(",")] for line in text.splitlines() if line.strip()]


def _mib(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None  # "[N/A]", "[Not Supported]"


def parse_gpus(text: str, visible_uuids: Sequence[str] = ()) -> dict[str, tuple[str, float, float]]:
    """nvidia-smi index -> (uuid, used MiB, total MiB) from ``NVIDIA_SMI_GPUS``' output; only the GPUs whose
    uuid contains one of ``visible_uuids`` (torch's, without the ``GPU-`` prefix) when any are given."""
    out: dict[str, tuple[str, float, float]] = {}
    for row in _rows(text):
        if len(row) < 4:
            continue
        used, total = _mib(row[2]), _mib(row[3])
        if used is None or total is None:
            continue
        if visible_uuids and not any(u and u in row[1] for u in visible_uuids):
            continue
        out[row[0]] = (row[1], used, total)
    return out


def parse_apps(text: str, uuid_to_index: dict[str, str], pids: set[int]) -> dict[str, float]:
    """Per GPU index, MiB used by the processes in ``pids``, from ``NVIDIA_SMI_APPS``' output."""
    out = {index: 0.0 for index in uuid_to_index.values()}
    for row in _rows(text):
        if len(row) < 3 or row[0] not in uuid_to_index:
            continue
        used = _mib(row[2])
        if used is not None and row[1].isdigit() and int(row[1]) in pids:
            out[uuid_to_index[row[0]]] += used
    return out


def nvidia_smi_query(visible_uuids: Sequence[str] = ()) -> Callable[[], MemorySample]:
    """A sampler reading nvidia-smi; ``ours_mib`` is None while no process of this tree shows on a GPU."""
    def sample() -> MemorySample:
        gpus = parse_gpus(_run(NVIDIA_SMI_GPUS), visible_uuids)
        used = {index: u for index, (_, u, _) in gpus.items()}
        apps = parse_apps(_run(NVIDIA_SMI_APPS), {uuid: index for index, (uuid, _, _) in gpus.items()},
                          set(tree_cpu_seconds()))
        return MemorySample(time.monotonic(), used, apps if any(apps.values()) else None)
    return sample


def torch_query() -> Callable[[], MemorySample]:
    """A sampler from ``torch.cuda.mem_get_info`` of every visible GPU (torch's indexes), device-wide."""
    import torch

    def sample() -> MemorySample:
        used = {}
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            used[str(i)] = (total - free) / 2**20
        return MemorySample(time.monotonic(), used)
    return sample


def _run(command: list[str]) -> str:
    return subprocess.run(command, capture_output=True, text=True, timeout=10, check=True).stdout


def torch_uuids() -> list[str]:
    """The uuids of the GPUs torch sees (empty when torch does not say)."""
    import torch

    try:
        return [str(torch.cuda.get_device_properties(i).uuid) for i in range(torch.cuda.device_count())]
    except (AttributeError, RuntimeError):
        return []


def pick_query() -> tuple[str, Callable[[], MemorySample]]:
    """(method in words, sampler): nvidia-smi when it answers, else torch.cuda.mem_get_info."""
    if shutil.which("nvidia-smi"):
        query = nvidia_smi_query(torch_uuids())
        try:
            query()
            return "nvidia-smi memory.used (device-wide) and used_memory of this process tree's compute apps", query
        except (OSError, subprocess.SubprocessError):
            pass
    return "torch.cuda.mem_get_info in the driver: total - free (device-wide)", torch_query()


def memory_peaks(samples: Sequence[MemorySample], t0: float, t1: float, baseline: MemorySample | None
                 ) -> dict[str, Any]:
    """Peaks of the samples taken in [t0, t1]: device-wide per GPU, above the baseline, and this tree's."""
    inside = [s for s in samples if t0 <= s.t <= t1]
    out: dict[str, Any] = {"samples": len(inside), "device_used_peak_mib": None, "above_baseline_peak_mib": None,
                           "max_above_baseline_mib": None, "our_processes_peak_mib": None,
                           "max_our_processes_mib": None}
    if not inside:
        return out
    gpus = sorted({g for s in inside for g in s.used_mib})
    peak = {g: max(s.used_mib[g] for s in inside if g in s.used_mib) for g in gpus}
    base = baseline.used_mib if baseline is not None else {}
    above = {g: peak[g] - base.get(g, 0.0) for g in gpus}
    out |= {"device_used_peak_mib": peak, "above_baseline_peak_mib": above,
            "max_above_baseline_mib": max(above.values()) if above else None}
    ours = [s.ours_mib for s in inside if s.ours_mib is not None]
    if ours:
        per_gpu = {g: max(o.get(g, 0.0) for o in ours) for g in sorted({g for o in ours for g in o})}
        out |= {"our_processes_peak_mib": per_gpu, "max_our_processes_mib": max(per_gpu.values())}
    return out


class GpuMemorySampler:
    """Samples the GPUs on a daemon thread from ``start()`` to ``stop()``; ``window(t0, t1)`` gives the peaks."""

    def __init__(self, interval_s: float = 0.5, query: tuple[str, Callable[[], MemorySample]] | None = None) -> None:
        self.interval_s = interval_s
        self.method, self._query = query or pick_query()
        self.samples: list[MemorySample] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="gpu-memory-sampler", daemon=True)

    @property
    def baseline(self) -> MemorySample | None:
        """The first sample (taken by ``start``, before any work)."""
        return self.samples[0] if self.samples else None

    def sample(self) -> None:
        """Take one sample now (an error is recorded, never raised: memory is a figure, not the check)."""
        try:
            self.samples.append(self._query())
        except Exception as err:  # a failed look must not end the check
            if len(self.errors) < 5:
                self.errors.append(f"{type(err).__name__}: {err}")

    def start(self) -> GpuMemorySampler:
        self.sample()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=15)
        self.sample()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.sample()

    def window(self, t0: float, t1: float) -> dict[str, Any]:
        """``memory_peaks`` of [t0, t1] against the baseline."""
        return memory_peaks(list(self.samples), t0, t1, self.baseline)

    def describe(self) -> dict[str, Any]:
        """How memory was measured, for the JSON file."""
        base = self.baseline
        return {"method": self.method, "interval_s": self.interval_s, "samples": len(self.samples),
                "baseline_mib": None if base is None else base.used_mib, "errors": self.errors,
                "note": ("peaks sampled per step; device-wide figures include every process on the GPU (the "
                         "driver's own CUDA context too); above_baseline = minus the first sample, taken before "
                         "Ray started; our_processes = this process tree only, null when nvidia-smi's PIDs are "
                         "not this machine's (a container) or the fallback is used")}
