"""Representation monitor: how well an encoder's features separate labelled scans, and whether
they have collapsed, without training anything.

* kNN accuracy (primary label) of held-out labelled scans against the training labelled scans,
  cosine similarity on the features a fine-tuning head would read (``finetune.pooling``),
  z-scored per dimension with the training scans' mean and std first, as the head's
  ``FeatureStandardizer`` does (raw features put a constant offset and a few high-variance
  dimensions into every cosine, which hides what varies with the label);
* the spread of the raw features, ``embedding_std`` of the L2-normalised features: 0 when every
  scan maps to one point, about ``uniform_std`` = 1/sqrt(D) when they spread over the sphere
  (standardised features would hide a collapse: z-scoring blows any tiny spread up to 1).

Used in every phase-1 round at each site on the global encoder it received, before local
training (client/monitor_round.py; reply metrics ``monitor-*`` below, recorded by the
coordinator as ``rounds[].sites[].monitor``), and by the compare study for every arm
(simulations/studies/downstream.py). The split is phase 2's (``common/labelled.py``), so the monitor's
held-out scans are the ones phase 2 evaluates on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ctfed.common.config import FeaturePooling, FinetuneConfig, ModelConfig
from ctfed.common.finetune import STANDARDIZER_EPS, build_classifier
from ctfed.common.labelled import LabelledScans, SiteSplit, site_split
from ctfed.common.metrics import embedding_std, knn_accuracy
from ctfed.common.preprocess import CachedVolumes

# Reply metrics of a phase-1 round (aggregate statistics, sent in clear like the loss; on the
# secure path with the site's unmask reply, client/monitor_round.py).
MONITOR_PREFIX = "monitor-"
KNN_ACCURACY_KEY = "monitor-knn-accuracy"
EMBEDDING_STD_KEY = "monitor-embedding-std"
UNIFORM_STD_KEY = "monitor-uniform-std"
SCANS_KEY = "monitor-scans"
K_KEY = "monitor-k"
# Kept apart from train-seconds: the federation-overhead benchmark divides by training time.
SECONDS_KEY = "monitor-seconds"

# Scans per forward pass: bounds the memory of a large model's activations.
_FEATURE_BATCH = 8


@dataclass(frozen=True)
class MonitorResult:
    """One encoder's monitor at one site; ``k`` is the kNN's neighbours after capping at the
    training scans, ``scans`` the labelled scans behind the numbers (training + held out)."""

    knn_accuracy: float
    embedding_std: float
    uniform_std: float
    scans: int
    k: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)

    def to_metrics(self) -> dict[str, float | int]:
        """As reply metrics (``monitor-*``)."""
        return {
            KNN_ACCURACY_KEY: float(self.knn_accuracy),
            EMBEDDING_STD_KEY: float(self.embedding_std),
            UNIFORM_STD_KEY: float(self.uniform_std),
            SCANS_KEY: int(self.scans),
            K_KEY: int(self.k),
        }


_METRIC_FIELDS = {
    "knn_accuracy": KNN_ACCURACY_KEY,
    "embedding_std": EMBEDDING_STD_KEY,
    "uniform_std": UNIFORM_STD_KEY,
    "scans": SCANS_KEY,
    "k": K_KEY,
}


def monitor_from_metrics(metrics: Mapping[str, Any]) -> dict[str, float | int] | None:
    """``{knn_accuracy, embedding_std, uniform_std, scans, k}`` from a site's reply metrics;
    None when any of them is missing, not a finite number or outside what the monitor can
    produce (a site's malformed metric is left out, never fatal to the coordinator, which
    divides by ``uniform_std``)."""
    values: dict[str, float | int] = {}
    for name, key in _METRIC_FIELDS.items():
        value = metrics.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return None
        values[name] = int(value) if name in ("scans", "k") else float(value)
    plausible = (
        0.0 <= values["knn_accuracy"] <= 1.0
        and 0.0 <= values["embedding_std"] <= 1.0
        and 0.0 < values["uniform_std"] <= 1.0
        and values["scans"] >= 2
        and values["k"] >= 1
    )
    return values if plausible else None


def feature_monitor(
    train_features: np.ndarray,
    train_labels: Sequence[int] | np.ndarray,
    test_features: np.ndarray,
    test_labels: Sequence[int] | np.ndarray,
    k: int,
) -> MonitorResult:
    """kNN accuracy of the test rows against the training rows (``k`` capped at the training
    rows) and the spread of all rows together."""
    train_features, test_features = np.asarray(train_features), np.asarray(test_features)
    k = min(k, len(train_features))
    train_z, test_z = standardize_features(train_features, test_features)
    return MonitorResult(
        knn_accuracy=knn_accuracy(train_z, train_labels, test_z, test_labels, k=k),
        embedding_std=embedding_std(np.concatenate([train_features, test_features])),
        uniform_std=1.0 / math.sqrt(train_features.shape[1]),
        scans=len(train_features) + len(test_features),
        k=k,
    )


def standardize_features(train: np.ndarray, *others: np.ndarray) -> tuple[np.ndarray, ...]:
    """``train`` and ``others`` z-scored per dimension with ``train``'s mean and (population) std;
    the same statistics and eps as the fine-tuning head's ``FeatureStandardizer``."""
    train = np.asarray(train, dtype=np.float64)
    if train.ndim != 2 or train.shape[0] < 1:
        raise ValueError(f"training features must be (N >= 1, D), got shape {train.shape}")
    mean = train.mean(axis=0)
    std = np.sqrt(train.var(axis=0) + STANDARDIZER_EPS)
    return tuple((np.asarray(x, dtype=np.float64) - mean) / std for x in (train, *others))


@torch.no_grad()
def encoder_features(
    model_cfg: ModelConfig,
    encoder_state: Mapping[str, torch.Tensor],
    scans: Dataset,
    pooling: FeaturePooling = FeaturePooling.cls,
) -> np.ndarray:
    """The features (N, D) a fine-tuning head with ``pooling`` would read, of every scan
    (``scans[i][0]`` is its volume), in eval mode."""
    classifier = build_classifier(model_cfg, 1, encoder_state, pooling=pooling).eval()
    features = []
    for start in range(0, len(scans), _FEATURE_BATCH):
        batch = torch.stack([scans[i][0] for i in range(start, min(start + _FEATURE_BATCH, len(scans)))])
        features.append(classifier.features(batch).float().numpy())
    return np.concatenate(features)


def representation_monitor(
    model_cfg: ModelConfig,
    encoder_state: Mapping[str, torch.Tensor],
    train: LabelledScans,
    test: LabelledScans,
    k: int,
    pooling: FeaturePooling = FeaturePooling.cls,
) -> MonitorResult:
    """The monitor of ``encoder_state`` on a site's (training, held-out) labelled scans; the
    kNN votes on the first label name."""
    return feature_monitor(
        encoder_features(model_cfg, encoder_state, train, pooling),
        train.labels[:, 0],
        encoder_features(model_cfg, encoder_state, test, pooling),
        test.labels[:, 0],
        k,
    )


def _quotas(sizes: Sequence[int], budget: int) -> list[int]:
    """``budget`` items shared over groups in proportion to their sizes (largest remainder),
    at least one per group, never more than a group holds."""
    total = sum(sizes)
    exact = [size * budget / total for size in sizes]
    quota = [min(size, max(1, math.floor(share))) for size, share in zip(sizes, exact)]
    while sum(quota) < budget:
        grow = max((i for i in range(len(sizes)) if quota[i] < sizes[i]), key=lambda i: exact[i] - quota[i])
        quota[grow] += 1
    while sum(quota) > budget:
        shrink = max((i for i in range(len(sizes)) if quota[i] > 1), key=lambda i: quota[i] - exact[i])
        quota[shrink] -= 1
    return quota


def cap_split(split: SiteSplit, classes: Mapping[int, int], max_scans: int, seed: int) -> SiteSplit:
    """At most ``max_scans`` of a split's scans: each (part, class) group keeps its share, at
    least one scan, drawn with ``seed`` (the same scans every round). ``classes`` maps a cache
    index to its primary label."""
    if len(split.train) + len(split.test) <= max_scans:
        return split
    groups = [
        [i for i in part if classes[i] == cls] for part in (split.train, split.test) for cls in sorted(set(classes.values()))
    ]
    groups = [group for group in groups if group]
    if max_scans < len(groups):
        raise ValueError(f"max_scans={max_scans} cannot keep one scan of each of {len(groups)} (part, class) groups")
    rng = np.random.default_rng(seed)
    kept = {
        int(index)
        for group, quota in zip(groups, _quotas([len(g) for g in groups], max_scans))
        for index in rng.choice(group, size=quota, replace=False)
    }
    return SiteSplit(
        train=tuple(i for i in split.train if i in kept), test=tuple(i for i in split.test if i in kept)
    )


def monitor_split(volumes: CachedVolumes, finetune: FinetuneConfig, max_scans: int) -> SiteSplit:
    """Phase 2's split of the site's labelled scans (``site_split``), capped at ``max_scans``.

    Raises ``NotEvaluableError`` (common/labelled.py) when the labels cannot be split."""
    split = site_split(volumes, finetune.label_names, finetune.test_fraction, finetune.split_seed)
    primary = finetune.label_names[0]
    classes = {i: int(volumes.labels[i][primary]) for i in (*split.train, *split.test)}
    return cap_split(split, classes, max_scans, finetune.split_seed)


def site_monitor(
    volumes: CachedVolumes,
    model_cfg: ModelConfig,
    encoder_state: Mapping[str, torch.Tensor],
    finetune: FinetuneConfig,
    knn_k: int,
    max_scans: int,
) -> MonitorResult:
    """The monitor of ``encoder_state`` on a site's cache: phase 2's split (capped), the head's
    features. Raises ``NotEvaluableError`` when the site's labels cannot be split."""
    split = monitor_split(volumes, finetune, max_scans)
    train = LabelledScans(volumes, split.train, finetune.label_names, model_cfg.image_size)
    test = LabelledScans(volumes, split.test, finetune.label_names, model_cfg.image_size)
    return representation_monitor(model_cfg, encoder_state, train, test, knn_k, finetune.pooling)
