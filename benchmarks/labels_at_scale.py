"""Labels for a billion images: paged label lookups (``compute.label_fetch=pages``) vs fetching them all.

Claim: with ``pages`` a training worker fetches and holds only the pages of the ids it reads, so the
coordinator serves N = 1B instances from one node with a per-step cost and an epoch boundary a real run
can afford, where ``all`` makes every training node fetch N x H labels each epoch.

Measured in one run, per mode (``pages``, then the baseline ``all``; each on a fresh coordinator of
``--num-samples`` ids, default 1B, one head of K = 1000, int16 labels):

1. Per-step cost: W simulated workers (Ray actors, ``--workers``, default 2) read ids the way training
   does: shards of ``--shard-size`` consecutive ids (ingest's 10,000) in a shuffled order, dealt to the
   workers in turn, batches of ``--batch`` in stream order. A step = ``labels_for`` + ``--step-ms`` of
   simulated compute (a sleep) + ``write_async``; the figure is the time in the two memory calls per
   step (median over workers, then over epochs), and the pages each worker fetched.
2. Epoch boundary: ``begin_epoch`` (per worker), ``end_epoch`` (statistics and swap) and ``state_dict``
   (what a checkpoint fetches from the shards, into this process).
3. Memory: the shard actor's peak and current resident set (``VmHWM``/``VmRSS`` of its process; per
   instance after subtracting the peak of an actor holding 1,000 ids), the workers' label bytes
   (``cached_label_bytes``) and peak resident sets.
4. The epoch close of a fully labelled memory (statistics and swap, in a fresh actor process, with its
   peak memory): the simulated epochs label only the ids their steps read.
5. ``--small-samples`` (default 10M) x the ``imagenet1k`` recipe's 10 heads, ``pages`` only: the same
   figures, from which 100M x 10 heads is extrapolated (linear in N), and the largest N one shard holds
   on a ``--node-gib`` node of which it may use ``--shard-fraction``, for 1 and 10 heads.

    python -m benchmarks.labels_at_scale
    python -m benchmarks.labels_at_scale --quick
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from benchmarks.common import (
    Figures,
    LoadProbe,
    Stopwatch,
    base_parser,
    print_table,
    start_ray,
    start_result,
    summarize,
    write_result,
)
from pipelines.training.coordinator import DEFAULT_MAX_PAGES, DEFAULT_PAGE_IDS, CoordinatorClient
from pipelines.training.memory import label_dtype
from secu.recipes import recipe

NAME = "labels_at_scale"
GIB = float(1 << 30)


def proc_kib(pid: int, field: str) -> int:
    """A ``/proc/<pid>/status`` figure in KiB (``VmRSS``, ``VmHWM``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def actor_pid(handle: Any) -> int:
    """The process id of an actor (``__ray_call__`` runs a function on the actor instance)."""
    import os

    return int(ray.get(handle.__ray_call__.remote(lambda _self: os.getpid())))


def stream_ids(num_samples: int, shard_size: int, workers: int, ids_per_worker: int, seed: int) -> list[np.ndarray]:
    """Each worker's ids in read order: shuffled shards of consecutive ids, dealt in turn (a shard of
    the stream is read by one worker), as many shards as ``ids_per_worker`` needs."""
    num_shards = math.ceil(num_samples / shard_size)
    shards_each = math.ceil(ids_per_worker / shard_size)
    order = np.random.default_rng(seed).choice(num_shards, size=min(num_shards, workers * shards_each), replace=False)
    out = []
    for w in range(workers):
        mine = order[w::workers]
        ids = np.concatenate([np.arange(s * shard_size, min((s + 1) * shard_size, num_samples)) for s in mine])
        out.append(ids[:ids_per_worker])
    return out


class SimWorker:
    """A simulated training worker (Ray actor): one epoch of steps through a ``CoordinatorClient``."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.client: CoordinatorClient | None = None

    def epoch(self, client: CoordinatorClient, epoch: int, ids: np.ndarray, batch: int, step_s: float) -> Figures:
        import os

        if self.client is None:
            self.client = client  # one unpickled client per worker for the whole run, as in training
        client = self.client
        rng = np.random.default_rng(epoch * 100 + self.rank)
        ks = client.ks
        with Stopwatch() as begin:
            client.begin_epoch(epoch)
        fetched_before = client.page_fetches
        in_steps, steps, held = 0.0, 0, 0
        for start in range(0, ids.size, batch):
            ids_B = ids[start:start + batch]
            labels_HB = np.stack([rng.integers(0, k, ids_B.size) for k in ks])
            t0 = time.perf_counter()
            client.labels_for(ids_B)
            t1 = time.perf_counter()
            time.sleep(step_s)
            t2 = time.perf_counter()
            client.write_async(ids_B, labels_HB, epoch)
            in_steps += (t1 - t0) + (time.perf_counter() - t2)
            steps += 1
            held = max(held, client.cached_label_bytes)
        with Stopwatch() as flush:
            client.flush()
        return {"begin_s": begin.seconds, "per_step_ms": 1e3 * in_steps / steps, "steps": float(steps),
                "flush_s": flush.seconds, "pages_fetched": float(client.page_fetches - fetched_before),
                "label_bytes_held_max": float(held), "peak_rss_gib": proc_kib(os.getpid(), "VmHWM") / 2**20}

    def drop(self) -> None:
        self.client = None
        gc.collect()


_SimWorkerActor = ray.remote(num_cpus=0)(SimWorker)


def measure(num_samples: int, ks: list[int], mode: str, args: Any) -> dict[str, Any]:
    """``--epochs`` epochs (the first unrecorded) of W simulated workers on a fresh coordinator."""
    baseline_gib = process_baseline_gib(ks)
    print(f"  N={num_samples:,} H={len(ks)} label_fetch={mode}")
    with Stopwatch() as create:
        client = CoordinatorClient.create(run_id=f"bench-{mode}-{num_samples}", num_samples=num_samples, ks=ks,
                                          label_fetch=mode)
        client.reset()  # waits until the actor exists and holds its arrays
    pids = [actor_pid(h) for h in client.handles]
    workers = [_SimWorkerActor.remote(rank) for rank in range(args.workers)]
    epochs: list[dict[str, Any]] = []
    try:
        for epoch in range(args.epochs):
            ids = stream_ids(num_samples, args.shard_size, args.workers, args.steps * args.batch, seed=epoch)
            figs = ray.get([w.epoch.remote(client, epoch, ids[i], args.batch, args.step_ms / 1e3)
                            for i, w in enumerate(workers)])
            with Stopwatch() as end:
                client.end_epoch(epoch=epoch)
            with Stopwatch() as state:
                shards = client.state_dict()
            del shards
            gc.collect()
            epochs.append({"warmup": epoch == 0, "workers": figs, "end_epoch_s": end.seconds,
                           "state_dict_s": state.seconds,
                           "actor_rss_gib": proc_kib(pids[0], "VmRSS") / 2**20})
            print(f"    epoch {epoch}: {statistics.median(f['per_step_ms'] for f in figs):.3f} ms/step, "
                  f"begin {statistics.median(f['begin_s'] for f in figs):.3f} s, end {end.seconds:.2f} s, "
                  f"state_dict {state.seconds:.2f} s, pages {[int(f['pages_fetched']) for f in figs]}")
        actor_peak = proc_kib(pids[0], "VmHWM") / 2**20
        ray.get([w.drop.remote() for w in workers])
    finally:
        for w in workers:
            ray.kill(w)
        client.shutdown()
    recorded = [e for e in epochs if not e["warmup"]] or epochs
    itemsize = np.dtype(label_dtype(ks)).itemsize

    def med(key: str) -> float:
        return statistics.median(statistics.median(f[key] for f in e["workers"]) for e in recorded)

    def spread(key: str) -> dict[str, float]:  # over the recorded epochs, each the median over workers
        return summarize([statistics.median(f[key] for f in e["workers"]) for e in recorded])

    return {
        "num_samples": num_samples, "heads": len(ks), "label_fetch": client.label_fetch, "epochs": epochs,
        "create_s": create.seconds,
        "per_step_ms_spread": spread("per_step_ms"), "begin_epoch_s_spread": spread("begin_s"),
        "per_step_ms": med("per_step_ms"), "begin_epoch_s": med("begin_s"), "flush_s": med("flush_s"),
        "pages_fetched_per_worker_epoch": med("pages_fetched"), "steps_per_worker_epoch": med("steps"),
        "worker_label_bytes_max": max(f["label_bytes_held_max"] for e in epochs for f in e["workers"]),
        "worker_peak_rss_gib": max(f["peak_rss_gib"] for e in epochs for f in e["workers"]),
        "end_epoch_s": statistics.median(e["end_epoch_s"] for e in recorded),
        "state_dict_s": statistics.median(e["state_dict_s"] for e in recorded),
        "actor_peak_rss_gib": actor_peak,
        "actor_rss_gib": recorded[-1]["actor_rss_gib"],
        "actor_array_bytes_per_instance": len(ks) * 2 * itemsize + 1.0,  # prev + next labels, written flag
        "actor_peak_bytes_per_instance": (actor_peak - baseline_gib) * GIB / num_samples,
        "actor_process_baseline_gib": baseline_gib,
    }


class EpochCloseProbe:
    """A fresh actor process that times the epoch close of a fully labelled ``AssignmentMemory`` (the simulated
    epochs above label only the ids their steps read, so their ``end_epoch`` skips most of the work)."""

    def run(self, num_samples: int, ks: list[int]) -> Figures:
        import os

        from pipelines.training.memory import STATS_CHUNK_IDS, AssignmentMemory

        before = proc_kib(os.getpid(), "VmHWM")
        memory = AssignmentMemory(0, num_samples, ks)
        for a in range(0, num_samples, STATS_CHUNK_IDS):  # every id labelled, written directly (not timed)
            b = min(a + STATS_CHUNK_IDS, num_samples)
            ids = np.arange(a, b)
            for h, k in enumerate(ks):
                memory.next_HN[h, a:b] = (ids * 7 + h) % k
        memory.written_N[:] = True
        with Stopwatch() as stats:
            memory.sufficient_stats(epoch=0)
        with Stopwatch() as commit:
            memory.commit_epoch(None, None, epoch=0)
        return {"stats_s": stats.seconds, "commit_s": commit.seconds, "end_epoch_s": stats.seconds + commit.seconds,
                "peak_gib": proc_kib(os.getpid(), "VmHWM") / 2**20, "baseline_gib": before / 2**20,
                "peak_bytes_per_instance": (proc_kib(os.getpid(), "VmHWM") - before) * 1024 / num_samples}


_EpochCloseActor = ray.remote(num_cpus=1)(EpochCloseProbe)


def full_epoch_close(num_samples: int, ks: list[int]) -> Figures:
    print(f"  epoch close of a fully labelled memory, N={num_samples:,} H={len(ks)}")
    probe = _EpochCloseActor.remote()
    try:
        figures: Figures = ray.get(probe.run.remote(num_samples, ks))
    finally:
        ray.kill(probe)
    print(f"    statistics {figures['stats_s']:.2f} s, swap {figures['commit_s']:.2f} s, "
          f"peak {figures['peak_gib']:.2f} GiB")
    return figures


def process_baseline_gib(ks: list[int]) -> float:
    """Peak resident set of a coordinator actor process holding only 1,000 ids: Ray's and numpy's share,
    subtracted before figures per instance are taken."""
    client = CoordinatorClient.create(run_id=f"bench-baseline-{len(ks)}", num_samples=1000, ks=ks)
    try:
        client.reset()
        return proc_kib(actor_pid(client.handles[0]), "VmHWM") / 2**20
    finally:
        client.shutdown()


def largest_n(bytes_per_instance: float, budget_bytes: float) -> int:
    return int(budget_bytes // bytes_per_instance)


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__)
    parser.add_argument("--num-samples", type=int, default=None, help="N of the one-head run (default 1e9)")
    parser.add_argument("--small-samples", type=int, default=None,
                        help="N of the 10-head run the 100M x 10 figures are extrapolated from (default 1e7)")
    parser.add_argument("--workers", type=int, default=2, help="simulated training workers")
    parser.add_argument("--steps", type=int, default=None, help="steps per worker per epoch (default 400)")
    parser.add_argument("--step-ms", type=float, default=20.0, help="simulated compute per step")
    parser.add_argument("--batch", type=int, default=256, help="local batch")
    parser.add_argument("--shard-size", type=int, default=10_000, help="ids per WebDataset shard")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per mode, the first unrecorded (default 4)")
    parser.add_argument("--node-gib", type=float, default=32.0, help="node memory for the largest-N figures")
    parser.add_argument("--shard-fraction", type=float, default=0.5, help="share of a node one shard may use")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    args = parser.parse_args(argv)
    args.num_samples = args.num_samples or (2_000_000 if args.quick else 1_000_000_000)
    args.small_samples = args.small_samples or (1_000_000 if args.quick else 10_000_000)
    args.steps = args.steps or (20 if args.quick else 400)
    args.epochs = args.epochs or (2 if args.quick else 4)
    heads10 = list(recipe("imagenet1k").secu.ks)
    result = start_result(NAME, args)
    load = LoadProbe()
    start_ray(args.cpus)
    runs = {
        "pages": measure(args.num_samples, [1000], "pages", args),
        "all": measure(args.num_samples, [1000], "all", args),
        "pages_10_heads": measure(args.small_samples, heads10, "pages", args),
    }
    closes = {"1_head": full_epoch_close(args.num_samples, [1000]),
              "10_heads": full_epoch_close(args.small_samples, heads10)}
    ray.shutdown()
    small = runs["pages_10_heads"]
    scale = 100_000_000 / args.small_samples
    budget = args.node_gib * args.shard_fraction * GIB
    # The larger of the two peaks per instance: the simulated epochs' (checkpoint fetch included) and the
    # fully labelled epoch close's.
    one_head_peak = max(runs["pages"]["actor_peak_bytes_per_instance"], closes["1_head"]["peak_bytes_per_instance"])
    ten_head_peak = max(small["actor_peak_bytes_per_instance"], closes["10_heads"]["peak_bytes_per_instance"])
    result["config"] = {k: getattr(args, k) for k in ("num_samples", "small_samples", "workers", "steps", "step_ms",
                                                      "batch", "shard_size", "epochs", "node_gib",
                                                      "shard_fraction", "cpus")}
    result["config"].update({"page_ids": DEFAULT_PAGE_IDS, "max_pages": DEFAULT_MAX_PAGES, "ks_10_heads": heads10})
    result["figure"] = ("per_step_ms: time in labels_for + write_async per simulated step (median over workers, "
                        "then over the recorded epochs); boundary: begin_epoch per worker, end_epoch and "
                        "state_dict on the driver; memory: VmHWM/VmRSS of the processes")
    result["baseline"] = "all"
    result["measured"] = runs
    result["full_epoch_close"] = closes
    result["ratios_pages_to_all"] = {k: runs["pages"][k] / runs["all"][k] if runs["all"][k] else None
                                     for k in ("per_step_ms", "begin_epoch_s", "worker_peak_rss_gib")}
    result["extrapolated"] = {
        "basis": f"the 10-head run at N = {args.small_samples:,}, linear in N",
        "100M_x_10_heads": {
            "actor_peak_gib": ten_head_peak * 1e8 / GIB,
            "end_epoch_s": closes["10_heads"]["end_epoch_s"] * scale,
            "state_dict_s": small["state_dict_s"] * scale,
            "worker_label_bytes": small["worker_label_bytes_max"],
            "shards_on_32_gib_nodes": max(1, math.ceil(ten_head_peak * 1e8 / budget)),
        },
        "largest_n_per_shard": {
            "budget_gib": budget / GIB,
            "1_head": largest_n(one_head_peak, budget),
            "10_heads": largest_n(ten_head_peak, budget),
        },
    }
    result["load"] = load.finish()
    under = " (UNDER LOAD)" if result["load"]["under_load"] else ""
    print_table(["run", "N", "H", "ms/step", "pages/worker/epoch", "begin s", "end s", "state_dict s",
                 "actor peak GiB", "worker labels MiB", "worker peak GiB"],
                [[name, f"{r['num_samples']:.2e}", r["heads"], r["per_step_ms"], r["pages_fetched_per_worker_epoch"],
                  r["begin_epoch_s"], r["end_epoch_s"], r["state_dict_s"], r["actor_peak_rss_gib"],
                  r["worker_label_bytes_max"] / 2**20, r["worker_peak_rss_gib"]] for name, r in runs.items()],
                title=f"{NAME}{under}")
    ext = result["extrapolated"]
    print(f"100M x 10 heads (extrapolated): {ext['100M_x_10_heads']}")
    print(f"largest N per shard ({budget / GIB:g} GiB): {ext['largest_n_per_shard']}")
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
