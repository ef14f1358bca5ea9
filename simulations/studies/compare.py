"""The ``compare`` study: is federated pretraining worth it on these hospitals?

``ctfed simulate preset=compare`` (any run with ``compare.enabled=true``) first runs the normal
federation (the *federated* arm), then, on the same site caches and the same budget of
``federation.rounds x train.local_steps`` optimiser steps per trained model, and from the same
initial encoder:

* *centralized*: one ``LocalTrainer`` on the pooled caches of all sites;
* *local-only*: one ``LocalTrainer`` per site on that site alone (or only the smallest site);
* *scratch*: no pretraining, the federation's initial encoder (``global_round_0000``).

Every arm is then fine-tuned and tested at every site with the same split, recipe and seeds
(simulations/studies/downstream.py): each site fine-tunes the arm's encoder on its training scans
(local-only: the site's own encoder) and predicts its held-out scans; pooled metrics score
all sites' held-out predictions together. ``compare.json`` is rewritten atomically after
each arm, so a crash keeps the finished ones; ``compare.md`` and the plots are rendered from
it (simulations/studies/compare_report.py).
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch.utils.data import ConcatDataset, Dataset

from ctfed.client.site import site_cache_dirs
from ctfed.client.train import LocalTrainer
from ctfed.common.checkpoint import load_checkpoint, save_checkpoint, state_digest
from ctfed.common.exchange import PRETRAIN_PHASE
from ctfed.simulations.config import SimulationRunConfig
from ctfed.common.fileio import write_json_atomic
from ctfed.common.preprocess import CachedVolumes
from ctfed.server.results import CHECKPOINT_DIR
from ctfed.server.rounds import initial_encoder_state
from ctfed.common.labelled import LabelledScans, NotEvaluableError, SiteSplit, stratified_split
from ctfed.common.monitor import representation_monitor
from ctfed.common.model import encoder_part
from ctfed.simulations.studies.downstream import Predictions, finetune_and_predict, monitor_entry, pool, score
from ctfed.simulations.report.report import load_results

logger = logging.getLogger(__name__)

COMPARE_JSON = "compare.json"
ENCODER_DIR = Path("compare") / "encoders"
# The second federation of the teacher-policy comparison, under the run folder.
TEACHER_ARM_DIR = Path("arms")
TEACHER_POLICIES = ("reset", "keep")
FORMAT = 1
# Key of the one encoder every site shares (all arms but local-only), and of pooled metrics.
SHARED = "shared"
POOLED = "pooled"


class Arm(str, enum.Enum):
    """The four pretraining arms, in report order."""

    federated = "federated"
    centralized = "centralized"
    local_only = "local_only"
    scratch = "scratch"


# What each arm's model trained on, for the report.
ARM_DESCRIPTIONS: dict[Arm, str] = {
    Arm.federated: "FedAvg of per-site DINO/iBOT updates (Flower simulation engine)",
    Arm.centralized: "one LocalTrainer on the pooled caches of all sites",
    Arm.local_only: "one LocalTrainer per site on that site's cache alone",
    Arm.scratch: "no pretraining: the federation's initial encoder",
}


@dataclass
class Site:
    """One site's cache and its downstream split (``split`` is None when not evaluable)."""

    name: str
    index: int  # partition id in the federation: the LocalTrainer seed offset there
    volumes: CachedVolumes
    split: SiteSplit | None
    reason: str = ""  # why the site is not evaluable

    def labelled(self, cfg: SimulationRunConfig) -> tuple[LabelledScans, LabelledScans]:
        """(fine-tuning scans, held-out test scans) of an evaluable site."""
        if self.split is None:
            raise NotEvaluableError(self.reason)
        names, size = cfg.compare.finetune.label_names, cfg.model.image_size
        return (
            LabelledScans(self.volumes, self.split.train, names, size),
            LabelledScans(self.volumes, self.split.test, names, size),
        )


@dataclass
class Pretrained:
    """An arm's encoder(s): one under SHARED, or one per site name (local-only)."""

    encoders: dict[str, dict[str, torch.Tensor]]
    files: dict[str, Path]
    models_trained: int
    steps_per_model: int
    volumes_seen: int
    seconds: float
    # Loss per optimiser step of each trained model (federated: per site), for the plots.
    losses: dict[str, list[float]] = field(default_factory=dict)

    def encoder_for(self, site: str) -> dict[str, torch.Tensor] | None:
        return self.encoders.get(site, self.encoders.get(SHARED))


# ----------------------------------------------------------------------------- sites


def load_sites(cfg: SimulationRunConfig, data_dir: Path) -> list[Site]:
    """Every site cache in federation order, with its stratified split (or why it has none)."""
    sites = []
    for index, cache_dir in enumerate(site_cache_dirs(data_dir)):
        volumes = CachedVolumes(cache_dir)
        try:
            split = stratified_split(
                volumes, cfg.compare.finetune.label_names, cfg.compare.test_fraction, cfg.compare.split_seed
            )
            sites.append(Site(cache_dir.name, index, volumes, split))
        except NotEvaluableError as err:
            sites.append(Site(cache_dir.name, index, volumes, None, reason=str(err)))
    if not any(site.split for site in sites):
        reasons = "; ".join(site.reason for site in sites)
        raise NotEvaluableError(f"no site has enough labelled scans of both classes for a downstream test: {reasons}")
    return sites


def smallest_site(sites: list[Site]) -> Site:
    """The evaluable site with the fewest scans (the first of equals): where local-only is weakest."""
    return min((s for s in sites if s.split), key=lambda s: len(s.volumes))


def _site_summary(site: Site, label: str) -> dict[str, Any]:
    summary: dict[str, Any] = {"scans": len(site.volumes), "evaluable": site.split is not None, "reason": site.reason}
    if site.split is not None:
        labels = [int(site.volumes.labels[i][label]) for i in site.split.test]
        summary.update(train=len(site.split.train), test=len(site.split.test), test_positives=sum(labels))
    return summary


# ----------------------------------------------------------------------------- pretraining arms


def _train(cfg: SimulationRunConfig, dataset: Dataset, seed: int, initial: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[float], int]:
    """``federation.rounds`` rounds of ``train.local_steps`` steps from the initial encoder, as ``ctfed pretrain`` does."""
    trainer = LocalTrainer(cfg.model, cfg.train, dataset, seed=seed)
    trainer.set_global_encoder(initial)  # the federation's starting point, teacher included
    losses: list[float] = []
    volumes = 0
    for round_index in range(cfg.federation.rounds):
        result = trainer.train_round(round_index)
        losses += result.losses
        volumes += result.num_examples
    return trainer.encoder_state(), losses, volumes


def _save_encoder(run_dir: Path, name: str, state: Mapping[str, torch.Tensor], cfg: SimulationRunConfig, losses: list[float]) -> Path:
    return save_checkpoint(run_dir / ENCODER_DIR / name, state, cfg.model, kind=f"{name}-encoder", steps=len(losses), losses=losses)


def pretrain_federated(cfg: SimulationRunConfig, run_dir: Path, sites: list[Site], initial: Mapping[str, torch.Tensor]) -> Pretrained:
    """The federation ``ctfed simulate`` just ran: its last SSL checkpoint and its per-site losses
    (phase-2 rounds, if any, fine-tuned a classifier: not part of the pretraining arm)."""
    results = load_results(run_dir)
    pretraining = [record for record in results.rounds if record.phase == PRETRAIN_PHASE]
    weights = run_dir / CHECKPOINT_DIR / pretraining[-1].checkpoint
    state = encoder_part(load_checkpoint(weights)[0])  # verifies the hash in its card; shared heads left out
    losses: dict[str, list[float]] = {}
    for record in pretraining:
        for site in record.sites:
            losses.setdefault(site.site, []).extend(site.losses)
    steps = {len(site_losses) for site_losses in losses.values()}
    if len(steps) != 1:
        raise RuntimeError(f"federated sites trained different numbers of steps {sorted(steps)}; the budgets would not match")
    return Pretrained(
        encoders={SHARED: state},
        files={SHARED: weights},
        models_trained=1,  # one global encoder, however many sites contributed
        steps_per_model=steps.pop(),
        volumes_seen=sum(s.num_examples for r in pretraining for s in r.sites),
        seconds=results.wall_seconds,
        losses=losses,
    )


def pretrain_centralized(cfg: SimulationRunConfig, run_dir: Path, sites: list[Site], initial: Mapping[str, torch.Tensor]) -> Pretrained:
    started = time.perf_counter()
    pooled = ConcatDataset([site.volumes for site in sites])
    print(f"      pretraining on {len(pooled)} pooled scans of {len(sites)} sites")
    state, losses, volumes = _train(cfg, pooled, cfg.train.seed, initial)
    weights = _save_encoder(run_dir, Arm.centralized.value, state, cfg, losses)
    return Pretrained({SHARED: state}, {SHARED: weights}, 1, len(losses), volumes, time.perf_counter() - started, {SHARED: losses})


def pretrain_local_only(cfg: SimulationRunConfig, run_dir: Path, sites: list[Site], initial: Mapping[str, torch.Tensor]) -> Pretrained:
    started = time.perf_counter()
    chosen = sites if cfg.compare.local_only_all_sites else [smallest_site(sites)]
    encoders, files, losses, volumes = {}, {}, {}, 0
    for site in chosen:
        print(f"      pretraining at {site.name} alone ({len(site.volumes)} scans)")
        # The seed the site trains with in the federation (train.seed + partition id).
        state, site_losses, site_volumes = _train(cfg, site.volumes, cfg.train.seed + site.index, initial)
        encoders[site.name], losses[site.name] = state, site_losses
        files[site.name] = _save_encoder(run_dir, f"{Arm.local_only.value}_{site.name}", state, cfg, site_losses)
        volumes += site_volumes
    steps = len(next(iter(losses.values())))
    return Pretrained(encoders, files, len(chosen), steps, volumes, time.perf_counter() - started, losses)


def pretrain_scratch(cfg: SimulationRunConfig, run_dir: Path, sites: list[Site], initial: Mapping[str, torch.Tensor]) -> Pretrained:
    """The untrained initial encoder; checked against the federation's round-0 checkpoint."""
    round_zero = run_dir / CHECKPOINT_DIR / "global_round_0000.safetensors"
    if round_zero.is_file():
        federation_initial = encoder_part(load_checkpoint(round_zero)[0])
        if state_digest(federation_initial) != state_digest(initial):
            raise RuntimeError(f"{round_zero} differs from the encoder train.seed={cfg.train.seed} builds")
        weights = round_zero
    else:  # a federation resumed from a folder that lost it
        weights = _save_encoder(run_dir, Arm.scratch.value, initial, cfg, [])
    return Pretrained({SHARED: dict(initial)}, {SHARED: weights}, 0, 0, 0, 0.0)


PRETRAIN: dict[Arm, Callable[[SimulationRunConfig, Path, list[Site], Mapping[str, torch.Tensor]], Pretrained]] = {
    Arm.federated: pretrain_federated,
    Arm.centralized: pretrain_centralized,
    Arm.local_only: pretrain_local_only,
    Arm.scratch: pretrain_scratch,
}


# ----------------------------------------------------------------------------- downstream


def _fmt_auroc(metrics: dict[str, Any], task: str) -> str:
    auroc = metrics[task]["auroc"]
    return f"AUROC {auroc['value']:.3f} [{auroc['low']:.3f}, {auroc['high']:.3f}]"


def evaluate_arm(cfg: SimulationRunConfig, sites: list[Site], pretrained: Pretrained) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fine-tune and test at every evaluable site with an encoder, in every mode.

    Returns (downstream, representation): ``downstream[mode][site or POOLED]`` holds metrics
    (and, per site, the held-out probabilities, labels and fine-tuning losses, so verdicts and
    reports can be recomputed from compare.json); ``representation[site]`` the monitors.
    """
    compare = cfg.compare
    label_names = compare.finetune.label_names
    task = label_names[0]
    # (site, its fine-tuning and test scans, the encoder it fine-tunes from)
    evaluated = [
        (site, *site.labelled(cfg), encoder)
        for site in sites
        if site.split is not None and (encoder := pretrained.encoder_for(site.name)) is not None
    ]
    downstream: dict[str, Any] = {}
    for mode in compare.modes:
        by_site: dict[str, Predictions] = {}
        downstream[mode] = {}
        for site, train, test, encoder in evaluated:
            predictions = finetune_and_predict(cfg.model, compare.finetune, mode, encoder, train, test)
            by_site[site.name] = predictions
            metrics = score(predictions, label_names, compare.n_boot, compare.split_seed)
            downstream[mode][site.name] = {
                "metrics": metrics,
                "probs": predictions.probs.tolist(),
                "labels": predictions.labels.astype(int).tolist(),
                "finetune_losses": predictions.losses,
            }
            print(f"      {mode:<12} {site.name:<10} {_fmt_auroc(metrics, task)}")
        # Pooled only when every evaluable site took part, so arms pool the same test scans.
        if len(by_site) == sum(1 for s in sites if s.split):
            metrics = score(pool(list(by_site.values())), label_names, compare.n_boot, compare.split_seed)
            downstream[mode][POOLED] = {"metrics": metrics}
            print(f"      {mode:<12} {POOLED:<10} {_fmt_auroc(metrics, task)}")
    representation = {
        site.name: monitor_entry(
            representation_monitor(cfg.model, encoder, train, test, compare.knn_k, compare.finetune.pooling)
        )
        for site, train, test, encoder in evaluated
    }
    return downstream, representation


# ----------------------------------------------------------------------------- teacher policy


def other_teacher_policy(policy: str) -> str:
    return next(p for p in TEACHER_POLICIES if p != policy)


def ssl_loss_per_round(run_dir: Path) -> dict[str, Any]:
    """Mean local-step SSL loss per pretraining round: per site and averaged over sites."""
    pretraining = [r for r in load_results(run_dir).rounds if r.phase == PRETRAIN_PHASE]
    per_site: dict[str, list[float]] = {}
    for record in pretraining:
        for site in record.sites:
            if site.losses:
                per_site.setdefault(site.site, []).append(sum(site.losses) / len(site.losses))
    rounds = len(pretraining)
    mean = [
        sum(values[r] for values in per_site.values() if len(values) > r) / max(sum(len(v) > r for v in per_site.values()), 1)
        for r in range(rounds)
    ]
    return {"mean": mean, "sites": per_site}


def _policy_entry(policy: str, run_dir: Path, study_dir: Path, pretrained: Pretrained, downstream: dict[str, Any], representation: dict[str, Any]) -> dict[str, Any]:
    return {
        "policy": policy,
        "run_dir": run_dir.relative_to(study_dir).as_posix() if run_dir != study_dir else ".",
        "steps_per_model": pretrained.steps_per_model,
        "seconds": pretrained.seconds,
        "ssl_loss_per_round": ssl_loss_per_round(run_dir),
        "downstream": downstream,
        "representation": representation,
    }


def compare_teacher_policies(cfg: SimulationRunConfig, run_dir: Path, data_dir: Path, sites: list[Site], record: "CompareRecord") -> bool:
    """Run the federation again with the other teacher policy on the same sites, seeds and budget
    and put both policies side by side in compare.json (``teacher_policies``); False if it failed.

    The policy of ``cfg`` is the federated arm already evaluated; the other one runs in
    ``<run>/arms/teacher_<policy>/`` through the same simulation path as ``ctfed simulate``.
    """
    from ctfed.common.config import save_run_config
    from ctfed.simulations.runtime.simulate import CONFIG_NAME, run_federation_simulation
    from ctfed.simulations.studies.sweep import arm_config

    base_policy = cfg.train.teacher_on_new_global
    other = other_teacher_policy(base_policy)
    federated = record.data["arms"][Arm.federated.value]
    base_pretrained = pretrain_federated(cfg, run_dir, sites, initial_encoder_state(cfg))
    entries = {base_policy: _policy_entry(base_policy, run_dir, run_dir, base_pretrained, federated["downstream"], federated["representation"])}
    arm_dir = run_dir / TEACHER_ARM_DIR / f"teacher_{other}"
    arm_dir.mkdir(parents=True, exist_ok=True)
    other_cfg = arm_config(cfg, [f"train.teacher_on_new_global={other}"])
    config_path = arm_dir / CONFIG_NAME
    save_run_config(other_cfg, config_path)
    if run_federation_simulation(other_cfg, arm_dir, config_path, data_dir) != 0:
        print(f"ctfed simulate: compare: the federation with teacher policy '{other}' failed; see {arm_dir}")
        return False
    pretrained = pretrain_federated(other_cfg, arm_dir, sites, initial_encoder_state(other_cfg))
    downstream, representation = evaluate_arm(other_cfg, sites, pretrained)
    entries[other] = _policy_entry(other, arm_dir, run_dir, pretrained, downstream, representation)
    record.data["teacher_policies"] = {"base": base_policy, "policies": entries}
    record.write()
    return True


# ----------------------------------------------------------------------------- compare.json


class CompareRecord:
    """compare.json, rewritten atomically whenever an arm finishes."""

    def __init__(self, run_dir: Path, cfg: SimulationRunConfig, sites: list[Site]) -> None:
        self.run_dir = run_dir
        self.path = run_dir / COMPARE_JSON
        self.started = time.perf_counter()
        compare = cfg.compare
        label = compare.finetune.label_names[0]
        self.data: dict[str, Any] = {
            "format": FORMAT,
            "status": "running",
            "task": label,
            "label_names": list(compare.finetune.label_names),
            "primary_mode": compare.finetune.mode,
            "modes": compare.modes,
            "smallest_site": smallest_site(sites).name,
            "budget": {
                "pretrain_steps_per_model": cfg.federation.rounds * cfg.train.local_steps,
                "rounds": cfg.federation.rounds,
                "local_steps": cfg.train.local_steps,
                "batch_size": cfg.train.batch_size,
                "finetune_steps": compare.finetune.total_steps,
                "finetune_batch_size": compare.finetune.batch_size,
            },
            "seeds": {
                "synth": cfg.synth.seed,
                "train": cfg.train.seed,
                "finetune": compare.finetune.seed,
                "split": compare.split_seed,
                "bootstrap": compare.split_seed,
            },
            "compare_config": OmegaConf.to_container(OmegaConf.structured(compare)),
            "model": cfg.model.name,
            "sites": {site.name: _site_summary(site, label) for site in sites},
            "arms": {},
            "verdicts": [],
            "wall_seconds": 0.0,
        }
        self.write()

    def add_arm(self, arm: Arm, pretrained: Pretrained, downstream: dict[str, Any], representation: dict[str, Any], downstream_seconds: float) -> None:
        self.data["arms"][arm.value] = {
            "description": ARM_DESCRIPTIONS[arm],
            "budget": {
                "pretrain_steps_per_model": pretrained.steps_per_model,
                "models": pretrained.models_trained,
                "volumes_seen": pretrained.volumes_seen,
                "finetune_steps": self.data["budget"]["finetune_steps"],
            },
            "wall_seconds": {"pretrain": pretrained.seconds, "downstream": downstream_seconds},
            "encoders": {
                key: {"file": path.relative_to(self.run_dir).as_posix(), "sha256": state_digest(pretrained.encoders[key])}
                for key, path in pretrained.files.items()
            },
            "pretrain_losses": pretrained.losses,
            "downstream": downstream,
            "representation": representation,
        }
        self.write()

    def finish(self, verdicts: list[dict[str, Any]]) -> None:
        self.data["verdicts"] = verdicts
        self.data["status"] = "completed"
        self.write()

    def write(self) -> None:
        self.data["wall_seconds"] = time.perf_counter() - self.started
        write_json_atomic(self.path, self.data)


def check_budgets(data: Mapping[str, Any]) -> None:
    """Every pretrained arm spent the same optimiser steps per model; every arm the same fine-tune."""
    arms = data["arms"]
    expected = data["budget"]["pretrain_steps_per_model"]
    wrong = {
        arm: entry["budget"]["pretrain_steps_per_model"]
        for arm, entry in arms.items()
        if arm != Arm.scratch.value and entry["budget"]["pretrain_steps_per_model"] != expected
    }
    if wrong:
        raise RuntimeError(f"pretraining budgets differ from rounds x local_steps = {expected}: {wrong}")


# ----------------------------------------------------------------------------- the study


def run_comparison(cfg: SimulationRunConfig, run_dir: Path, data_dir: Path) -> int:
    """Train the non-federated arms, evaluate all four, write compare.json/compare.md; 0 on success."""
    from ctfed.simulations.studies.compare_report import console_summary, judge, render_compare_report

    started = time.perf_counter()
    budget = cfg.federation.rounds * cfg.train.local_steps
    print(
        f"compare: {len(Arm)} arms, {budget} pretraining steps per model ({cfg.federation.rounds} rounds x "
        f"{cfg.train.local_steps} steps), fine-tuning {', '.join(cfg.compare.modes)} for {cfg.compare.finetune.total_steps} steps"
    )
    try:
        sites = load_sites(cfg, data_dir)
    except NotEvaluableError as err:
        print(f"ctfed simulate: compare: {err}")
        return 1
    for site in sites:
        if site.split:
            print(f"      {site.name}: {len(site.volumes)} scans, {len(site.split.train)} fine-tune / {len(site.split.test)} test")
        else:
            print(f"      {site.name}: {len(site.volumes)} scans, not evaluated ({site.reason})")
    record = CompareRecord(run_dir, cfg, sites)
    initial = initial_encoder_state(cfg)
    for number, arm in enumerate(Arm, start=1):
        print(f"[compare {number}/{len(Arm)}] {arm.value}: {ARM_DESCRIPTIONS[arm]}")
        pretrained = PRETRAIN[arm](cfg, run_dir, sites, initial)
        if arm is not Arm.scratch:
            print(f"      pretrained in {pretrained.seconds:.0f} s ({pretrained.steps_per_model} steps per model)")
        downstream_started = time.perf_counter()
        downstream, representation = evaluate_arm(cfg, sites, pretrained)
        record.add_arm(arm, pretrained, downstream, representation, time.perf_counter() - downstream_started)
    check_budgets(record.data)
    if cfg.compare.teacher_policies:
        other = other_teacher_policy(cfg.train.teacher_on_new_global)
        print(f"[compare] teacher policy: the federation again with train.teacher_on_new_global={other}")
        if not compare_teacher_policies(cfg, run_dir, data_dir, sites, record):
            return 1
    record.finish(judge(record.data))
    report = render_compare_report(run_dir)
    print(console_summary(record.data))
    print(f"compare done in {time.perf_counter() - started:.0f} s")
    print(f"compare:     {record.path}")
    print(f"report:      {report}")
    return 0
