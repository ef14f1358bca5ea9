"""Downstream metrics with bootstrap CIs, and representation monitors for pretraining.

Written with numpy only, so sites and the coordinator need no scikit-learn; the tests check
every metric against scikit-learn. Conventions follow scikit-learn's:

* AUROC is the Mann-Whitney statistic with ties counted half (equal to the trapezoidal ROC area);
* average precision is the step-wise sum ``sum_n (R_n - R_{n-1}) P_n`` over distinct
  thresholds, without interpolation;
* balanced accuracy is the mean recall over the classes present in ``y_true``;
* F1 is 0 when there is no positive prediction and no positive label.

A metric that is undefined on the given labels (AUROC or AP with one class only) is NaN
rather than an exception, so one bootstrap resample without positives does not end an
evaluation; CIs use the resamples where the metric is defined.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

logger = logging.getLogger(__name__)

METRICS = ("auroc", "average_precision", "balanced_accuracy", "f1")


def _as_array(values: np.ndarray | torch.Tensor | Sequence[float]) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _binary_inputs(y_true: np.ndarray, y_other: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_other = _as_array(y_true).ravel(), _as_array(y_other).ravel()
    if y_true.shape != y_other.shape:
        raise ValueError(f"labels and scores differ in length: {y_true.shape[0]} vs {y_other.shape[0]}")
    if not np.isin(y_true, (0, 1)).all():
        raise ValueError("binary labels must be 0 or 1")
    return y_true.astype(bool), y_other.astype(float)


def roc_auc(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Area under the ROC curve for one binary task (NaN if only one class is present)."""
    y, score = _binary_inputs(y_true, y_score)
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Average ranks make tied scores count one half, as the trapezoidal ROC area does.
    order = np.argsort(score, kind="mergesort")
    sorted_scores = score[order]
    ranks = np.empty(len(score))
    _, first, counts = np.unique(sorted_scores, return_index=True, return_counts=True)
    average = first + (counts + 1) / 2.0  # 1-based mean rank of each tie group
    ranks[order] = np.repeat(average, counts)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def average_precision(y_true: np.ndarray, y_score: np.ndarray) -> float:
    """Average precision for one binary task (NaN if there is no positive label)."""
    y, score = _binary_inputs(y_true, y_score)
    n_pos = int(y.sum())
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-score, kind="mergesort")
    y, score = y[order], score[order]
    # One operating point per distinct score: the last index of each tie group.
    last = np.r_[np.flatnonzero(np.diff(score)), len(score) - 1]
    tps = np.cumsum(y)[last]
    precision = tps / (last + 1)
    recall = tps / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean of sensitivity and specificity (over the classes present in ``y_true``)."""
    y, pred = _binary_inputs(y_true, y_pred)
    pred = pred.astype(bool)
    recalls = [float(np.mean(pred[y == cls] == cls)) for cls in (False, True) if np.any(y == cls)]
    return float(np.mean(recalls)) if recalls else float("nan")


def f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """F1 of the positive class (0 when neither labels nor predictions have a positive)."""
    y, pred = _binary_inputs(y_true, y_pred)
    pred = pred.astype(bool)
    tp = int(np.sum(y & pred))
    denominator = int(y.sum()) + int(pred.sum())
    return 2.0 * tp / denominator if denominator else 0.0


@dataclass(frozen=True)
class Estimate:
    """A metric on the full test set with a percentile bootstrap interval."""

    value: float
    low: float
    high: float
    # Resamples in which the metric was defined (both classes present where needed).
    n_boot: int


def _task_metrics(y: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, float]:
    pred = score >= threshold
    return {
        "auroc": roc_auc(y, score),
        "average_precision": average_precision(y, score),
        "balanced_accuracy": balanced_accuracy(y, pred),
        "f1": f1(y, pred),
    }


def _as_matrix(values: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    array = _as_array(values)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2:
        raise ValueError(f"{name} must be (N,) for one task or (N, K) for K tasks, got shape {array.shape}")
    return array


def evaluate(
    y_true: np.ndarray | torch.Tensor,
    y_score: np.ndarray | torch.Tensor,
    task_names: Sequence[str] | None = None,
    threshold: float = 0.5,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, dict[str, Estimate]]:
    """Per-task AUROC, AP, balanced accuracy and F1 with bootstrap CIs.

    ``y_true`` (N,) or (N, K) of 0/1, ``y_score`` the same shape of probabilities (predictions
    are ``score >= threshold``). Resampling draws whole cases, the same cases for every task,
    so CIs of different tasks come from the same resamples. Returns
    ``{task: {metric: Estimate}}``; tasks are named ``task_names`` or ``task0``, ``task1``...
    """
    y, score = _as_matrix(y_true, "y_true"), _as_matrix(y_score, "y_score")
    if y.shape != score.shape:
        raise ValueError(f"y_true {y.shape} and y_score {score.shape} must have the same shape")
    if n_boot < 1 or not 0 < confidence < 1:
        raise ValueError(f"need n_boot >= 1 and 0 < confidence < 1, got {n_boot}, {confidence}")
    names = list(task_names) if task_names is not None else [f"task{k}" for k in range(y.shape[1])]
    if len(names) != y.shape[1]:
        raise ValueError(f"{len(names)} task names for {y.shape[1]} tasks")

    rng = np.random.default_rng(seed)
    samples = rng.integers(0, y.shape[0], size=(n_boot, y.shape[0]))
    tail = 100.0 * (1.0 - confidence) / 2.0
    results: dict[str, dict[str, Estimate]] = {}
    for k, name in enumerate(names):
        point = _task_metrics(y[:, k], score[:, k], threshold)
        boot = [_task_metrics(y[idx, k], score[idx, k], threshold) for idx in samples]
        results[name] = {}
        for metric in METRICS:
            values = np.array([b[metric] for b in boot])
            values = values[~np.isnan(values)]
            if len(values) < n_boot:
                logger.debug("%s/%s: %d of %d resamples undefined", name, metric, n_boot - len(values), n_boot)
            low, high = (np.percentile(values, [tail, 100.0 - tail]) if len(values) else (np.nan, np.nan))
            results[name][metric] = Estimate(point[metric], float(low), float(high), len(values))
    return results


def estimate_to_dict(estimate: Estimate) -> dict[str, float]:
    return {"value": estimate.value, "low": estimate.low, "high": estimate.high, "n_boot": estimate.n_boot}


def evaluation_dict(
    y_true: np.ndarray | torch.Tensor,
    y_score: np.ndarray | torch.Tensor,
    task_names: Sequence[str],
    n_boot: int,
    seed: int,
) -> dict[str, dict[str, dict[str, float]]]:
    """``evaluate`` as plain values, ``{task: {metric: {value, low, high, n_boot}}}``: what
    results files and reply metrics hold."""
    results = evaluate(y_true, y_score, task_names=task_names, n_boot=n_boot, seed=seed)
    return {task: {metric: estimate_to_dict(est) for metric, est in metrics.items()} for task, metrics in results.items()}


OPERATING_POINT_METHOD = "youden_j"
# A phase-2 reply's metric ``eval/<task>/operating_point``: the site's threshold for the task.
OPERATING_POINT_METRIC = "operating_point"


def youden_operating_point(y_true: np.ndarray | torch.Tensor, y_score: np.ndarray | torch.Tensor) -> dict[str, float] | None:
    """The decision threshold on ``y_score`` that maximises Youden's J (sensitivity +
    specificity - 1) on one binary task, with the sensitivity and specificity it has there;
    None when the labels hold one class only (no operating point can be chosen).

    Candidates are the midpoints between consecutive distinct scores (a decision is
    ``score >= threshold``), so a threshold never sits exactly on a validation scan's score;
    of equally good candidates the middle one is taken (the widest margin on both sides)."""
    y, score = _binary_inputs(_as_array(y_true), _as_array(y_score))
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    distinct = np.unique(score)
    if len(distinct) < 2:
        return None  # every scan scores the same: no threshold separates anything
    candidates = (distinct[:-1] + distinct[1:]) / 2.0
    sensitivity = np.array([np.mean(score[y] >= t) for t in candidates])
    specificity = np.array([np.mean(score[~y] < t) for t in candidates])
    youden = sensitivity + specificity - 1.0
    best = np.flatnonzero(np.isclose(youden, youden.max(), rtol=0.0, atol=1e-12))
    chosen = int(best[len(best) // 2])
    return {
        "threshold": float(candidates[chosen]),
        "sensitivity": float(sensitivity[chosen]),
        "specificity": float(specificity[chosen]),
        "youden_j": float(youden[chosen]),
        "positives": n_pos,
        "negatives": n_neg,
    }


def operating_points(
    y_true: np.ndarray | torch.Tensor, y_score: np.ndarray | torch.Tensor, task_names: Sequence[str], split: str
) -> dict[str, dict[str, Any]]:
    """``youden_operating_point`` per task of (N, K) labels and probabilities, as a model card
    holds it: ``{task: {threshold, sensitivity, specificity, youden_j, positives, negatives,
    method, split}}``; a task with one class in ``y_true`` is left out."""
    y, score = _as_matrix(y_true, "y_true"), _as_matrix(y_score, "y_score")
    if y.shape != score.shape or y.shape[1] != len(task_names):
        raise ValueError(f"y_true {y.shape}, y_score {score.shape} and {len(task_names)} task names do not match")
    points: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(task_names):
        point = youden_operating_point(y[:, k], score[:, k])
        if point is None:
            logger.warning("task %s: one class only on the %s scans; no operating point chosen", name, split)
            continue
        points[name] = {**point, "method": OPERATING_POINT_METHOD, "split": split}
    return points


def embedding_std(features: np.ndarray | torch.Tensor) -> float:
    """Mean per-dimension std of L2-normalised embeddings (N, D) across samples.

    Collapse to one point gives 0; embeddings spread over the sphere give about 1/sqrt(D)
    (the SimSiam collapse monitor), so compare against that, not against 1.
    """
    x = _as_array(features).astype(float)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"features must be (N >= 2, D), got shape {x.shape}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return float(x.std(axis=0).mean())


def knn_accuracy(
    train_feats: np.ndarray | torch.Tensor,
    train_labels: np.ndarray | torch.Tensor,
    test_feats: np.ndarray | torch.Tensor,
    test_labels: np.ndarray | torch.Tensor,
    k: int = 5,
) -> float:
    """Accuracy of a cosine-similarity k-nearest-neighbour vote (integer class labels).

    Majority vote among the k most similar training embeddings; ties between classes go to
    the class with the larger summed similarity. A cheap probe of representation quality
    that needs no training, which is why DINO monitors it.
    """
    train, test = _as_array(train_feats).astype(float), _as_array(test_feats).astype(float)
    train_y, test_y = _as_array(train_labels).astype(int).ravel(), _as_array(test_labels).astype(int).ravel()
    if train.ndim != 2 or test.ndim != 2 or train.shape[1] != test.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {train.shape} and {test.shape}")
    if len(train_y) != len(train) or len(test_y) != len(test):
        raise ValueError("each feature row needs one label")
    if not 1 <= k <= len(train):
        raise ValueError(f"k must be in [1, {len(train)}] (training samples), got {k}")
    if train_y.min() < 0 or test_y.min() < 0:
        raise ValueError("class labels must be non-negative integers")

    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    similarity = unit(test) @ unit(train).T
    neighbours = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    neighbour_sims = np.take_along_axis(similarity, neighbours, axis=1)
    n_classes = int(max(train_y.max(), test_y.max())) + 1
    rows = np.repeat(np.arange(len(test)), k)
    votes = np.zeros((len(test), n_classes))
    sims = np.zeros((len(test), n_classes))
    np.add.at(votes, (rows, train_y[neighbours].ravel()), 1.0)
    np.add.at(sims, (rows, train_y[neighbours].ravel()), neighbour_sims.ravel())
    # Lexicographic (votes, summed similarity): similarities sum to less than k + 1 in size.
    best = np.argmax(votes * (2 * k + 2) + sims, axis=1)
    return float(np.mean(best == test_y))
