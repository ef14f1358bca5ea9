"""A site's labelled scans and its deterministic train/test split.

Shared by the federated phase 2 (client/app.py: each site fine-tunes on its training part and
evaluates on its held-out part every round) and the ``compare`` study
(simulations/studies/downstream.py). Labels come from the cache manifest (``labels.csv`` at
``ctfed prepare``), keyed by pseudonymous study keys; nothing here reads a header.

The split depends on the scans' content hashes and a seed, not on the site's secret-keyed
file names, so re-synthesising the same hospitals gives the same split.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ctfed.common.preprocess import CachedVolumes

# Each class needs one scan in the training and one in the test part.
MIN_SCANS_PER_CLASS = 2
# A labels.csv column with which a site fixes its phase-2 split itself: "train" or "test" per
# scan (blank: phase 2 leaves the scan out). A hospital's own held-out list, or the
# label-efficiency study's labelled level and validation scans. Without it: stratified_split.
SPLIT_COLUMN = "finetune_split"
SPLIT_PARTS = ("train", "test")


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
        volume = model_input(self.volumes[self.indices[position]], self.image_size)
        return volume, torch.from_numpy(self.labels[position])


# A phase-2 site fits the head's feature statistics on at most this many of its cache's scans,
# evenly spread in content order: a few hundred estimate a mean and std per feature well, and
# a hospital archive of thousands would cost a full encoder pass over it every round.
STANDARDIZER_MAX_SCANS = 512


class CacheScans(Dataset):
    """A cache's scans at the model input, labels unused (``None``): what the head's feature
    statistics are fitted on (they need no label, so not only the labelled scans)."""

    def __init__(self, volumes: CachedVolumes, image_size: int, indices: Sequence[int] | None = None) -> None:
        self.volumes = volumes
        self.image_size = image_size
        self.indices = list(range(len(volumes))) if indices is None else list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, position: int) -> tuple[torch.Tensor, None]:
        return model_input(self.volumes[self.indices[position]], self.image_size), None


def standardizer_scans(volumes: CachedVolumes, image_size: int, max_scans: int = STANDARDIZER_MAX_SCANS) -> CacheScans:
    """The cache scans a site fits the feature statistics on: all of them, or ``max_scans``
    evenly spread in content-hash order (the same ones whatever the pseudonym keys)."""
    order = sorted(range(len(volumes)), key=lambda i: str(volumes.entries[i].get("content_hash", volumes.entries[i]["key"])))
    if len(order) > max_scans:
        order = [order[int(k * len(order) / max_scans)] for k in range(max_scans)]
    return CacheScans(volumes, image_size, sorted(order))


def model_input(volume: torch.Tensor, image_size: int) -> torch.Tensor:
    """A cached volume (C, S, S, S) at the model's input size (``ctfed predict`` feeds the same)."""
    if volume.shape[-1] != image_size:
        # Caches may be prepared larger than the model input (RunConfig allows it).
        volume = F.interpolate(volume[None], size=(image_size,) * 3, mode="trilinear", align_corners=False)[0]
    return volume


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


def site_split(volumes: CachedVolumes, label_names: Sequence[str], test_fraction: float, seed: int) -> SiteSplit:
    """The site's phase-2 split: the one its labels name in ``SPLIT_COLUMN`` where any labelled
    scan has it, else ``stratified_split``."""
    parts = {i: (volumes.labels[i] or {}).get(SPLIT_COLUMN) for i in labelled_indices(volumes, label_names)}
    if all(part is None for part in parts.values()):
        return stratified_split(volumes, label_names, test_fraction, seed)
    unknown = sorted({str(part) for part in parts.values() if part is not None and part not in SPLIT_PARTS})
    if unknown:
        raise NotEvaluableError(f"{volumes.cache_dir.name}: {SPLIT_COLUMN} must be 'train', 'test' or blank, found {unknown}")
    train = tuple(sorted(i for i, part in parts.items() if part == "train"))
    test = tuple(sorted(i for i, part in parts.items() if part == "test"))
    if not train or not test:
        raise NotEvaluableError(
            f"{volumes.cache_dir.name}: the {SPLIT_COLUMN} column names {len(train)} training and {len(test)} held-out "
            "labelled scans; phase 2 needs at least one of each"
        )
    return SiteSplit(train=train, test=test)


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
