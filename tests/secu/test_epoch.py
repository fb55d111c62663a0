"""The Ray-free epoch (``secu.epoch.run_epoch``) and the method interface (``secu.method``): what the
epoch does for any method, and SeCu's method resuming exactly from its ``state_dict``."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from secu.epoch import run_epoch
from secu.local_train import predict
from secu.method import Batch, ClusteringMethod, EpochContext, EpochSummary, StepOutput
from secu.network import build_network
from secu.overrides import apply_overrides
from secu.recipes import recipe
from secu.secu_method import SeCuMethod
from secu.state import LocalMemory

N, BATCH = 40, 8


def batches(n: int = N, batch: int = BATCH, seed: int = 0) -> Iterator[Batch]:
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    for start in range(0, n, batch):
        ids = order[start:start + batch]
        views = torch.randint(0, 256, (2, ids.shape[0], 1, 28, 28), dtype=torch.uint8, generator=gen)
        yield {"sample_index": ids, "view1": views[0], "view2": views[1], "image": views[0]}


class PerBatchLossMethod(ClusteringMethod):
    """A method with per-batch losses only (as DRC): it stores no labels."""

    name = "per-batch"

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.epochs: list[int] = []

    def wrap_networks(self, wrap: Callable[[nn.Module], nn.Module]) -> None:
        pass

    def before_epoch(self, epoch: int, context: EpochContext) -> None:
        self.epochs.append(epoch)

    def train_step(self, batch: Batch, stored_HB: torch.Tensor) -> StepOutput:
        self.seen.extend(batch["sample_index"].tolist())
        return StepOutput()

    def after_epoch(self) -> EpochSummary:
        return EpochSummary(metrics={"train/steps": len(self.seen) // BATCH})

    def state_dict(self) -> dict[str, Any]:
        return {"seen": list(self.seen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = list(state["seen"])

    def assign(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.zeros(1, images.shape[0], dtype=torch.long), torch.ones(1, images.shape[0])


class FeaturePassMethod(PerBatchLossMethod):
    """A method that needs every image's features before an epoch (as ProPos's k-means)."""

    name = "feature-pass"
    needs_feature_pass = True

    def before_epoch(self, epoch: int, context: EpochContext) -> None:
        assert context.feature_batches is not None
        self.pass_ids = sorted(i for b in context.feature_batches() for i in b["sample_index"].tolist())


def test_partial_last_batch_is_counted_not_trained_and_nothing_stored_without_labels() -> None:
    method, memory = PerBatchLossMethod(), LocalMemory(N + 3, 1)
    result = run_epoch(method, batches(N + 3), memory, 0, batch_size=BATCH)
    assert (result.steps, result.images, result.delivered, result.labelled_only) == (5, 40, 43, 0)
    assert len(method.seen) == 40 and len(set(method.seen)) == 40
    assert bool((memory.labels_HN == -1).all())  # the method returned no labels: the store is untouched


def test_only_the_last_batch_may_be_short() -> None:
    def short_first() -> Iterator[Batch]:
        items = list(batches(N + 3))
        yield from [items[-1], *items[:-1]]

    with pytest.raises(ValueError, match="3 rows came before a full one"):
        run_epoch(PerBatchLossMethod(), short_first(), LocalMemory(N + 3, 1), 0, batch_size=BATCH)


@pytest.mark.parametrize("constraint", ["size", "entropy"])
def test_secu_labels_every_image_every_epoch_and_counters_equal_the_recount(constraint: str) -> None:
    """N = 43 with batches of 8: the last 3 images of each epoch are labelled by ``label_step`` (eval mode, no
    optimizer step), so every image has its label of the epoch and the counters equal a recount."""
    exp = apply_overrides(experiment(), [f"secu.constraint={constraint}", "secu.alpha=50"])
    written: dict[int, set[int]] = {}

    class RecordingMemory(LocalMemory):
        def write_async(self, sample_index_B: np.ndarray, labels_HB: np.ndarray, epoch: int) -> None:
            written.setdefault(epoch, set()).update(np.asarray(sample_index_B).tolist())
            super().write_async(sample_index_B, labels_HB, epoch)

    method, memory = SeCuMethod(exp, build_network(exp), (N + 3) // BATCH), RecordingMemory(N + 3, 2)
    for epoch in range(3):
        before = {k: v.clone() for k, v in method.base.state_dict().items()}
        steps_before = method.global_step
        result = run_epoch(method, batches(N + 3, seed=epoch), memory, epoch, batch_size=BATCH)
        assert (result.steps, result.labelled_only) == (5, 3) and method.global_step == steps_before + 5
        assert written[epoch] == set(range(N + 3)), f"epoch {epoch}: an image got no label of the epoch"
        state = result.summary.cluster_state
        assert state is not None
        for h, k in enumerate((3, 5)):
            recount = torch.bincount(memory.labels_HN[h], minlength=k).double()
            assert torch.equal(state.counters[h], recount), (epoch, h, state.counters[h], recount)
        assert any(not torch.equal(before[k], v) for k, v in method.base.state_dict().items())
    assert method.base.training, "label_step leaves the network in training mode"


def test_secu_label_step_trains_nothing_and_keeps_the_duals() -> None:
    exp = experiment()
    method = SeCuMethod(exp, build_network(exp), N // BATCH)
    method.before_epoch(0, EpochContext())
    method.state.duals[0] += torch.linspace(-1, 1, 3, dtype=torch.float64)
    short = next(batches(3, batch=3))
    weights = copy.deepcopy(method.base.state_dict())
    duals = [d.clone() for d in method.state.duals]
    out = method.label_step(short, torch.full((2, 3), -1, dtype=torch.long))
    assert out.labels_HB is not None and out.labels_HB.shape == (2, 3)
    assert all(torch.equal(weights[k], v) for k, v in method.base.state_dict().items())  # BN stats too
    assert all(torch.equal(a, b) for a, b in zip(duals, method.state.duals, strict=True))
    assert [float(c.sum()) for c in method.state.counters] == [3.0, 3.0]
    assert method.steps == 0 and method.global_step == 0


def test_a_feature_pass_method_gets_every_image_before_the_epoch() -> None:
    method = FeaturePassMethod()
    run_epoch(method, batches(), LocalMemory(N, 1), 0, batch_size=BATCH,
              context=EpochContext(feature_batches=lambda: batches(seed=1)))
    assert method.pass_ids == list(range(N))


def experiment(epochs: int = 3) -> Any:
    return apply_overrides(recipe("fashion-mnist-cpu"), [
        "secu.ks=[3,5]", "model.cnn_width=8", f"optim.batch_size={BATCH}", f"optim.epochs={epochs}",
        "optim.warmup_epochs=1"])


def train(method: SeCuMethod, memory: LocalMemory, epochs: range) -> list[dict[str, float]]:
    return [run_epoch(method, batches(seed=e), memory, e, batch_size=BATCH).summary.metrics for e in epochs]


def test_secu_method_resumed_from_its_state_dict_equals_an_uninterrupted_run() -> None:
    exp = experiment()
    straight, memory = SeCuMethod(exp, build_network(exp), N // BATCH), LocalMemory(N, 2)
    want = train(straight, memory, range(3))

    first, memory2 = SeCuMethod(exp, build_network(exp), N // BATCH), LocalMemory(N, 2)
    got = train(first, memory2, range(2))
    saved = copy.deepcopy(first.state_dict())
    resumed = SeCuMethod(exp, build_network(exp), N // BATCH)
    resumed.load_state_dict(saved)
    got += train(resumed, memory2, range(2, 3))

    assert got == want
    assert torch.equal(memory.labels_HN, memory2.labels_HN)
    for a, b in zip(straight.state.duals + straight.state.counters, resumed.state.duals + resumed.state.counters,
                    strict=True):
        assert torch.equal(a, b)
    assert want[0]["train/lr"] == 0.0 and want[-1]["train/steps"] == N // BATCH


def test_secu_method_assign_is_what_predict_publishes() -> None:
    exp = experiment(epochs=2)
    method = SeCuMethod(exp, build_network(exp), N // BATCH)
    train(method, LocalMemory(N, 2), range(2))
    images = np.random.default_rng(0).integers(0, 256, (12, 28, 28), dtype=np.uint8)
    labels, confidence = predict(method, images, exp)
    from secu.augment import EvalTransform, eval_batch, normalize

    method.eval()
    x = normalize(torch.from_numpy(eval_batch(EvalTransform(exp.augment), list(images))),
                  exp.augment.mean, exp.augment.std)
    got = method.assign(x)
    assert np.array_equal(got.clusters_HB.numpy(), labels)
    assert np.allclose(got.confidence_HB.numpy(), confidence)
    assert got.similarity_HB.shape == (2, 12) and got.embedding_BD is not None
    assert labels.shape == (2, 12) and bool(((confidence > 0) & (confidence <= 1)).all())


class LabelStepRecorder(PerBatchLossMethod):
    """Records the short batches it was asked to label (and labels them all 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.labelled: list[int] = []

    def label_step(self, batch: Batch, stored_HB: torch.Tensor) -> StepOutput:
        self.labelled.extend(batch["sample_index"].tolist())
        return StepOutput(labels_HB=torch.zeros(1, batch["sample_index"].shape[0], dtype=torch.long))


def _short_batch_rank(rank: int, world: int, port: int, sizes: tuple[int, int], out_path: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        method, memory = LabelStepRecorder(), LocalMemory(N + 8, 1)
        result = run_epoch(method, batches(N + sizes[rank]), memory, 0, batch_size=BATCH)
        torch.save({"labelled": method.labelled, "labelled_only": result.labelled_only}, f"{out_path}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(("sizes", "labelled"), [((3, 3), True), ((3, 5), False)])
def test_ranks_label_their_short_batches_only_when_all_have_the_same_size(
        sizes: tuple[int, int], labelled: bool, tmp_path: Any) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    out = str(tmp_path / "rank")
    mp.spawn(_short_batch_rank, args=(2, port, sizes, out), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(f"{out}.{rank}")
        assert got["labelled_only"] == (sizes[rank] if labelled else 0)
        assert len(got["labelled"]) == (sizes[rank] if labelled else 0)
