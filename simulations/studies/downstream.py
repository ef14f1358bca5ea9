"""Downstream evaluation of a pretrained encoder at one site: split, fine-tune, score.

Used by the ``compare`` study (simulations/studies/compare.py) to judge every pretraining arm on the
same held-out scans with the same fine-tuning recipe:

* a deterministic, stratified train/test split of the site's labelled scans
  (``common/labelled.py``, shared with the federated phase 2);
* fine-tuning with ``common/finetune.Finetuner`` (progressive freezing by default) and
  prediction on the held-out scans; metrics with bootstrap CIs come from ``common/metrics``;
* a representation monitor that needs no training (``common/monitor.py``, which every
  phase-1 round also runs at each site): kNN accuracy of the features the head reads and their
  spread (a collapsed encoder maps every scan to one point);
* a paired bootstrap of the AUROC difference between two arms on the same test scans.

The self-supervised arms pretrain on every scan of a site, held-out ones included, but never
see a label: the usual protocol for SSL (labels, not images, are what is scarce).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ctfed.common.config import FinetuneConfig, ModelConfig
from ctfed.common.finetune import Finetuner, build_classifier
from ctfed.common.metrics import evaluation_dict, roc_auc
from ctfed.common.monitor import MonitorResult


# A verdict counts as evidence only with this many held-out scans (fewer: a handful of distinct
# resamples make the bootstrap CI itself unreliable) and a CI half-width (AUROC) this narrow.
MIN_EVIDENCE_TEST_SCANS = 100
TARGET_HALF_WIDTH = 0.05


@dataclass
class Predictions:
    """Held-out probabilities and labels, both (N, K), plus the fine-tuning losses."""

    probs: np.ndarray
    labels: np.ndarray
    losses: list[float]


def finetune_and_predict(
    model_cfg: ModelConfig,
    finetune_cfg: FinetuneConfig,
    mode: str,
    encoder_state: Mapping[str, torch.Tensor],
    train: Dataset,
    test: Dataset,
) -> Predictions:
    """Fine-tune a fresh classifier on ``encoder_state`` in ``mode``; predict the test scans.

    The head's initialisation and the batch order come from ``finetune_cfg.seed``, so every
    arm starts its fine-tune from the same head and sees the same batches.
    """
    return finetune_and_predict_many(model_cfg, finetune_cfg, mode, encoder_state, train, [test])[0]


def finetune_and_predict_many(
    model_cfg: ModelConfig,
    finetune_cfg: FinetuneConfig,
    mode: str,
    encoder_state: Mapping[str, torch.Tensor],
    train: Dataset,
    evaluated: Sequence[Dataset],
) -> list[Predictions]:
    """``finetune_and_predict`` with one fine-tune predicting several sets (validation, test)."""
    cfg = replace(finetune_cfg, mode=mode)
    classifier = build_classifier(model_cfg, cfg.num_outputs, encoder_state, seed=cfg.seed, pooling=cfg.pooling)
    finetuner = Finetuner(classifier, cfg, train)
    fit = finetuner.fit()
    predictions = []
    for scans in evaluated:
        probs, labels = finetuner.predict(scans)
        predictions.append(Predictions(probs=probs, labels=labels, losses=fit.losses))
    return predictions


def score(predictions: Predictions, label_names: Sequence[str], n_boot: int, seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """``{task: {metric: {value, low, high, n_boot}}}`` via ``common.metrics.evaluate``."""
    return evaluation_dict(predictions.labels, predictions.probs, label_names, n_boot, seed)


def pool(predictions: Sequence[Predictions]) -> Predictions:
    """Held-out predictions of several sites as one test set (each site's own fine-tuned model)."""
    return Predictions(
        probs=np.concatenate([p.probs for p in predictions]),
        labels=np.concatenate([p.labels for p in predictions]),
        losses=[],
    )


def monitor_entry(result: MonitorResult) -> dict[str, float]:
    """A ``common.monitor`` result in compare.json's form: kNN accuracy (primary label) on the
    held-out scans, ``knn_k``, and the spread of the features the fine-tuning head reads
    against ``uniform_std`` = 1/sqrt(D) (near 0: collapse)."""
    return {
        "knn_accuracy": result.knn_accuracy,
        "knn_k": result.k,
        "embedding_std": result.embedding_std,
        "uniform_std": result.uniform_std,
    }


def paired_auroc_difference(
    labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, n_boot: int, seed: int, confidence: float = 0.95
) -> dict[str, float]:
    """AUROC(a) - AUROC(b) on the same test scans, with a paired percentile bootstrap CI.

    Both arms are scored on the same resampled cases, so the interval reflects the
    difference, not two independent uncertainties. Resamples with one class only are skipped.
    """
    y = np.asarray(labels).ravel()
    a, b = np.asarray(scores_a).ravel(), np.asarray(scores_b).ravel()
    if not len(y) == len(a) == len(b):
        raise ValueError(f"labels and scores differ in length: {len(y)}, {len(a)}, {len(b)}")
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, len(y), size=(n_boot, len(y)))
    diffs = np.array([roc_auc(y[idx], a[idx]) - roc_auc(y[idx], b[idx]) for idx in samples])
    diffs = diffs[~np.isnan(diffs)]
    tail = 100.0 * (1.0 - confidence) / 2.0
    low, high = np.percentile(diffs, [tail, 100.0 - tail]) if len(diffs) else (math.nan, math.nan)
    return {"value": roc_auc(y, a) - roc_auc(y, b), "low": float(low), "high": float(high), "n_boot": int(len(diffs))}


def judged_difference(
    labels: np.ndarray, scores_a: np.ndarray, scores_b: np.ndarray, target: float, gap: bool, n_boot: int, seed: int
) -> dict[str, Any]:
    """A verdict's numbers: AUROC(a) - AUROC(b) must exceed ``target`` (a gain); with ``gap``,
    AUROC(b) - AUROC(a) (how far a trails b) must stay at or below it. ``difference`` is the
    paired bootstrap of whichever difference is judged; ``evidence`` whether the test set can
    answer at all (MIN_EVIDENCE_TEST_SCANS, TARGET_HALF_WIDTH)."""
    diff = paired_auroc_difference(labels, scores_b, scores_a, n_boot, seed) if gap else paired_auroc_difference(labels, scores_a, scores_b, n_boot, seed)
    if gap:
        met, supported, missed_by = diff["value"] <= target, diff["high"] <= target, diff["value"] - target
    else:
        met, supported, missed_by = diff["value"] > target, diff["low"] > target, target - diff["value"]
    half_width = (diff["high"] - diff["low"]) / 2.0
    return {
        "difference": diff,
        "target": target,
        "kind": "at most" if gap else "more than",
        "met": bool(met),
        "ci_clears_target": bool(supported),
        "missed_by": None if met else float(missed_by),
        "n_test": int(len(labels)),
        "n_positive": int(np.asarray(labels).sum()),
        "evidence": bool(len(labels) >= MIN_EVIDENCE_TEST_SCANS and half_width <= TARGET_HALF_WIDTH),
    }
