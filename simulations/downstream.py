"""Downstream evaluation of a pretrained encoder at one site: split, fine-tune, score.

Used by the ``compare`` study (simulations/compare.py) to judge every pretraining arm on the
same held-out scans with the same fine-tuning recipe:

* a deterministic, stratified train/test split of the site's labelled scans (the split
  depends on the scans' content hashes and a seed, not on the site's secret-keyed file names,
  so re-synthesising the same hospitals gives the same split);
* fine-tuning with ``common/finetune.Finetuner`` (progressive freezing by default) and
  prediction on the held-out scans; metrics with bootstrap CIs come from ``common/metrics``;
* a representation monitor that needs no training: kNN accuracy of the encoder's CLS features
  and their spread (a collapsed encoder maps every scan to one point);
* a paired bootstrap of the AUROC difference between two arms on the same test scans.

The self-supervised arms pretrain on every scan of a site, held-out ones included, but never
see a label: the usual protocol for SSL (labels, not images, are what is scarce).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ctfed.common.config import FinetuneConfig, ModelConfig
from ctfed.common.finetune import Finetuner, build_classifier
from ctfed.common.metrics import Estimate, embedding_std, evaluate, knn_accuracy, roc_auc
from ctfed.common.preprocess import CachedVolumes

# Each class needs one scan in the training and one in the test part.
MIN_SCANS_PER_CLASS = 2


class NotEvaluableError(ValueError):
    """A site whose labels cannot support a train/test split; the message says why."""


class LabelledScans(Dataset):
    """(volume, labels) pairs from a site cache, volumes resized to the model input if needed."""

    def __init__(self, volumes: CachedVolumes, indices: Sequence[int], label_names: Sequence[str], image_size: int) -> None:
        self.volumes = volumes
        self.indices = list(indices)
        self.label_names = list(label_names)
        self.image_size = image_size
        self.labels = np.array([[_label(volumes, i, name) for name in self.label_names] for i in self.indices], dtype=np.float32)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        volume = self.volumes[self.indices[position]]
        if volume.shape[-1] != self.image_size:
            # Caches may be prepared larger than the model input (RunConfig allows it).
            volume = F.interpolate(volume[None], size=(self.image_size,) * 3, mode="trilinear", align_corners=False)[0]
        return volume, torch.from_numpy(self.labels[position])


def _label(volumes: CachedVolumes, index: int, name: str) -> float:
    value = (volumes.labels[index] or {}).get(name)
    if value not in (0, 1):
        raise NotEvaluableError(f"scan {index} of {volumes.cache_dir.name} has label {name}={value!r}; expected 0 or 1")
    return float(value)


def labelled_indices(volumes: CachedVolumes, label_names: Sequence[str]) -> list[int]:
    """Scans whose manifest entry carries a value for every label name."""
    return [
        i
        for i, label in enumerate(volumes.labels)
        if label is not None and all(label.get(name) is not None for name in label_names)
    ]


@dataclass(frozen=True)
class SiteSplit:
    """Indices into a site's cache; stratified on the first label name."""

    train: tuple[int, ...]
    test: tuple[int, ...]


def stratified_split(volumes: CachedVolumes, label_names: Sequence[str], test_fraction: float, seed: int) -> SiteSplit:
    """Hold out ``test_fraction`` of each class (at least one scan, never all of them).

    Scans are ordered by content hash, then shuffled per class with ``seed``: the same scans
    give the same split whatever the cache's pseudonymous keys are.
    """
    primary = label_names[0]
    indices = labelled_indices(volumes, label_names)
    order = sorted(indices, key=lambda i: str(volumes.entries[i].get("content_hash", volumes.entries[i]["key"])))
    rng = np.random.default_rng(seed)
    train: list[int] = []
    test: list[int] = []
    for cls in (0, 1):
        members = [i for i in order if _label(volumes, i, primary) == cls]
        if len(members) < MIN_SCANS_PER_CLASS:
            raise NotEvaluableError(
                f"{volumes.cache_dir.name}: {len(members)} labelled scan(s) with {primary}={cls}; a train/test split "
                f"needs at least {MIN_SCANS_PER_CLASS} per class"
            )
        members = [members[k] for k in rng.permutation(len(members))]
        # Rounded half up (Python's round() goes half-to-even), at least one, never all.
        held_out = min(max(math.floor(len(members) * test_fraction + 0.5), 1), len(members) - 1)
        test += members[:held_out]
        train += members[held_out:]
    return SiteSplit(train=tuple(sorted(train)), test=tuple(sorted(test)))


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
    cfg = replace(finetune_cfg, mode=mode)
    classifier = build_classifier(model_cfg, cfg.num_outputs, encoder_state, seed=cfg.seed)
    finetuner = Finetuner(classifier, cfg, train)
    fit = finetuner.fit()
    probs, labels = finetuner.predict(test)
    return Predictions(probs=probs, labels=labels, losses=fit.losses)


def score(predictions: Predictions, label_names: Sequence[str], n_boot: int, seed: int) -> dict[str, dict[str, dict[str, float]]]:
    """``{task: {metric: {value, low, high, n_boot}}}`` via ``common.metrics.evaluate``."""
    results = evaluate(predictions.labels, predictions.probs, task_names=label_names, n_boot=n_boot, seed=seed)
    return {task: {metric: estimate_to_dict(est) for metric, est in metrics.items()} for task, metrics in results.items()}


def estimate_to_dict(estimate: Estimate) -> dict[str, float]:
    return {"value": estimate.value, "low": estimate.low, "high": estimate.high, "n_boot": estimate.n_boot}


def pool(predictions: Sequence[Predictions]) -> Predictions:
    """Held-out predictions of several sites as one test set (each site's own fine-tuned model)."""
    return Predictions(
        probs=np.concatenate([p.probs for p in predictions]),
        labels=np.concatenate([p.labels for p in predictions]),
        losses=[],
    )


@torch.no_grad()
def cls_features(model_cfg: ModelConfig, encoder_state: Mapping[str, torch.Tensor], scans: LabelledScans) -> np.ndarray:
    """The encoder's CLS features (N, D) of every scan, in eval mode."""
    encoder = build_classifier(model_cfg, 1, encoder_state).encoder.eval()
    return np.stack([encoder.cls_features(scans[i][0][None])[0].numpy() for i in range(len(scans))])


def representation_monitor(
    model_cfg: ModelConfig, encoder_state: Mapping[str, torch.Tensor], train: LabelledScans, test: LabelledScans, k: int
) -> dict[str, float]:
    """kNN accuracy (primary label) on the held-out scans and the features' spread.

    ``embedding_std`` near 0 means collapse; features spread over the sphere give about
    ``uniform_std`` = 1/sqrt(D).
    """
    train_feats = cls_features(model_cfg, encoder_state, train)
    test_feats = cls_features(model_cfg, encoder_state, test)
    k = min(k, len(train))
    return {
        "knn_accuracy": knn_accuracy(train_feats, train.labels[:, 0], test_feats, test.labels[:, 0], k=k),
        "knn_k": k,
        "embedding_std": embedding_std(np.concatenate([train_feats, test_feats])),
        "uniform_std": 1.0 / math.sqrt(train_feats.shape[1]),
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
