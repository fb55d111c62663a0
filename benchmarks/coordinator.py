"""Coordinator: the assignment memory and its statistics through the actor vs a local array.

Claim: keeping SeCu's per-instance labels y_h[i] in the ``ClusterCoordinator`` actor (not replicated
into every worker) costs a negligible share of a training step, at ImageNet scale and beyond.

Measured, at N = 1.28M and 10M instances (``--quick``: 100k) with the ``imagenet1k`` recipe's heads
(H = 10, K = 1000..10000, int16 labels):

1. Per-step overhead with W = 1, 2, 4 simulated workers (Ray actors, each its own process). A
   simulated step = look up the batch's previous labels, ``--step-ms`` of simulated compute (a sleep,
   so the coordinator gets the CPU a GPU step would leave free), send the new labels. ``actor``: a
   ``CoordinatorClient`` (``begin_epoch`` once, ``labels_for`` per step (local lookup in the published
   object), ``write_async`` (buffered, asynchronous), ``flush`` at the end); ``local``: the same
   calls on a plain ``AssignmentMemory`` in the worker process (the single-process reference; with W
   workers each would hold its own replica, which is what the actor avoids). Figures: time spent in
   the memory calls per step (ms), and that as % of the step time; the epoch boundary (``begin_epoch``
   publish + fetch, ``end_epoch`` statistics + buffer swap) amortised over a real epoch of N / (W B)
   steps.
2. Update throughput: rows/s of writes of B = 256 rows through the client (buffered, flushed) vs
   ``AssignmentMemory.write`` in this process.
3. Memory: bytes per instance per head of the actor's arrays (measured from the arrays).
4. Extrapolation to N = 100M and 1B from the measured per-instance figures: memory, shards needed
   (assumption: ``--node-gib`` GiB nodes, of which ``--shard-fraction`` may hold one shard), epoch
   boundary time, and the size of the published labels every training node fetches each epoch.

    python -m benchmarks.coordinator
    python -m benchmarks.coordinator --quick
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any

import numpy as np
import ray

from benchmarks.common import (
    Figures,
    LoadProbe,
    Stopwatch,
    alternate,
    base_parser,
    print_table,
    start_ray,
    start_result,
    write_result,
)
from pipelines.training.coordinator import CoordinatorClient
from pipelines.training.memory import AssignmentMemory, combine_stats, label_dtype
from secu.recipes import recipe

NAME = "coordinator"
GIB = float(1 << 30)


def close_epoch(memory: AssignmentMemory, epoch: int) -> dict[str, float]:
    """What a shard does at ``CoordinatorClient.end_epoch``: the epoch's statistics, then the swap."""
    stats = combine_stats([memory.sufficient_stats(epoch=epoch)], memory.ks)
    memory.commit_epoch(None, None, epoch=epoch)
    return stats


class SimWorker:
    """A simulated training worker (Ray actor): runs simulated steps against the actor or a local memory."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.local: AssignmentMemory | None = None

    def _labels(self, ks: list[int], steps: int, batch: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return np.stack([rng.integers(0, k, size=(steps, batch)) for k in ks], axis=1)  # steps x H x B

    def epoch_actor(self, client: CoordinatorClient, epoch: int, ids_SB: np.ndarray, step_s: float) -> Figures:
        """One simulated epoch through the coordinator actor."""
        steps, batch = ids_SB.shape
        labels_SHB = self._labels(client.ks, steps, batch, seed=epoch * 100 + self.rank)
        t_start = time.perf_counter()
        with Stopwatch() as begin:
            client.begin_epoch(epoch)
        in_steps = 0.0
        for s in range(ids_SB.shape[0]):
            t0 = time.perf_counter()
            client.labels_for(ids_SB[s])
            t1 = time.perf_counter()
            time.sleep(step_s)
            t2 = time.perf_counter()
            client.write_async(ids_SB[s], labels_SHB[s], epoch)
            in_steps += (t1 - t0) + (time.perf_counter() - t2)
        with Stopwatch() as flush:
            client.flush()
        return {"wall_s": time.perf_counter() - t_start, "in_steps_s": in_steps, "begin_s": begin.seconds,
                "flush_s": flush.seconds}

    def epoch_local(self, num_samples: int, ks: list[int], ids_SB: np.ndarray, step_s: float) -> Figures:
        """The same epoch on a plain ``AssignmentMemory`` held in this process."""
        if self.local is None or self.local.num_samples != num_samples:
            self.local = None
            self.local = AssignmentMemory(0, num_samples, ks)
        memory = self.local
        epoch = memory.epoch
        steps, batch = ids_SB.shape
        labels_SHB = self._labels(ks, steps, batch, seed=epoch * 100 + self.rank)
        t_start = time.perf_counter()
        with Stopwatch() as begin:
            prev_HN = memory.published()
        in_steps = 0.0
        for s in range(ids_SB.shape[0]):
            t0 = time.perf_counter()
            prev_HN[:, ids_SB[s]].astype(np.int64)
            t1 = time.perf_counter()
            time.sleep(step_s)
            t2 = time.perf_counter()
            memory.write(ids_SB[s], labels_SHB[s], epoch)
            in_steps += (t1 - t0) + (time.perf_counter() - t2)
        with Stopwatch() as end:
            close_epoch(memory, epoch)
        return {"wall_s": time.perf_counter() - t_start, "in_steps_s": in_steps, "begin_s": begin.seconds,
                "end_s": end.seconds}

    def release(self) -> None:
        self.local = None


_SimWorkerActor = ray.remote(num_cpus=0)(SimWorker)


def _ids(num_samples: int, workers: int, steps: int, batch: int, seed: int) -> list[np.ndarray]:
    perm = np.random.default_rng(seed).permutation(num_samples)[: workers * steps * batch]
    return [chunk.reshape(steps, batch) for chunk in np.split(perm, workers)]


def step_overhead(num_samples: int, ks: list[int], workers: list[Any], args: Any) -> dict[str, Any]:
    """Part 1 at one N for every W: rounds alternate actor and local."""
    client = CoordinatorClient.create(run_id=f"bench-{num_samples}", num_samples=num_samples, ks=ks)
    step_s = args.step_ms / 1e3
    epoch_counter = {"actor": 0, "round": 0}
    out: dict[str, Any] = {}
    try:
        for w in args.writers:
            active = workers[:w]

            def run_actor(w: int = w, active: list[Any] = active) -> Figures:
                epoch = epoch_counter["actor"]
                ids = _ids(num_samples, w, args.steps, args.batch, seed=epoch)
                figs = ray.get([a.epoch_actor.remote(client, epoch, ids[i], step_s) for i, a in enumerate(active)])
                with Stopwatch() as end:
                    client.end_epoch(epoch=epoch)
                epoch_counter["actor"] += 1
                return _combine(figs, end.seconds, args.steps, step_s)

            def run_local(w: int = w, active: list[Any] = active) -> Figures:
                epoch_counter["round"] += 1
                ids = _ids(num_samples, w, args.steps, args.batch, seed=1000 + epoch_counter["round"])
                figs = ray.get([a.epoch_local.remote(num_samples, ks, ids[i], step_s) for i, a in enumerate(active)])
                return _combine(figs, statistics.median(f["end_s"] for f in figs), args.steps, step_s)

            print(f"  N={num_samples:,} W={w}")
            rounds = alternate({"actor": run_actor, "local": run_local}, args.repeats, args.warmup)
            steps_real = num_samples / (w * args.batch)  # steps per worker in a real epoch
            entry: dict[str, Any] = {"raw": rounds.raw, "order": rounds.order}
            for key in ("per_step_ms", "wall_overhead_pct", "boundary_s"):
                entry[key] = rounds.summary(key)
            for variant in ("actor", "local"):
                per_step = entry["per_step_ms"][variant]["median"]
                boundary = entry["boundary_s"][variant]["median"]
                entry.setdefault("overhead_pct_of_step", {})[variant] = 100.0 * per_step / args.step_ms
                entry.setdefault("overhead_pct_of_epoch", {})[variant] = 100.0 * (
                    per_step * steps_real / 1e3 + boundary) / (steps_real * step_s)
            entry["steps_per_real_epoch"] = steps_real
            out[f"W{w}"] = entry
        ray.get([a.release.remote() for a in workers])
    finally:
        client.shutdown()
    return out


def _combine(figs: list[Figures], end_s: float, steps: int, step_s: float) -> Figures:
    """Worker figures of one epoch -> per-step cost (median over workers), wall overhead, boundary."""
    per_step = statistics.median(f["in_steps_s"] / steps for f in figs)
    wall = statistics.median(f["wall_s"] for f in figs)
    begin = statistics.median(f["begin_s"] for f in figs)
    return {"per_step_ms": 1e3 * per_step, "wall_overhead_pct": 100.0 * (wall - steps * step_s) / (steps * step_s),
            "boundary_s": begin + end_s, "begin_s": begin, "end_s": end_s,
            "flush_s": statistics.median(f.get("flush_s", 0.0) for f in figs)}


def update_throughput(num_samples: int, ks: list[int], args: Any) -> dict[str, Any]:
    """Part 2: rows/s of B-row writes, client (buffered + flushed) vs a local ``AssignmentMemory``."""
    rows = min(num_samples, args.update_rows)
    client = CoordinatorClient.create(run_id=f"bench-tp-{num_samples}", num_samples=num_samples, ks=ks)
    local = AssignmentMemory(0, num_samples, ks)
    rng = np.random.default_rng(0)
    labels_HR = np.stack([rng.integers(0, k, size=rows) for k in ks])
    state = {"actor_epoch": 0}

    def batches(seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        ids = np.random.default_rng(seed).permutation(num_samples)[:rows]
        return [(ids[i:i + args.batch], labels_HR[:, i:i + args.batch]) for i in range(0, rows, args.batch)]

    def actor() -> Figures:
        epoch = state["actor_epoch"]
        work = batches(epoch)
        with Stopwatch() as sw:
            for ids, labels in work:
                client.write_async(ids, labels, epoch)
            written = client.flush()
        client.end_epoch(epoch=epoch)  # untimed: the next round writes fresh rows of a new epoch
        state["actor_epoch"] += 1
        return {"rows": float(written), "seconds": sw.seconds, "rows_per_s": written / sw.seconds}

    def plain() -> Figures:
        epoch = local.epoch
        work = batches(epoch)
        with Stopwatch() as sw:
            written = sum(local.write(ids, labels, epoch) for ids, labels in work)
        close_epoch(local, epoch)
        return {"rows": float(written), "seconds": sw.seconds, "rows_per_s": written / sw.seconds}

    try:
        print(f"  update throughput, N={num_samples:,}, {rows:,} rows in writes of {args.batch}")
        rounds = alternate({"actor": actor, "local": plain}, args.repeats, args.warmup)
    finally:
        client.shutdown()
    summary = rounds.summary("rows_per_s")
    return {"rows": rows, "raw": rounds.raw, "rows_per_s": summary,
            "ratio_actor_to_local": summary["actor"]["median"] / summary["local"]["median"]}


def memory_bytes(num_samples: int, ks: list[int]) -> dict[str, float]:
    """Bytes of the actor's arrays (prev + next labels, written flags), per instance and head."""
    memory = AssignmentMemory(0, num_samples, ks)
    heads = len(ks)
    total = memory.prev_HN.nbytes + memory.next_HN.nbytes + memory.written_N.nbytes
    return {"total_bytes": float(total), "bytes_per_instance": total / num_samples,
            "bytes_per_instance_per_head": total / (num_samples * heads),
            "label_bytes": float(np.dtype(label_dtype(ks)).itemsize),
            "published_bytes_per_instance": memory.prev_HN.nbytes / num_samples}


def extrapolate(measured: dict[int, dict[str, Any]], ks: list[int], args: Any) -> dict[str, Any]:
    """Memory, shards, epoch boundary time and published size at 100M and 1B from per-instance figures."""
    largest = max(measured)
    per_inst = measured[largest]["memory"]["bytes_per_instance"]
    published_per_inst = measured[largest]["memory"]["published_bytes_per_instance"]
    # End-of-epoch statistics + swap scale with the instances of one shard (shards work in parallel).
    end_per_inst = statistics.median(
        measured[n]["steps"][f"W{args.writers[0]}"]["raw_end_s_median"] / n for n in measured)
    begin_per_inst = statistics.median(
        measured[n]["steps"][f"W{args.writers[0]}"]["raw_begin_s_median"] / n for n in measured)
    budget = args.node_gib * args.shard_fraction * GIB
    object_store = args.node_gib * 0.3 * GIB  # Ray's default object store: 30% of node memory
    out: dict[str, Any] = {
        "assumptions": {
            "node_gib": args.node_gib,
            "shard_fraction": args.shard_fraction,
            "shard_budget_gib": budget / GIB,
            "object_store_gib_per_node": object_store / GIB,
            "heads": len(ks),
            "basis": f"per-instance figures measured at N = {sorted(measured)}; linear in N; shards in parallel",
        },
        "sizes": {},
    }
    for n in (100_000_000, 1_000_000_000):
        total = per_inst * n
        shards = max(1, math.ceil(total / budget))
        with_truth = (per_inst + 8.0) * n  # run_training passes int64 true labels to the actors
        out["sizes"][f"{n:.0e}"] = {
            "num_samples": n,
            "actor_memory_gib": total / GIB,
            "actor_memory_with_true_labels_gib": with_truth / GIB,
            "shards_needed": shards,
            "shards_needed_with_true_labels": max(1, math.ceil(with_truth / budget)),
            "end_epoch_s_per_shard": end_per_inst * n / shards,
            "begin_epoch_publish_s_per_shard": begin_per_inst * n / shards,
            "published_labels_gib_fetched_per_training_node": published_per_inst * n / GIB,
            "published_fits_object_store": published_per_inst * n < object_store,
            "checkpoint_coordinator_gib": published_per_inst * n / GIB,
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = base_parser(NAME, __doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=None, help="N values (default 1280000 10000000)")
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--steps", type=int, default=None, help="simulated steps per worker per epoch (default 50)")
    parser.add_argument("--step-ms", type=float, default=None, help="simulated step time (default 100 ms)")
    parser.add_argument("--batch", type=int, default=256, help="local batch B")
    parser.add_argument("--update-rows", type=int, default=None, help="rows per throughput round (default 1M)")
    parser.add_argument("--recipe", default="imagenet1k", help="recipe whose heads (ks) are used")
    parser.add_argument("--node-gib", type=float, default=32.0, help="memory of one node, for the extrapolation")
    parser.add_argument("--shard-fraction", type=float, default=0.5,
                        help="share of a node's memory one coordinator shard may use")
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    args = parser.parse_args(argv)
    args.sizes = args.sizes or ([100_000] if args.quick else [1_280_000, 10_000_000])
    args.steps = args.steps or (5 if args.quick else 50)
    args.step_ms = args.step_ms or (20.0 if args.quick else 100.0)
    args.update_rows = args.update_rows or (50_000 if args.quick else 1_000_000)
    ks = list(recipe(args.recipe).secu.ks)
    result = start_result(NAME, args)
    load = LoadProbe()
    start_ray(args.cpus)
    workers = [_SimWorkerActor.remote(rank) for rank in range(max(args.writers))]
    measured: dict[int, dict[str, Any]] = {}
    for n in args.sizes:
        print(f"\nN = {n:,}, H = {len(ks)} heads (K = {ks[0]}..{ks[-1]})")
        steps = step_overhead(n, ks, workers, args)
        for entry in steps.values():
            actor_raw = [r for r in entry["raw"]["actor"] if not r["warmup"]]
            entry["raw_end_s_median"] = statistics.median(r["end_s"] for r in actor_raw)
            entry["raw_begin_s_median"] = statistics.median(r["begin_s"] for r in actor_raw)
        measured[n] = {"steps": steps, "update": update_throughput(n, ks, args), "memory": memory_bytes(n, ks)}
    ray.shutdown()
    result["config"] = {"sizes": args.sizes, "writers": args.writers, "steps_per_epoch_simulated": args.steps,
                        "step_ms": args.step_ms, "batch": args.batch, "update_rows": args.update_rows,
                        "recipe": args.recipe, "ks": ks, "ray_cpus": args.cpus, "repeats": args.repeats,
                        "warmup": args.warmup}
    result["figure"] = ("per_step_ms: time in memory calls per simulated step (median over workers, then over "
                        "rounds); overhead_pct_of_step = per_step_ms / step_ms; overhead_pct_of_epoch adds the "
                        "epoch boundary amortised over a real epoch of N / (W * batch) steps")
    result["baseline"] = "local"
    result["measured"] = {str(n): m for n, m in measured.items()}
    result["extrapolated"] = extrapolate(measured, ks, args)
    result["load"] = load.finish()
    rows = []
    for n, m in measured.items():
        for w, e in m["steps"].items():
            rows.append([f"{n:,}", w, e["per_step_ms"]["actor"]["median"], e["per_step_ms"]["local"]["median"],
                         e["overhead_pct_of_step"]["actor"], e["overhead_pct_of_step"]["local"],
                         e["boundary_s"]["actor"]["median"], e["boundary_s"]["local"]["median"],
                         e["overhead_pct_of_epoch"]["actor"]])
    under = " (UNDER LOAD)" if result["load"]["under_load"] else ""
    print_table(["N", "W", "actor ms/step", "local ms/step", f"actor % of {args.step_ms:g} ms", "local %",
                 "actor boundary s", "local boundary s", "actor % of epoch"], rows,
                title=f"{NAME}: per-step cost of the memory{under}")
    print_table(["N", "actor rows/s", "local rows/s", "ratio", "bytes/instance/head"],
                [[f"{n:,}", m["update"]["rows_per_s"]["actor"]["median"], m["update"]["rows_per_s"]["local"]["median"],
                  m["update"]["ratio_actor_to_local"], m["memory"]["bytes_per_instance_per_head"]]
                 for n, m in measured.items()], title="update throughput and memory")
    ext = result["extrapolated"]
    print_table(["N", "actor GiB", "shards", "with int64 truth: GiB", "shards", "end_epoch s/shard",
                 "published GiB per node", "fits object store"],
                [[f"{v['num_samples']:.0e}", v["actor_memory_gib"], v["shards_needed"],
                  v["actor_memory_with_true_labels_gib"], v["shards_needed_with_true_labels"],
                  v["end_epoch_s_per_shard"], v["published_labels_gib_fetched_per_training_node"],
                  str(v["published_fits_object_store"])] for v in ext["sizes"].values()],
                title=(f"extrapolated (H={len(ks)}; {args.node_gib:g} GiB nodes, one shard may use "
                       f"{args.shard_fraction:.0%}; object store 30% of a node)"))
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
