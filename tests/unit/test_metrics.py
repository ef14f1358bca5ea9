"""Metrics against scikit-learn, bootstrap CIs, and representation monitors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, balanced_accuracy_score, f1_score, roc_auc_score

from ctfed.common.metrics import (
    average_precision,
    balanced_accuracy,
    embedding_std,
    evaluate,
    f1,
    knn_accuracy,
    roc_auc,
)


def _task(n: int, seed: int, signal: float = 1.0, ties: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    score = 1 / (1 + np.exp(-(signal * (2 * y - 1) + rng.normal(size=n))))
    if ties:  # coarse scores: many tied values, where the conventions matter
        score = np.round(score, 1)
    return y, score


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ties", [False, True])
def test_binary_metrics_equal_sklearn(seed: int, ties: bool) -> None:
    y, score = _task(60 + 17 * seed, seed, signal=0.5 * seed, ties=ties)
    pred = score >= 0.5
    assert roc_auc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)
    assert average_precision(y, score) == pytest.approx(average_precision_score(y, score), abs=1e-12)
    assert balanced_accuracy(y, pred) == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    assert f1(y, pred) == pytest.approx(f1_score(y, pred), abs=1e-12)


def test_multilabel_point_estimates_equal_sklearn_per_task() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, (80, 3))
    score = np.clip(0.3 * y + rng.uniform(0, 0.7, (80, 3)), 0, 1)
    result = evaluate(y, torch.from_numpy(score), task_names=["ich", "fracture", "mass"], n_boot=50)
    assert list(result) == ["ich", "fracture", "mass"]
    for k, name in enumerate(result):
        pred = score[:, k] >= 0.5
        assert result[name]["auroc"].value == pytest.approx(roc_auc_score(y[:, k], score[:, k]))
        ap = average_precision_score(y[:, k], score[:, k])
        assert result[name]["average_precision"].value == pytest.approx(ap)
        assert result[name]["balanced_accuracy"].value == pytest.approx(balanced_accuracy_score(y[:, k], pred))
        assert result[name]["f1"].value == pytest.approx(f1_score(y[:, k], pred))
    # sklearn's per-column multi-label averages agree too.
    assert np.mean([result[n]["auroc"].value for n in result]) == pytest.approx(roc_auc_score(y, score, average="macro"))


def test_bootstrap_ci_contains_estimate_narrows_and_is_seeded() -> None:
    small = evaluate(*_task(60, 1), n_boot=300, seed=0)["task0"]
    large = evaluate(*_task(1500, 1), n_boot=300, seed=0)["task0"]
    for metric, est in small.items():
        assert est.low <= est.value <= est.high, metric
        assert large[metric].low <= large[metric].value <= large[metric].high, metric
        assert large[metric].high - large[metric].low < est.high - est.low, metric
    assert evaluate(*_task(60, 1), n_boot=100, seed=3) == evaluate(*_task(60, 1), n_boot=100, seed=3)
    assert evaluate(*_task(60, 1), n_boot=100, seed=3) != evaluate(*_task(60, 1), n_boot=100, seed=4)


def test_undefined_metrics_are_nan_not_errors() -> None:
    y = np.zeros(10, dtype=int)
    score = np.linspace(0, 1, 10)
    assert np.isnan(roc_auc(y, score)) and np.isnan(average_precision(y, score))
    assert f1(y, score >= 2) == 0.0
    # Few positives: some resamples lack one, the CI uses the rest.
    y[0] = 1
    est = evaluate(y, score, n_boot=200)["task0"]["auroc"]
    assert 0 < est.n_boot < 200
    with pytest.raises(ValueError, match="0 or 1"):
        roc_auc(np.array([0, 2]), np.array([0.1, 0.2]))


def test_embedding_std_detects_collapse() -> None:
    rng = np.random.default_rng(0)
    dim = 64
    collapsed = np.tile(rng.normal(size=(1, dim)), (100, 1)) * rng.uniform(0.5, 2, (100, 1))
    assert embedding_std(collapsed) == pytest.approx(0.0, abs=1e-9)
    spread = embedding_std(torch.randn(2000, dim))
    assert spread == pytest.approx(1 / np.sqrt(dim), rel=0.05)


def test_knn_accuracy_on_clusters() -> None:
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(3, 16)) * 5
    train_y, test_y = rng.integers(0, 3, 90), rng.integers(0, 3, 30)
    train = centres[train_y] + rng.normal(size=(90, 16))
    test = centres[test_y] + rng.normal(size=(30, 16))
    assert knn_accuracy(train, train_y, test, test_y, k=5) == 1.0
    # Cosine: scaling features changes nothing.
    assert knn_accuracy(train * 7, train_y, test * 0.1, test_y, k=5) == 1.0
    # Random labels: about chance.
    assert knn_accuracy(train, rng.integers(0, 3, 90), test, test_y, k=5) < 0.7
    # Tie (one vote each with k=2): the more similar neighbour wins.
    two = np.array([[1.0, 0.0], [0.0, 1.0]])
    assert knn_accuracy(two, [0, 1], np.array([[1.0, 0.2]]), [0], k=2) == 1.0
    with pytest.raises(ValueError, match="k must be"):
        knn_accuracy(train, train_y, test, test_y, k=0)
