"""Clustering metrics: hand-computed examples, and sklearn.metrics as a test-only reference."""

import math

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from secu.metrics import (
    ari,
    contingency,
    evaluate_clustering,
    hungarian_acc,
    metrics_from_contingency,
    nmi,
    size_stats,
    sum_contingency,
)


def test_permuted_perfect_clustering_scores_one() -> None:
    y_true = np.array([0, 0, 1, 1, 2, 2, 2])
    y_pred = np.array([5, 5, 0, 0, 3, 3, 3])  # a relabelling, cluster ids not contiguous
    assert evaluate_clustering(y_true, y_pred) == pytest.approx({"acc": 1.0, "nmi": 1.0, "ari": 1.0})


def test_known_2x2_example() -> None:
    # Table [[2, 1], [0, 1]]: 4 samples, class 0 -> clusters {0, 0, 1}, class 1 -> cluster 1.
    y_true = np.array([0, 0, 0, 1])
    y_pred = np.array([0, 0, 1, 1])
    np.testing.assert_array_equal(contingency(y_true, y_pred), [[2, 1], [0, 1]])
    # Best matching 0->0, 1->1 gets 2 + 1 of 4.
    assert hungarian_acc(y_true, y_pred) == pytest.approx(0.75)
    # Pairs (6): together in both: {0,1} -> 1; sum C(a,2) = 3 + 0; sum C(b,2) = 1 + 1.
    # expected = 3 * 2 / 6 = 1, max = (3 + 2) / 2 = 2.5, ARI = (1 - 1) / (2.5 - 1) = 0.
    assert ari(y_true, y_pred) == pytest.approx(0.0, abs=1e-12)

    # H(true) = H(3/4, 1/4), H(pred) = log 2, MI = H(pred) - H(pred | true)
    #   H(pred | true) = 3/4 * H(2/3, 1/3) + 1/4 * 0.
    def h(*p: float) -> float:
        return -sum(q * math.log(q) for q in p)

    mi = h(0.5, 0.5) - 0.75 * h(2 / 3, 1 / 3)
    expected_nmi = mi / ((h(0.75, 0.25) + h(0.5, 0.5)) / 2)
    assert nmi(y_true, y_pred) == pytest.approx(expected_nmi)


def test_acc_with_more_clusters_than_classes() -> None:
    y_true = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    y_pred = np.array([0, 0, 1, 1, 2, 2, 2, 3])
    # Only two clusters can be matched: 0 (or 1) -> class 0 gives 2, 2 -> class 1 gives 3.
    assert hungarian_acc(y_true, y_pred) == pytest.approx(5 / 8)


def test_acc_with_fewer_clusters_than_classes() -> None:
    y_true = np.array([0, 0, 1, 1, 2, 2])
    y_pred = np.array([0, 0, 0, 0, 1, 1])
    assert hungarian_acc(y_true, y_pred) == pytest.approx(4 / 6)


@pytest.mark.parametrize("seed", range(6))
def test_nmi_ari_match_sklearn_on_random_labels(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, classes, clusters = int(rng.integers(20, 400)), int(rng.integers(2, 12)), int(rng.integers(2, 15))
    y_true = rng.integers(0, classes, n)
    # Correlated prediction so that the scores are not all near zero.
    y_pred = np.where(rng.random(n) < 0.6, y_true % clusters, rng.integers(0, clusters, n))
    assert nmi(y_true, y_pred) == pytest.approx(
        normalized_mutual_info_score(y_true, y_pred, average_method="arithmetic"), abs=1e-10
    )
    assert ari(y_true, y_pred) == pytest.approx(adjusted_rand_score(y_true, y_pred), abs=1e-10)


@pytest.mark.parametrize(
    ("y_true", "y_pred"),
    [
        ([0, 0, 0, 0], [0, 0, 0, 0]),  # one group each
        ([0, 0, 0, 0], [0, 1, 2, 3]),  # one class, all singletons
        ([0, 1, 2, 3], [0, 1, 2, 3]),  # all singletons
        ([0, 1, 2, 3], [0, 0, 0, 0]),
        ([0, 0, 1, 1], [1, 1, 1, 1]),
    ],
)
def test_degenerate_partitions_match_sklearn(y_true: list[int], y_pred: list[int]) -> None:
    t, p = np.array(y_true), np.array(y_pred)
    assert nmi(t, p) == pytest.approx(normalized_mutual_info_score(t, p, average_method="arithmetic"))
    assert ari(t, p) == pytest.approx(adjusted_rand_score(t, p))


def test_unlabelled_entries_are_ignored() -> None:
    y_true = np.array([0, 0, 1, 1, -1, -1])
    y_pred = np.array([1, 1, 0, 0, 0, 1])
    assert evaluate_clustering(y_true, y_pred) == pytest.approx({"acc": 1.0, "nmi": 1.0, "ari": 1.0})


def test_sharded_tables_add_up_to_the_whole() -> None:
    rng = np.random.default_rng(3)
    y_true = rng.integers(0, 5, 300)
    y_pred = np.where(rng.random(300) < 0.5, y_true, rng.integers(0, 7, 300))
    parts = np.array_split(np.arange(300), 4)
    # Shards built without explicit sizes can have different shapes; sum_contingency pads them.
    tables = [contingency(y_true[i], y_pred[i]) for i in parts]
    whole = evaluate_clustering(y_true, y_pred)
    assert metrics_from_contingency(sum_contingency(tables)) == pytest.approx(whole)
    fixed = [contingency(y_true[i], y_pred[i], num_classes=5, num_clusters=7) for i in parts]
    assert all(t.shape == (5, 7) for t in fixed)
    np.testing.assert_array_equal(sum(fixed), contingency(y_true, y_pred, 5, 7))


def test_input_errors() -> None:
    with pytest.raises(ValueError, match="must match"):
        contingency(np.array([0, 1]), np.array([0]))
    with pytest.raises(ValueError, match="negative cluster"):
        contingency(np.array([0, 1]), np.array([0, -1]))
    with pytest.raises(ValueError, match="num_clusters"):
        contingency(np.array([0, 1]), np.array([0, 3]), num_clusters=2)
    with pytest.raises(ValueError, match="no labelled"):
        evaluate_clustering(np.array([-1, -1]), np.array([0, 1]))
    with pytest.raises(ValueError, match="integers"):
        nmi(np.array([0.5, 1.0]), np.array([0, 1]))


def test_size_stats_hand_computed() -> None:
    labels = np.array([0, 0, 0, 1, -1, -1])  # cluster 2 of 3 is empty, two not yet assigned
    stats = size_stats(labels, k=3)
    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    assert stats == pytest.approx(
        {
            "min_size_frac": 0.0,
            "max_size_frac": 0.75,
            "empty": 1.0,
            "entropy": entropy,
            "entropy_norm": entropy / math.log(3),
            "labelled": 4.0,
        }
    )


def test_size_stats_balanced_and_errors() -> None:
    stats = size_stats(np.arange(40) % 4, k=4)
    assert stats["entropy_norm"] == pytest.approx(1.0)
    assert stats["min_size_frac"] == stats["max_size_frac"] == pytest.approx(0.25)
    assert stats["empty"] == 0.0
    nothing = size_stats(np.full(5, -1), k=4)
    assert nothing["labelled"] == 0.0 and nothing["empty"] == 4.0 and nothing["entropy"] == 0.0
    with pytest.raises(ValueError, match="< k"):
        size_stats(np.array([0, 4]), k=4)
