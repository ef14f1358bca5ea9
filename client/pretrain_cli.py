"""``ctfed pretrain``: self-supervised pretraining on one site's cache, no federation.

The same LocalTrainer and schedules a federated site uses, run for ``federation.rounds``
rounds of ``train.local_steps`` steps back to back, so a local-only or centralized baseline
is the federated run with one participant. Writes a checkpoint per round.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ctfed.client.train import LocalTrainer
from ctfed.common.checkpoint import save_checkpoint
from ctfed.common.config import ConfigError, load_run_config
from ctfed.common.data_summary import card_data_summary, site_data_metrics
from ctfed.common.preprocess import CachedVolumes


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", required=True, type=Path, help="a prepared cache folder (ctfed prepare)")
    parser.add_argument("--out", required=True, type=Path, help="folder for checkpoints")
    parser.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="Hydra overrides, e.g. federation.rounds=10 train.local_steps=50 model=small",
    )


def run(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.overrides)
    if not args.cache.is_dir():
        raise ConfigError(f"--cache {args.cache} is not a folder")
    dataset = CachedVolumes(args.cache)
    trainer = LocalTrainer(cfg.model, cfg.train, dataset, seed=cfg.train.seed)
    args.out.mkdir(parents=True, exist_ok=True)
    # One site, named generically: a cache folder's name may be anything the site chose.
    data_summary = card_data_summary({"local": site_data_metrics(dataset)}, dataset.preprocessing)
    started = time.perf_counter()
    for round_index in range(cfg.federation.rounds):
        result = trainer.train_round(round_index)
        weights = save_checkpoint(
            args.out / f"local_round_{round_index + 1:04d}",
            trainer.encoder_state(),
            cfg.model,
            round=round_index + 1,
            kind="local-encoder",
            losses=result.losses,
            data_summary=data_summary,
        )
        print(
            f"round {round_index + 1}/{cfg.federation.rounds}: loss {result.losses[0]:.4f} -> "
            f"{result.losses[-1]:.4f} ({result.seconds:.1f} s) -> {weights.name}"
        )
    torch.save(trainer.local_state(copy=False), args.out / "local_state.pt")
    print(f"done in {time.perf_counter() - started:.0f} s; checkpoints in {args.out}")
    return 0
