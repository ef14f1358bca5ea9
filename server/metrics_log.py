"""Per-round metrics beside results.json: ``results.csv`` and TensorBoard event files.

results.json stays the one complete record; these are views of it for spreadsheets and
for watching a long run live (``tensorboard --logdir RUN_DIR/tensorboard``). The CSV is
rewritten from all recorded rounds each time, so a resumed run never holds a row twice;
TensorBoard drops events after the round a resumed run continues from.
"""

from __future__ import annotations

import csv
import io
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from ctfed.common.exchange import STATUS_AGGREGATED
from ctfed.common.fileio import write_text_atomic

if TYPE_CHECKING:  # results.py imports this module
    from ctfed.server.results import RoundRecord

CSV_NAME = "results.csv"
TENSORBOARD_DIR = "tensorboard"
CSV_COLUMNS = (
    "round", "site", "status", "num_examples", "loss_first", "loss", "epsilon",
    "train_seconds", "data_seconds", "bytes_received", "bytes_sent", "clipped_values", "reason",
)


def write_csv(path: Path, rounds: Sequence[RoundRecord]) -> None:
    """One row per site per round (the round's own numbers are in results.json)."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for record in rounds:
        for site in record.sites:
            writer.writerow({"round": record.round, **asdict(site)})
    write_text_atomic(path, buffer.getvalue())


class TensorBoardLog:
    """Scalars per round: the weighted loss, and per site loss, epsilon, bytes and the
    representation monitor (kNN accuracy, spread / uniform spread)."""

    def __init__(self, folder: Path, first_round: int) -> None:
        from torch.utils.tensorboard import SummaryWriter  # imports tensorboard: only when used

        # purge_step: a resumed run rewrites the rounds after its checkpoint.
        self.writer = SummaryWriter(str(folder), purge_step=first_round)

    def add(self, record: RoundRecord) -> None:
        step = record.round
        trained = [s for s in record.sites if s.loss is not None and s.status == STATUS_AGGREGATED]
        total = sum(s.num_examples for s in trained)
        if total:
            self.writer.add_scalar("loss/weighted", sum(s.loss * s.num_examples for s in trained) / total, step)
        self.writer.add_scalar("round/seconds", record.seconds, step)
        self.writer.add_scalar("round/sites_aggregated", len(trained), step)
        if record.central_epsilon is not None:
            self.writer.add_scalar("privacy/central_epsilon", record.central_epsilon, step)
        for site in record.sites:
            if site.loss is not None:
                self.writer.add_scalar(f"loss/{site.site}", site.loss, step)
            if site.epsilon is not None:
                self.writer.add_scalar(f"privacy/epsilon/{site.site}", site.epsilon, step)
            self.writer.add_scalar(f"bytes_received/{site.site}", site.bytes_received, step)
            if site.monitor:
                self.writer.add_scalar(f"monitor/knn_accuracy/{site.site}", site.monitor["knn_accuracy"], step)
                spread = site.monitor["embedding_std"] / site.monitor["uniform_std"]
                self.writer.add_scalar(f"monitor/std_over_uniform/{site.site}", spread, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
