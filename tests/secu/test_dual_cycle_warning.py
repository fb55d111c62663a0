"""The warning for size-constraint duals locked in a cycle (``secu.diagnose.warn_if_duals_cycle``).

The signature was measured with ``python -m benchmarks.small_data_stability`` (docs/benchmarks.md,
"Small-data stability"): cycling runs had a median largest batch share of 0.64-1.0 with a quarter to
three quarters of the labels changing every epoch; settled runs 0.39-0.41 and under 5 %.
"""

from __future__ import annotations

import logging

import pytest

from secu.diagnose import warn_if_duals_cycle
from secu.recipes import recipe


def metrics(epoch: int, shares: tuple[float, ...], changed: tuple[float, ...]) -> dict[str, float]:
    row: dict[str, float] = {"epoch": epoch}
    for h, (share, frac) in enumerate(zip(shares, changed, strict=True)):
        row[f"clusters/h{h}/largest_batch_share"] = share
        row[f"clusters/h{h}/changed_frac"] = frac
    return row


def test_cycling_head_is_named_with_the_dual_step(caplog: pytest.LogCaptureFixture) -> None:
    exp = recipe("fashion-mnist-cpu")
    exp.secu.ks = (3, 6)
    with caplog.at_level(logging.WARNING, logger="secu.diagnose"):
        assert warn_if_duals_cycle(metrics(10, (0.67, 0.35), (0.34, 0.02)), exp) == [0]
    assert "head 0 (K=3)" in caplog.text and "67%" in caplog.text and "34%" in caplog.text
    assert "dual_lr * lratio / K = 0.03" in caplog.text and "Small-data stability" in caplog.text


@pytest.mark.parametrize(("epoch", "share", "changed", "constraint"), [
    (10, 0.41, 0.01, "size"),   # settled: balanced batches, labels stable
    (10, 0.41, 0.40, "size"),   # labels still moving, but the batches spread over the clusters
    (10, 1.00, 0.02, "size"),   # one cluster takes the batches, but the labels do not move
    (2, 1.00, 0.70, "size"),    # within the warm-up (2 epochs in the recipe) labels move a lot anyway
    (10, 0.41, 0.60, "entropy"),  # entropy: labels moving, batches spread
    (10, 1.00, 0.00, "entropy"),  # entropy: one cluster takes the batches, labels frozen
])
def test_no_warning_without_the_signature(epoch: int, share: float, changed: float, constraint: str,
                                          caplog: pytest.LogCaptureFixture) -> None:
    exp = recipe("fashion-mnist-cpu")
    exp.secu.ks, exp.secu.constraint = (3,), constraint
    with caplog.at_level(logging.WARNING):
        assert warn_if_duals_cycle(metrics(epoch, (share,), (changed,)), exp) == []
    assert "cycle" not in caplog.text


def test_an_entropy_constraint_that_does_not_settle_is_named_with_alpha(caplog: pytest.LogCaptureFixture) -> None:
    """Issue 17: the cycle check covered only the size constraint. The entropy signature was measured on 192
    pattern images with secu.alpha=200 (2 seeds, last 3 epochs): largest batch share 0.92-1.0, 58-83 % of
    the labels changing every epoch."""
    exp = recipe("fashion-mnist-cpu")
    exp.secu.ks, exp.secu.constraint, exp.secu.alpha = (3, 6), "entropy", 200.0
    with caplog.at_level(logging.WARNING, logger="secu.diagnose"):
        assert warn_if_duals_cycle(metrics(10, (1.0, 0.92), (0.59, 0.81)), exp) == [0, 1]
    assert "head 1 (K=6)" in caplog.text and "entropy constraint" in caplog.text
    assert "secu.alpha=200 outweighs" in caplog.text and "duals" not in caplog.text


def test_collapsed_memory_is_named_after_the_warm_up_under_either_constraint() -> None:
    from secu.diagnose import collapsed_heads

    for constraint in ("size", "entropy"):
        exp = recipe("fashion-mnist-cpu")
        exp.secu.ks, exp.secu.constraint = (10, 20), constraint
        row = {"epoch": 5, "clusters/h0/empty": 4.0, "clusters/h0/max_size_frac": 0.9, "clusters/h0/labelled_frac": 1.0,
               "clusters/h1/empty": 0.0, "clusters/h1/max_size_frac": 0.08, "clusters/h1/labelled_frac": 1.0}
        (msg,) = collapsed_heads(row, exp, 2000)
        assert msg.startswith("head 0 (K=10) collapsed in the training memory after epoch 5")
        assert "4 of its 10 clusters are empty" in msg and "90% of the 2000 images" in msg
        assert collapsed_heads(row | {"epoch": 1}, exp, 2000) == []  # still in the warm-up (2 epochs)
