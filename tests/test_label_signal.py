"""The label-signal probe of an encoder's features (simulations/label_signal.py)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from ctfed.common.config import FeaturePooling
from ctfed.simulations.label_signal import TuningSet, encoder_probe


class _Volumes(Dataset):
    def __init__(self, volumes: list[torch.Tensor]) -> None:
        self.volumes = volumes

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.volumes[index]


def test_encoder_probe_reports_every_pooling_before_and_after_pretraining() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = np.array([0, 1] * 10)
    # Positives carry a bright cube: a label an untrained encoder's features already show.
    volumes = []
    for label in labels:
        volume = 0.3 * torch.rand(3, 32, 32, 32, generator=generator)
        if label:
            volume[:, 8:20, 8:20, 8:20] += 0.6
        volumes.append(volume)
    # A second task with too few positives for 5 folds gets no row.
    rare = np.zeros_like(labels)
    rare[:3] = 1
    data = TuningSet(caches=[_Volumes(volumes)], volumes=volumes, labels={"cube": labels, "rare": rare})  # type: ignore[list-item]
    untrained = encoder_probe(data, [], steps=0, seed=0)
    trained = encoder_probe(data, ["train.mim_objective=mae", "train.batch_size=4"], steps=2, seed=0)
    for by_task in (untrained, trained):
        assert set(by_task) == {"cube"}
        row = by_task["cube"]
        assert set(row) == {p.value for p in FeaturePooling} | {f"{p.value}_spread" for p in FeaturePooling}
        assert all(0.0 <= row[p.value] <= 1.0 and row[f"{p.value}_spread"] > 0 for p in FeaturePooling)
    assert untrained["cube"]["mean_patch"] > 0.9  # the cube is plain to see
    assert trained != untrained  # two steps changed the encoder
