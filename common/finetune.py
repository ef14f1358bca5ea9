"""Supervised fine-tuning of the pretrained encoder with progressive layer freezing.

Recipe from arXiv 2507.12269 (code ``phflot/bpdneo-cxr``):

* stage 0 - linear probe: only the head trains (a good head first, so the backbone is not
  torn up by gradients from a random head);
* stage 1 - the backbone starts frozen and the top blocks unfreeze one by one at fixed
  fractions of the stage (default 10%, 30%, 60%); the stem (patch embedding, CLS token) and
  the first block never unfreeze;
* discriminative LRs per group (head > top block > next > ...), OneCycle with 30% warm-up.

Frozen modules are kept in ``eval()`` even while the model trains, so dropout and any
normalisation statistics of a frozen part stay exactly as pretrained (the paper's pitfall).

The final LayerNorm (``encoder.norm``) follows the top block: it normalises that block's
output, so it unfreezes (and shares the LR) with it. The mask token is never used here and
stays frozen. In a federation only ``trainable_state`` needs to travel: the more is frozen,
the fewer bytes per round (and the less DP noise).

The head reads standardised features (``FeatureStandardizer``: each feature dimension
z-scored with the training split's mean and std, fitted by the Finetuner before it trains):
pretrained features carry per-dimension offsets and scales that dwarf their variation across
scans, and a linear head on them at the recipe's LR learns slowly or not at all. MAE's linear
probe puts a non-affine BatchNorm there for the same reason; fixed statistics are used here
instead, so training and evaluation see the same function at batch sizes of 2-4 and frozen
parts never update anything in train mode.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, default_collate

from ctfed.common.checkpoint import load_checkpoint
from ctfed.common.config import FeaturePooling, FeatureStatistics, FinetuneConfig, ModelConfig
from ctfed.common.model import INIT_STD, ViTEncoder

logger = logging.getLogger(__name__)

# OneCycleLR needs at least two steps to have a warm-up and an annealing phase.
_MIN_ONECYCLE_STEPS = 2


# Added to a feature's variance before the square root (BatchNorm's default eps): a dimension
# that does not vary over the training scans is centred, not blown up.
STANDARDIZER_EPS = 1e-5
STANDARDIZER_PREFIX = "standardizer."


class FeatureStandardizer(nn.Module):
    """``(x - mean) / std`` per feature dimension, with statistics fitted on training scans.

    The statistics are buffers, not parameters: no optimizer moves them, and a federated
    phase-2 round sends trainable parameters as such. A site fits them on its whole cache (up
    to ``labelled.STANDARDIZER_MAX_SCANS`` scans, labelled or not) whenever the classifier it
    receives holds none. With finetune.feature_statistics=site (the default) they never leave
    a site and it refits them every round (as FedBN keeps normalisation statistics local); a
    site that predicts with such a classifier fits them on its cache first
    (``fit_standardizer_on_cache``). With ``federated`` a site fits them in the first phase-2
    round only and sends them once, inside that round's update (``encode_feature_statistics``);
    the coordinator fixes their mean in the global classifier (``set_feature_statistics``), and
    every later round, site and checkpoint uses those (``ctfed predict`` needs no cache for
    them). Unfitted (``count`` 0) it is the identity.
    """

    mean: torch.Tensor
    std: torch.Tensor
    count: torch.Tensor

    def __init__(self, width: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("std", torch.ones(width))
        # Scans the statistics come from (float32: checkpoints and records carry one dtype).
        self.register_buffer("count", torch.zeros(1))

    @property
    def fitted(self) -> bool:
        return bool(self.count.item() > 0)

    @torch.no_grad()
    def fit(self, features: torch.Tensor) -> None:
        """Statistics of ``features`` (N, D): mean and population std (+ eps) per dimension."""
        if features.ndim != 2 or features.shape[1] != self.mean.shape[0] or features.shape[0] < 1:
            raise ValueError(
                f"standardiser needs (N >= 1, {self.mean.shape[0]}) features, got {tuple(features.shape)}"
            )
        features = features.detach().to(self.mean.dtype)
        if not torch.isfinite(features).all():
            raise ValueError("standardiser features are not all finite")
        self.mean.copy_(features.mean(dim=0))
        self.std.copy_((features.var(dim=0, correction=0) + STANDARDIZER_EPS).sqrt())
        self.count.fill_(features.shape[0])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return (features - self.mean) / self.std


class Classifier(nn.Module):
    """Linear head on the encoder's pooled features (``pooling``), standardised
    (``FeatureStandardizer``): K logits for K binary (sigmoid) tasks."""

    def __init__(self, encoder: ViTEncoder, num_outputs: int, pooling: FeaturePooling = FeaturePooling.cls) -> None:
        super().__init__()
        if num_outputs < 1:
            raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
        self.encoder = encoder
        self.pooling = FeaturePooling(pooling)
        width = 2 * encoder.hidden_size if self.pooling is FeaturePooling.cls_mean_patch else encoder.hidden_size
        self.standardizer = FeatureStandardizer(width)
        self.head = nn.Linear(width, num_outputs)
        nn.init.trunc_normal_(self.head.weight, std=INIT_STD)
        nn.init.zeros_(self.head.bias)
        # Parameters the encoder itself marks trainable (not the fixed position table or
        # MONAI's unused cross-attention norm), minus the mask token (no masking here).
        self.tunable_names = frozenset(
            name
            for name, param in encoder.named_parameters()
            if param.requires_grad and not name.startswith("mask_token.")
        )
        self._frozen_modules: list[nn.Module] = []
        self.set_trainable(blocks=(), stem=False)

    @property
    def num_blocks(self) -> int:
        return len(self.encoder.blocks)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """What the head reads: (B, hidden), or (B, 2 * hidden) for ``cls_mean_patch``."""
        if self.pooling is FeaturePooling.cls:
            return self.encoder.cls_features(x)
        tokens = self.encoder(x)
        mean_patch = tokens[:, 1:].mean(dim=1)
        if self.pooling is FeaturePooling.mean_patch:
            return mean_patch
        return torch.cat([tokens[:, 0], mean_patch], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.standardizer(self.features(x)))

    @torch.no_grad()
    def fit_standardizer(self, scans: Dataset, batch_size: int = 8) -> None:
        """Fit the head's feature standardisation on ``scans`` (``scans[i][0]`` a volume; labels
        unused), with the encoder as it is now, in eval mode."""
        if len(scans) == 0:  # type: ignore[arg-type]
            raise ValueError("cannot fit the feature standardisation on no scans")
        was_training = self.training
        self.eval()
        device = self.head.weight.device
        features = []
        for start in range(0, len(scans), batch_size):  # type: ignore[arg-type]
            batch = [scans[i][0] for i in range(start, min(start + batch_size, len(scans)))]  # type: ignore[arg-type]
            features.append(self.features(torch.stack(batch).to(device)).float())
        self.standardizer.fit(torch.cat(features))
        self.train(was_training)

    def set_trainable(self, blocks: Sequence[int], stem: bool = False) -> None:
        """Train the head, the given encoder blocks and (if ``stem``) the patch embedding and CLS token.

        Everything else in the encoder is frozen and put in eval mode; the final norm trains
        with the top block. Call again whenever the schedule changes.
        """
        top = self.num_blocks - 1
        wanted = set(blocks)
        if any(not 0 <= b <= top for b in wanted):
            raise ValueError(f"block indices must be in [0, {top}], got {sorted(wanted)}")
        trainable_prefixes = [f"blocks.{b}." for b in wanted]
        if top in wanted:
            trainable_prefixes.append("norm.")
        if stem:
            trainable_prefixes += ["patch_embedding.", "cls_token."]
        for name, param in self.encoder.named_parameters():
            param.requires_grad_(name in self.tunable_names and name.startswith(tuple(trainable_prefixes)))
        self.head.requires_grad_(True)
        self._frozen_modules = [block for index, block in enumerate(self.encoder.blocks) if index not in wanted]
        if not stem:
            self._frozen_modules.append(self.encoder.patch_embedding)
        if top not in wanted:
            self._frozen_modules.append(self.encoder.norm)
        self.train(self.training)

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        for module in self._frozen_modules:
            module.eval()
        return self


def build_classifier(
    model_cfg: ModelConfig,
    num_outputs: int,
    encoder_state: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    pooling: FeaturePooling = FeaturePooling.cls,
) -> Classifier:
    """A classifier on a pretrained encoder (``encoder_state``) or a fresh one (from scratch)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = ViTEncoder(model_cfg)
        if encoder_state is not None:
            try:
                encoder.load_state_dict(encoder_state, strict=True)
            except RuntimeError as err:
                raise ValueError(f"encoder state does not fit the model config: {err}") from None
        return Classifier(encoder, num_outputs, pooling)


CLASSIFIER_KIND_SUFFIX = "classifier"


def load_classifier(weights: Path) -> tuple[Classifier, dict[str, Any]]:
    """A saved classifier (``ctfed finetune``'s, a federation's phase-2 ``global_round_NNNN``)
    rebuilt from its card (model, label names, pooling) with its weights; and the card."""
    state, model_cfg, card = load_checkpoint(weights)
    kind = str(card.get("kind", ""))
    if not kind.endswith(CLASSIFIER_KIND_SUFFIX) or "label_names" not in card:
        raise ValueError(f"{weights} is a '{kind}' checkpoint, not a classifier with label names")
    pooling = FeaturePooling(card.get("pooling", FeaturePooling.cls.value))
    classifier = build_classifier(model_cfg, len(card["label_names"]), pooling=pooling)
    reference = classifier.state_dict()
    absent = [name for name in reference if name not in state]
    if absent and all(name.startswith(STANDARDIZER_PREFIX) for name in absent):
        # Saved before the head standardised its features: its head reads them raw (identity).
        logger.info("%s predates feature standardisation; its head reads the raw features", weights.name)
        state = {**state, **{name: reference[name] for name in absent}}
    try:
        classifier.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{weights} does not fit the classifier its card describes: {err}") from None
    if not classifier.standardizer.fitted and not absent:
        logger.warning(
            "%s has no feature statistics (a federated classifier's stay at the sites): fit them on this "
            "site's scans with classifier.fit_standardizer(scans) before predicting", weights.name,
        )
    return classifier, card


def fit_standardizer_on_cache(classifier: Classifier, cache_dir: Path, image_size: int) -> None:
    """Fit a classifier's feature statistics on every scan of a prepared cache (labels unused):
    what a site does with a federated classifier, whose statistics stayed at the sites, before
    it scores or exports it (``ctfed predict --cache``, ``ctfed export --cache``)."""
    from ctfed.common.labelled import CacheScans
    from ctfed.common.preprocess import CachedVolumes

    scans = CacheScans(CachedVolumes(cache_dir), image_size)
    classifier.fit_standardizer(scans)
    logger.info("fitted the classifier's feature statistics on the %d scans of the cache", len(scans))


# Phase 2's feature statistics on the wire (finetune.feature_statistics=federated): a site
# sends its own once, as two more tensors of its first round's update, scaled into secure
# aggregation's per-value range (+-1, secagg.clipping_range's default): means up to +-32 and
# stds from e^-8 to e^8 travel as they are, larger ones are clipped (the site logs it). The
# coordinator's mean of them gives the mean of the sites' means and the geometric mean of
# their stds.
STATISTICS_PREFIX = "feature_statistics."
STATISTICS_MEAN = STATISTICS_PREFIX + "mean"
STATISTICS_LOG_STD = STATISTICS_PREFIX + "log_std"
_MEAN_SCALE, _LOG_STD_SCALE = 32.0, 8.0


def sends_feature_statistics(cfg: FinetuneConfig, update_dp: bool, classifier: Classifier) -> bool:
    """Whether a phase-2 round's update carries the site's feature statistics: the coordinator
    wants them until it has fixed its own (the classifier it sent holds none), not under an
    update-level DP (central or distributed: its clip and noise are sized for the update).
    Both sides decide with this."""
    return cfg.feature_statistics is FeatureStatistics.federated and not update_dp and not classifier.standardizer.fitted


def encode_feature_statistics(standardizer: FeatureStandardizer) -> tuple[dict[str, torch.Tensor], int]:
    """A fitted standardiser's statistics as they travel, and how many values were clipped."""
    mean = standardizer.mean / _MEAN_SCALE
    log_std = standardizer.std.log() / _LOG_STD_SCALE
    clipped = int((mean.abs() > 1).sum() + (log_std.abs() > 1).sum())
    return {STATISTICS_MEAN: mean.clamp(-1, 1), STATISTICS_LOG_STD: log_std.clamp(-1, 1)}, clipped


def feature_statistics_like(classifier: Classifier) -> dict[str, torch.Tensor]:
    """Names and shapes of the statistics in an update (what the coordinator expects)."""
    width = classifier.standardizer.mean.shape
    return {STATISTICS_MEAN: torch.zeros(width), STATISTICS_LOG_STD: torch.zeros(width)}


def set_feature_statistics(classifier: Classifier, mean_of_sites: Mapping[str, torch.Tensor], sites: int) -> None:
    """Fix the classifier's statistics from the mean of the sites' encoded ones (``count``: sites)."""
    standardizer = classifier.standardizer
    standardizer.mean.copy_(mean_of_sites[STATISTICS_MEAN].float() * _MEAN_SCALE)
    standardizer.std.copy_((mean_of_sites[STATISTICS_LOG_STD].float() * _LOG_STD_SCALE).exp())
    standardizer.count.fill_(float(sites))


@dataclass(frozen=True)
class FreezingSchedule:
    """Which encoder blocks train at a given point of the progressive recipe.

    ``fractions[i]`` is the progress of stage 1 at which block ``num_blocks - 1 - i``
    (top first) unfreezes. Block 0 never unfreezes, so with few blocks fewer fractions apply.
    """

    num_blocks: int
    fractions: tuple[float, ...] = (0.1, 0.3, 0.6)

    def __post_init__(self) -> None:
        if self.num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {self.num_blocks}")
        if list(self.fractions) != sorted(set(self.fractions)) or any(not 0 <= f < 1 for f in self.fractions):
            raise ValueError(f"fractions must be strictly increasing values in [0, 1), got {self.fractions}")

    @property
    def unfreezable(self) -> list[int]:
        """Block indices in unfreezing order (top first), never block 0."""
        return [b for b in range(self.num_blocks - 1, 0, -1)][: len(self.fractions)]

    def trainable_blocks(self, progress: float, stage: int) -> tuple[int, ...]:
        """Trainable block indices (top first) at ``progress`` in [0, 1] of ``stage`` (0 or 1)."""
        if stage not in (0, 1):
            raise ValueError(f"stage must be 0 (linear probe) or 1 (progressive), got {stage}")
        if not 0.0 <= progress <= 1.0:
            raise ValueError(f"progress must be in [0, 1], got {progress}")
        if stage == 0:
            return ()
        return tuple(b for b, f in zip(self.unfreezable, self.fractions) if progress >= f)


# Finetuner phases (and phase-2 round stages): what trains and with which parameter groups.
PROBE_PHASE = "probe"  # head only, stage 0 of the progressive recipe
PROGRESSIVE_PHASE = "progressive"  # head + unfrozen top blocks, stage 1
LINEAR_PROBE_PHASE = "linear_probe"  # mode linear_probe: head only throughout
FULL_PHASE = "full"  # mode full: every tunable weight throughout
HEAD_ONLY_PHASES = (PROBE_PHASE, LINEAR_PROBE_PHASE)


@dataclass(frozen=True)
class FinetuneRoundPlan:
    """What one federated phase-2 round trains, decided by the coordinator and sent to sites.

    ``schedule_start``/``schedule_total`` place the round on its stage's OneCycle LR curve, in
    local steps, so rounds x local steps follow one curve per stage as a standalone fine-tune
    of the same length would.
    """

    stage: str  # one of the *_PHASE names above
    blocks: tuple[int, ...]  # trainable encoder blocks, top first
    stem: bool  # patch embedding and CLS token train too (mode "full")
    schedule_start: int
    schedule_total: int


class FederatedFreezingSchedule:
    """The progressive recipe over federated rounds instead of optimizer steps.

    Mode "progressive": the first rounds are the linear probe, in the share
    ``probe_steps / (probe_steps + stage_steps)`` of the phase-2 rounds (at least one round
    each when both are > 0 and there are two rounds or more); in the remaining rounds the
    top blocks unfreeze top-down at ``unfreeze_fractions`` of that stage. The trainable set
    cannot change within a round (a site's reply names it), so a block trains from the
    round in which its fraction of the stage falls. The set only ever grows, so the
    parameters that differ from the phase-2 start are always among the trainable ones: a site
    that holds the starting classifier needs only the trainable part in later rounds.
    Modes "linear_probe" and "full" train the head only / everything in every round.
    """

    def __init__(self, cfg: FinetuneConfig, num_blocks: int, rounds: int, local_steps: int) -> None:
        if rounds < 1 or local_steps < 1:
            raise ValueError(f"need rounds >= 1 and local_steps >= 1, got {rounds}, {local_steps}")
        self.cfg = cfg
        self.num_blocks = num_blocks
        self.rounds = rounds
        self.local_steps = local_steps
        self.freezing = FreezingSchedule(num_blocks, tuple(cfg.unfreeze_fractions))

    @property
    def probe_rounds(self) -> int:
        """Phase-2 rounds spent on the linear probe (mode "progressive" only)."""
        cfg = self.cfg
        if cfg.mode != PROGRESSIVE_PHASE:
            return 0
        share = cfg.probe_steps / cfg.total_steps
        rounds = math.floor(self.rounds * share + 0.5)
        if cfg.probe_steps > 0:
            rounds = max(rounds, 1)
        if cfg.stage_steps > 0 and self.rounds >= 2:
            rounds = min(rounds, self.rounds - 1)
        return min(rounds, self.rounds)

    def plan(self, finetune_round: int) -> FinetuneRoundPlan:
        """The plan of phase-2 round ``finetune_round`` (1 = the first phase-2 round)."""
        if not 1 <= finetune_round <= self.rounds:
            raise ValueError(f"phase-2 round must be in [1, {self.rounds}], got {finetune_round}")
        steps = self.local_steps
        index = finetune_round - 1
        if self.cfg.mode == LINEAR_PROBE_PHASE:
            return FinetuneRoundPlan(LINEAR_PROBE_PHASE, (), False, index * steps, self.rounds * steps)
        if self.cfg.mode == FULL_PHASE:
            blocks = tuple(range(self.num_blocks - 1, -1, -1))
            return FinetuneRoundPlan(FULL_PHASE, blocks, True, index * steps, self.rounds * steps)
        probe = self.probe_rounds
        if index < probe:
            return FinetuneRoundPlan(PROBE_PHASE, (), False, index * steps, probe * steps)
        stage_rounds = self.rounds - probe
        stage_index = index - probe
        end = (stage_index + 1) / stage_rounds
        blocks = tuple(b for b, f in zip(self.freezing.unfreezable, self.freezing.fractions) if f < end)
        return FinetuneRoundPlan(PROGRESSIVE_PHASE, blocks, False, stage_index * steps, stage_rounds * steps)


def trainable_blocks(
    progress: float, stage: int, num_blocks: int, fractions: Sequence[float] = (0.1, 0.3, 0.6)
) -> tuple[int, ...]:
    """Function form of ``FreezingSchedule.trainable_blocks``."""
    return FreezingSchedule(num_blocks, tuple(fractions)).trainable_blocks(progress, stage)


def trainable_names(model: nn.Module) -> list[str]:
    """Names of the parameters that currently train, sorted: the order both sides of a
    federation use (secure aggregation flattens an update in its order)."""
    return sorted(name for name, param in model.named_parameters() if param.requires_grad)


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the parameters that currently train, by name: what a federated fine-tune sends."""
    params = dict(model.named_parameters())
    return {name: params[name].detach().cpu().clone() for name in trainable_names(model)}


def state_nbytes(state: Mapping[str, torch.Tensor]) -> int:
    """Payload size of a state dict in bytes (tensor data only, no framing)."""
    return sum(t.numel() * t.element_size() for t in state.values())


def param_groups(classifier: Classifier, cfg: FinetuneConfig, include_backbone: bool) -> list[dict]:
    """AdamW groups with discriminative LRs: head, then one group per unfreezable block.

    Blocks are grouped whether trainable yet or not: a frozen parameter has no gradient and
    AdamW skips it, and when it unfreezes it picks up its group's current OneCycle LR.
    ``include_backbone`` adds the stem and lower blocks at ``backbone_lr`` (mode "full").
    """
    encoder = classifier.encoder
    schedule = FreezingSchedule(classifier.num_blocks, tuple(cfg.unfreeze_fractions))
    groups: list[dict] = [{"name": "head", "params": list(classifier.head.parameters()), "lr": cfg.head_lr}]
    grouped: set[str] = set()
    for block, lr in zip(schedule.unfreezable, cfg.block_lrs):
        prefixes = (f"blocks.{block}.", "norm.") if block == classifier.num_blocks - 1 else (f"blocks.{block}.",)
        names = [n for n in sorted(classifier.tunable_names) if n.startswith(prefixes)]
        grouped.update(names)
        groups.append({"name": f"block{block}", "params": [encoder.get_parameter(n) for n in names], "lr": lr})
    if include_backbone:
        # Everything tunable not covered above: the stem, the lower blocks, and (with one
        # block only) the final norm.
        rest = [n for n in sorted(classifier.tunable_names) if n not in grouped]
        groups.append({"name": "backbone", "params": [encoder.get_parameter(n) for n in rest], "lr": cfg.backbone_lr})
    return [g for g in groups if g["params"]]


@dataclass
class FinetuneResult:
    losses: list[float] = field(default_factory=list)  # per step
    # Per step: number of trainable parameter elements (shows the unfreezing).
    trainable_params: list[int] = field(default_factory=list)


class Finetuner:
    """Trains a Classifier on (volume (C, S, S, S), label (K,) or scalar) pairs per ``cfg.mode``.

    ``fit`` and ``fit_round`` first fit the head's feature standardisation on the training
    scans (or ``standardizer_scans``) with the encoder as it starts (``fit_round`` only where
    the classifier arrived without statistics); it then stays fixed while the head trains.

    All modes spend ``cfg.total_steps`` steps: "progressive" splits them into the probe stage
    and the unfreezing stage; "linear_probe" trains the head throughout; "full" trains every
    tunable weight throughout. Each phase has its own AdamW and OneCycle schedule (max LR per
    group, ``warmup_fraction`` warm-up), as two separate runs of the recipe would.

    In a head-only phase (the linear probe, the progressive recipe's stage 0) every encoder
    module is frozen in eval mode (``set_trainable(())``), so a scan's features are the same at
    every step: where the phase's steps would run the encoder on more volumes than there are
    training scans (twice, with flips), the features are computed once per scan, as is and
    flipped, and the steps train the head on those (the same function, fewer encoder forwards).
    """

    # Off: every head-only step runs the encoder again (tests compare the two).
    cache_head_only_features = True

    def __init__(
        self, classifier: Classifier, cfg: FinetuneConfig, dataset: Dataset, device: str = "cpu",
        standardizer_scans: Dataset | None = None,
    ) -> None:
        if len(dataset) == 0:  # type: ignore[arg-type]
            raise ValueError("the fine-tuning dataset is empty")
        if classifier.head.out_features != cfg.num_outputs:
            raise ValueError(
                f"classifier has {classifier.head.out_features} outputs, finetune.label_names lists {cfg.num_outputs}"
            )
        self.classifier = classifier.to(device)
        self.cfg = cfg
        self.dataset = dataset
        # What the head's feature statistics are fitted on (labels unused): the training scans,
        # or e.g. a phase-2 site's whole cache (client/finetune_round.py).
        self.standardizer_scans = dataset if standardizer_scans is None else standardizer_scans
        self.device = torch.device(device)
        # Its own stream, so the flips never shift the batch order (_batches) or the head's init.
        self._flips = torch.Generator().manual_seed(cfg.seed)
        # (features, flipped features, labels) of the training scans in a head-only phase.
        self._features: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def phases(self) -> list[tuple[str, int]]:
        """(phase, steps) pairs that make up this mode's budget."""
        cfg = self.cfg
        if cfg.mode == PROGRESSIVE_PHASE:
            phases = [(PROBE_PHASE, cfg.probe_steps), (PROGRESSIVE_PHASE, cfg.stage_steps)]
            return [(name, steps) for name, steps in phases if steps]
        return [(cfg.mode, cfg.total_steps)]

    def fit(self, on_step: Callable[[str, float], None] | None = None) -> FinetuneResult:
        """Spend the mode's whole budget; ``on_step(phase, loss)`` after every step (progress)."""
        result = FinetuneResult()
        self.classifier.fit_standardizer(self.standardizer_scans, self.cfg.batch_size)
        batches = self._batches()
        self.classifier.train()
        for phase, steps in self.phases():
            self._run_phase(phase, steps, batches, result, on_step)
        self._features = None
        logger.info(
            "fine-tune (%s): %d steps, loss %.4f -> %.4f",
            self.cfg.mode, len(result.losses), result.losses[0], result.losses[-1],
        )
        return result

    def fit_round(self, plan: FinetuneRoundPlan, steps: int) -> FinetuneResult:
        """One federated phase-2 round: ``steps`` steps with the plan's trainable set, on the
        plan's part of its stage's OneCycle curve (a fresh AdamW: moments do not outlive a round)."""
        if plan.schedule_start + steps > plan.schedule_total:
            raise ValueError(
                f"a round of {steps} steps from step {plan.schedule_start} overruns its stage's {plan.schedule_total} steps"
            )
        self.classifier.set_trainable(plan.blocks, stem=plan.stem)
        optimizer, scheduler = self._optimizer(plan.stage, plan.schedule_total)
        if scheduler is not None:
            with warnings.catch_warnings():  # stepping the curve before any optimizer step is the point here
                warnings.simplefilter("ignore", UserWarning)
                for _ in range(plan.schedule_start):
                    scheduler.step()
        result = FinetuneResult()
        if not self.classifier.standardizer.fitted:
            # The classifier came without statistics (finetune.feature_statistics=site, or the
            # first phase-2 round with federated): this site's own, of the encoder it received.
            self.classifier.fit_standardizer(self.standardizer_scans, self.cfg.batch_size)
        batches = self._batches()
        self.classifier.train()
        self._features = self._frozen_features(steps) if plan.stage in HEAD_ONLY_PHASES else None
        for step in range(steps):
            self._step(optimizer, scheduler, batches, plan.stage, step, result)
        self._features = None
        return result

    @torch.no_grad()
    def predict(self, dataset: Dataset) -> tuple[np.ndarray, np.ndarray]:
        """Sigmoid probabilities and labels, both (N, K), for evaluation with ctfed.common.metrics."""
        was_training = self.classifier.training
        self.classifier.eval()
        probs, labels = [], []
        for volumes, targets in DataLoader(dataset, batch_size=self.cfg.batch_size):
            probs.append(torch.sigmoid(self.classifier(volumes.to(self.device))).cpu())
            labels.append(self._targets(targets, volumes.shape[0]).cpu())
        self.classifier.train(was_training)
        return torch.cat(probs).numpy(), torch.cat(labels).numpy()

    def _optimizer(
        self, phase: str, total_steps: int
    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler | None]:
        """AdamW over the phase's parameter groups, with OneCycle over ``total_steps``."""
        cfg = self.cfg
        groups = param_groups(self.classifier, cfg, include_backbone=phase == FULL_PHASE)
        if phase in HEAD_ONLY_PHASES:
            groups = groups[:1]
        optimizer = torch.optim.AdamW(groups, lr=cfg.head_lr, weight_decay=cfg.weight_decay)
        scheduler = None
        if total_steps >= _MIN_ONECYCLE_STEPS:
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer,
                max_lr=[g["lr"] for g in groups],
                total_steps=total_steps,
                pct_start=cfg.warmup_fraction,
                anneal_strategy="cos",
                cycle_momentum=False,
            )
        return optimizer, scheduler

    def _run_phase(
        self,
        phase: str,
        steps: int,
        batches: Iterator,
        result: FinetuneResult,
        on_step: Callable[[str, float], None] | None = None,
    ) -> None:
        schedule = FreezingSchedule(self.classifier.num_blocks, tuple(self.cfg.unfreeze_fractions))
        if phase == FULL_PHASE:
            self.classifier.set_trainable(range(self.classifier.num_blocks), stem=True)
        else:
            self.classifier.set_trainable(())
        optimizer, scheduler = self._optimizer(phase, steps)
        self._features = self._frozen_features(steps) if phase in HEAD_ONLY_PHASES else None
        blocks: tuple[int, ...] = ()
        for step in range(steps):
            if phase == PROGRESSIVE_PHASE:
                now = schedule.trainable_blocks(step / steps, stage=1)
                if now != blocks:
                    blocks = now
                    self.classifier.set_trainable(blocks)
                    logger.info("step %d of stage 1: training blocks %s", step, list(blocks))
            self._step(optimizer, scheduler, batches, phase, step, result)
            if on_step is not None:
                on_step(phase, result.losses[-1])

    def _step(
        self,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler | None,
        batches: Iterator,
        phase: str,
        step: int,
        result: FinetuneResult,
    ) -> None:
        indices = next(batches)
        flip = self._flip_draw(len(indices))
        if self._features is not None:
            features, flipped, labels = self._features
            chosen = torch.where(flip[:, None].to(self.device), flipped[indices], features[indices])
            logits, targets = self.classifier.head(self.classifier.standardizer(chosen)), labels[indices]
        else:
            volumes, raw_targets = default_collate([self.dataset[i] for i in indices.tolist()])
            if flip.any():
                volumes = volumes.clone()
                volumes[flip] = volumes[flip].flip(-1)
            logits = self.classifier(volumes.to(self.device))
            targets = self._targets(raw_targets, volumes.shape[0])
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"fine-tune loss is {loss.item()} in phase '{phase}', step {step}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_([p for p in self.classifier.parameters() if p.requires_grad], self.cfg.grad_clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        result.losses.append(loss.item())
        result.trainable_params.append(sum(p.numel() for p in self.classifier.parameters() if p.requires_grad))

    def _flip_draw(self, count: int) -> torch.Tensor:
        """Which of a batch's volumes are flipped left-right (``flip_lr_prob``; the cache's
        (C, z, y, x) volumes run left -> right along x, the last axis)."""
        if self.cfg.flip_lr_prob <= 0:
            return torch.zeros(count, dtype=torch.bool)
        return torch.rand(count, generator=self._flips) < self.cfg.flip_lr_prob

    @torch.no_grad()
    def _frozen_features(self, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The features every training scan gives the frozen encoder, as is and flipped (when
        flips are on), and the labels; None when ``cache_head_only_features`` is off or when
        ``steps`` would run the encoder on fewer volumes than the cache would (many scans, a
        short phase: a phase-2 round of a few steps at a large site)."""
        forwards = len(self.dataset) * (2 if self.cfg.flip_lr_prob > 0 else 1)  # type: ignore[arg-type]
        if not self.cache_head_only_features or forwards >= steps * self.cfg.batch_size:
            return None
        classifier = self.classifier
        plain, flipped, labels = [], [], []
        for start in range(0, len(self.dataset), self.cfg.batch_size):  # type: ignore[arg-type]
            items = [self.dataset[i] for i in range(start, min(start + self.cfg.batch_size, len(self.dataset)))]  # type: ignore[arg-type]
            volumes, targets = default_collate(items)
            volumes = volumes.to(self.device)
            plain.append(classifier.features(volumes).float())
            flipped.append(classifier.features(volumes.flip(-1)).float() if self.cfg.flip_lr_prob > 0 else plain[-1])
            labels.append(self._targets(targets, volumes.shape[0]))
        return torch.cat(plain), torch.cat(flipped), torch.cat(labels)

    def _targets(self, targets: torch.Tensor, batch: int) -> torch.Tensor:
        targets = torch.as_tensor(targets).float().to(self.device)
        if targets.ndim == 1 and self.cfg.num_outputs == 1:
            targets = targets.unsqueeze(1)
        if targets.shape != (batch, self.cfg.num_outputs):
            raise ValueError(
                f"labels must have shape (batch, {self.cfg.num_outputs}) (or (batch,) for one task), "
                f"got {tuple(targets.shape)}"
            )
        return targets

    def _batches(self) -> Iterator[torch.Tensor]:
        """Indices of the training scans, a batch at a time, reshuffled every epoch (seeded)."""
        generator = torch.Generator().manual_seed(self.cfg.seed)
        count = len(self.dataset)  # type: ignore[arg-type]
        loader = DataLoader(range(count), batch_size=self.cfg.batch_size, shuffle=True, generator=generator,
                            drop_last=count >= self.cfg.batch_size)
        while True:
            yield from loader
