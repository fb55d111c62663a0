"""``make gpu-check`` (``benchmarks.gpu_check``) without a GPU: it exits 3 at once with a message saying what it
needs and what to run instead, before Ray or any job is imported; and the parts of the check that need no GPU:
the options, the jobs' arguments (parsed and resolved by the product's own parsers), the figures read from
the run's files, the assembly of the JSON and the GPU memory sampling."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from benchmarks import gpu_check as gc
from benchmarks.gpu_memory import GpuMemorySampler, MemorySample, memory_peaks, parse_apps, parse_gpus

ROOT = Path(__file__).resolve().parents[2]


def no_gpu_env(tmp_path: Path) -> dict[str, str]:
    """The environment with every GPU hidden, Ray's and Python's temporary files redirected into ``tmp_path``."""
    (tmp_path / "tmp").mkdir()
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", RAY_TMPDIR=str(tmp_path / "raytmp"), TMPDIR=str(tmp_path / "tmp"))
    env.pop("RAY_ADDRESS", None)
    return env


# ---------------------------------------------------------------------------------------------
# Without a GPU
# ---------------------------------------------------------------------------------------------


def test_without_a_gpu_it_exits_3_at_once_with_a_clear_message(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--out", str(out)], cwd=ROOT,
                          env=no_gpu_env(tmp_path), capture_output=True, text=True, timeout=120)
    elapsed = time.monotonic() - started
    assert proc.returncode == gc.EXIT_NO_GPU == 3, proc.stderr[-3000:]
    assert "no CUDA GPU found" in proc.stderr
    assert "CUDA_VISIBLE_DEVICES is set to an empty value" in proc.stderr  # why, in this environment
    assert "a CUDA GPU visible to torch" in proc.stderr and "Ray cluster with GPUs" in proc.stderr
    assert "`make test`" in proc.stderr and "`make demo`" in proc.stderr  # what to run on CPU instead
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    assert not out.exists() and not out.with_suffix(".json.tmp").exists()
    assert elapsed < 30, f"took {elapsed:.1f} s: the GPU check must come before any work"
    assert not (tmp_path / "raytmp").exists(), "a Ray session was started"
    assert list((tmp_path / "tmp").iterdir()) == [], "temporary files were written"


def test_without_a_gpu_neither_ray_nor_any_job_is_imported(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check.json"
    script = ("import json, sys\nfrom benchmarks import gpu_check\n"
              f"code = gpu_check.main(['--out', {str(out)!r}])\n"
              "mods = [m for m in sys.modules if m.split('.')[0] in ('ray', 'jobs', 'pipelines')]\n"
              "print(json.dumps({'code': code, 'modules': sorted(mods)}))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=no_gpu_env(tmp_path), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seen = json.loads(proc.stdout.strip().splitlines()[-1])
    assert seen == {"code": 3, "modules": []}
    assert not out.exists()


def test_no_gpu_message_says_why() -> None:
    cpu_build = gc.no_gpu_message(None, None)
    assert "CPU-only build" in cpu_build and "CUDA_VISIBLE_DEVICES" not in cpu_build.split(".")[1]
    assert "CUDA_VISIBLE_DEVICES=7" in gc.no_gpu_message("7", "13.0")
    plain = gc.no_gpu_message(None, "13.0")
    assert "is False. Nothing was run." in plain and "make demo" in plain


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_target_runs_the_module() -> None:
    # --no-print-directory: under `make test` (MAKELEVEL set) make would add "Entering directory" lines.
    proc = subprocess.run(["make", "--no-print-directory", "-n", "gpu-check", "GPU_CHECK_ARGS=--epochs 3"], cwd=ROOT,
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "-m benchmarks.gpu_check" in proc.stdout and proc.stdout.rstrip().endswith("--epochs 3")


# ---------------------------------------------------------------------------------------------
# Options and the jobs' arguments
# ---------------------------------------------------------------------------------------------


def test_sizes_default_quick_and_explicit() -> None:
    args = gc.parse_args([])
    assert {k: getattr(args, k) for k in gc.SIZES} == gc.SIZES
    assert args.out.name == "gpu_check.json" and args.budget_s == 480
    quick = gc.parse_args(["--quick", "--epochs", "3"])
    assert (quick.train_images, quick.epochs) == (gc.QUICK_SIZES["train_images"], 3)


@pytest.mark.parametrize("argv", [["--epochs", "1"], ["--test-images", "10001"], ["--train-images", "0"],
                                  ["--num-gpus", "-1"]])
def test_bad_options_exit_2(argv: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        gc.parse_args(argv)
    assert exc.value.code == 2


def test_the_jobs_arguments_are_the_products(tmp_path: Path) -> None:
    from jobs import evaluate as evaluate_job
    from jobs import infer as infer_job
    from jobs import ingest as ingest_job

    args = gc.parse_args(["--train-images", "20000", "--epochs", "5"])
    argvs = gc.job_argvs(args, str(tmp_path), "gpu-check-x", workers=2)
    train_set, test_set = ingest_job.build_parser().parse_args(argvs["ingest"][0]), \
        ingest_job.build_parser().parse_args(argvs["ingest"][1])
    assert (train_set.split, train_set.limit, train_set.shard_size, train_set.ray) == ("train", 20000, 2500, "on")
    assert (test_set.split, test_set.limit, test_set.dataset) == ("test", 10000, "gpu-check-fm-test10000")
    infer = infer_job.build_parser().parse_args(argvs["infer"][0])
    assert (infer.use_gpu, infer.dataset, infer.run_id) == ("yes", "gpu-check-fm-test10000", "gpu-check-x")
    assert evaluate_job.build_parser().parse_args(argvs["evaluate"][0]).dataset == "gpu-check-fm-test10000"
    # jobs.train resolves them: the GPU path, and the short schedule kept (the adaptation to 20,000 images would
    # otherwise raise the epochs to reach 2,500 steps)
    setup = gc.training_setup(argvs["train"][0], args.train_images)
    assert setup == setup | {"recipe": "fashion-mnist-resnet18", "backbone": "resnet18_cifar", "use_gpu": True,
                             "backend": "nccl", "mixed_precision": True, "sync_batchnorm": True,
                             "views_on_device": True, "epochs": 5, "warmup_epochs": 2, "num_workers": 2,
                             "global_batch": 128}
    one = gc.training_setup(gc.job_argvs(args, str(tmp_path), "r", workers=1)["train"][0], args.train_images)
    assert one["sync_batchnorm"] is False and one["num_workers"] == 1


def test_training_overrides_pass_through_and_bad_ones_fail_early(tmp_path: Path) -> None:
    args = gc.parse_args(["--set", "optim.batch_size=256", "--epochs", "2"])
    setup = gc.training_setup(gc.job_argvs(args, str(tmp_path), "r", 1)["train"][0], args.train_images)
    assert (setup["global_batch"], setup["warmup_epochs"]) == (256, 1)
    bad = gc.parse_args(["--set", "optim.no_such_key=1"])
    with pytest.raises(ValueError, match="no_such_key"):
        gc.training_setup(gc.job_argvs(bad, str(tmp_path), "r", 1)["train"][0], bad.train_images)


# ---------------------------------------------------------------------------------------------
# Figures and the JSON
# ---------------------------------------------------------------------------------------------


def history_row(epoch: int, seconds: float, images: float = 20000.0) -> dict[str, float]:
    return {"epoch": epoch, "time/epoch_s": seconds, "data/images": images, "data/images_per_s": images / seconds,
            "clusters/h0/acc": 0.3 + 0.1 * epoch}


def test_training_figures_leave_out_the_first_epoch() -> None:
    figures = gc.training_figures([history_row(0, 40.0), history_row(1, 10.0), history_row(2, 8.0),
                                   history_row(3, 12.0)])
    assert figures["epochs"] == 4 and figures["first_epoch_s"] == 40.0
    assert figures["epoch_s_after_first"]["median"] == 10.0 and figures["epoch_s_after_first"]["n"] == 3
    assert figures["images_per_s_after_first"]["median"] == pytest.approx(2000.0)
    assert figures["train_memory_acc_h0_last_epoch"] == pytest.approx(0.6)
    assert gc.training_figures([history_row(0, 5.0)])["epoch_s_after_first"]["median"] == 5.0
    with pytest.raises(ValueError, match="no epoch"):
        gc.training_figures([])


def test_inference_figures_take_the_primary_head() -> None:
    heads = [{"head": h, "k": k, "acc": acc, "nmi": 0.5, "ari": 0.4} for h, (k, acc) in
             enumerate([(20.0, 0.41), (10.0, 0.62), (30.0, 0.35)])]
    metrics = {"protocol": {"primary_head": 1, "rows": 10000, "checkpoint_epoch": 4}, "heads": heads}
    marker = {"images_per_s": 25000.0, "seconds": 0.4, "device": "gpu", "actors": 1}
    figures = gc.inference_figures(marker, metrics)
    assert (figures["test_acc"], figures["acc_head"], figures["acc_head_k"]) == (0.62, 1, 10)
    assert (figures["images_per_s"], figures["device"], figures["rows"]) == (25000.0, "gpu", 10000)


def passed(name: str, figures: dict[str, Any], ours: float | None, above: float) -> gc.Step:
    return gc.Step(name, "passed", 10.0, figures, gpu_memory={"max_our_processes_mib": ours,
                                                               "max_above_baseline_mib": above})


def all_steps(device: str = "gpu", ours: bool = True) -> list[gc.Step]:
    med = {"median": 1.0}
    return [passed("ray", {}, 0.0 if ours else None, 0.0), passed("ingest", {}, 0.0 if ours else None, 0.0),
            passed("train", {"images_per_s_after_first": {"median": 5000.0}, "epoch_s_after_first": {"median": 4.0},
                             "first_epoch_s": 30.0}, 9000.0 if ours else None, 9500.0),
            passed("inference", {"images_per_s": 20000.0, "test_acc": 0.55, "device": device},
                   3000.0 if ours else None, 3600.0),
            passed("stream_224", {"images_per_s": {"views_on_device": med | {"median": 1500.0},
                                                   "decode_only": med | {"median": 1800.0}}},
                   2000.0 if ours else None, 2500.0)]


def test_assemble_result_of_a_passing_run() -> None:
    result = gc.assemble_result(all_steps(), wall_s=300.0, budget_s=480.0, workers=2)
    assert result["ok"] is True and result["within_budget"] is True and result["problems"] == []
    f = result["figures"]
    assert (f["train_images_per_s"], f["train_epoch_s"], f["train_first_epoch_s"]) == (5000.0, 4.0, 30.0)
    assert (f["stream_224_views_on_device_images_per_s"], f["stream_224_decode_only_images_per_s"]) == (1500.0, 1800.0)
    assert (f["inference_images_per_s"], f["test_acc"]) == (20000.0, 0.55)
    assert f["peak_gpu_memory_mib"] == 9000.0 and f["peak_gpu_memory_mib_by_step"]["inference"] == 3000.0
    assert "process tree" in f["peak_gpu_memory_measured_as"]
    assert set(result["steps"]) == set(gc.STEPS) and result["notes"] == []
    json.dumps(result)  # serialisable as it is


def test_assemble_result_falls_back_to_device_wide_memory() -> None:
    f = gc.assemble_result(all_steps(ours=False), 300.0, 480.0, 2)["figures"]
    assert f["peak_gpu_memory_mib"] == 9500.0 and "device-wide" in f["peak_gpu_memory_measured_as"]


def test_assemble_result_records_the_budget_failures_and_the_cpu() -> None:
    late = gc.assemble_result(all_steps(device="cpu"), wall_s=500.0, budget_s=480.0, workers=1)
    assert late["within_budget"] is False and late["ok"] is True  # recorded, not a failure
    assert any("over the 480 s budget" in p for p in late["problems"])
    assert any("inference ran on 'cpu'" in p for p in late["problems"])
    assert any("SyncBatchNorm" in n for n in late["notes"])
    steps = all_steps()
    steps[2] = gc.Step("train", "failed", 3.0, error="RuntimeError: boom")
    steps[3] = gc.Step("inference", error="not run: needs train")
    broken = gc.assemble_result(steps, 100.0, 480.0, 2)
    assert broken["ok"] is False
    assert broken["figures"]["train_images_per_s"] is None and broken["figures"]["test_acc"] is None
    assert broken["figures"]["stream_224_views_on_device_images_per_s"] == 1500.0
    assert broken["steps"]["train"]["error"] == "RuntimeError: boom"
    assert any(p.startswith("failed: train") for p in broken["problems"])
    assert any(p == "not run: inference" for p in broken["problems"])


def test_run_step_records_failures_and_skips_what_depends_on_them() -> None:
    fake = iter(range(100))
    sampler = GpuMemorySampler(10.0, query=("fake", lambda: MemorySample(time.monotonic(), {"0": 100.0 + next(fake)})))
    sampler.start()
    try:
        ok = gc.run_step("a", lambda: {"x": 1}, sampler)
        bad = gc.run_step("b", lambda: {"x": 1 // 0}, sampler, [ok])
        skipped = gc.run_step("c", lambda: {"x": 2}, sampler, [ok, bad])
    finally:
        sampler.stop()
    assert (ok.status, ok.figures, ok.error) == ("passed", {"x": 1}, None)
    assert ok.gpu_memory is not None and ok.gpu_memory["samples"] >= 1 and ok.gpu_memory["max_above_baseline_mib"] > 0
    assert bad.status == "failed" and bad.error is not None and bad.error.startswith("ZeroDivisionError")
    assert (skipped.status, skipped.error, skipped.seconds) == ("not run", "not run: needs b", None)


def test_call_job_fails_on_a_nonzero_exit() -> None:
    gc.call_job(lambda argv: 0, ["--x"], "secu ok")
    with pytest.raises(RuntimeError, match=r"`secu train --run-id r` exited with code 2"):
        gc.call_job(lambda argv: 2, ["--run-id", "r"], "secu train")


# ---------------------------------------------------------------------------------------------
# GPU memory sampling
# ---------------------------------------------------------------------------------------------

GPUS = """0, GPU-aaaa-1111, 1024, 143771
1, GPU-bbbb-2222, 70000, 143771
2, GPU-cccc-3333, [N/A], 143771
"""


def test_parse_gpus_keeps_the_visible_ones() -> None:
    assert parse_gpus(GPUS) == {"0": ("GPU-aaaa-1111", 1024.0, 143771.0), "1": ("GPU-bbbb-2222", 70000.0, 143771.0)}
    assert set(parse_gpus(GPUS, visible_uuids=["bbbb-2222"])) == {"1"}


def test_parse_apps_counts_only_this_process_tree() -> None:
    apps = "GPU-aaaa-1111, 100, 5000\nGPU-aaaa-1111, 101, 700\nGPU-bbbb-2222, 999, 60000\nGPU-zzzz, 100, 1\n"
    uuids = {"GPU-aaaa-1111": "0", "GPU-bbbb-2222": "1"}
    assert parse_apps(apps, uuids, {100, 101}) == {"0": 5700.0, "1": 0.0}
    assert parse_apps("", uuids, {100}) == {"0": 0.0, "1": 0.0}


def test_memory_peaks_of_a_window() -> None:
    samples = [MemorySample(0.0, {"0": 1000.0}), MemorySample(1.0, {"0": 5000.0}, {"0": 3900.0}),
               MemorySample(2.0, {"0": 7000.0}, {"0": 6000.0}), MemorySample(3.0, {"0": 20000.0})]
    peaks = memory_peaks(samples, 0.5, 2.5, samples[0])
    assert peaks["samples"] == 2 and peaks["device_used_peak_mib"] == {"0": 7000.0}
    assert peaks["max_above_baseline_mib"] == 6000.0 and peaks["max_our_processes_mib"] == 6000.0
    empty = memory_peaks(samples, 10.0, 11.0, samples[0])
    assert empty["samples"] == 0 and empty["max_above_baseline_mib"] is None


def test_sampler_records_errors_instead_of_raising() -> None:
    def broken() -> MemorySample:
        raise OSError("nvidia-smi went away")

    sampler = GpuMemorySampler(10.0, query=("broken", broken)).start()
    sampler.stop()
    assert sampler.samples == [] and sampler.baseline is None
    assert sampler.errors and "nvidia-smi went away" in sampler.errors[0]
    assert sampler.describe()["method"] == "broken"
