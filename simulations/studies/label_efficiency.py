"""The ``label_efficiency`` study: does a pretrained encoder pay off when labels are scarce?

``ctfed simulate preset=label_efficiency`` (any run with ``label_efficiency.enabled=true``):

1. **Splits, before any training.** Each site's labelled scans (ordered by content hash, then
   shuffled with ``split_seed``) are cut into a *test* split (``test_fraction``), a *validation*
   split and a *labelled pool* drawn in order: level L labels the pool's first L scans, so the
   levels are nested. The federation pretrains on every scan but the test ones, through a
   manifest view of each cache (``<run>/label_efficiency/pretrain/<site>``); the test split is
   never pretrained on and never used for a choice. ``splits.json`` records the cut.
2. **Pretraining arms** on those scans with one budget (``federation.rounds x
   train.local_steps`` optimiser steps per model): *federated* (the run's federation),
   *centralized* (one trainer on the pooled views), *local-only* (the smallest site alone),
   *scratch* (the initial encoder) and *federated_dp* (the same federation with
   ``dp_overrides``: local DP-SGD, its ledger's epsilon reported).
3. **Pretraining curve**: encoders along the way (federated: round checkpoints) probed on the
   validation split (a logistic regression on frozen features of the largest labelled level).
4. **Fine-tuning** of every arm at every level and in every mode (one multi-label head for
   all tasks), predicting validation and test scans, with three kinds of head
   (``label_efficiency.heads``): each site's own, on its own labelled scans (``site``); one
   on every site's labelled scans of the level (``pooled_labels``: centralised fine-tuning, the
   ceiling of a federated phase 2 on the same labels); and that federated phase 2 itself
   (``federated_phase2``: a Flower federation of the sites with no SSL round, starting from the
   arm's encoder, each site training on its labelled scans of the level and evaluating on its
   validation scans; at ``phase2_levels``, one federation per ``phase2_modes`` entry and
   ``phase2_head_lrs`` entry, ``phase2_options``). The model-free
   probes (window histograms, raw voxels) fit the same labelled scans. Each arm's mode (and the
   model-free probe) is chosen per level and kind of head on the pooled validation AUROC.
5. **Verdicts** per kind of head, task and level, compare.json's shape plus ``task``,
   ``labels_per_site`` and ``heads`` (paired bootstrap on the same test scans), and the issue's
   targets at ``judged_labels_per_site``. ``study.json`` is rewritten after every stage, so a crash keeps
   what finished; ``study.md`` and its plots come from it (label_efficiency_report.py).
"""

from __future__ import annotations

import argparse
import enum
import functools
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from threadpoolctl import threadpool_limits
from torch.utils.data import ConcatDataset, Dataset

from ctfed.client.site import site_cache_dirs
from ctfed.common.cli import os_error_text
from ctfed.client.train import LocalTrainer
from ctfed.common.checkpoint import load_checkpoint, save_checkpoint, state_digest
from ctfed.common.config import ConfigError, FinetuneConfig, ModelConfig, save_run_config
from ctfed.simulations.config import STUDY_HEADS, LabelEfficiencyConfig, SimulationRunConfig
from ctfed.common.exchange import PRETRAIN_PHASE
from ctfed.common.fileio import write_json_atomic
from ctfed.common.finetune import Finetuner, load_classifier
from ctfed.common.labelled import SPLIT_COLUMN, LabelledScans, labelled_indices, standardizer_scans
from ctfed.common.metrics import roc_auc
from ctfed.common.model import encoder_part
from ctfed.common.monitor import encoder_features
from ctfed.common.preprocess import FORMAT as CACHE_FORMAT
from ctfed.common.preprocess import MANIFEST, VOLUMES_DIR_FIELD, CachedVolumes, channel_stats
from ctfed.server.results import CHECKPOINT_DIR
from ctfed.server.rounds import initial_encoder_state
from ctfed.simulations.studies.downstream import finetune_and_predict_many, judged_difference
from ctfed.simulations.data.label_signal import linear_probe, window_histograms
from ctfed.simulations.report.report import load_results
from ctfed.simulations.runtime.simulate import site_epsilons

logger = logging.getLogger(__name__)

STUDY_DIR = Path("label_efficiency")
STUDY_JSON = "study.json"
SPLITS_JSON = "splits.json"
PRETRAIN_VIEWS = "pretrain"
PHASE2_VIEWS = "phase2"
ENCODER_DIR = "encoders"
ARMS_DIR = "arms"
# 2: fine-tunes, model-free probes, summary, verdicts and targets per kind of head (Heads).
# 3: federated_phase2 heads; the beats-scratch target as the issue states it, the stricter beside it.
FORMAT = 3
POOLED = "pooled"
# Digits kept of each held-out probability in study.json (AUROC needs ranks, not precision).
PROB_DIGITS = 5


class Arm(str, enum.Enum):
    """The pretraining arms, in report order."""

    federated = "federated"
    centralized = "centralized"
    local_only = "local_only"
    scratch = "scratch"
    federated_dp = "federated_dp"


ARM_DESCRIPTIONS: dict[Arm, str] = {
    Arm.federated: "FedAvg of the sites' DINO/iBOT updates (Flower simulation engine, SecAgg+ as configured)",
    Arm.centralized: "one LocalTrainer on the pooled pretraining scans of all sites",
    Arm.local_only: "one LocalTrainer on the smallest site's pretraining scans alone",
    Arm.scratch: "no pretraining: the federation's initial encoder",
    Arm.federated_dp: "the federation again with local DP-SGD at every site (label_efficiency.dp_overrides)",
}
# Model-free probes: logistic regressions on features that need no encoder.
MODEL_FREE = ("window_histograms", "raw_voxels")


class Heads(str, enum.Enum):
    """Who fine-tunes a head on a level's labelled scans (``label_efficiency.heads``, whose
    allowed values are STUDY_HEADS)."""

    site = "site"  # each site its own, on its own labelled scans: what a hospital does alone
    pooled_labels = "pooled_labels"  # one on every site's: the labels a federated phase 2 would see
    federated_phase2 = "federated_phase2"  # that federated phase 2 itself: what a federation does


HEADS_DESCRIPTIONS: dict[Heads, str] = {
    Heads.site: "each site fine-tunes its own head on its own labelled scans; the sites' test predictions are pooled",
    Heads.pooled_labels: "one head fine-tuned on every site's labelled scans of the level (sites x level labels): "
                         "centralised fine-tuning, the ceiling of a federated phase 2 on the same labels",
    Heads.federated_phase2: "one head fine-tuned by ctfed's federated phase 2 (a Flower federation of the sites, "
                            "secure aggregation as configured) on every site's labelled scans of the level; each site "
                            "evaluates on its validation scans every round and standardises the head's features on its "
                            "own labelled scans (those statistics never leave a site)",
}
# The labels the one-head kinds are fine-tuned on: every site's of the level.
ONE_HEAD_KINDS = (Heads.pooled_labels.value, Heads.federated_phase2.value)


# ----------------------------------------------------------------------------- splits


@dataclass
class StudySite:
    """One site: its whole cache, the study's cut of it, and the view the arms pretrain on."""

    name: str
    index: int  # partition id in the federation (the LocalTrainer seed offset there)
    cache: CachedVolumes
    test: tuple[int, ...]
    val: tuple[int, ...]
    labelled: tuple[int, ...]  # the labelled pool in draw order: level L = the first L
    pretrain: CachedVolumes

    def labelled_at(self, level: int) -> tuple[int, ...]:
        return self.labelled[: min(level, len(self.labelled))]


def study_tasks(cfg: SimulationRunConfig, caches: Sequence[CachedVolumes]) -> list[str]:
    """The configured tasks, or every label column of the first labelled scan."""
    if cfg.label_efficiency.tasks:
        return list(cfg.label_efficiency.tasks)
    for cache in caches:
        for labels in cache.labels:
            if labels:
                return [name for name, value in labels.items() if value in (0, 1)]
    raise ValueError("label_efficiency: no site has labelled scans; the study needs labels.csv at the sites")


def cut_site(cache: CachedVolumes, tasks: Sequence[str], test_fraction: float, val_fraction: float, seed: Sequence[int]) -> tuple[list[int], list[int], list[int]]:
    """(test, validation, labelled pool in draw order) of the scans that carry every task's label.

    Scans are ordered by content hash first, so the same scans give the same cut whatever the
    cache's pseudonymous keys; unlabelled scans are only ever pretrained on.
    """
    candidates = sorted(
        labelled_indices(cache, tasks), key=lambda i: str(cache.entries[i].get("content_hash", cache.entries[i]["key"]))
    )
    order = [candidates[k] for k in np.random.default_rng(list(seed)).permutation(len(candidates))]
    n_test = int(np.floor(len(order) * test_fraction + 0.5))
    rest = order[n_test:]
    n_val = int(np.floor(len(rest) * val_fraction + 0.5))
    return sorted(order[:n_test]), sorted(rest[:n_val]), rest[n_val:]


def write_cache_view(cache: CachedVolumes, entries: Sequence[Mapping[str, Any]], folder: Path) -> None:
    """A manifest in ``folder`` listing ``entries`` of ``cache``: a site cache of those scans that
    shares the cache's volume files (entries name them relative to its volumes_dir)."""
    view = {
        "format": CACHE_FORMAT,
        "preprocessing": cache.preprocessing,
        VOLUMES_DIR_FIELD: str(cache.volumes_dir.resolve()),
        "series": list(entries),
        "rejected": [],
    }
    stats = channel_stats(list(entries))
    if stats is not None:
        view["channel_stats"] = stats
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / MANIFEST, view)


def write_pretraining_views(cfg: SimulationRunConfig, run_dir: Path, cache_root: Path) -> Path:
    """Cut every site and write the manifest views the arms pretrain on (every scan but the
    test ones) plus ``splits.json``; returns the views folder, the federation's data dir."""
    study = cfg.label_efficiency
    caches = [CachedVolumes(path) for path in site_cache_dirs(cache_root)]
    tasks = study_tasks(cfg, caches)
    out = run_dir / STUDY_DIR / PRETRAIN_VIEWS
    splits: dict[str, Any] = {"tasks": tasks, "split_seed": study.split_seed, "sites": {}}
    for index, cache in enumerate(caches):
        name = cache.cache_dir.name
        test, val, labelled = cut_site(cache, tasks, study.test_fraction, study.val_fraction, (study.split_seed, index))
        if len(labelled) < study.labels_per_site[-1]:
            print(f"      {name}: only {len(labelled)} labelled scans outside test and validation; levels above are capped")
        held_out = set(test)
        entries = [cache.entries[i] for i in range(len(cache)) if i not in held_out]
        write_cache_view(cache, entries, out / name)
        splits["sites"][name] = {
            "cache": str(cache.cache_dir.resolve()),
            "scans": len(cache),
            "test": test,
            "val": val,
            "labelled": labelled,
            "pretrain_scans": len(entries),
        }
        print(f"      {name}: {len(cache)} scans: {len(test)} test, {len(val)} validation, {len(labelled)} labelled pool, "
              f"{len(entries)} pretrained on")
    write_json_atomic(run_dir / STUDY_DIR / SPLITS_JSON, splits)
    return out


def load_study_sites(run_dir: Path) -> tuple[list[StudySite], list[str]]:
    """The sites as ``write_pretraining_views`` cut them (splits.json), and the tasks."""
    splits = json.loads((run_dir / STUDY_DIR / SPLITS_JSON).read_text(encoding="utf-8"))
    views = run_dir / STUDY_DIR / PRETRAIN_VIEWS
    sites = []
    for index, (name, cut) in enumerate(splits["sites"].items()):
        cache = CachedVolumes(Path(cut["cache"]))
        if len(cache) != cut["scans"]:
            raise RuntimeError(f"{name}: the cache holds {len(cache)} scans, the study cut {cut['scans']}; it changed since")
        sites.append(StudySite(name, index, cache, tuple(cut["test"]), tuple(cut["val"]), tuple(cut["labelled"]), CachedVolumes(views / name)))
    return sites, list(splits["tasks"])


# ----------------------------------------------------------------------------- pretraining arms


@dataclass
class Pretrained:
    """An arm's encoder(s) (one per site name for local-only, else one under POOLED) and the
    encoders along its pretraining, keyed by optimiser steps, for the curve."""

    encoders: dict[str, dict[str, torch.Tensor]]
    steps_per_model: int
    models_trained: int
    seconds: float
    along_the_way: dict[int, dict[str, torch.Tensor]]
    losses: dict[str, list[float]]
    files: dict[str, str]
    extra: dict[str, Any]

    def encoder_for(self, site: str) -> dict[str, torch.Tensor] | None:
        return self.encoders.get(site, self.encoders.get(POOLED))


def curve_rounds(rounds: int, points: int) -> list[int]:
    """Rounds (0 = the initial encoder) at which encoders are probed, evenly spread."""
    return sorted({int(round(r)) for r in np.linspace(0, rounds, min(points, rounds + 1))})


def _train_arm(
    cfg: SimulationRunConfig, dataset: Dataset, seed: int, initial: Mapping[str, torch.Tensor], keep_rounds: Sequence[int]
) -> tuple[dict[str, torch.Tensor], list[float], dict[int, dict[str, torch.Tensor]]]:
    """``federation.rounds`` rounds of ``train.local_steps`` from the initial encoder (as
    ``ctfed pretrain``), keeping the encoder after each of ``keep_rounds``."""
    trainer = LocalTrainer(cfg.model, cfg.train, dataset, seed=seed)
    trainer.set_global_encoder(initial)
    losses: list[float] = []
    kept = {0: dict(initial)} if 0 in keep_rounds else {}
    for round_index in range(cfg.federation.rounds):
        losses += trainer.train_round(round_index).losses
        if round_index + 1 in keep_rounds:
            kept[len(losses)] = {k: v.clone() for k, v in trainer.encoder_state().items()}
    return trainer.encoder_state(), losses, kept


def _federation_arm(cfg: SimulationRunConfig, run_dir: Path, keep_rounds: Sequence[int]) -> Pretrained:
    """A finished federation's last SSL checkpoint, its round checkpoints and per-site losses."""
    results = load_results(run_dir)
    pretraining = [r for r in results.rounds if r.phase == PRETRAIN_PHASE]
    if not pretraining or not all(r.aggregated for r in pretraining):
        raise RuntimeError(f"the federation in {run_dir} did not aggregate every pretraining round")
    losses: dict[str, list[float]] = {}
    for record in pretraining:
        for site in record.sites:
            losses.setdefault(site.site, []).extend(site.losses)
    steps = cfg.train.local_steps
    along: dict[int, dict[str, torch.Tensor]] = {}
    for number in keep_rounds:
        path = run_dir / CHECKPOINT_DIR / (f"global_round_{0:04d}.safetensors" if number == 0 else pretraining[number - 1].checkpoint)
        along[number * steps] = encoder_part(load_checkpoint(path)[0])
    final = run_dir / CHECKPOINT_DIR / pretraining[-1].checkpoint
    state = encoder_part(load_checkpoint(final)[0])  # the SSL heads too under train.share_heads
    site_epsilon = site_epsilons(run_dir, pretraining[-1].sites)
    extra: dict[str, Any] = {"site_epsilon": site_epsilon}
    if site_epsilon:
        extra["max_site_epsilon"] = max(site_epsilon.values())
    # The federation's own wall time (it ran before the study started).
    return Pretrained(
        {POOLED: state}, len(pretraining) * steps, 1, results.wall_seconds, along, losses,
        {POOLED: final.relative_to(run_dir).as_posix()}, extra,
    )


def pretrain_arm(arm: Arm, cfg: SimulationRunConfig, run_dir: Path, data_dir: Path, sites: list[StudySite], initial: Mapping[str, torch.Tensor]) -> Pretrained:
    """Pretrain (or, federated, collect) one arm's encoders on the sites' pretraining views."""
    started = time.perf_counter()
    keep = curve_rounds(cfg.federation.rounds, cfg.label_efficiency.curve_points)
    budget = cfg.federation.rounds * cfg.train.local_steps
    if arm is Arm.federated:
        return _federation_arm(cfg, run_dir, keep)
    if arm is Arm.federated_dp:
        return _dp_federation(cfg, run_dir, data_dir, keep)
    if arm is Arm.scratch:
        return Pretrained({POOLED: dict(initial)}, 0, 0, 0.0, {}, {}, {POOLED: f"{CHECKPOINT_DIR}/global_round_0000.safetensors"}, {})
    if arm is Arm.centralized:
        chosen, seed, key = ConcatDataset([s.pretrain for s in sites]), cfg.train.seed, POOLED
        print(f"      pretraining on {len(chosen)} pooled scans of {len(sites)} sites ({budget} steps)")
    else:
        smallest = smallest_site(sites)
        chosen, seed, key = smallest.pretrain, cfg.train.seed + smallest.index, smallest.name
        print(f"      pretraining at {smallest.name} alone ({len(chosen)} scans, {budget} steps)")
    state, losses, along = _train_arm(cfg, chosen, seed, initial, keep)
    path = save_checkpoint(run_dir / STUDY_DIR / ENCODER_DIR / arm.value, state, cfg.model, kind=f"{arm.value}-encoder", steps=len(losses), losses=losses)
    return Pretrained({key: state}, len(losses), 1, time.perf_counter() - started, along, {key: losses},
                      {key: path.relative_to(run_dir).as_posix()}, {})


def _dp_federation(cfg: SimulationRunConfig, run_dir: Path, data_dir: Path, keep: Sequence[int]) -> Pretrained:
    from ctfed.simulations.runtime.simulate import CONFIG_NAME, run_federation_simulation
    from ctfed.simulations.studies.sweep import arm_config

    arm_dir = run_dir / ARMS_DIR / Arm.federated_dp.value
    arm_dir.mkdir(parents=True, exist_ok=True)
    dp_cfg = arm_config(cfg, list(cfg.label_efficiency.dp_overrides))
    config_path = arm_dir / CONFIG_NAME
    save_run_config(dp_cfg, config_path)
    if run_federation_simulation(dp_cfg, arm_dir, config_path, data_dir) != 0:
        raise RuntimeError(f"the local-DP federation failed; see {arm_dir / 'federation.log'}")
    pretrained = _federation_arm(dp_cfg, arm_dir, keep)
    pretrained.files = {k: (Path(ARMS_DIR) / Arm.federated_dp.value / v).as_posix() for k, v in pretrained.files.items()}
    pretrained.extra["privacy"] = OmegaConf.to_container(OmegaConf.structured(dp_cfg.privacy))
    return pretrained


def smallest_site(sites: Sequence[StudySite]) -> StudySite:
    """The site with the fewest pretraining scans (the first of equals): local-only's weakest."""
    return min(sites, key=lambda s: len(s.pretrain))


# ----------------------------------------------------------------------------- federated phase 2


def write_phase2_views(run_dir: Path, sites: Sequence[StudySite], level: int) -> Path:
    """The caches a federated phase 2 at ``level`` runs on: per site every scan it pretrained on
    (no test scan), its labelled scans of the level marked "train" and its validation scans
    "test" (what it evaluates on every round) in the labels' SPLIT_COLUMN, the others blank (not
    trained on; with the rest, they fit the head's feature statistics, as a site's whole cache
    does). Returns the folder of the sites' views."""
    out = run_dir / STUDY_DIR / PHASE2_VIEWS / f"labels_{level}"
    for site in sites:
        parts = {**{i: "train" for i in site.labelled_at(level)}, **{i: "test" for i in site.val}}
        held_out = set(site.test)
        entries = []
        for i, entry in enumerate(site.cache.entries):
            if i in held_out:
                continue
            label = {k: v for k, v in (entry.get("label") or {}).items() if k != SPLIT_COLUMN}
            entries.append({**entry, "label": {**label, SPLIT_COLUMN: parts[i]} if i in parts else label})
        write_cache_view(site.cache, entries, out / site.name)
    return out


@dataclass(frozen=True)
class Phase2Option:
    """One federated phase 2 per level: a mode at a head learning rate. ``key`` names it in
    study.json (with its predictions, where ``choose`` picks among them) and in its run folder."""

    key: str
    mode: str
    head_lr: float


def phase2_options(study: LabelEfficiencyConfig) -> list[Phase2Option]:
    """Every mode of ``phase2_modes`` at every rate of ``phase2_head_lrs``; with one rate the
    key is the mode alone (``progressive``), else the mode and rate (``progressive_lr0.03``)."""
    rates = list(study.phase2_head_lrs)
    return [Phase2Option(mode if len(rates) == 1 else f"{mode}_lr{rate:g}", mode, rate)
            for mode in study.phase2_modes for rate in rates]


def phase2_recipe(study: LabelEfficiencyConfig, tasks: Sequence[str], option: Phase2Option) -> FinetuneConfig:
    """The fine-tuning recipe of a federated phase 2 (also the replay's: phase2_replay.py)."""
    return replace(study.finetune, label_names=list(tasks), mode=option.mode, head_lr=option.head_lr,
                   local_steps=max(1, study.finetune.total_steps // study.phase2_rounds))


def phase2_federation(
    cfg: SimulationRunConfig, run_dir: Path, arm: Arm, encoder_file: Path, sites: Sequence[StudySite], tasks: Sequence[str],
    level: int, option: Phase2Option,
) -> dict[str, dict[str, Any]]:
    """Fine-tune ``arm``'s encoder (``encoder_file``) by a real federated phase 2 at ``level``
    with ``option``'s mode and head LR (Flower's simulation engine, ``label_efficiency.phase2_rounds``
    rounds, no SSL round, a fresh run folder); ``phase2_predictions`` of its last classifier."""
    from ctfed.simulations.runtime.simulate import CONFIG_NAME, run_federation_simulation
    from ctfed.simulations.studies.sweep import arm_config

    study = cfg.label_efficiency
    rounds = study.phase2_rounds
    arm_dir = run_dir / ARMS_DIR / f"{arm.value}_{Heads.federated_phase2.value}_{level}_{option.key}"
    shutil.rmtree(arm_dir, ignore_errors=True)  # an earlier try's (rerun_phase2) is replaced
    arm_dir.mkdir(parents=True)
    base = arm_config(cfg, ["federation.rounds=0", f"federation.finetune_rounds={rounds}",
                            f"federation.initial_encoder={encoder_file.resolve()}"])
    phase2_cfg = replace(base, finetune=phase2_recipe(study, tasks, option))
    config_path = arm_dir / CONFIG_NAME
    save_run_config(phase2_cfg, config_path)
    views = write_phase2_views(run_dir, sites, level)
    if run_federation_simulation(phase2_cfg, arm_dir, config_path, views) != 0:
        raise RuntimeError(f"the federated phase 2 of {arm.value} at {level} labels/site failed; see {arm_dir / 'federation.log'}")
    return phase2_predictions(cfg, run_dir, arm_dir, views, sites, tasks)


def phase2_predictions(
    cfg: SimulationRunConfig, run_dir: Path, arm_dir: Path, views: Path, sites: Sequence[StudySite], tasks: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Every site's validation and test predictions by the federation's last classifier, as the
    site would make them: where the feature statistics stayed at the sites
    (finetune.feature_statistics=site), each first fits them on its own cache (its phase-2 view,
    as in every round) with the federation's encoder; fixed ones (``federated``) the classifier
    carries."""
    last = load_results(arm_dir).rounds[-1]
    classifier, _ = load_classifier(arm_dir / CHECKPOINT_DIR / last.checkpoint)
    recipe = replace(cfg.label_efficiency.finetune, label_names=list(tasks))
    trained = [s for s in last.sites if s.loss is not None]
    out = {}
    carried = classifier.standardizer.fitted
    for site in sites:
        if not carried:
            classifier.fit_standardizer(standardizer_scans(CachedVolumes(views / site.name), cfg.model.image_size), recipe.batch_size)
        folder = str(site.cache.cache_dir)
        val, test = _scans([(folder, site.val), (folder, site.test)], tasks, cfg.model.image_size)
        predictor = Finetuner(classifier, recipe, val)
        out[site.name] = {
            "val": _rounded(predictor.predict(val)[0]), "test": _rounded(predictor.predict(test)[0]),
            "final_loss": float(np.mean([s.loss for s in trained])),
            # What the federation's head was fine-tuned on: the sites' training scans of the last round.
            "labelled_scans": int(sum(s.num_examples for s in trained)),
            "run": arm_dir.relative_to(run_dir).as_posix(),
        }
    return out


def phase2_arm(
    cfg: SimulationRunConfig, run_dir: Path, arm: Arm, encoder_file: Path, sites: Sequence[StudySite], tasks: Sequence[str],
) -> dict[str, Any]:
    """``{level: {option key: {site: ...}}}`` of ``arm``'s federated phase 2: one federation per
    phase2 level and option (the study judges each arm's best on validation, ``choose``)."""
    study = cfg.label_efficiency
    results: dict[str, Any] = {}
    for level in study.phase2_levels:
        for option in phase2_options(study):
            print(f"      federated phase 2 at {level} labelled scans per site, {option.mode}, head LR {option.head_lr:g}", flush=True)
            results.setdefault(str(level), {})[option.key] = phase2_federation(cfg, run_dir, arm, encoder_file, sites, tasks, level, option)
    return results


# ----------------------------------------------------------------------------- evaluation


def _probe_scores(train_x: np.ndarray, train_y: np.ndarray, others: Sequence[np.ndarray], row_span: bool = False) -> list[np.ndarray]:
    """Per task, a standardised L2 logistic regression on ``train_x``; scores of each of
    ``others``. A task with one class among the training scans scores its prevalence (AUROC 0.5)."""
    outputs = [np.zeros((len(x), train_y.shape[1])) for x in others]
    for k in range(train_y.shape[1]):
        y = train_y[:, k]
        if y.min() == y.max():
            for out in outputs:
                out[:, k] = float(y.mean())
            continue
        # One BLAS thread: tiny fits that spin-wait on a loaded 2-core machine (label_signal.py).
        with threadpool_limits(limits=1, user_api="blas"):
            probe = linear_probe(row_span).fit(train_x, y)
            for out, x in zip(outputs, others):
                out[:, k] = probe.predict_proba(x)[:, 1]
    return outputs


def _labels(cache: CachedVolumes, indices: Sequence[int], tasks: Sequence[str]) -> np.ndarray:
    return np.array([[float(cache.labels[i][t]) for t in tasks] for i in indices]).reshape(len(indices), len(tasks))


def probe_on_validation(cfg: SimulationRunConfig, state: Mapping[str, torch.Tensor], sites: Sequence[StudySite], tasks: Sequence[str]) -> dict[str, Any]:
    """Validation AUROC per task of a logistic probe on frozen features, trained on every site's
    largest labelled level (pooled): the pretraining curve's measure. Never sees a test scan."""
    level = cfg.label_efficiency.labels_per_site[-1]
    pooling = cfg.label_efficiency.finetune.pooling
    train_x, train_y, val_x, val_y = [], [], [], []
    for site in sites:
        for indices, xs, ys in ((site.labelled_at(level), train_x, train_y), (site.val, val_x, val_y)):
            scans = LabelledScans(site.cache, indices, tasks, cfg.model.image_size)
            xs.append(encoder_features(cfg.model, state, scans, pooling))
            ys.append(_labels(site.cache, indices, tasks))
    scores = _probe_scores(np.concatenate(train_x), np.concatenate(train_y), [np.concatenate(val_x)])[0]
    truth = np.concatenate(val_y)
    per_task = {t: roc_auc(truth[:, k], scores[:, k]) for k, t in enumerate(tasks)}
    defined = [v for v in per_task.values() if np.isfinite(v)]
    return {"val_auroc": per_task, "mean_val_auroc": float(np.mean(defined)) if defined else None}


def _rounded(probs: np.ndarray) -> list[list[float]]:
    return np.round(probs.astype(np.float64), PROB_DIGITS).tolist()


@dataclass(frozen=True)
class FinetuneJob:
    """One fine-tune of the study: a fresh head on ``encoder`` in ``mode``, trained on the
    ``train`` scans and predicting each of ``evaluated``; scans as (cache folder, indices), so a
    worker process opens the caches itself."""

    key: tuple[str, str, str]  # (heads, level, mode)
    sites: tuple[str, ...]  # whose validation and test scans ``evaluated`` holds, in pairs
    model: ModelConfig
    recipe: FinetuneConfig
    encoder: Mapping[str, torch.Tensor]
    train: tuple[tuple[str, tuple[int, ...]], ...]
    evaluated: tuple[tuple[str, tuple[int, ...]], ...]


def _scans(parts: Sequence[tuple[str, Sequence[int]]], tasks: Sequence[str], size: int) -> list[LabelledScans]:
    return [LabelledScans(_open_cache(folder), indices, tasks, size) for folder, indices in parts]


@functools.lru_cache(maxsize=None)
def _open_cache(folder: str) -> CachedVolumes:
    """A cache opened once per process (a worker runs many jobs on the same few caches)."""
    return CachedVolumes(Path(folder))


def run_finetune_job(job: FinetuneJob) -> list[dict[str, Any]]:
    """``job``'s predictions, one ``{val, test, final_loss, labelled_scans}`` per site."""
    tasks, size = job.recipe.label_names, job.model.image_size
    train = _scans(job.train, tasks, size)
    dataset: Dataset = train[0] if len(train) == 1 else ConcatDataset(train)
    predictions = finetune_and_predict_many(job.model, job.recipe, job.key[2], job.encoder, dataset, _scans(job.evaluated, tasks, size))
    return [
        {"val": _rounded(val.probs), "test": _rounded(test.probs), "final_loss": val.losses[-1], "labelled_scans": len(dataset)}
        for val, test in zip(predictions[0::2], predictions[1::2])
    ]


def _worker_init() -> None:
    torch.set_num_threads(1)  # one core per worker: the workers share the machine's cores


def finetune_jobs(cfg: SimulationRunConfig, pretrained: Pretrained, sites: Sequence[StudySite], tasks: Sequence[str]) -> list[FinetuneJob]:
    """Every fine-tune of one arm: per kind of head, level, mode (and site for the sites' own).
    ``pooled_labels`` heads need one encoder for every site: an arm with per-site encoders
    (local-only) has none."""
    study = cfg.label_efficiency
    recipe = replace(study.finetune, label_names=list(tasks))

    def held(site: StudySite) -> tuple[tuple[str, tuple[int, ...]], ...]:
        return ((str(site.cache.cache_dir), site.val), (str(site.cache.cache_dir), site.test))

    jobs = []
    for level, mode in ((lv, m) for lv in study.labels_per_site for m in study.modes):
        if Heads.site.value in study.heads:
            for site in sites:
                encoder = pretrained.encoder_for(site.name)
                if encoder is not None:
                    jobs.append(FinetuneJob((Heads.site.value, str(level), mode), (site.name,), cfg.model, recipe, encoder,
                                            ((str(site.cache.cache_dir), site.labelled_at(level)),), held(site)))
        encoder = pretrained.encoders.get(POOLED)
        if Heads.pooled_labels.value in study.heads and encoder is not None:
            jobs.append(FinetuneJob(
                (Heads.pooled_labels.value, str(level), mode), tuple(s.name for s in sites), cfg.model, recipe, encoder,
                tuple((str(s.cache.cache_dir), s.labelled_at(level)) for s in sites), tuple(part for s in sites for part in held(s)),
            ))
    return jobs


def finetune_pool(cfg: SimulationRunConfig) -> ProcessPoolExecutor | None:
    """The worker processes of every fine-tune of the study (``label_efficiency.finetune_workers``;
    None: one core, the fine-tunes run in this process)."""
    workers = cfg.label_efficiency.finetune_workers or os.cpu_count() or 1
    if workers <= 1:
        return None
    # spawn: this process has run Ray and torch's thread pools, which a fork would copy mid-use.
    return ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init)


def run_finetune_jobs(jobs: Sequence[FinetuneJob], pool: ProcessPoolExecutor | None, progress: Callable[[str], None]) -> list[list[dict[str, Any]]]:
    """Every job's predictions, in the jobs' order, on ``pool`` (None: here, one after another).
    Each fine-tune is seeded by its recipe alone, so where it ran changes no result."""
    started = time.perf_counter()
    outputs: Iterator[list[dict[str, Any]]] = pool.map(run_finetune_job, jobs) if pool is not None else map(run_finetune_job, jobs)
    results = []
    for predicted in outputs:
        results.append(predicted)
        if len(results) % max(1, len(jobs) // 4) == 0 or len(results) == len(jobs):
            progress(f"{len(results)}/{len(jobs)} fine-tunes ({time.perf_counter() - started:.0f} s)")
    return results


def finetune_arm(
    cfg: SimulationRunConfig, pretrained: Pretrained, sites: Sequence[StudySite], tasks: Sequence[str],
    progress: Callable[[str], None], pool: ProcessPoolExecutor | None = None,
) -> dict[str, Any]:
    """``{heads: {level: {mode: {site: {val, test, final_loss, labelled_scans}}}}}`` of held-out
    probabilities (``labelled_scans``: what the head that predicted them was fine-tuned on)."""
    jobs = finetune_jobs(cfg, pretrained, sites, tasks)
    results: dict[str, Any] = {}
    # In the jobs' order, which is the config's order of heads, levels, modes and sites.
    for job, predicted in zip(jobs, run_finetune_jobs(jobs, pool, progress)):
        results.setdefault(job.key[0], {}).setdefault(job.key[1], {}).setdefault(job.key[2], {}).update(zip(job.sites, predicted))
    return results


def model_free_arm(cfg: SimulationRunConfig, sites: Sequence[StudySite], tasks: Sequence[str]) -> dict[str, Any]:
    """``{heads: {probe: {level: {site: {val, test}}}}}``: the model-free probes fitted on the
    same labelled scans as the fine-tunes (each site's own, or every site's pooled)."""
    study = cfg.label_efficiency
    top = study.labels_per_site[-1]

    def features(site: StudySite, indices: Sequence[int]) -> dict[str, np.ndarray]:
        volumes = [site.cache[i].numpy() for i in indices]
        return {
            "window_histograms": np.stack([window_histograms(v) for v in volumes]) if volumes else np.zeros((0, 1)),
            "raw_voxels": np.stack([v.ravel() for v in volumes]).astype(np.float32) if volumes else np.zeros((0, 1)),
        }

    held = {s.name: (features(s, s.val), features(s, s.test)) for s in sites}
    pools = {s.name: (features(s, s.labelled_at(top)), _labels(s.cache, s.labelled_at(top), tasks)) for s in sites}
    results: dict[str, Any] = {heads: {probe: {str(level): {} for level in study.labels_per_site} for probe in MODEL_FREE}
                               for heads in study.heads}
    for level in study.labels_per_site:
        for probe in MODEL_FREE:
            def fit(fitted_on: Sequence[StudySite], scored: Sequence[StudySite]) -> list[np.ndarray]:
                """Scores of ``scored``'s validation and test scans, in that order per site."""
                x = np.concatenate([pools[s.name][0][probe][: len(s.labelled_at(level))] for s in fitted_on])
                y = np.concatenate([pools[s.name][1][: len(s.labelled_at(level))] for s in fitted_on])
                return _probe_scores(x, y, [part[probe] for s in scored for part in held[s.name]], row_span=probe == "raw_voxels")

            entries = {}
            if Heads.site.value in results:
                entries[Heads.site.value] = {s.name: fit([s], [s]) for s in sites}
            one_head = [heads for heads in ONE_HEAD_KINDS if heads in results]
            if one_head:  # both see every site's labels of the level: the same fit
                scores = fit(sites, sites)
                for heads in one_head:
                    entries[heads] = {s.name: scores[2 * k : 2 * k + 2] for k, s in enumerate(sites)}
            for heads, by_site in entries.items():
                results[heads][probe][str(level)] = {name: {"val": _rounded(val), "test": _rounded(test)} for name, (val, test) in by_site.items()}
    return results


# ----------------------------------------------------------------------------- scoring


def held_out(data: Mapping[str, Any], part: str, sites: Sequence[str]) -> np.ndarray:
    """Labels (N, K) of the validation or test scans of ``sites``, concatenated in that order."""
    return np.concatenate([np.asarray(data["sites"][s][f"{part}_labels"], dtype=np.float64).reshape(-1, len(data["tasks"])) for s in sites])


def _scores(entry: Mapping[str, Any], part: str, sites: Sequence[str], tasks: int) -> np.ndarray | None:
    if any(site not in entry for site in sites):
        return None
    return np.concatenate([np.asarray(entry[s][part], dtype=np.float64).reshape(-1, tasks) for s in sites])


def mean_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    values = [roc_auc(labels[:, k], scores[:, k]) for k in range(labels.shape[1])]
    values = [v for v in values if np.isfinite(v)]
    return float(np.mean(values)) if values else float("nan")


def auroc_ci(labels: np.ndarray, scores: np.ndarray, n_boot: int, seed: int) -> dict[str, float]:
    """AUROC with a percentile bootstrap 95% CI (resamples with one class skipped)."""
    rng = np.random.default_rng(seed)
    samples = rng.integers(0, len(labels), size=(n_boot, len(labels)))
    boot = np.array([roc_auc(labels[idx], scores[idx]) for idx in samples])
    boot = boot[np.isfinite(boot)]
    low, high = np.percentile(boot, [2.5, 97.5]) if len(boot) else (np.nan, np.nan)
    return {"value": roc_auc(labels, scores), "low": float(low), "high": float(high), "n_boot": int(len(boot))}


def choose(data: Mapping[str, Any], arm: str, level: str, where: Sequence[str], heads: str = Heads.site.value) -> str | None:
    """The arm's fine-tuning mode (or the model-free probe) with the best mean validation AUROC
    over tasks at ``where``: the only choice the study makes, and on validation scans."""
    labels = held_out(data, "val", where)
    tasks = len(data["tasks"])
    available, best, best_value = [], None, -np.inf
    for option, entry in _options(data, arm, level, heads).items():
        scores = _scores(entry, "val", where, tasks)
        if scores is None:
            continue
        available.append(option)
        value = mean_auroc(labels, scores)
        if np.isfinite(value) and value > best_value:
            best, best_value = option, value
    # A validation split with one class in every task cannot rank the options: the first listed.
    return best if best is not None else next(iter(available), None)


def _options(data: Mapping[str, Any], arm: str, level: str, heads: str) -> dict[str, Any]:
    """{mode: per-site predictions} of an arm's ``heads`` at a level (empty: none fine-tuned);
    the model-free arm's options are its probes."""
    if arm == "model_free":
        probes = data["model_free"].get(heads, {})
        return {probe: probes[probe][level] for probe in probes if level in probes[probe]}
    return data["arms"][arm].get("finetune", {}).get(heads, {}).get(level, {})


def test_scores(data: Mapping[str, Any], arm: str, level: str, where: Sequence[str], heads: str = Heads.site.value) -> tuple[str, np.ndarray] | None:
    option = choose(data, arm, level, where, heads)
    if option is None:
        return None
    scores = _scores(_options(data, arm, level, heads)[option], "test", where, len(data["tasks"]))
    return None if scores is None else (option, scores)


def summarise(data: dict[str, Any]) -> dict[str, Any]:
    """Per kind of head, arm (and model-free), level and task: the chosen mode and the pooled
    test AUROC with its CI."""
    sites = list(data["sites"])
    n_boot, seed = data["config"]["n_boot"], data["seeds"]["bootstrap"]
    table: dict[str, Any] = {}
    for heads in data["config"]["heads"]:
        table[heads] = {}
        for arm in [*data["arms"], "model_free"]:
            by_level = {}
            for level in map(str, data["config"]["labels_per_site"]):
                where = sites if arm != Arm.local_only.value else [data["smallest_site"]]
                chosen = test_scores(data, arm, level, where, heads)
                if chosen is None:
                    continue
                mode, scores = chosen
                truth = held_out(data, "test", where)
                by_level[level] = {
                    "mode": mode,
                    "where": POOLED if len(where) > 1 else where[0],
                    "auroc": {t: auroc_ci(truth[:, k], scores[:, k], n_boot, seed) for k, t in enumerate(data["tasks"])},
                }
            if by_level:
                table[heads][arm] = by_level
    return table


def _verdict(
    data: Mapping[str, Any], key: str, question: str, task: str, level: str, a: str, b: str, where: Sequence[str], target: float,
    gap: bool, heads: str,
) -> dict[str, Any] | None:
    """AUROC(a) - AUROC(b) > target; with ``gap``, AUROC(b) - AUROC(a) <= target (a trails b)."""
    k = data["tasks"].index(task)
    held_a, held_b = test_scores(data, a, level, where, heads), test_scores(data, b, level, where, heads)
    if held_a is None or held_b is None:
        return None
    labels = held_out(data, "test", where)[:, k]
    judged = judged_difference(
        labels, held_a[1][:, k], held_b[1][:, k], target, gap, data["config"]["n_boot"], data["seeds"]["bootstrap"]
    )
    names = (b, a) if gap else (a, b)
    return {
        "key": key,
        "question": question,
        "task": task,
        "labels_per_site": int(level),
        "heads": heads,
        "where": POOLED if len(where) > 1 else where[0],
        "a": {"arm": a, "mode": held_a[0], "auroc": roc_auc(labels, held_a[1][:, k])},
        "b": {"arm": b, "mode": held_b[0], "auroc": roc_auc(labels, held_b[1][:, k])},
        **judged,
        "difference": {"of": f"{names[0]} - {names[1]}", **judged["difference"]},
    }


def judge(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every verdict, per kind of head, task and labelled level (best mode of each arm on
    validation). Local-only has no pooled-label head (one site's encoder), so
    ``federated_vs_local_only`` is judged on the sites' own heads only."""
    cfg = data["config"]
    sites, smallest = list(data["sites"]), data["smallest_site"]
    arms = data["arms"]
    verdicts = []
    for heads, level, task in ((h, str(lv), t) for h in cfg["heads"] for lv in cfg["labels_per_site"] for t in data["tasks"]):
        candidates = [
            ("pretrained_vs_scratch", "Does federated SSL + its best fine-tuning beat scratch (pooled)?",
             Arm.federated.value, Arm.scratch.value, sites, cfg["target_gain_over_scratch"], False),
            ("centralized_vs_scratch", "Does centralized SSL + its best fine-tuning beat scratch (pooled)?",
             Arm.centralized.value, Arm.scratch.value, sites, cfg["target_gain_over_scratch"], False),
            ("federated_vs_local_only", f"Does federated beat local-only at the smallest site ({smallest})?",
             Arm.federated.value, Arm.local_only.value, [smallest], cfg["target_gain_over_local_only"], False),
            ("gap_to_centralized", "How far does federated trail centralized (pooled)?",
             Arm.federated.value, Arm.centralized.value, sites, cfg["max_gap_to_centralized"], True),
            ("dp_cost", "How much does local DP-SGD cost the federated encoder (pooled)?",
             Arm.federated_dp.value, Arm.federated.value, sites, cfg["max_dp_cost"], True),
            ("pretrained_vs_model_free", "Do federated SSL features beat the best model-free probe (pooled)?",
             Arm.federated.value, "model_free", sites, cfg["target_gain_over_model_free"], False),
        ]
        for key, question, a, b, where, target, gap in candidates:
            if all(arm in arms or arm == "model_free" for arm in (a, b)):
                verdict = _verdict(data, key, question, task, level, a, b, where, target, gap, heads)
                if verdict is not None:
                    verdicts.append(verdict)
    return verdicts


def targets(data: Mapping[str, Any], structural: Sequence[str]) -> list[dict[str, Any]]:
    """The issue's targets at ``judged_labels_per_site`` for each kind of head, each met or not,
    from the verdicts (the DP arm's epsilon once: it does not depend on the heads)."""
    rows = [{"heads": heads, **row} for heads in data["config"]["heads"] for row in _targets_for(data, structural, heads)]
    if "max_site_epsilon" in data["arms"].get(Arm.federated_dp.value, {}).get("privacy", {}):
        cfg = data["config"]
        epsilon = data["arms"][Arm.federated_dp.value]["privacy"]["max_site_epsilon"]
        rows.append({"heads": "-", "target": f"the DP arm's epsilon per site <= {cfg['max_dp_epsilon']:g} (delta as configured)",
                     "met": epsilon <= cfg["max_dp_epsilon"], "detail": f"worst site epsilon {epsilon:.2f}"})
    return rows


def _targets_for(data: Mapping[str, Any], structural: Sequence[str], heads: str) -> list[dict[str, Any]]:
    cfg = data["config"]
    level = cfg["judged_labels_per_site"]
    at = [v for v in data["verdicts"] if v["labels_per_site"] == level and v["heads"] == heads]

    def by(key: str) -> list[dict[str, Any]]:
        return [v for v in at if v["key"] == key]

    gain, needed, against_scratch = cfg["target_gain_over_scratch"], cfg["min_tasks_beating_scratch"], by("pretrained_vs_scratch")
    # The target: a gain of at least `gain` whose 95% CI excludes no gain; and the
    # stricter reading, the whole CI above `gain`, reported beside it.
    beating = [v["task"] for v in against_scratch if v["met"] and v["difference"]["low"] > 0]
    clearing = [v["task"] for v in against_scratch if v["ci_clears_target"]]
    rows = [
        {"target": f"federated + best fine-tuning beats scratch by > {gain:.2f} AUROC with the 95% CI above 0, on >= {needed} tasks",
         "met": len(beating) >= needed, "detail": f"{len(beating)} of {len(against_scratch)} tasks: {', '.join(beating) or 'none'}"},
        {"target": f"(stricter) the same with the whole CI above {gain:.2f}",
         "met": len(clearing) >= needed, "detail": f"{len(clearing)} of {len(against_scratch)} tasks: {', '.join(clearing) or 'none'}"},
    ]
    for key, text in (
        ("federated_vs_local_only", "federated beats local-only at the smallest site"),
        ("gap_to_centralized", f"centralized - federated <= {cfg['max_gap_to_centralized']:.2f}"),
        ("dp_cost", f"the DP arm costs <= {cfg['max_dp_cost']:.2f} AUROC"),
    ):
        found = by(key)
        if found:
            met = [v["task"] for v in found if v["met"]]
            rows.append({"target": f"{text} (per task, point estimate)", "met": len(met) == len(found),
                         "detail": f"met on {len(met)} of {len(found)} tasks (CI clears on {sum(v['ci_clears_target'] for v in found)})"})
    model_free = [v for v in by("pretrained_vs_model_free") if v["task"] in structural]
    if model_free:
        met = [v["task"] for v in model_free if v["met"]]
        rows.append({"target": "pretrained features beat the model-free probes on the structural tasks (point estimate)",
                     "met": len(met) == len(model_free), "detail": f"met on {', '.join(met) or 'none'} of {len(model_free)}"})
    return rows


# ----------------------------------------------------------------------------- the study


class StudyRecord:
    """study.json, rewritten atomically after every stage."""

    def __init__(self, run_dir: Path, cfg: SimulationRunConfig, sites: Sequence[StudySite], tasks: Sequence[str]) -> None:
        self.path = run_dir / STUDY_DIR / STUDY_JSON
        self.started = time.perf_counter()
        study = cfg.label_efficiency
        self.data: dict[str, Any] = {
            "format": FORMAT,
            "status": "running",
            "tasks": list(tasks),
            "config": OmegaConf.to_container(OmegaConf.structured(study)),
            "model": OmegaConf.to_container(OmegaConf.structured(cfg.model)),
            "budget": {
                "pretrain_steps_per_model": cfg.federation.rounds * cfg.train.local_steps,
                "rounds": cfg.federation.rounds,
                "local_steps": cfg.train.local_steps,
                "batch_size": cfg.train.batch_size,
                "lr": cfg.train.lr,
                "finetune_steps": study.finetune.total_steps,
                "finetune_batch_size": study.finetune.batch_size,
            },
            "heads": {heads: HEADS_DESCRIPTIONS[Heads(heads)] for heads in study.heads},
            "seeds": {"synth": cfg.synth.seed, "train": cfg.train.seed, "finetune": study.finetune.seed,
                      "split": study.split_seed, "bootstrap": study.split_seed},
            "smallest_site": smallest_site(sites).name,
            "sites": {
                s.name: {
                    "scans": len(s.cache), "pretrain_scans": len(s.pretrain), "test": len(s.test), "val": len(s.val),
                    "labelled_pool": len(s.labelled),
                    "test_labels": _labels(s.cache, s.test, tasks).astype(int).tolist(),
                    "val_labels": _labels(s.cache, s.val, tasks).astype(int).tolist(),
                    "labelled_positives": {
                        str(level): _labels(s.cache, s.labelled_at(level), tasks).sum(axis=0).astype(int).tolist()
                        for level in study.labels_per_site
                    },
                }
                for s in sites
            },
            "arms": {},
            "wall_seconds": {},
            "verdicts": [],
        }
        self.write()

    def write(self) -> None:
        self.data["wall_seconds"]["total"] = time.perf_counter() - self.started
        write_json_atomic(self.path, self.data)


def _run_arms(
    cfg: SimulationRunConfig, run_dir: Path, data_dir: Path, sites: list[StudySite], tasks: Sequence[str], arms: Sequence[Arm],
    initial: Mapping[str, torch.Tensor], record: StudyRecord, pool: ProcessPoolExecutor | None,
) -> None:
    """Pretrain, probe along the way and fine-tune each arm in turn, recording each as it ends."""
    for number, arm in enumerate(arms, start=1):
        print(f"[study {number}/{len(arms) + 1}] {arm.value}: {ARM_DESCRIPTIONS[arm]}")
        pretrained = pretrain_arm(arm, cfg, run_dir, data_dir, sites, initial)
        if pretrained.seconds:
            print(f"      pretrained in {pretrained.seconds:.0f} s")
        entry: dict[str, Any] = {
            "description": ARM_DESCRIPTIONS[arm],
            "budget": {"pretrain_steps_per_model": pretrained.steps_per_model, "models": pretrained.models_trained},
            "encoders": {k: {"file": f, "sha256": state_digest(pretrained.encoders[k])} for k, f in pretrained.files.items()},
            "pretrain_losses": pretrained.losses,
            "privacy": pretrained.extra,
        }
        curve_started = time.perf_counter()
        entry["curve"] = [
            {"steps": steps, **probe_on_validation(cfg, state, sites, tasks)} for steps, state in sorted(pretrained.along_the_way.items())
        ]
        if entry["curve"]:
            print("      validation probe along pretraining: " + ", ".join(
                f"{c['steps']} steps {c['mean_val_auroc']:.3f}" for c in entry["curve"] if c["mean_val_auroc"] is not None))
        finetune_started = time.perf_counter()
        chosen = [s for s in sites if pretrained.encoder_for(s.name) is not None]
        entry["finetune"] = finetune_arm(cfg, pretrained, chosen, tasks, lambda msg: print(f"      fine-tuned {msg}", flush=True), pool)
        entry["wall_seconds"] = {"pretrain": pretrained.seconds, "curve": finetune_started - curve_started,
                                 "finetune": time.perf_counter() - finetune_started}
        if Heads.federated_phase2.value in cfg.label_efficiency.heads and POOLED in pretrained.encoders:
            phase2_started = time.perf_counter()
            encoder_file = run_dir / pretrained.files[POOLED]
            entry["finetune"][Heads.federated_phase2.value] = phase2_arm(cfg, run_dir, arm, encoder_file, sites, tasks)
            entry["wall_seconds"]["federated_phase2"] = time.perf_counter() - phase2_started
        record.data["arms"][arm.value] = entry
        record.write()


def run_label_efficiency(cfg: SimulationRunConfig, run_dir: Path, data_dir: Path) -> int:
    """Every arm after the federation: pretrain, curve, fine-tune, judge; study.json/.md. 0 on success."""
    study = cfg.label_efficiency
    sites, tasks = load_study_sites(run_dir)
    arms = [arm for arm in Arm if arm is not Arm.federated_dp or study.dp_overrides]
    print(f"label efficiency: {len(arms)} arms, {cfg.federation.rounds * cfg.train.local_steps} pretraining steps per model, "
          f"{len(tasks)} tasks, {', '.join(map(str, study.labels_per_site))} labelled scans per site, modes {', '.join(study.modes)}")
    record = StudyRecord(run_dir, cfg, sites, tasks)
    initial = initial_encoder_state(cfg)
    pool = finetune_pool(cfg)
    try:
        _run_arms(cfg, run_dir, data_dir, sites, tasks, arms, initial, record, pool)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    print(f"[study {len(arms) + 1}/{len(arms) + 1}] model-free probes (window histograms, raw voxels)")
    started = time.perf_counter()
    record.data["model_free"] = model_free_arm(cfg, sites, tasks)
    record.data["wall_seconds"]["model_free"] = time.perf_counter() - started
    record.write()
    _judge_and_report(record.data, run_dir, record.write)
    return 0


def _judge_and_report(data: dict[str, Any], run_dir: Path, write: Callable[[], None]) -> None:
    """Summary, verdicts and targets from the predictions in ``data``; study.json and study.md."""
    from ctfed.simulations.data.phantom import STRUCTURAL_FINDINGS
    from ctfed.simulations.studies.label_efficiency_report import console_summary, render_study_report

    started = time.perf_counter()
    data["summary"] = summarise(data)
    data["verdicts"] = judge(data)
    data["targets"] = targets(data, STRUCTURAL_FINDINGS)
    data["wall_seconds"]["judge"] = time.perf_counter() - started
    data["status"] = "completed"
    write()
    report = render_study_report(run_dir)
    print(console_summary(data))
    print(f"study:       {run_dir / STUDY_DIR / STUDY_JSON}")
    print(f"report:      {report}")


def rerun_phase2(run_dir: Path, overrides: Sequence[str] = ()) -> int:
    """Run the federated phase 2 of a finished study again (its saved config with ``overrides``,
    e.g. ``label_efficiency.phase2_rounds=20``) from the arms' recorded encoders, and judge
    again: a phase-2 change without the pretraining again. Every other prediction is kept;
    study.json records the rerun."""
    from ctfed.simulations.config import read_simulation_config, with_overrides
    from ctfed.simulations.runtime.simulate import CONFIG_NAME

    path = run_dir / STUDY_DIR / STUDY_JSON
    data = json.loads(path.read_text(encoding="utf-8"))
    if data.get("status") != "completed":
        raise RuntimeError(f"{path}: the study is {data.get('status')!r}, not completed; run it to the end first")
    cfg = with_overrides(read_simulation_config(run_dir / CONFIG_NAME), overrides, "overrides")
    if Heads.federated_phase2.value not in cfg.label_efficiency.heads:
        raise RuntimeError("label_efficiency.heads has no federated_phase2: nothing to rerun")
    sites, tasks = load_study_sites(run_dir)
    data["config"] = OmegaConf.to_container(OmegaConf.structured(cfg.label_efficiency))
    # A study run without these heads has no model-free probes for them: the pooled-label fit.
    if Heads.federated_phase2.value not in data["model_free"]:
        pooled = data["model_free"].get(Heads.pooled_labels.value)
        data["model_free"][Heads.federated_phase2.value] = pooled or model_free_arm(cfg, sites, tasks)[Heads.federated_phase2.value]
    started = time.perf_counter()
    for arm, entry in data["arms"].items():
        if POOLED in entry.get("encoders", {}):
            print(f"[phase 2] {arm}")
            encoder_file = run_dir / entry["encoders"][POOLED]["file"]
            entry["finetune"][Heads.federated_phase2.value] = phase2_arm(cfg, run_dir, Arm(arm), encoder_file, sites, tasks)
    data.setdefault("phase2_reruns", []).append({"overrides": list(overrides), "seconds": time.perf_counter() - started})

    def write() -> None:
        write_json_atomic(path, data)

    _judge_and_report(data, run_dir, write)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``main`` (tests/unit/test_doc_commands.py parses the docs' commands with it)."""
    parser = argparse.ArgumentParser(prog="python -m ctfed.simulations.studies.label_efficiency",
                                     description="Run a finished label-efficiency study's federated phase 2 again and judge again.")
    parser.add_argument("--rerun-phase2", type=Path, required=True, metavar="RUN_DIR", help="a finished study's run folder")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. label_efficiency.phase2_rounds=20")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m ctfed.simulations.studies.label_efficiency --rerun-phase2 RUN_DIR [OVERRIDES]``."""
    args = build_parser().parse_args(argv)
    try:
        return rerun_phase2(args.rerun_phase2, args.overrides)
    except OSError as err:
        print(f"label_efficiency --rerun-phase2: {os_error_text(err)}", file=sys.stderr)
        return 1
    except (ConfigError, RuntimeError) as err:
        print(f"label_efficiency --rerun-phase2: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
