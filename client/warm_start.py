"""Work a site's ClientApp processes would each redo, done once in the fork server instead.

``client/clientapp_executor.py`` forks every message's ClientApp process from a fork server
that imports this module at site start (``PRELOADED_MODULES``). Importing the ClientApp
imports torch and MONAI, but the first ``LocalTrainer`` a process builds still costs about a
second more (MONAI's and torch's lazy set-up on first use; 1.1-1.2 s against 0.03 s for the
next one, one loaded core: docs/benchmarks.md), and a forked child starts from the server's
memory, so a trainer built here once is that second saved in every training message.

It builds one tiny trainer on random volumes (no site data: nothing of the site's is read or
kept) with one torch thread, so that the server starts no thread pool a fork would copy, and
restores the thread count after.
"""

from __future__ import annotations

import logging
import time

import torch

from ctfed.client.train import LocalTrainer
from ctfed.common.config import ModelConfig, TrainConfig

logger = logging.getLogger(__name__)


class _RandomVolumes(torch.utils.data.Dataset):
    """Two random volumes of the tiny model's input: what a trainer needs to be built."""

    def __init__(self, cfg: ModelConfig) -> None:
        generator = torch.Generator().manual_seed(0)
        size = cfg.image_size
        self.volumes = [torch.rand(cfg.in_channels, size, size, size, generator=generator) for _ in range(2)]

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.volumes[index]


def warm_trainer() -> float:
    """Build one tiny LocalTrainer with one torch thread; its seconds."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    started = time.perf_counter()
    try:
        cfg = ModelConfig()
        LocalTrainer(cfg, TrainConfig(local_steps=1, batch_size=2), _RandomVolumes(cfg), seed=0)
    finally:
        torch.set_num_threads(threads)
    return time.perf_counter() - started


WARM_SECONDS = warm_trainer()
