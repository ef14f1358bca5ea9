"""The run folder: ``results.json`` after every round, and a checkpoint per round.

``results.json`` is rewritten atomically after each round, so a run that dies keeps every
round it finished. It holds only site ids chosen by the sites' IT, numbers and file names.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf

from ctfed.common.checkpoint import save_checkpoint
from ctfed.common.fileio import write_json_atomic
from ctfed.common.config import RunConfig

RESULTS_NAME = "results.json"
CHECKPOINT_DIR = "checkpoints"


@dataclass
class SiteRoundRecord:
    site: str
    status: str  # "aggregated" | "rejected" | "failed" | "dropped" | "not-aggregated"
    reason: str = ""
    num_examples: int = 0
    loss_first: float | None = None
    loss: float | None = None
    losses: list[float] = field(default_factory=list)
    train_seconds: float | None = None
    data_seconds: float | None = None  # of train_seconds, spent loading volumes and cropping
    bytes_received: int = 0
    # Secure aggregation: bytes the coordinator sent this site over all protocol stages,
    # and how many of its update values were clipped before quantisation.
    bytes_sent: int = 0
    clipped_values: int = 0


@dataclass
class RoundRecord:
    round: int
    sites: list[SiteRoundRecord]
    aggregated: bool
    bytes_sent_per_site: int
    seconds: float
    checkpoint: str
    secure_aggregation: bool = False
    reason: str = ""  # why the round was not aggregated


class RunRecorder:
    """Collects per-round records and keeps the run folder's files current."""

    def __init__(self, run_dir: Path, cfg: RunConfig) -> None:
        self.run_dir = run_dir
        self.cfg = cfg
        self.rounds: list[RoundRecord] = []
        self.started = time.time()
        self.status = "running"
        run_dir.mkdir(parents=True, exist_ok=True)
        self._write()

    @property
    def results_path(self) -> Path:
        return self.run_dir / RESULTS_NAME

    def save_global(self, server_round: int, state: dict[str, torch.Tensor]) -> Path:
        stem = self.run_dir / CHECKPOINT_DIR / f"global_round_{server_round:04d}"
        return save_checkpoint(stem, state, self.cfg.model, round=server_round, kind="global-encoder")

    def add_round(self, record: RoundRecord) -> None:
        self.rounds.append(record)
        self._write()

    def finish(self) -> None:
        self.status = "completed"
        self._write()

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "config": OmegaConf.to_container(OmegaConf.structured(self.cfg), enum_to_str=True),
            "wall_seconds": time.time() - self.started,
            "secure_aggregation": self.cfg.secagg.enabled,
            "rounds": [asdict(r) for r in self.rounds],
        }

    def _write(self) -> None:
        write_json_atomic(self.results_path, self.to_dict())
