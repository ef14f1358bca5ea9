"""Replay a finished label-efficiency study's federated phase 2 in one process, in seconds.

The study's ``federated_phase2`` heads are Flower federations (about a minute each, most of it
start-up). To try a phase-2 idea on the tuning seed, this replays the same computation in
this process: the arm's recorded encoder, each site's labelled scans of the level, per round
and site one ``Finetuner.fit_round`` with the site's seed (as ``client/finetune_round.py``),
the example-weighted mean of the trainable deltas (without secure aggregation's rounding)
applied as the coordinator applies it (``server/aggregation.GlobalUpdate``: FedAvg, or FedAdam's
step with ``federation.strategy=fedadam``), the feature statistics refitted at every site each round
(``finetune.feature_statistics=site``), and the sites' validation and test predictions with
the final classifier, each site refitting its statistics on its own view first (as
``label_efficiency.phase2_predictions``). It matches the Flower run's predictions to secure
aggregation's rounding (tested) and reports the validation AUROC after every round.

    python -m ctfed.simulations.studies.phase2_replay RUN_DIR --arm federated --mode full [--head-lr 0.03] [--rounds 10] [overrides]

A research tool: it reads a run folder and writes nothing; choices belong on the validation
split of a tuning seed, never on a study seed's test split.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ctfed.client.finetune_round import _SEED_STRIDE_PER_SITE
from ctfed.common.checkpoint import load_checkpoint
from ctfed.common.config import FINETUNE_MODES, FeatureStatistics, FinetuneConfig
from ctfed.common.exchange import state_delta
from ctfed.common.finetune import Classifier, FederatedFreezingSchedule, Finetuner, build_classifier, trainable_state
from ctfed.common.labelled import LabelledScans, standardizer_scans
from ctfed.common.model import encoder_part
from ctfed.common.preprocess import CachedVolumes
from ctfed.server.aggregation import GlobalUpdate
from ctfed.simulations.config import read_simulation_config, with_overrides
from ctfed.simulations.runtime.simulate import CONFIG_NAME
from ctfed.simulations.studies.label_efficiency import (
    PHASE2_VIEWS, POOLED, STUDY_DIR, STUDY_JSON, Phase2Option, StudySite, _labels, load_study_sites, mean_auroc, phase2_recipe,
)

# A site's per-round seed offset: the site's own (client/finetune_round.py).
SEED_STRIDE_PER_SITE = _SEED_STRIDE_PER_SITE


@dataclass(frozen=True)
class ReplayResult:
    """Mean pooled AUROC over tasks on validation after every round; the final classifier's
    per-site validation and test probabilities; each round's mean first and last site loss."""

    val_curve: list[float]
    val_auroc: float
    test_auroc: float
    predictions: dict[str, dict[str, np.ndarray]]
    losses: list[tuple[float, float]]


def _predict(
    classifier: Classifier, recipe: FinetuneConfig, sites: Sequence[StudySite], parts: dict[str, dict[str, LabelledScans]],
    statistics: dict[str, Dataset], part: str,
) -> dict[str, np.ndarray]:
    """Every site's probabilities on its ``part`` scans, each with its own feature statistics."""
    out = {}
    for site in sites:
        own = copy.deepcopy(classifier)
        own.fit_standardizer(statistics[site.name], recipe.batch_size)  # the site's own, as it predicts
        scans = parts[part][site.name]
        out[site.name] = Finetuner(own, recipe, scans).predict(scans)[0]
    return out


def replay_phase2(
    run_dir: Path, arm: str, mode: str, rounds: int | None = None, level: int | None = None,
    head_lr: float | None = None, overrides: Sequence[str] = (),
) -> ReplayResult:
    """Replay ``arm``'s federated phase 2 of the study in ``run_dir`` in ``mode`` at ``head_lr``
    (``rounds``, ``level``, ``head_lr``: the study's phase2_rounds, first phase2 level and first
    phase2 head LR unless given), its saved config with ``overrides`` as ``--rerun-phase2`` takes
    them (e.g. ``federation.strategy=fedadam``: the coordinator's update rule)."""
    cfg = with_overrides(read_simulation_config(run_dir / CONFIG_NAME), overrides, "overrides")
    study = cfg.label_efficiency
    data = json.loads((run_dir / STUDY_DIR / STUDY_JSON).read_text(encoding="utf-8"))
    entry = data["arms"].get(arm, {})
    if POOLED not in entry.get("encoders", {}):
        raise ValueError(f"{run_dir}: arm {arm!r} has no single encoder to fine-tune (arms with one: "
                         f"{', '.join(a for a, e in data['arms'].items() if POOLED in e.get('encoders', {}))})")
    if study.finetune.feature_statistics is not FeatureStatistics.site:
        raise ValueError("the replay refits the feature statistics at every site each round (finetune.feature_statistics=site); "
                         f"the study ran {study.finetune.feature_statistics.value}")
    rounds = rounds or study.phase2_rounds
    level = level or study.phase2_levels[0]
    views = run_dir / STUDY_DIR / PHASE2_VIEWS / f"labels_{level}"
    if not views.is_dir():
        raise ValueError(f"{views}: the study ran no federated phase 2 at {level} labelled scans per site")
    sites, tasks = load_study_sites(run_dir)
    size = cfg.model.image_size
    option = Phase2Option(mode, mode, head_lr or study.phase2_head_lrs[0])
    recipe = phase2_recipe(replace(study, phase2_rounds=rounds), tasks, option)
    steps = recipe.local_steps
    encoder = encoder_part(load_checkpoint(run_dir / entry["encoders"][POOLED]["file"])[0])
    classifier = build_classifier(cfg.model, len(tasks), encoder, seed=recipe.seed, pooling=recipe.pooling)
    schedule = FederatedFreezingSchedule(recipe, cfg.model.num_layers, rounds, steps)
    train = {s.name: LabelledScans(s.cache, sorted(s.labelled_at(level)), list(tasks), size) for s in sites}
    statistics = {s.name: standardizer_scans(CachedVolumes(views / s.name), size) for s in sites}
    parts = {part: {s.name: LabelledScans(s.cache, list(getattr(s, part)), list(tasks), size) for s in sites} for part in ("val", "test")}
    labels = {part: np.concatenate([_labels(s.cache, getattr(s, part), tasks) for s in sites]) for part in ("val", "test")}

    def auroc(part: str, predicted: dict[str, np.ndarray]) -> float:
        return mean_auroc(labels[part], np.concatenate([predicted[s.name] for s in sites]))

    updater = GlobalUpdate(cfg.federation)  # FedAvg's global + mean delta, or FedAdam's step (server/aggregation.py)
    curve, losses = [], []
    for number in range(1, rounds + 1):
        plan = schedule.plan(number)
        classifier.set_trainable(plan.blocks, stem=plan.stem)  # what the round's sites send
        base = trainable_state(classifier)
        total, summed, round_losses = 0, dict.fromkeys(base, 0.0), []
        for site in sites:
            local = copy.deepcopy(classifier)  # arrives without statistics: the site fits its own
            site_recipe = replace(recipe, seed=recipe.seed + SEED_STRIDE_PER_SITE * site.index + number)
            fit = Finetuner(local, site_recipe, train[site.name], standardizer_scans=statistics[site.name]).fit_round(plan, steps)
            round_losses.append((fit.losses[0], fit.losses[-1]))
            count = len(train[site.name])
            total += count
            for name, delta in state_delta(trainable_state(local), base).items():
                summed[name] = summed[name] + count * delta
        classifier.load_state_dict(updater.apply(base, {name: value / total for name, value in summed.items()}), strict=False)
        losses.append(tuple(float(np.mean(x)) for x in zip(*round_losses)))
        val = _predict(classifier, recipe, sites, parts, statistics, "val")
        curve.append(auroc("val", val))
    predictions = {"val": val, "test": _predict(classifier, recipe, sites, parts, statistics, "test")}
    return ReplayResult(curve, curve[-1], auroc("test", predictions["test"]), predictions, losses)


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``main`` (tests/unit/test_doc_commands.py parses the docs' commands with it)."""
    parser = argparse.ArgumentParser(prog="python -m ctfed.simulations.studies.phase2_replay",
                                     description="Replay a finished label-efficiency study's federated phase 2 in one process.")
    parser.add_argument("run_dir", type=Path, help="a finished label-efficiency study's run folder")
    parser.add_argument("--arm", default="federated", help="an arm with one encoder (federated, centralized, scratch, ...)")
    parser.add_argument("--mode", default="full", choices=FINETUNE_MODES)
    parser.add_argument("--rounds", type=int, default=None, help="phase-2 rounds (default: the study's phase2_rounds)")
    parser.add_argument("--level", type=int, default=None, help="labelled scans per site (default: the study's first phase2 level)")
    parser.add_argument("--head-lr", type=float, default=None, help="the head's learning rate (default: the study's first phase2_head_lrs)")
    parser.add_argument("overrides", nargs="*", help="config overrides, as --rerun-phase2 takes them (e.g. federation.strategy=fedadam)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ctfed.simulations.studies.phase2_replay RUN_DIR [--arm A] [--mode M] [--head-lr R] [--rounds N] [--level L] [overrides]``."""
    args = build_parser().parse_intermixed_args(argv)  # overrides before or after the options
    torch.set_num_threads(1)
    try:
        result = replay_phase2(args.run_dir, args.arm, args.mode, args.rounds, args.level, args.head_lr, args.overrides)
    except (OSError, ValueError, KeyError) as err:
        print(f"phase2_replay: {err}", file=sys.stderr)
        return 1
    for number, (value, (first, last)) in enumerate(zip(result.val_curve, result.losses), start=1):
        print(f"round {number}: sites' loss {first:.3f} -> {last:.3f}, validation AUROC {value:.4f}")
    print(f"final: validation {result.val_auroc:.4f}, test {result.test_auroc:.4f} (mean pooled AUROC over tasks)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
