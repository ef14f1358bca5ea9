"""Log lines that alarm hospital IT for nothing, or tell it the wrong thing (issue #14 item 10)."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
from torch.utils.data import Dataset

from ctfed.client.train import LocalTrainer
from ctfed.common.config import ModelConfig, TrainConfig
from ctfed.common.exchange import STATUS_AGGREGATED, STATUS_DROPPED, STATUS_REFUSED
from ctfed.server.results import SiteRoundRecord, loss_summary

MODEL = ModelConfig()


class _Noise(Dataset):
    def __init__(self, count: int = 3) -> None:
        self.volumes = torch.rand(count, MODEL.in_channels, *[MODEL.image_size] * 3, generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.volumes[index]


def test_building_a_sites_models_raises_no_meshgrid_warning() -> None:
    """A site builds its model every round: MONAI's position table warned about torch.meshgrid
    each time. In a fresh interpreter, because torch raises that warning once per process."""
    code = (
        "from ctfed.common.config import ModelConfig\n"
        "from ctfed.common.model import SSLModel\n"
        "SSLModel(ModelConfig(), mae_decoder=True)\n"
    )
    done = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "meshgrid" not in done.stderr, done.stderr


def test_the_trainers_round_line_counts_from_one(caplog: pytest.LogCaptureFixture) -> None:
    """Site logs said "round 0" for the coordinator's round 1."""
    cfg = TrainConfig(local_steps=1, batch_size=2)
    with caplog.at_level(logging.INFO, logger="ctfed.client.train"):
        LocalTrainer(MODEL, cfg, _Noise(), seed=0).train_round(round_index=0)
    (line,) = [r.getMessage() for r in caplog.records if "steps," in r.getMessage()]
    assert line.startswith("round 1:"), line


def test_the_coordinators_loss_line_keeps_sites_out_of_the_aggregate_apart() -> None:
    """A site that trained and then dropped out of secure aggregation has a loss, but its update
    is not in the model: the line must not list it among the aggregated."""
    sites = [
        SiteRoundRecord(site="site_0", status=STATUS_AGGREGATED, loss=5.25),
        SiteRoundRecord(site="site_1", status=STATUS_DROPPED, loss=5.5),
        SiteRoundRecord(site="site_2", status=STATUS_REFUSED),
    ]
    assert loss_summary(sites) == "site_0 5.2500; not in the aggregate: site_1 (dropped), site_2 (refused)"
    assert loss_summary(sites[1:]) == "n/a; not in the aggregate: site_1 (dropped), site_2 (refused)"
