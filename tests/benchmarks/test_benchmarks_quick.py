"""Smoke test of the benchmark scripts: each runs in ``--quick`` mode as a user would run it and writes a
complete JSON result. The figures themselves are not checked (claims live in the benchmarks, not in
timed tests); only that they are there, numeric and finite.

Those that train through the product (``scaling``, ``quality``, ``methods``: about a minute each on 2
cores) are behind the slow marker; the others run in the default suite.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMMON_KEYS = ("benchmark", "date", "command", "quick", "machine", "device", "versions", "config", "load",
               "figure", "baseline")


def run_quick(name: str, tmp_path: Path) -> dict[str, Any]:
    """``python -m benchmarks.<name> --quick --out <tmp>``; returns the JSON it wrote."""
    out = tmp_path / f"{name}.json"
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run([sys.executable, "-m", f"benchmarks.{name}", "--quick", "--out", str(out)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    assert out.is_file(), f"{name} wrote no JSON file"
    data: dict[str, Any] = json.loads(out.read_text(encoding="utf-8"))
    check_common(data, name)
    return data


def numbers(obj: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """Every leaf of a JSON value with its path."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            yield from numbers(value, f"{path}.{key}")
    elif isinstance(obj, list):
        for i, value in enumerate(obj):
            yield from numbers(value, f"{path}[{i}]")
    else:
        yield path, obj


def medians(obj: Any) -> list[Any]:
    """Values of every ``median`` key."""
    return [value for path, value in numbers(obj) if path.endswith(".median")]


def check_common(data: dict[str, Any], name: str) -> None:
    missing = [k for k in COMMON_KEYS if k not in data]
    assert not missing, f"{name}: keys missing {missing}"
    assert data["benchmark"] == name and data["quick"] is True
    for key in ("cpu_model", "cores_logical", "ram_gib"):
        assert data["machine"][key], f"machine.{key} empty"
    assert data["device"]["device"] in ("cpu", "cuda")
    for key in ("python", "torch", "ray", "pyarrow"):
        assert data["versions"][key] not in ("", "absent"), f"versions.{key}"
    assert isinstance(data["load"]["under_load"], bool)
    for path, value in numbers(data):
        if isinstance(value, float):
            assert math.isfinite(value), f"{name}{path} = {value}"
    found = medians(data)
    assert found, f"{name}: no medians in the result"
    assert all(isinstance(v, int | float) and math.isfinite(v) for v in found), f"{name}: a median is not a number"


def test_train_step_quick(tmp_path: Path) -> None:
    data = run_quick("train_step", tmp_path)
    assert set(data["configs"]) == {"fashion-mnist-cpu", "cifar-smallcnn"}
    for cfg in data["configs"].values():
        assert set(cfg["step_ms"]) == {"secu", "plain", "secu_heads_only"}
        assert math.isfinite(cfg["overhead_pct"]) and cfg["ratio_secu_to_plain"] > 0
        assert len([r for r in cfg["raw"]["secu"] if not r["warmup"]]) >= 3


@pytest.mark.ray
def test_coordinator_quick(tmp_path: Path) -> None:
    data = run_quick("coordinator", tmp_path)
    (measured,) = data["measured"].values()
    assert set(measured["steps"]) == {"W1", "W2", "W4"}
    for entry in measured["steps"].values():
        assert set(entry["per_step_ms"]) == {"actor", "local"}
    assert measured["memory"]["bytes_per_instance_per_head"] > 0
    assert measured["update"]["rows_per_s"]["actor"]["median"] > 0
    sizes = data["extrapolated"]["sizes"]
    assert {v["num_samples"] for v in sizes.values()} == {100_000_000, 1_000_000_000}
    assert all(v["shards_needed"] >= 1 for v in sizes.values())


@pytest.mark.ray
def test_labels_at_scale_quick(tmp_path: Path) -> None:
    data = run_quick("labels_at_scale", tmp_path)
    runs = data["measured"]
    assert {name: r["label_fetch"] for name, r in runs.items()} == {"pages": "pages", "all": "all",
                                                                    "pages_10_heads": "pages"}
    n = data["config"]["num_samples"]
    assert runs["all"]["worker_label_bytes_max"] == n * 2  # every label, int16
    for name in ("pages", "pages_10_heads"):  # only the pages of the ids a worker read
        run = runs[name]
        assert 1 <= run["pages_fetched_per_worker_epoch"] <= 4
        assert run["worker_label_bytes_max"] <= 4 * data["config"]["page_ids"] * 2 * run["heads"]
    assert runs["pages"]["epochs"][-1]["workers"][0]["steps"] == data["config"]["steps"]
    assert data["extrapolated"]["largest_n_per_shard"]["1_head"] > data["extrapolated"]["largest_n_per_shard"][
        "10_heads"] > 0


@pytest.mark.ray
def test_data_pipeline_quick(tmp_path: Path) -> None:
    data = run_quick("data_pipeline", tmp_path)
    assert set(data["kinds"]) == {"fashion_mnist_png", "synthetic_jpeg"}
    for kind in data["kinds"].values():
        assert set(kind["images_per_s"]) == {"ray_data", "ray_data_decode_only", "wds_dataloader",
                                             "pool_decode_augment", "pool_raw_pil"}
        assert kind["ratio_to_wds_dataloader"]["wds_dataloader"] == pytest.approx(1.0)
        assert kind["worker_views_cpu_ms_per_image"]["median"] > 0
        # every variant saw every image in every round
        assert all(r["images"] == kind["images"] for runs in kind["raw"].values() for r in runs)


@pytest.mark.ray
def test_inference_quick(tmp_path: Path) -> None:
    data = run_quick("inference", tmp_path)
    assert set(data["images_per_s"]) == {"ray_data", "ray_data_fresh_ray", "ray_data_actors", "plain_loop"}
    assert data["config"]["inference_options"]["model_in"] == "auto"
    assert data["config"]["actor_options"]["model_in"] == "actors"
    assert data["checks"]["same_schema"] is True
    assert data["checks"]["rows_ours"] == data["checks"]["rows_plain"] == data["config"]["images"]


@pytest.mark.slow  # a short training through the product: about a minute on 2 cores
@pytest.mark.ray
def test_scaling_quick(tmp_path: Path) -> None:
    data = run_quick("scaling", tmp_path)
    assert set(data["scaling"]) == {"W1", "W2"}
    assert data["scaling"]["W1"]["efficiency"] == pytest.approx(1.0)


@pytest.mark.slow  # a short training through the product: about a minute on 2 cores
@pytest.mark.ray
def test_quality_quick(tmp_path: Path) -> None:
    data = run_quick("quality", tmp_path)
    for key in ("kmeans/test/acc", "kmeans/all/acc", "secu/test/h0/acc", "secu/all/h0/nmi", "secu/train_s"):
        assert key in data["summary"], key
    assert data["raw"][0]["secu"]["epochs"] == 1


def test_png_charts(tmp_path: Path) -> None:
    from PIL import Image

    from benchmarks.plot_png import line_chart, main, scaling_png

    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    epochs = [{"epoch": e, "clusters/h0/acc": 0.2 + 0.05 * e} for e in range(5)]
    (run / "train_history.json").write_text(json.dumps({"epochs": epochs}))
    (tmp_path / "train_history_other.json").write_text(json.dumps({"epochs": epochs[:3]}))
    out = tmp_path / "acc.png"
    assert main(["history", str(out), f"{run}=demo", f"{tmp_path / 'train_history_other.json'}=other"]) == 0
    with Image.open(out) as img:
        assert img.size == (800, 500)
        # Both series are drawn: pixels in matplotlib's first two colours (tab:blue, tab:orange).
        colors = {c for _, c in img.convert("RGB").getcolors(1 << 20)}
        assert {(31, 119, 180), (255, 127, 14)} <= colors
    result = {"config": {"workers": [1, 2]},
              "scaling": {"W1": {"images_per_s": {"median": 100.0}, "ideal_images_per_s": 100.0},
                          "W2": {"images_per_s": {"median": 150.0}, "ideal_images_per_s": 200.0}}}
    scaling_png(tmp_path / "s.png", result)
    assert (tmp_path / "s.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="2 x values for 1 y values"):
        line_chart(tmp_path / "bad.png", [("bad", [1, 2], [1])], title="t", xlabel="x", ylabel="y")
    assert main(["nonsense", "x.png", "y"]) == 2


def test_augment_quick(tmp_path: Path) -> None:
    data = run_quick("augment", tmp_path)
    assert set(data["kinds"]) == {"gray_28", "rgb_32"}
    for kind in data["kinds"].values():
        assert set(kind["ms_per_batch"]) == {"batched", "per_image_torchvision"}
        assert math.isfinite(kind["speedup_batched"]) and kind["speedup_batched"] > 0


def test_small_data_stability_quick(tmp_path: Path) -> None:
    data = run_quick("small_data_stability", tmp_path)
    assert set(data["variants"]) == {"adapted", "paper_schedule"}
    for variant in data["variants"].values():
        assert variant["seeds"] == 2 and len(variant["runs"]) == 2
        assert 0 <= variant["settled"] + variant["cycling"] <= 2 and 0 <= variant["merged"] <= 2
        assert variant["warned"] == sum(run["warned"] for run in variant["runs"])
        for run in variant["runs"]:
            assert len(run["changed_last"]) == 3 and all(0.0 <= c <= 1.0 for c in run["changed_last"])
            assert sum(run["published_sizes"]) == 192 and 1 / 3 <= run["largest_batch_share"] <= 1.0
            assert run["settled"] == (max(run["changed_last"]) < 0.05) and math.isfinite(run["margin"])


def test_robustness_quick(tmp_path: Path) -> None:
    data = run_quick("robustness", tmp_path)
    assert list(data["rows"]) == ["pattern-3"]
    row = data["rows"]["pattern-3"]
    assert row["seeds"] == 1 and 0 <= row["seeds_at_or_above_kmeans"] <= 1
    (run,) = data["runs"]["pattern-3"]
    assert run["n"] == 192 and sum(run["published_sizes"]) == 192
    for who in ("secu", "kmeans", "secu_memory"):
        assert 0.0 <= run[who]["acc"] <= 1.0 and 0.0 <= run[who]["nmi"] <= 1.0


@pytest.mark.slow  # a short training through the product: about a minute on 2 cores
def test_methods_quick(tmp_path: Path) -> None:
    data = run_quick("methods", tmp_path)
    assert set(data["summary"]) == {"propos", "drc", "kmeans"}
    for method in ("propos", "drc"):
        (run,) = data["runs"][method]
        assert run["epochs"] >= 2 and len(run["per_epoch_acc"]) == run["epochs"]
        assert 0.0 <= run["test"]["acc"] <= 1.0 and run["train_s"] > 0
