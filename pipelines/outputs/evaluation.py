"""Evaluate published assignments: ACC/NMI/ARI per head when labels exist, sizes and confidence always.

Labels come from the dataset's ``manifest.parquet`` (joined on ``sample_index``; null labels are
ignored). Metrics follow secu-algorithm.md section 7 (``secu.metrics``): ACC with the Hungarian
matching on the contingency table, NMI with arithmetic normalisation, ARI. The result is written to
``runs/<run_id>/metrics.json`` (``metrics-<suffix>.json`` for an output ``assignments-<suffix>``)
together with the protocol (which dataset and splits, which checkpoint, which transform) and a summary
of the training history when ``train_history.json`` exists.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa

from pipelines.dataset.info import DatasetInfo, find_dataset_info, read_manifest
from pipelines.outputs.assignments import DEFAULT_NAME, read_assignments, read_marker
from pipelines.outputs.schema import cluster_column, confidence_column, similarity_column
from pipelines.storage import Storage, join
from pipelines.training.metrics_log import HISTORY_FILE
from secu.diagnose import collapse_message
from secu.methods import INFERENCE_RULES
from secu.metrics import evaluate_clustering, size_stats

logger = logging.getLogger(__name__)

TRANSFORM = "deterministic evaluation transform: resize the short side, center crop (no augmentation)"


def metrics_file(name: str = DEFAULT_NAME) -> str:
    """File name of the metrics of output ``name``: metrics.json, or metrics-<suffix>.json."""
    if name == DEFAULT_NAME:
        return "metrics.json"
    suffix = name[len(DEFAULT_NAME) + 1:] if name.startswith(DEFAULT_NAME + "-") else name
    return f"metrics-{suffix}.json"


@dataclass
class LabelSet:
    """Ground truth by sample_index (-1 where unknown) and the class names when the source had them."""

    labels_N: np.ndarray
    names: list[str] | None
    info: DatasetInfo | None


def load_labels(storage: Storage, dataset: str) -> LabelSet:
    """Labels of ``dataset`` indexed by sample_index; all -1 when the dataset or its manifest is gone."""
    info = find_dataset_info(storage, dataset)
    if info is None:
        logger.warning("dataset %r not found under %s: evaluating without labels", dataset, storage.uri("datasets"))
        return LabelSet(np.full(0, -1, dtype=np.int64), None, None)
    manifest = read_manifest(storage, info)
    labels_N = np.full(info.num_samples, -1, dtype=np.int64)
    ids = manifest["sample_index"].to_numpy()
    labels_N[ids] = manifest["label"].fill_null(-1).to_numpy().astype(np.int64)
    return LabelSet(labels_N, info.label_names, info)


def labels_for(labels: LabelSet, sample_index: np.ndarray) -> np.ndarray:
    """Labels of the given ids; -1 for ids the manifest does not know."""
    out = np.full(sample_index.shape, -1, dtype=np.int64)
    known = sample_index < labels.labels_N.size
    out[known] = labels.labels_N[sample_index[known]]
    return out


def evaluate_head(y_true: np.ndarray, pred: np.ndarray, k: int, confidence: np.ndarray,
                  similarity: np.ndarray) -> dict[str, float]:
    """Figures of one head: acc/nmi/ari (labelled rows only, when any), size statistics, mean scores."""
    out: dict[str, float] = {"k": float(k)}
    if (y_true >= 0).any():
        out.update(evaluate_clustering(y_true, pred))
    out.update(size_stats(pred, k))
    out["mean_confidence"] = float(confidence.mean()) if confidence.size else 0.0
    out["mean_similarity"] = float(similarity.mean()) if similarity.size else 0.0
    return out


def summarize_history(storage: Storage, run_id: str) -> dict[str, Any] | None:
    """Epoch count, the last epoch's figures and the best ACC per head from train_history.json."""
    rel = join("runs", run_id, HISTORY_FILE)
    if not storage.exists(rel):
        return None
    epochs = json.loads(storage.read_bytes(rel).decode("utf-8")).get("epochs", [])
    if not epochs:
        return {"num_epochs": 0}
    best: dict[str, dict[str, float]] = {}
    for row in epochs:
        for key, value in row.items():
            if key.startswith("clusters/") and key.endswith("/acc") and isinstance(value, int | float):
                if key not in best or value > best[key]["value"]:
                    best[key] = {"value": float(value), "epoch": float(row.get("epoch", -1))}
    return {"num_epochs": len(epochs), "last": epochs[-1], "best": best}


def skipped_images(marker: dict[str, Any], info: DatasetInfo | None, history: dict[str, Any] | None
                   ) -> dict[str, Any]:
    """Images left out as bad input at each stage: ingest (files skipped, from ``dataset.json``), training (the
    last epoch's ``data/bad_inputs``) and inference (from ``_SUCCESS``), with counts per reason."""
    ingest: dict[str, int] = {}
    for entry in info.ingests if info else []:
        for reason, count in (entry.get("skipped") or {}).items():
            ingest[str(reason)] = ingest.get(str(reason), 0) + int(count)
    inference = marker.get("skipped") or {}
    last = (history or {}).get("last") or {}
    training = last.get("data/bad_inputs")
    return {
        "ingest": {"count": sum(ingest.values()), "by_reason": ingest},
        "training": None if training is None else {"count": int(training)},
        "inference": {"count": int(inference.get("count", 0)), "by_reason": dict(inference.get("by_reason") or {}),
                      "examples": list(inference.get("examples") or [])},
    }


def describe_skipped(skipped: dict[str, Any]) -> str:
    """One line: how many images each stage left out as bad input, with the reasons."""
    def part(stage: str) -> str | None:
        entry = skipped.get(stage)
        if entry is None:
            return None
        reasons = ", ".join(f"{k} {v}" for k, v in sorted((entry.get("by_reason") or {}).items()))
        return f"{entry['count']} at {stage}" + (f" ({reasons})" if reasons else "")
    parts = [p for p in (part("ingest"), part("training"), part("inference")) if p]
    return "skipped as bad input: " + "; ".join(parts)


def evaluate_assignments(storage: Storage, run_id: str, name: str = DEFAULT_NAME) -> dict[str, Any]:
    """Evaluate the published output ``name`` of ``run_id``; returns the content of the metrics file."""
    marker = read_marker(storage, run_id, name)
    heads = int(marker["num_heads"])
    ks = [int(k) for k in marker["ks"]]
    columns = ["sample_index"] + [c(h) for h in range(heads)
                                  for c in (cluster_column, confidence_column, similarity_column)]
    table: pa.Table = read_assignments(storage, run_id, name, columns=columns)
    ids = table["sample_index"].to_numpy()
    labels = load_labels(storage, marker["dataset"])
    y_true = labels_for(labels, ids)
    labelled = int((y_true >= 0).sum())
    results, warnings = [], []
    for h in range(heads):
        pred = table[cluster_column(h)].to_numpy().astype(np.int64)
        msg = collapse_message(h, np.bincount(pred, minlength=ks[h]), where=f"the published output {name!r}")
        if msg:
            warnings.append(msg)
        figures = evaluate_head(y_true, pred, ks[h], table[confidence_column(h)].to_numpy(),
                                table[similarity_column(h)].to_numpy())
        results.append({"head": h} | figures)
    classes = int(np.unique(y_true[y_true >= 0]).size)
    primary = next((h for h in range(heads) if ks[h] == classes), 0)
    splits = sorted({str(i.get("split", "")) for i in labels.info.ingests} - {""}) if labels.info else []
    same = marker["dataset"] == marker.get("train_dataset")
    protocol = {
        "dataset": marker["dataset"],
        "splits": splits,
        "train_dataset": marker.get("train_dataset"),
        "evaluated_on_training_images": same,
        "rows": int(ids.size),
        "labelled_rows": labelled,
        "classes": classes,
        "primary_head": primary,
        "checkpoint": marker["checkpoint"],
        "checkpoint_epoch": marker["checkpoint_epoch"],
        "method": marker.get("method", "secu"),
        "assignment": INFERENCE_RULES[marker.get("method", "secu")],
        "transform": TRANSFORM,
        "metrics": "ACC: Hungarian matching on the contingency table; NMI: arithmetic normalisation; ARI"
                   if labelled else "no labels: cluster sizes and confidence only",
        "note": ("the images the run was trained on (transductive clustering, unsupervised training); splits "
                 "listed are those ingested into the dataset") if same else
                ("images not seen in training (dataset differs from the training dataset)"),
    }
    flat: dict[str, float] = {}
    for row in results:
        for key, value in row.items():
            if key != "head":
                flat[f"eval/h{row['head']}/{key}"] = value
    history = summarize_history(storage, run_id)
    return {
        "run_id": run_id,
        "output": name,
        "evaluated": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "protocol": protocol,
        "heads": results,
        "metrics": flat,
        "skipped": skipped_images(marker, labels.info, history),
        "warnings": warnings,
        "train_history": history,
    }


def write_metrics(storage: Storage, run_id: str, result: dict[str, Any]) -> str:
    """Publish ``result`` (atomically) at runs/<run_id>/<metrics file>; returns its location."""
    rel = join("runs", run_id, metrics_file(str(result.get("output", DEFAULT_NAME))))
    storage.write_bytes_atomic(rel, (json.dumps(result, indent=1, default=float) + "\n").encode())
    return storage.uri(rel)


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of the per-head figures and the protocol line."""
    labelled = bool(result["protocol"]["labelled_rows"])
    header = ["head", "K"] + (["ACC", "NMI", "ARI"] if labelled else []) + [
        "min size", "max size", "empty", "H/logK", "mean conf", "mean sim"]
    rows = []
    for row in result["heads"]:
        cells = [str(row["head"]), str(int(row["k"]))]
        if labelled:
            cells += [f"{row['acc']:.4f}", f"{row['nmi']:.4f}", f"{row['ari']:.4f}"]
        cells += [f"{row['min_size_frac']:.4f}", f"{row['max_size_frac']:.4f}", str(int(row["empty"])),
                  f"{row['entropy_norm']:.3f}", f"{row['mean_confidence']:.3f}", f"{row['mean_similarity']:.3f}"]
        rows.append(cells)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in [header, *rows]]
    p = result["protocol"]
    lines.insert(0, f"run {result['run_id']} / {result['output']}: dataset {p['dataset']} (splits "
                    f"{','.join(p['splits']) or '?'}), {p['rows']} images, {p['labelled_rows']} labelled, "
                    f"checkpoint epoch {p['checkpoint_epoch']}")
    lines.insert(1, "-" * len(lines[1]))
    if "skipped" in result:  # metrics files written before the count existed have none
        lines.append(describe_skipped(result["skipped"]))
    lines += [f"WARNING: {w}" for w in result.get("warnings", [])]
    return "\n".join(lines)
