"""Structured configuration for every ctfed command.

Each section is a dataclass registered with Hydra's ConfigStore, so a typo in a key or a
wrong type fails at composition time, and value rules that types cannot express are
checked in ``__post_init__`` (which runs when the composed config is turned into objects).
YAML presets live in ``conf/`` (installed as ``ctfed.conf``).
"""

from __future__ import annotations

import difflib
import enum
import re
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, TypeVar

from hydra import compose, initialize_config_module
from hydra.core.config_store import ConfigStore
from hydra.errors import HydraException
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ctfed.common.fileio import write_text_atomic

CONFIG_MODULE = "ctfed.conf"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message says what to change."""


# Site ids (and sweep arm names) become file and folder names: keep them plain.
SITE_ID_RULE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")


# Config enums have lower-case member names: OmegaConf parses a value by member *name*, so
# `federation.strategy=fedavg` on the command line must be a name.
class Strategy(str, enum.Enum):
    """Aggregation strategies the coordinator offers."""

    fedavg = "fedavg"  # example-weighted mean of the site updates
    fedprox = "fedprox"  # FedAvg, with a proximal term in each site's loss (train.proximal_mu)
    fedadam = "fedadam"  # Adam at the coordinator, the mean update as its pseudo-gradient
    median = "median"  # coordinate-wise median: robust, needs each site's update in clear
    trimmed_mean = "trimmed_mean"  # mean after dropping federation.trim_fraction at each end


# Robust rules look at every site's update: they cannot run on a securely aggregated sum.
ROBUST_STRATEGIES = (Strategy.median, Strategy.trimmed_mean)


@dataclass
class WindowConfig:
    """A CT display window mapped to one input channel in [0, 1]."""

    name: str = "brain"
    level: float = 40.0
    width: float = 80.0

    def __post_init__(self) -> None:
        if self.width <= 0:
            raise ConfigError(f"window '{self.name}': width must be > 0, got {self.width}")


def _fm_ct_windows() -> list[WindowConfig]:
    return [
        WindowConfig("brain", 40.0, 80.0),
        WindowConfig("subdural", 80.0, 200.0),
        WindowConfig("bone", 600.0, 2800.0),
    ]


@dataclass
class ModelConfig:
    """3D ViT encoder and DINO projection head sizes."""

    name: str = "tiny"
    image_size: int = 32
    patch_size: int = 8
    in_channels: int = 3
    hidden_size: int = 48
    num_layers: int = 2
    num_heads: int = 3
    mlp_dim: int = 96
    dropout: float = 0.0
    head_hidden: int = 64
    head_bottleneck: int = 32
    head_prototypes: int = 128
    # MAE's reconstruction decoder (only built with train.mim_objective=mae): a narrower
    # transformer over the encoder's patch tokens that predicts each patch's voxels.
    decoder_hidden: int = 48
    decoder_layers: int = 1
    decoder_heads: int = 3
    # Per-channel standardisation of the [0, 1] window channels, (x - mean) / std, as the
    # encoder's first step (MAE/DINO standardise their inputs too). Without it the patch content
    # is a fraction of the fixed sin-cos position table and the untrained encoder maps every scan
    # to nearly the same features. Defaults: the brain/subdural/bone channels of head CT after
    # FM-CT's preprocessing (measured on ctfed's synthetic heads; `ctfed prepare` records a
    # cache's own figures in its manifest and warns the site when they are far from these).
    # They belong to the model: checkpoints carry them, so fine-tuning and inference agree.
    input_mean: list[float] = field(default_factory=lambda: [0.32, 0.25, 0.20])
    input_std: list[float] = field(default_factory=lambda: [0.33, 0.30, 0.19])

    def __post_init__(self) -> None:
        if len(self.input_mean) != self.in_channels or len(self.input_std) != self.in_channels:
            raise ConfigError(
                f"model.input_mean and model.input_std need one value per input channel "
                f"(model.in_channels={self.in_channels}), got {list(self.input_mean)} and {list(self.input_std)}"
            )
        if any(not std > 0 for std in self.input_std):
            raise ConfigError(f"model.input_std must be > 0 for every channel, got {list(self.input_std)}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"model.image_size ({self.image_size}) must be a multiple of "
                f"model.patch_size ({self.patch_size})"
            )
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by "
                f"model.num_heads ({self.num_heads})"
            )
        # MONAI's 3D sin-cos position embedding splits the width over 3 axes x (sin, cos).
        if self.hidden_size % 6:
            raise ConfigError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by 6 "
                "(3D sin-cos position embedding)"
            )
        for name in ("num_layers", "mlp_dim", "head_hidden", "head_bottleneck", "head_prototypes",
                     "decoder_hidden", "decoder_layers", "decoder_heads"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be > 0")
        if self.decoder_hidden % self.decoder_heads or self.decoder_hidden % 6:
            raise ConfigError(
                f"model.decoder_hidden ({self.decoder_hidden}) must be divisible by model.decoder_heads "
                f"({self.decoder_heads}) and by 6 (3D sin-cos position embedding)"
            )

    @property
    def tokens_per_side(self) -> int:
        return self.image_size // self.patch_size


class SeriesPerStudy(str, enum.Enum):
    """How many CT series of one study ``prepare`` caches."""

    one = "one"  # the best-ranked series (preprocess.series_selection), the others rejected with why
    all = "all"  # every usable series (duplicates over-weight the study and share its label)


class SeriesTieBreak(str, enum.Enum):
    """Among series of equal pattern rank: which one ``prepare`` prefers."""

    thinnest = "thinnest"  # smallest SliceThickness, then most slices
    most_slices = "most_slices"  # most slices, then smallest SliceThickness


# Head-CT reconstruction kernels and descriptions worth training on, best first: brain /
# soft-tissue kernels (Siemens H/J/Q 2x-4x with or without r, GE STANDARD/SOFT, Canon FC1x-FC2x,
# Philips UA-UC). Case-insensitive regular expressions, matched with re.search.
def _preferred_series_patterns() -> list[str]:
    return [r"brain", r"soft", r"\b[HJQ]r?[2-4]\d", r"standard|\bstd\b", r"\bFC[12]\d", r"\bU[ABC]\b", r"head"]


# Kernels and descriptions for bone and lung (sharp, noisy, wrong texture for brain windows)
# and derived reformats; a series matching one is taken only if its study has nothing else.
def _excluded_series_patterns() -> list[str]:
    return [r"bone", r"lung", r"sharp", r"edge", r"\b[BHJQ]r?[6-9]\d", r"\bFC[3-8]\d", r"\bY[A-D]\b",
            r"\bmip\b", r"\bmpr\b", r"\bcor(?:onal)?\b", r"\bsag(?:ittal)?\b"]


@dataclass
class SeriesSelectionConfig:
    """Which CT series of a study ``prepare`` keeps when a study holds several.

    Hospitals reconstruct one acquisition several ways (thin bone kernel, thick soft-tissue
    kernel, reformats) and sometimes repeat a series. Caching them all over-weights the study
    and, because they share the study's label, lets one patient sit in both the training and
    the held-out part of a split. So by default one series per study is kept: the one whose
    SeriesDescription or ConvolutionKernel matches the earliest ``preferred`` pattern, series
    matching an ``excluded`` pattern last (excluded wins over preferred), then ``tie_break``.
    If the chosen series cannot be loaded, the next one is tried.
    """

    per_study: SeriesPerStudy = SeriesPerStudy.one
    preferred: list[str] = field(default_factory=_preferred_series_patterns)
    excluded: list[str] = field(default_factory=_excluded_series_patterns)
    tie_break: SeriesTieBreak = SeriesTieBreak.thinnest

    def __post_init__(self) -> None:
        # OmegaConf hands over the enum; direct construction may pass the value string.
        try:
            self.per_study = SeriesPerStudy(self.per_study)
            self.tie_break = SeriesTieBreak(self.tie_break)
        except ValueError as err:
            raise ConfigError(f"preprocess.series_selection: {err}") from None
        for name in ("preferred", "excluded"):
            for pattern in getattr(self, name):
                try:
                    re.compile(pattern)
                except re.error as err:
                    raise ConfigError(
                        f"preprocess.series_selection.{name}: {pattern!r} is not a regular expression ({err})"
                    ) from None


@dataclass
class PreprocessConfig:
    """How a HU volume becomes a cached, training-ready tensor (defaults: FM-CT)."""

    spacing_mm: float = 1.0
    # Voxels above this HU define the head's bounding box (foreground crop).
    foreground_hu: float = 0.0
    # FM-CT's 96^3; `ctfed simulate` caches at the model's input size instead (conf/simulate.yaml).
    output_size: int = 96
    windows: list[WindowConfig] = field(default_factory=_fm_ct_windows)
    # Gantry-tilted stacks: "resample" them onto an orthogonal grid, or "reject".
    gantry_tilt: str = "resample"
    # A slice gap that deviates from the series' median gap by more than
    # max(slice_gap_tolerance x median, slice_gap_tolerance_mm) means missing or irregular
    # slices, and the series is rejected: resampling across it would invent anatomy. The mm
    # term covers positions rounded in the header (thin slices, few decimals).
    slice_gap_tolerance: float = 0.1
    slice_gap_tolerance_mm: float = 0.0
    series_selection: SeriesSelectionConfig = field(default_factory=SeriesSelectionConfig)
    workers: int = 1

    def __post_init__(self) -> None:
        if self.spacing_mm <= 0:
            raise ConfigError("preprocess.spacing_mm must be > 0")
        if self.output_size < 8:
            raise ConfigError("preprocess.output_size must be >= 8")
        if self.gantry_tilt not in ("resample", "reject"):
            raise ConfigError("preprocess.gantry_tilt must be 'resample' or 'reject'")
        if not self.windows:
            raise ConfigError("preprocess.windows must list at least one window")
        if self.workers < 1:
            raise ConfigError("preprocess.workers must be >= 1")
        if not 0 <= self.slice_gap_tolerance < 1:
            raise ConfigError(
                f"preprocess.slice_gap_tolerance must be in [0, 1) (a fraction of the median slice gap; 1 or more "
                f"would accept missing slices), got {self.slice_gap_tolerance}"
            )
        if self.slice_gap_tolerance_mm < 0:
            raise ConfigError(f"preprocess.slice_gap_tolerance_mm must be >= 0, got {self.slice_gap_tolerance_mm}")
        if self.slice_gap_tolerance == 0 and self.slice_gap_tolerance_mm == 0:
            raise ConfigError(
                "preprocess.slice_gap_tolerance and slice_gap_tolerance_mm are both 0: header rounding alone "
                "would reject every series"
            )


class MIMObjective(str, enum.Enum):
    """What the student learns from its masked patch tokens (train.mim_objective)."""

    # iBOT / DINOv2: predict the teacher's prototype distribution for the same, unmasked patch.
    ibot = "ibot"
    # MAE's loss: a small decoder reconstructs the masked patches' voxels (normalised per
    # patch); masked tokens enter the encoder as the mask token, as in iBOT and SimMIM.
    mae = "mae"


class Precision(str, enum.Enum):
    """Compute precision of the training forward passes (weights and optimiser stay fp32)."""

    fp32 = "fp32"
    bf16 = "bf16"  # autocast to bfloat16: float32's range, no scaler needed; CPU and GPU
    fp16 = "fp16"  # autocast to float16 with a gradient scaler; GPU only


_DEVICE_SPEC = re.compile(r"^(auto|cpu|cuda|cuda:\d+)$")


def valid_device_spec(spec: str) -> bool:
    """auto, cpu, cuda or cuda:N (common/device.py resolves it)."""
    return bool(_DEVICE_SPEC.match(spec))


@dataclass
class AugmentConfig:
    """Random views for self-supervised training (``common/ssl.py`` MultiCrop3D), chosen so
    that no view removes what a head CT is read for: blood of 60-80 HU against 30-40 HU brain
    must stay brighter than brain after any draw, and no view shows an anatomy no scanner
    produces. Intensities are in window units ([0, 1] per channel); spatial sizes in mm, so
    one config means the same physics at every cache and model size.
    """

    # Mirror left <-> right (the cache's x axis). A head is nearly symmetric and findings occur
    # on either side; superior-inferior and anterior-posterior flips are never made (no scan
    # presents a head upside down or back to front).
    flip_lr_prob: float = 0.5
    # MONAI RandAffine: rotation about each axis uniform in +-rotate_degrees (head positioning
    # in the gantry varies by a few degrees) and per-axis scale in [1 - scale, 1 + scale]
    # (head size varies about 10%). Outside the field of view is air (0 in every window).
    affine_prob: float = 0.5
    rotate_degrees: float = 10.0
    scale: float = 0.1
    # Window jitter, per channel: the window width scales by 1 / (1 + c) with c uniform in
    # +-contrast (5% of 80 HU: 4 HU at the blood/brain step), the level moves by +-level_shift
    # of the width (3%: 2.4 HU in the brain window). Each applies with window_prob.
    window_prob: float = 0.8
    contrast: float = 0.05
    level_shift: float = 0.03
    # Additive Gaussian noise, std uniform in [0, noise_std] window units (0.02: 1.6 HU in
    # the brain window, below the 3-5 HU of a real soft-tissue kernel).
    noise_prob: float = 0.5
    noise_std: float = 0.02
    # Gaussian blur with sigma uniform in blur_sigma_mm (physical, converted with each view's
    # voxel size, which the cache's manifest records): [0.5, 1.5] mm is the spread between a
    # sharp and a soft reconstruction kernel. Without a known voxel size it is skipped (logged).
    blur_prob: float = 0.2
    blur_sigma_mm: list[float] = field(default_factory=lambda: [0.5, 1.5])

    def __post_init__(self) -> None:
        # Written as `not (low <= x <= high)` so that NaN fails too.
        for name in ("flip_lr_prob", "affine_prob", "window_prob", "noise_prob", "blur_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"train.augment.{name} must be a probability in [0, 1], got {value}")
        # Upper bounds: beyond them a view no longer shows a plausible head CT.
        limits = {"rotate_degrees": 45.0, "scale": 0.5, "contrast": 0.5, "level_shift": 0.5, "noise_std": 0.5}
        for name, limit in limits.items():
            value = getattr(self, name)
            if not 0.0 <= value <= limit:
                raise ConfigError(f"train.augment.{name} must be in [0, {limit:g}], got {value}")
        sigma = list(self.blur_sigma_mm)
        if len(sigma) != 2 or not 0.0 < sigma[0] <= sigma[1] <= 10.0:
            raise ConfigError(
                f"train.augment.blur_sigma_mm must be [low, high] mm with 0 < low <= high <= 10, got {sigma}"
            )


@dataclass
class TrainConfig:
    """Local self-supervised training at a site (one federated round)."""

    local_steps: int = 4
    batch_size: int = 2
    # Base learning rate per lr_reference_batch volumes: AdamW runs at
    # lr * batch_size * accumulation_steps / lr_reference_batch (DINO's linear scaling rule, 5e-4 per 256). At a
    # site's small batches an unscaled 5e-4 lets the student reach the teacher's still
    # input-independent target within a few steps.
    lr: float = 5e-4
    lr_reference_batch: int = 256
    weight_decay: float = 0.04
    grad_clip: float = 3.0
    teacher_momentum: float = 0.994
    student_temp: float = 0.1
    # Teacher temperature after its warm-up (DINO's 0.07; sharper early, see teacher_temp_warmup).
    teacher_temp: float = 0.07
    center_momentum: float = 0.9
    global_crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    local_crop_scale: list[float] = field(default_factory=lambda: [0.2, 0.5])
    num_local_crops: int = 2
    seed: int = 0
    # Cosine schedules run over the GLOBAL step (round * local_steps + local step), so a
    # federation and a standalone run with the same totals follow the same curves.
    min_lr: float = 1e-6
    weight_decay_end: float = 0.4
    teacher_momentum_end: float = 1.0
    # Linear LR warm-up over this share of the schedule horizon (schedule_rounds x local_steps;
    # DINO: 10 of 100 epochs).
    warmup_fraction: float = 0.1
    # Rounds the schedules span; 0: RunConfig fills in federation.rounds (one round if used alone).
    schedule_rounds: int = 0
    # What a site's EMA teacher encoder does when a new global encoder arrives:
    # "reset" copies the global student into it, "keep" keeps the site's own EMA.
    teacher_on_new_global: str = "reset"
    # Loss mix: total = dino_weight * DINO (CLS) + mim_weight * MIM (masked patch tokens, by
    # mim_objective). mim_weight = 0 switches masking off entirely and keeps the mask token frozen.
    dino_weight: float = 1.0
    mim_weight: float = 1.0
    mim_objective: MIMObjective = MIMObjective.ibot
    # MAE: reconstruct each patch normalised by its own mean and std (MAE's norm_pix_loss,
    # which gives better features than raw voxels).
    mae_norm_pix_loss: bool = True
    # iBOT/DINOv2 block masking of the student's global crops (iBOT objective only): this
    # fraction of them is masked, each at a ratio drawn from [low, high]; the others (and all
    # local crops) stay whole.
    mask_ratio: list[float] = field(default_factory=lambda: [0.1, 0.5])
    mask_probability: float = 0.5
    # MAE objective: every global crop hides this share of its patches (random, MAE's 75%),
    # and the encoder drops them (only visible tokens enter the blocks: cheaper per step).
    mae_mask_ratio: float = 0.75
    # DINO keeps the prototypes fixed at first: a moving last layer early on lets the student
    # chase a target that is still random. Share of the schedule horizon (DINO: 1 of 100 epochs).
    freeze_last_layer_fraction: float = 0.01
    # Teacher temperature warm-up: linear from teacher_temp_warmup to teacher_temp over this
    # share of the schedule horizon (DINO: 0.04 -> 0.07 over 30 epochs). A sharp early teacher
    # keeps the student from the uniform output that centring alone would lead to.
    teacher_temp_warmup: float = 0.04
    teacher_temp_warmup_fraction: float = 0.3
    # Local DP-SGD only: the DINO and iBOT centres are EMAs of the teacher's outputs on this
    # many public synthetic head volumes (common/reference.py), not on the site's scans, so
    # they cost no privacy (client/train.py says why).
    dp_center_volumes: int = 8
    # Where the site trains: auto (the first CUDA device if one is visible, else the CPU), cpu,
    # cuda or cuda:N. A site's node config `device` overrides it (the hospital picks the GPU).
    device: str = "auto"
    # fp32, bf16 (autocast, CPU or GPU) or fp16 (autocast + gradient scaler, GPU only).
    # Local DP-SGD runs in fp32 only: Opacus' per-sample gradients are not checked under autocast.
    precision: Precision = Precision.fp32
    # Recompute each transformer block's activations in the backward pass instead of keeping
    # them: less memory for more compute (not under local DP-SGD, whose hooks see every forward).
    # null (auto): on for a CPU site whose encoder has >= 50M parameters (ViT-B: a 2-step round
    # peaks at 3.3 GB instead of 7.3 GB, docs/benchmarks.md), off on a GPU, for smaller models and
    # under local DP-SGD; true/false force it.
    activation_checkpointing: Optional[bool] = None
    # Micro-batches of batch_size per optimiser step: the optimiser batch is their product (the
    # LR scales with it) while memory holds one micro-batch. Not under local DP-SGD (its Poisson
    # batches are the privacy unit of a step).
    accumulation_steps: int = 1
    # Worker processes that read volumes and make the crops ahead of the training step (0: the
    # training process does it). The crops of a seed are the same whatever the count.
    loader_workers: int = 0
    # FedProx: mu/2 * ||w - w_global||^2 on the student encoder keeps a site near the
    # global model when site data differ (0: off; federation.strategy=fedprox needs > 0).
    proximal_mu: float = 0.0
    # DINOv2's KoLeo spreading term on the student's global-crop CLS embeddings (per crop,
    # within the batch): total += koleo_weight * KoLeo. 0: off. It needs batch_size >= 2 and
    # couples the volumes of a batch, so local DP-SGD (per-volume gradients) refuses it.
    koleo_weight: float = 0.0
    # The random views of every crop (CT-appropriate; see AugmentConfig).
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        if self.local_steps < 1:
            raise ConfigError("train.local_steps must be >= 1")
        if self.proximal_mu < 0:
            raise ConfigError("train.proximal_mu must be >= 0")
        if self.batch_size < 1:
            raise ConfigError("train.batch_size must be >= 1")
        if self.lr <= 0:
            raise ConfigError("train.lr must be > 0")
        if self.lr_reference_batch < 1:
            raise ConfigError(f"train.lr_reference_batch must be >= 1, got {self.lr_reference_batch}")
        if not 0.0 <= self.teacher_momentum <= 1.0:
            raise ConfigError("train.teacher_momentum must be in [0, 1]")
        for name in ("global_crop_scale", "local_crop_scale"):
            lo_hi = getattr(self, name)
            if len(lo_hi) != 2 or not 0 < lo_hi[0] <= lo_hi[1] <= 1:
                raise ConfigError(f"train.{name} must be [low, high] with 0 < low <= high <= 1")
        if self.num_local_crops < 0:
            raise ConfigError("train.num_local_crops must be >= 0")
        if not 0.0 <= self.min_lr <= self.lr:
            raise ConfigError(f"train.min_lr must be in [0, train.lr={self.lr}], got {self.min_lr}")
        if self.weight_decay < 0 or self.weight_decay_end < 0:
            raise ConfigError("train.weight_decay and train.weight_decay_end must be >= 0")
        if not 0.0 <= self.teacher_momentum_end <= 1.0:
            raise ConfigError("train.teacher_momentum_end must be in [0, 1]")
        if self.student_temp <= 0 or self.teacher_temp <= 0:
            raise ConfigError("train.student_temp and train.teacher_temp must be > 0")
        if not 0.0 <= self.center_momentum <= 1.0:
            raise ConfigError("train.center_momentum must be in [0, 1]")
        for name in ("warmup_fraction", "freeze_last_layer_fraction", "teacher_temp_warmup_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"train.{name} must be in [0, 1] (a share of the schedule), got {getattr(self, name)}")
        if not 0.0 <= self.mae_mask_ratio < 1.0:
            raise ConfigError(f"train.mae_mask_ratio must be in [0, 1), got {self.mae_mask_ratio}")
        if not valid_device_spec(self.device):
            raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got '{self.device}'")
        if self.accumulation_steps < 1 or self.loader_workers < 0:
            raise ConfigError(
                f"train.accumulation_steps must be >= 1 and train.loader_workers >= 0, got "
                f"{self.accumulation_steps} and {self.loader_workers}"
            )
        if not 1 <= self.dp_center_volumes <= 64:
            raise ConfigError(f"train.dp_center_volumes must be in [1, 64], got {self.dp_center_volumes}")
        if self.schedule_rounds < 0:
            raise ConfigError("train.schedule_rounds must be >= 0 (0: federation.rounds)")
        if self.teacher_on_new_global not in ("reset", "keep"):
            raise ConfigError(
                f"train.teacher_on_new_global must be 'reset' or 'keep', got '{self.teacher_on_new_global}'"
            )
        if self.dino_weight < 0 or self.mim_weight < 0:
            raise ConfigError("train.dino_weight and train.mim_weight must be >= 0")
        if self.dino_weight == 0 and self.mim_weight == 0:
            raise ConfigError("train.dino_weight and train.mim_weight are both 0: nothing to train")
        if len(self.mask_ratio) != 2 or not 0 < self.mask_ratio[0] <= self.mask_ratio[1] < 1:
            raise ConfigError(
                f"train.mask_ratio must be [low, high] with 0 < low <= high < 1, got {list(self.mask_ratio)}"
            )
        if not 0.0 <= self.mask_probability <= 1.0:
            raise ConfigError(f"train.mask_probability must be in [0, 1], got {self.mask_probability}")
        if self.teacher_temp_warmup <= 0:
            raise ConfigError("train.teacher_temp_warmup must be > 0")
        if self.koleo_weight < 0:
            raise ConfigError(f"train.koleo_weight must be >= 0, got {self.koleo_weight}")
        if self.koleo_weight > 0 and self.batch_size < 2:
            raise ConfigError("train.koleo_weight > 0 needs train.batch_size >= 2 (a nearest neighbour in the batch)")

    @property
    def schedule_steps(self) -> int:
        """The horizon every schedule spans, in global steps."""
        return max(self.schedule_rounds, 1) * self.local_steps

    @property
    def optimizer_batch(self) -> int:
        """Volumes per optimiser step (micro-batch x accumulation steps)."""
        return self.batch_size * self.accumulation_steps

    @property
    def scaled_lr(self) -> float:
        """The peak learning rate AdamW runs at (linear scaling with the optimiser batch)."""
        return self.lr * self.optimizer_batch / self.lr_reference_batch

    @property
    def scaled_min_lr(self) -> float:
        return self.min_lr * self.optimizer_batch / self.lr_reference_batch

    def fraction_steps(self, fraction: float) -> int:
        """A share of the schedule horizon in whole global steps."""
        return int(round(fraction * self.schedule_steps))


# How much of the pretrained encoder a downstream fine-tune may change:
# "progressive": stage 0 linear probe, then the top blocks unfreeze one by one (arXiv 2507.12269);
# "full": every encoder weight trains from the first step (from scratch = fresh encoder + "full");
# "linear_probe": only the head trains, for the whole budget.
FINETUNE_MODES = ("progressive", "full", "linear_probe")


class FeaturePooling(str, enum.Enum):
    """Which of the encoder's output tokens the fine-tuning head reads (finetune.pooling)."""

    cls = "cls"  # the CLS token, what DINO trains
    mean_patch = "mean_patch"  # the mean of the patch tokens (MAE's fine-tuning default)
    cls_mean_patch = "cls_mean_patch"  # both, concatenated (DINOv2's linear evaluation)


@dataclass
class FinetuneConfig:
    """Supervised fine-tuning of a pretrained encoder with progressive freezing.

    Every mode spends ``probe_steps + stage_steps`` optimizer steps, so the three baselines
    compare at an equal budget. Fractions and block LRs are listed top block first.
    """

    mode: str = "progressive"  # one of FINETUNE_MODES
    # Stage 0: head only (the paper's 10 epochs), then stage 1 (its 20 epochs), in steps.
    probe_steps: int = 10
    stage_steps: int = 20
    # Progress of stage 1 at which the top, second and third block unfreeze.
    unfreeze_fractions: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.6])
    head_lr: float = 1e-3
    block_lrs: list[float] = field(default_factory=lambda: [5e-4, 2.5e-4, 1e-4])
    # Stem and lower blocks in mode "full" (progressive never trains them).
    backbone_lr: float = 1e-4
    weight_decay: float = 0.01
    # OneCycle warm-up share of each stage.
    warmup_fraction: float = 0.3
    grad_clip: float = 1.0
    batch_size: int = 4
    # One sigmoid output per name (1 name: binary task; K names: multi-label).
    label_names: list[str] = field(default_factory=lambda: ["label"])
    # The head's input: a local finding moves a few patch tokens, which the CLS token of an
    # encoder pretrained without DINO (MAE alone) does not summarise.
    pooling: FeaturePooling = FeaturePooling.cls
    seed: int = 0
    # Federated phase 2 only (``federation.finetune_rounds``); the split of the standalone
    # compare study is ``compare.test_fraction`` / ``compare.split_seed``.
    # Optimizer steps per site per phase-2 round (0: train.local_steps).
    local_steps: int = 0
    # Share of each site's labelled scans held out (stratified) to evaluate on every round.
    test_fraction: float = 0.5
    split_seed: int = 0
    # Bootstrap resamples of the per-round evaluation's confidence intervals (small: it runs every round).
    eval_n_boot: int = 50

    def __post_init__(self) -> None:
        if self.mode not in FINETUNE_MODES:
            raise ConfigError(f"finetune.mode must be one of {', '.join(FINETUNE_MODES)}, got '{self.mode}'")
        if self.probe_steps < 0 or self.stage_steps < 0 or self.probe_steps + self.stage_steps < 1:
            raise ConfigError("finetune.probe_steps and finetune.stage_steps must be >= 0 with a sum >= 1")
        fractions = list(self.unfreeze_fractions)
        if not fractions or any(not 0 <= f < 1 for f in fractions) or fractions != sorted(set(fractions)):
            raise ConfigError(
                f"finetune.unfreeze_fractions must be strictly increasing values in [0, 1), got {fractions}"
            )
        if len(self.block_lrs) != len(fractions):
            raise ConfigError(
                f"finetune.block_lrs ({len(self.block_lrs)} values) needs one LR per entry of "
                f"finetune.unfreeze_fractions ({len(fractions)})"
            )
        if min(self.head_lr, self.backbone_lr, *self.block_lrs) <= 0:
            raise ConfigError("finetune.head_lr, finetune.block_lrs and finetune.backbone_lr must be > 0")
        if self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("finetune.weight_decay and finetune.grad_clip must be >= 0")
        if not 0 < self.warmup_fraction < 1:
            raise ConfigError(f"finetune.warmup_fraction must be in (0, 1), got {self.warmup_fraction}")
        if self.batch_size < 1:
            raise ConfigError("finetune.batch_size must be >= 1")
        if not self.label_names or len(set(self.label_names)) != len(self.label_names):
            raise ConfigError(f"finetune.label_names must be non-empty and unique, got {list(self.label_names)}")
        if self.local_steps < 0:
            raise ConfigError(f"finetune.local_steps must be >= 0 (0: train.local_steps), got {self.local_steps}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"finetune.test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.eval_n_boot < 1:
            raise ConfigError(f"finetune.eval_n_boot must be >= 1, got {self.eval_n_boot}")

    @property
    def num_outputs(self) -> int:
        return len(self.label_names)

    @property
    def total_steps(self) -> int:
        return self.probe_steps + self.stage_steps


# A monitor split needs one scan of each class in the training and in the held-out part.
MIN_MONITOR_SCANS = 4


@dataclass
class MonitorConfig:
    """Representation monitor of every phase-1 round (common/monitor.py).

    Before local training each site with labelled scans scores the global encoder it received:
    kNN accuracy of its held-out scans (the phase-2 split, ``finetune.test_fraction`` /
    ``split_seed``) against its training scans, on the features the fine-tuning head would
    read (``finetune.pooling``), and their spread (feature-collapse check). Sites send the
    numbers as reply metrics; a site's ``policy.share_monitor: false`` keeps them.
    """

    enabled: bool = True
    knn_k: int = 3
    # At most this many labelled scans per site and round (a deterministic stratified subset of
    # the split): the monitor costs one encoder forward pass per scan, every round.
    max_scans: int = 64

    def __post_init__(self) -> None:
        if self.knn_k < 1:
            raise ConfigError(f"monitor.knn_k must be >= 1, got {self.knn_k}")
        if self.max_scans < MIN_MONITOR_SCANS:
            raise ConfigError(
                f"monitor.max_scans must be >= {MIN_MONITOR_SCANS} (one scan per class in the training and the "
                f"held-out part), got {self.max_scans}"
            )


class Transport(str, enum.Enum):
    """Float format of the plain path's update on the wire (sites cast, the coordinator
    upcasts to float32 before aggregating). Secure aggregation sends quantised integers
    instead; its size is ``secagg.modulus_bits``."""

    float32 = "float32"
    float16 = "float16"  # half the bytes; 11-bit mantissa, values beyond 65504 overflow
    bfloat16 = "bfloat16"  # half the bytes; float32's range, 8-bit mantissa


@dataclass
class FederationConfig:
    """Rounds and aggregation run by the coordinator."""

    rounds: int = 2
    # Phase 2 after the SSL rounds: federated progressive-freezing fine-tuning rounds on the
    # sites' labelled scans (``finetune:`` section); 0: no phase 2.
    finetune_rounds: int = 0
    strategy: Strategy = Strategy.fedavg
    fraction_train: float = 1.0
    min_sites: int = 2
    # Seconds the coordinator waits for site replies in one round.
    round_timeout_s: float = 600.0
    # A site update (weights minus the global weights) with a larger L2 norm is rejected:
    # far beyond what a few local optimiser steps can produce, so a bug or an attack.
    max_update_norm: float = 100.0
    # fedadam: the coordinator's Adam (Reddi et al. 2021, "Adaptive Federated Optimization").
    server_lr: float = 1e-2
    server_beta1: float = 0.9
    server_beta2: float = 0.99
    server_tau: float = 1e-3
    # trimmed_mean: fraction of the site values dropped at each end, per coordinate.
    trim_fraction: float = 0.2
    # Plain path (secagg.enabled=false): float format of each site's update on the wire.
    transport: Transport = Transport.float32
    # Stop the run (status "failed", non-zero exit) after this many consecutive rounds that
    # aggregated nothing: the sites would go on training for a model that never changes.
    # 3 rides out a site restarting; 0: never stop.
    max_failed_rounds: int = 3

    def __post_init__(self) -> None:
        if self.rounds < 1:
            raise ConfigError("federation.rounds must be >= 1")
        if self.max_failed_rounds < 0:
            raise ConfigError(f"federation.max_failed_rounds must be >= 0 (0: never stop), got {self.max_failed_rounds}")
        if self.finetune_rounds < 0:
            raise ConfigError(f"federation.finetune_rounds must be >= 0 (0: no phase 2), got {self.finetune_rounds}")
        if self.server_lr <= 0 or self.server_tau <= 0:
            raise ConfigError("federation.server_lr and federation.server_tau must be > 0")
        if not (0 <= self.server_beta1 < 1 and 0 <= self.server_beta2 < 1):
            raise ConfigError("federation.server_beta1 and federation.server_beta2 must be in [0, 1)")
        if not 0 <= self.trim_fraction < 0.5:
            raise ConfigError("federation.trim_fraction must be in [0, 0.5)")
        if not self.max_update_norm > 0:
            raise ConfigError("federation.max_update_norm must be > 0")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError("federation.fraction_train must be in (0, 1]")
        if self.min_sites < 1:
            raise ConfigError("federation.min_sites must be >= 1")


class PrivacyMode(str, enum.Enum):
    """Where differential-privacy noise is added (see ARCHITECTURE.md, "Differential privacy")."""

    none = "none"
    # Sample-level DP-SGD at every site (Opacus); each site accounts its own epsilon.
    local = "local"
    # Site-level DP: sites clip their update, the coordinator noises the uniform mean.
    central = "central"


@dataclass
class LocalDPConfig:
    """DP-SGD at a site: per-volume gradient clipping plus Gaussian noise, every local step."""

    noise_multiplier: float = 1.0
    # Per-volume L2 bound on the gradient (all crops of one volume together).
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    # (No seed or RNG knob: a site draws DP-SGD noise and Poisson batches from the operating
    # system's CSPRNG, always; client/dp_sgd.py.)

    def __post_init__(self) -> None:
        if not self.noise_multiplier > 0:
            raise ConfigError(f"privacy.local.noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not self.max_grad_norm > 0:
            raise ConfigError(f"privacy.local.max_grad_norm must be > 0, got {self.max_grad_norm}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"privacy.local.delta must be in (0, 1), got {self.delta}")


@dataclass
class CentralDPConfig:
    """Central DP: each site clips its whole update, the coordinator adds noise to the mean."""

    # L2 bound on one site's update (all tensors together).
    clip_norm: float = 1.0
    # Noise std on the mean = noise_multiplier * clip_norm / (number of aggregated sites).
    noise_multiplier: float = 1.0
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not self.clip_norm > 0:
            raise ConfigError(f"privacy.central.clip_norm must be > 0, got {self.clip_norm}")
        if not self.noise_multiplier > 0:
            raise ConfigError(f"privacy.central.noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"privacy.central.delta must be in (0, 1), got {self.delta}")


@dataclass
class PrivacyConfig:
    """Differential privacy of a run; travels to the sites with every round's instructions."""

    mode: PrivacyMode = PrivacyMode.none
    local: LocalDPConfig = field(default_factory=LocalDPConfig)
    central: CentralDPConfig = field(default_factory=CentralDPConfig)


# What a run is for; a site's policy lists the ones it takes part in.
PHASES = ("pretrain", "finetune")


@dataclass
class SitePolicy:
    """What a hospital's IT allows its site to take part in (``policy:`` in site.yaml).

    The defaults allow everything; every limit of 0 or an empty list means "no limit".
    The site checks each round's instructions against it before it reads any data.
    """

    allowed_phases: list[str] = field(default_factory=lambda: list(PHASES))
    require_secure_aggregation: bool = False
    # Refuse rounds whose aggregate may hold fewer sites than this (the coordinator's min_sites).
    min_sites: int = 1
    # Refuse rounds without differential privacy (local or central). Needs a bound on what
    # counts as DP (max_epsilon, max_round_epsilon or min_noise_multiplier): any noise at all
    # would otherwise meet it.
    require_dp: bool = False
    # Privacy budget over every round ever run, epsilon at ``delta``, computed by the site
    # itself from its own ledger of the mode in use (local: DP-SGD, a volume is the unit;
    # central: one entry per round, this site's whole update is the unit; docs/security.md).
    # A round that would take the site past it is refused. 0: no budget.
    max_epsilon: float = 0.0
    # The delta at which the site computes (and reports) every epsilon.
    delta: float = 1e-5
    # Largest epsilon (at ``delta``) one round may add on its own. 0: no limit.
    max_round_epsilon: float = 0.0
    # Smallest noise multiplier a DP round may use (privacy.local / privacy.central). 0: none.
    min_noise_multiplier: float = 0.0
    # Largest delta a DP round may name in its config (privacy.*.delta). 0: no limit.
    max_delta: float = 0.0
    # Largest train.local_steps (x train.accumulation_steps: micro-batches) per round (0: any).
    max_local_steps: int = 0
    # model.name values allowed (empty: any), and size limits (0: any).
    allowed_models: list[str] = field(default_factory=list)
    max_hidden_size: int = 0
    max_layers: int = 0
    # Send the model card's data summary (scan count, slice and spacing ranges, positives per
    # label) with each SSL round's metrics. Counts only, never an identifier; but they travel
    # in clear and outside any DP guarantee, so a site may keep them.
    share_data_summary: bool = True
    # Counts of the data summary below this (scans, labelled scans, positives per label, and
    # positives whose negatives are below it) are not sent: small cells single people out.
    # 0 sends every count.
    min_reported_count: int = 5
    # Send the representation monitor's numbers (kNN accuracy, feature spread and the number of
    # labelled scans behind them; common/monitor.py) with each SSL round's metrics. Aggregate
    # statistics of labelled scans, in clear and outside any DP guarantee, like the summary.
    share_monitor: bool = True
    # Secure aggregation floor: reveal nothing unless the coordinator's reconstruction
    # threshold t exceeds this fraction of the site's neighbourhood n (t > f * n). Bonawitz
    # et al. need t > 2n/3 against a coordinator colluding with up to n/3 sites; at or below
    # n/2 a coordinator can tell two halves different survivor lists and rebuild both secrets.
    min_secagg_threshold_fraction: float = 2 / 3

    def __post_init__(self) -> None:
        unknown = sorted(set(self.allowed_phases) - set(PHASES))
        if unknown:
            raise ConfigError(f"policy.allowed_phases: unknown phases {unknown}; choose from {', '.join(PHASES)}")
        if self.min_sites < 1:
            raise ConfigError(f"policy.min_sites must be >= 1, got {self.min_sites}")
        if self.max_epsilon < 0:
            raise ConfigError(f"policy.max_epsilon must be >= 0 (0: no budget), got {self.max_epsilon}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"policy.delta must be in (0, 1), got {self.delta}")
        for name in ("max_round_epsilon", "min_noise_multiplier"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"policy.{name} must be >= 0 (0: no limit), got {getattr(self, name)}")
        if not 0 <= self.max_delta < 1:
            raise ConfigError(f"policy.max_delta must be in [0, 1) (0: no limit), got {self.max_delta}")
        if self.require_dp and not (self.max_epsilon or self.max_round_epsilon or self.min_noise_multiplier):
            raise ConfigError(
                "policy.require_dp needs a bound on the privacy it accepts: set policy.max_epsilon, "
                "policy.max_round_epsilon or policy.min_noise_multiplier (any noise at all would meet it otherwise)"
            )
        for name in ("max_local_steps", "max_hidden_size", "max_layers", "min_reported_count"):
            if getattr(self, name) < 0:
                raise ConfigError(f"policy.{name} must be >= 0 (0: no limit), got {getattr(self, name)}")
        if not 0.5 <= self.min_secagg_threshold_fraction < 1:
            raise ConfigError(
                "policy.min_secagg_threshold_fraction must be in [0.5, 1) (a threshold at or below half the "
                f"neighbourhood lets a coordinator rebuild both of a site's secrets), got {self.min_secagg_threshold_fraction}"
            )



@dataclass
class NamedSitePolicy(SitePolicy):
    """A simulated site's own policy (``simulation.site_policies``)."""

    site: str = ""

@dataclass
class SecAggConfig:
    """Secure aggregation (SecAgg+ on ctfed's own round loop; see common/secagg.py).

    With ``enabled`` the coordinator only ever sees the sum of masked, quantised site
    deltas. ``num_shares`` is a site's neighbourhood size (itself included); any
    ``reconstruction_threshold`` of them can rebuild its masks if it drops out, and
    fewer learn nothing. Against a coordinator that deviates from the protocol the
    threshold must exceed 2/3 of the neighbourhood (Bonawitz et al. 2017), which sites
    enforce themselves (``SitePolicy.min_secagg_threshold_fraction``). Deltas are clipped
    to +-``clipping_range`` per value and quantised to ``quantization_range`` steps over
    [-c, c]; sums are taken modulo 2**``modulus_bits``.
    """

    enabled: bool = True
    num_shares: int = 5
    # 0: the smallest integer above 2/3 of each round's neighbourhood size n (4 of 5, 3 of 3
    # or 4, 2 of 2), so n - t neighbours may drop out. An explicit value is used as given;
    # sites refuse a round whose threshold is not above their floor (2/3 of n by default).
    reconstruction_threshold: int = 0
    clipping_range: float = 1.0
    quantization_range: int = 2**40
    modulus_bits: int = 64
    # A site's weight is its number of training examples, capped here.
    max_weight: int = 4096
    # Most sites one secure round may include; with max_weight it bounds the modular sum.
    max_sites: int = 64
    # Seconds the coordinator waits for replies in each protocol stage after training.
    stage_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        if self.num_shares < 3:
            raise ConfigError(f"secagg.num_shares must be >= 3, got {self.num_shares}")
        # A strict majority is the least that stops a coordinator telling one half of a
        # site's neighbours it dropped and the other half it survived. It is NOT enough
        # against a coordinator that deviates: that needs t > 2n/3 of the round's actual
        # neighbourhood n (Bonawitz et al. 2017), which each site checks itself before it
        # reveals anything (SitePolicy.min_secagg_threshold_fraction); the default (0) is
        # always above 2n/3.
        if self.reconstruction_threshold and not self.num_shares / 2 < self.reconstruction_threshold <= self.num_shares:
            raise ConfigError(
                f"secagg.reconstruction_threshold ({self.reconstruction_threshold}) must be more than half "
                f"of secagg.num_shares ({self.num_shares}) and at most num_shares (0: above 2/3, automatic)"
            )
        if not self.clipping_range > 0:
            raise ConfigError("secagg.clipping_range must be > 0")
        if self.modulus_bits not in (32, 64):
            raise ConfigError(f"secagg.modulus_bits must be 32 or 64, got {self.modulus_bits}")
        if self.quantization_range < 2 or self.quantization_range % 2:
            raise ConfigError("secagg.quantization_range must be an even integer >= 2")
        if self.max_weight < 1 or self.max_sites < 2:
            raise ConfigError("secagg.max_weight must be >= 1 and secagg.max_sites >= 2")
        # Each site adds weight * q with |q| <= quantization_range / 2; the signed sum must
        # stay inside (-2**(bits-1), 2**(bits-1)) or it wraps and the mean is garbage.
        worst_sum = self.max_sites * self.max_weight * (self.quantization_range // 2)
        if worst_sum >= 2 ** (self.modulus_bits - 1):
            fits = self.largest_quantization_range()
            advice = (
                f"the largest quantization_range that fits is {fits} (2**{fits.bit_length() - 1}, a step of "
                f"{2 * self.clipping_range / fits:.2g})" if fits else "no quantization_range fits"
            )
            raise ConfigError(
                f"secagg: max_sites * max_weight * quantization_range / 2 = {worst_sum} does not fit in "
                f"a signed {self.modulus_bits}-bit sum (limit 2**{self.modulus_bits - 1}); with max_sites="
                f"{self.max_sites} and max_weight={self.max_weight}, {advice}; lower quantization_range, "
                "max_weight or max_sites, or use modulus_bits=64"
            )
        if not self.stage_timeout_s > 0:
            raise ConfigError("secagg.stage_timeout_s must be > 0")

    def largest_quantization_range(self) -> int:
        """The largest power-of-two quantization_range whose worst-case signed sum fits in
        ``modulus_bits`` with ``max_sites`` sites of weight ``max_weight`` (0: none does)."""
        half = (2 ** (self.modulus_bits - 1) - 1) // (self.max_sites * self.max_weight)
        # quantization_range / 2 may be at most ``half``: the largest power of two below it, doubled.
        return 0 if half < 1 else 2 ** half.bit_length()


@dataclass
class SynthConfig:
    """Synthetic hospitals for simulations and demos."""

    sites: int = 3
    scans_per_site: int = 4
    # Sites of different sizes: one scan count per site (overrides scans_per_site); empty: all equal.
    scans_per_site_list: list[int] = field(default_factory=list)
    seed: int = 0
    # Multiplies every synthetic finding's size (haematoma radii, collection widths, sulcal
    # lines, dilation of blood-filled ventricles). 1.0: realistic sizes, which at the tiny
    # model's 32^3 input blur into the skull's rim or a few voxels; the compare preset
    # enlarges them so the labels are learnable at that size (README, "Comparing ...").
    finding_scale: float = 1.0
    # Chance per scan of each structural finding (simulations/phantom.py: not bright voxels,
    # each its own label column beside the haemorrhages and `any`), drawn independently of
    # each other and of the haemorrhages (whose rate each site's profile sets). 0.3 gives
    # every task positives and negatives at a few dozen scans; 0 leaves the pixels of a scan
    # without that finding exactly as they were.
    hydrocephalus_prevalence: float = 0.3
    mass_effect_prevalence: float = 0.3
    infarct_prevalence: float = 0.3
    fracture_prevalence: float = 0.3
    atrophy_prevalence: float = 0.3

    def __post_init__(self) -> None:
        if self.sites < 1 or self.scans_per_site < 1:
            raise ConfigError("synth.sites and synth.scans_per_site must be >= 1")
        if not self.finding_scale > 0:
            raise ConfigError(f"synth.finding_scale must be > 0 (1.0: realistic finding sizes), got {self.finding_scale}")
        for name, prevalence in self.structural_prevalence.items():
            if not 0.0 <= prevalence <= 1.0:
                raise ConfigError(f"synth.{name}_prevalence must be in [0, 1] (a chance per scan), got {prevalence}")
        if self.scans_per_site_list:
            if len(self.scans_per_site_list) != self.sites:
                raise ConfigError(
                    f"synth.scans_per_site_list has {len(self.scans_per_site_list)} entries for "
                    f"synth.sites={self.sites}; give one scan count per site"
                )
            if min(self.scans_per_site_list) < 1:
                raise ConfigError(f"synth.scans_per_site_list entries must be >= 1, got {list(self.scans_per_site_list)}")

    @property
    def scan_counts(self) -> list[int]:
        """Scans to write at each site, in site order."""
        return list(self.scans_per_site_list) or [self.scans_per_site] * self.sites

    @property
    def structural_prevalence(self) -> dict[str, float]:
        """{structural finding: prevalence}, the names simulations/phantom.py uses."""
        return {
            "hydrocephalus": self.hydrocephalus_prevalence,
            "mass_effect": self.mass_effect_prevalence,
            "infarct": self.infarct_prevalence,
            "fracture": self.fracture_prevalence,
            "atrophy": self.atrophy_prevalence,
        }


class FaultKind(str, enum.Enum):
    """Site failures a simulation can inject (the ``faults`` preset; tests of the round loop)."""

    crash = "crash"  # the ClientApp raises: the site dies mid-round
    nan_update = "nan_update"  # the update contains NaN (plain "nan" would parse as a float)
    huge_update = "huge_update"  # the update is scaled far beyond any real training step
    straggle = "straggle"  # the reply comes ``delay_s`` late (past the round timeout if long enough)


@dataclass
class FaultConfig:
    """One injected failure of one simulated site."""

    # Simulated site index (0 = the first site cache, as in results.json order of the caches).
    site: int = 0
    kind: FaultKind = FaultKind.crash
    # Rounds in which the fault happens (1-based); empty: every round.
    rounds: list[int] = field(default_factory=list)
    # STRAGGLE only: seconds the site waits before training.
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.site < 0:
            raise ConfigError("simulation.faults[].site must be >= 0")
        if any(r < 1 for r in self.rounds):
            raise ConfigError("simulation.faults[].rounds are 1-based round numbers")
        if self.kind is FaultKind.straggle and self.delay_s <= 0:
            raise ConfigError("a straggle fault needs delay_s > 0")


@dataclass
class SimulationConfig:
    """Flower simulation engine resources."""

    # Folder holding one prepared cache per site (``<dir>/<site>/manifest.json``).
    # Empty: synthesise ``synth.sites`` hospitals and prepare them inside the run folder.
    data_dir: str = ""
    client_cpus: int = 1
    # GPU share of each simulated site (Flower's client-resources.num-gpus; Ray packs sites
    # onto GPUs by it): 0.5 runs two sites per GPU. 0: CPU only. With train.device=auto a site
    # that gets a share trains on its GPU.
    client_gpus: float = 0.0
    # Seconds to wait for the whole federation before giving up.
    timeout_s: float = 3600.0
    # Injected site failures; any entry switches the simulated sites to the fault-injecting
    # ClientApp (simulations/faults.py), which deployed sites never run.
    faults: list[FaultConfig] = field(default_factory=list)
    # Every simulated site's policy (default: permissive), and whole replacements for named
    # sites (site = the cache folder's name), e.g.
    # simulation.site_policies=[{site:site_1,max_local_steps:1}]. A list, not a mapping,
    # because Hydra cannot add new keys to a mapping from the command line.
    site_policy: SitePolicy = field(default_factory=SitePolicy)
    site_policies: list[NamedSitePolicy] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.client_cpus < 1 or self.client_gpus < 0:
            raise ConfigError(
                f"simulation.client_cpus must be >= 1 and simulation.client_gpus >= 0, got "
                f"{self.client_cpus} and {self.client_gpus}"
            )
        names = [p.site for p in self.site_policies]
        if any(not name for name in names):
            raise ConfigError("simulation.site_policies: every entry needs 'site' (the site id)")
        if len(set(names)) != len(names):
            raise ConfigError(f"simulation.site_policies names a site twice: {names}")

    def policy_for(self, site_id: str) -> SitePolicy:
        for named in self.site_policies:
            if named.site == site_id:
                return SitePolicy(**{f.name: getattr(named, f.name) for f in fields(SitePolicy)})
        return self.site_policy


class SplitMethod(str, enum.Enum):
    """How ``split`` divides a pooled cache into simulated sites."""

    iid = "iid"  # a seeded shuffle cut into near-equal parts
    dirichlet = "dirichlet"  # label skew: per class, site shares ~ Dir(alpha) (Hsu et al. 2019)
    by_site = "by_site"  # the natural split: each entry stays with the site it came from


@dataclass
class SplitConfig:
    """Simulated sites cut from one pooled prepared cache (``split.pooled_cache``).

    The pool is either one cache (``<dir>/manifest.json``, e.g. ``ctfed prepare`` on a whole
    archive) or a folder of caches (``<dir>/<site>/manifest.json``), whose entries then carry
    their origin site (needed by ``by_site``). Each simulated site gets a manifest view in
    the run folder that points at the pooled volumes; nothing is copied.
    """

    # Empty: no split (synthesise hospitals, or simulation.data_dir).
    pooled_cache: str = ""
    method: SplitMethod = SplitMethod.iid
    # Simulated sites for iid and dirichlet; by_site takes them from the pool (0, or their number).
    sites: int = 4
    # Dirichlet concentration: small -> each site sees few classes, large -> close to iid.
    alpha: float = 0.5
    # Manifest label column the Dirichlet split skews (entries without it form their own class).
    label: str = "any"
    seed: int = 0
    # Fewest scans a site may get; a Dirichlet draw that leaves a site below it is redrawn.
    min_scans: int = 2
    # Dirichlet redraws before giving up with an error that says what to change.
    max_draws: int = 1000

    def __post_init__(self) -> None:
        if self.alpha <= 0:
            raise ConfigError(f"split.alpha must be > 0, got {self.alpha}")
        if self.min_scans < 1:
            raise ConfigError(f"split.min_scans must be >= 1, got {self.min_scans}")
        if self.max_draws < 1:
            raise ConfigError(f"split.max_draws must be >= 1, got {self.max_draws}")
        if self.method is SplitMethod.by_site:
            if self.sites < 0:
                raise ConfigError(f"split.sites must be >= 0 for by_site (0: one per origin site), got {self.sites}")
        elif self.sites < 1:
            raise ConfigError(f"split.sites must be >= 1 for split.method={self.method.value}, got {self.sites}")
        if not self.label.strip():
            raise ConfigError("split.label must name a manifest label column, e.g. 'any'")

    @property
    def enabled(self) -> bool:
        return bool(self.pooled_cache)


def _synthetic_finetune() -> FinetuneConfig:
    # The synthetic hospitals' labels.csv has one column per finding plus "any".
    return FinetuneConfig(label_names=["any"])


@dataclass
class CompareConfig:
    """The ``compare`` study: federated vs centralized vs local-only vs scratch encoders.

    With ``enabled``, ``ctfed simulate`` trains the other arms after the federation, on the same
    sites and the same pretraining budget, and fine-tunes every arm at every site
    (simulations/compare.py). Targets are AUROC differences the verdicts are checked against.
    """

    enabled: bool = False
    # Downstream task; finetune.mode is the primary mode the verdicts use.
    finetune: FinetuneConfig = field(default_factory=_synthetic_finetune)
    # Further fine-tuning modes reported as baselines (each costs one fine-tune per arm and site).
    baseline_modes: list[str] = field(default_factory=list)
    # Share of each site's labelled scans held out for testing, per class (stratified).
    test_fraction: float = 0.5
    split_seed: int = 0
    n_boot: int = 1000
    # Neighbours of the kNN representation monitor (capped at the training scans of a site).
    knn_k: int = 3
    # Local-only pretraining at every site, or only at the smallest one.
    local_only_all_sites: bool = True
    # One more federation with the other train.teacher_on_new_global policy ("reset" vs
    # "keep"), evaluated like the federated arm: compare.md's "Teacher policy" section.
    teacher_policies: bool = False
    # Verdict targets in AUROC: pretrained must beat scratch, federated must beat local-only at
    # the smallest site, by more than these; centralized may lead federated by at most this.
    target_gain_over_scratch: float = 0.0
    target_gain_over_local_only: float = 0.0
    max_gap_to_centralized: float = 0.05

    def __post_init__(self) -> None:
        unknown = [m for m in self.baseline_modes if m not in FINETUNE_MODES]
        if unknown:
            raise ConfigError(f"compare.baseline_modes must be among {', '.join(FINETUNE_MODES)}, got {unknown}")
        if self.finetune.mode in self.baseline_modes or len(set(self.baseline_modes)) != len(self.baseline_modes):
            raise ConfigError(
                f"compare.baseline_modes {list(self.baseline_modes)} must be unique and must not repeat "
                f"compare.finetune.mode '{self.finetune.mode}'"
            )
        if not 0.0 < self.test_fraction < 1.0:
            raise ConfigError(f"compare.test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.n_boot < 1 or self.knn_k < 1:
            raise ConfigError("compare.n_boot and compare.knn_k must be >= 1")
        if self.max_gap_to_centralized < 0:
            raise ConfigError("compare.max_gap_to_centralized must be >= 0")

    @property
    def modes(self) -> list[str]:
        """Fine-tuning modes to run, the primary one first."""
        return [self.finetune.mode, *self.baseline_modes]


@dataclass
class SweepArm:
    """One federation of a sweep: a name and the overrides that make it differ from the base run."""

    name: str = ""
    overrides: list[str] = field(default_factory=list)


@dataclass
class SweepConfig:
    """The ``privacy`` study (or any sweep): after the base federation, one more federation per
    arm on the same site caches, each fine-tuned and tested at every site as in ``compare``
    (its ``compare.finetune`` settings), epsilon against AUROC in sweep.md
    (simulations/sweep.py)."""

    enabled: bool = False
    # Name of the base run's arm in the tables.
    base_name: str = "base"
    arms: list[SweepArm] = field(default_factory=list)

    def __post_init__(self) -> None:
        names = [self.base_name, *(arm.name for arm in self.arms)]
        bad = [n for n in names if not SITE_ID_RULE.match(n)]
        if bad:
            raise ConfigError(f"sweep arm names become folder names; use letters, digits, '.', '_' or '-': {bad}")
        if len(set(names)) != len(names):
            raise ConfigError(f"sweep arm names must be unique (the base is '{self.base_name}'): {names}")
        for arm in self.arms:
            forbidden = [o for o in arm.overrides if o.split("=", 1)[0].split(".")[0] in ("model", "synth", "simulation", "sweep", "compare")]
            if forbidden:
                raise ConfigError(
                    f"sweep arm '{arm.name}': {forbidden} would change what the arms are compared on; "
                    "an arm may change federation, train, privacy and secagg settings"
                )


@dataclass
class RunConfig:
    """Everything one ``ctfed simulate`` run needs; written to the run folder."""

    model: ModelConfig = field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    secagg: SecAggConfig = field(default_factory=SecAggConfig)
    synth: SynthConfig = field(default_factory=SynthConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    # Sites cut from one pooled cache (empty split.pooled_cache: off).
    split: SplitConfig = field(default_factory=SplitConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    # Phase 2 (federation.finetune_rounds > 0): the downstream task and its recipe. Label
    # names are columns of the sites' labels.csv (the synthetic hospitals: findings and "any").
    finetune: FinetuneConfig = field(default_factory=_synthetic_finetune)
    # Phase 1: each site's kNN / feature-spread monitor of the global encoder, every round
    # (its split and features follow ``finetune``: label_names, test_fraction, split_seed, pooling).
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    # Parent folder for run folders; each run gets ``<output_dir>/<run_name>``.
    output_dir: str = "runs"
    run_name: str = ""

    def __post_init__(self) -> None:
        # Training crops are resized to model.image_size, so a larger cache works with any
        # model; a smaller one would only upsample what the cache already lost.
        if self.preprocess.output_size < self.model.image_size:
            raise ConfigError(
                f"preprocess.output_size ({self.preprocess.output_size}) is smaller than "
                f"model.image_size ({self.model.image_size}); prepare caches at least that large"
            )
        if len(self.preprocess.windows) != self.model.in_channels:
            raise ConfigError(
                f"model.in_channels ({self.model.in_channels}) must equal the number of "
                f"preprocess.windows ({len(self.preprocess.windows)})"
            )
        if self.train.schedule_rounds == 0:
            self.train.schedule_rounds = self.federation.rounds
        self._check_strategy()
        simulated_sites = self._simulated_sites()
        if self.secagg.enabled and simulated_sites and simulated_sites > self.secagg.max_sites:
            raise ConfigError(
                f"{simulated_sites} simulated sites exceed secagg.max_sites={self.secagg.max_sites}, which the "
                "quantisation bound is sized for; raise secagg.max_sites (with modulus_bits=32, lower "
                "quantization_range to fit)"
            )
        if self.federation.transport is not Transport.float32 and self.secagg.enabled:
            raise ConfigError(
                f"federation.transport={self.federation.transport.value} compresses the plain path's updates; with "
                "secure aggregation the sites send quantised integers: use secagg.modulus_bits=32 to halve them "
                "(or secagg.enabled=false)"
            )
        self._check_finetune_rounds()
        if self.split.enabled and self.simulation.data_dir:
            raise ConfigError(
                "split.pooled_cache and simulation.data_dir both name the sites' data; set one of them"
            )
        if self.split.enabled and self.split.method is not SplitMethod.by_site:
            beyond = sorted({f.site for f in self.simulation.faults if f.site >= self.split.sites})
            if beyond:
                raise ConfigError(f"simulation.faults name sites {beyond}, but split.sites is {self.split.sites}")
        elif not self.simulation.data_dir and not self.split.enabled:
            beyond = sorted({f.site for f in self.simulation.faults if f.site >= self.synth.sites})
            if beyond:
                raise ConfigError(f"simulation.faults name sites {beyond}, but synth.sites is {self.synth.sites}")


    def _simulated_sites(self) -> int:
        """Sites ``ctfed simulate`` will run, when the config alone says (0: not known here)."""
        if self.simulation.data_dir:
            return 0
        if self.split.enabled:
            return 0 if self.split.method is SplitMethod.by_site else self.split.sites
        return self.synth.sites

    def _check_finetune_rounds(self) -> None:
        if not self.federation.finetune_rounds:
            return
        if self.privacy.mode is PrivacyMode.local:
            raise ConfigError(
                "federation.finetune_rounds > 0 with privacy.mode=local: per-volume DP-SGD is implemented for SSL "
                "pretraining only; use privacy.mode=central or none for phase 2"
            )
        if self.federation.strategy is Strategy.fedprox:
            raise ConfigError(
                "federation.strategy=fedprox has no proximal term in phase-2 fine-tuning; "
                "use fedavg or fedadam with federation.finetune_rounds > 0"
            )

    def _check_strategy(self) -> None:
        strategy = self.federation.strategy
        if strategy in ROBUST_STRATEGIES and self.secagg.enabled:
            raise ConfigError(
                f"federation.strategy={strategy.value} needs every site's update, which secure aggregation hides; "
                "set secagg.enabled=false or use fedavg, fedprox or fedadam"
            )
        if strategy in ROBUST_STRATEGIES and self.privacy.mode is PrivacyMode.central:
            raise ConfigError(f"central DP calibrates its noise to a uniform mean; it cannot follow {strategy.value}")
        if strategy is Strategy.fedprox and self.train.proximal_mu <= 0:
            raise ConfigError("federation.strategy=fedprox needs train.proximal_mu > 0 (e.g. 0.01)")
        if self.train.proximal_mu > 0 and self.privacy.mode is PrivacyMode.local:
            raise ConfigError("train.proximal_mu is not available with local DP-SGD (per-volume clipping)")
        if self.train.koleo_weight > 0 and self.privacy.mode is PrivacyMode.local:
            raise ConfigError(
                "train.koleo_weight > 0 is not available with local DP-SGD: KoLeo couples the volumes of a batch "
                "(each is pushed from its nearest neighbour), so there is no per-volume gradient to clip; "
                "set train.koleo_weight=0 with privacy.mode=local"
            )


def register_configs() -> None:
    """Make the schemas known to Hydra (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="run_schema", node=RunConfig)
    cs.store(group="model", name="model_schema", node=ModelConfig)


T = TypeVar("T")


def _valid_keys_hint(message: str, schema: Any) -> str:
    """Name the valid keys of the config node a bad key was aimed at."""
    match = (
        re.search(r"full_key: ([\w.]+)", message)
        or re.search(r"override '([\w.]+)'", message)
        or re.search(r"Key '([\w.]+)'", message)
    )
    if match is None:
        return ""
    parts = match.group(1).split(".")
    node: Any = schema
    path: list[str] = []
    for part in parts:
        names = [f.name for f in fields(node)] if is_dataclass(node) else []
        if part not in names:
            close = difflib.get_close_matches(part, names, n=1)
            where = ".".join(path) or "the top level"
            hint = f"\nValid keys at {where}: {', '.join(names)}"
            if close:
                hint += f"\nDid you mean '{'.'.join(path + [close[0]])}'?"
            return hint
        default = next(f for f in fields(node) if f.name == part)
        node = default.default_factory() if callable(default.default_factory) else default.default  # type: ignore[misc]
        path.append(part)
    return ""


def _describe_hydra_error(err: Exception) -> str:
    # Hydra's advice to append with '+' would silently add an ignored key: drop it.
    lines = [line for line in str(err).strip().splitlines() if "To append to your config" not in line]
    cause = err.__cause__
    if cause is not None and str(cause).strip() and str(cause).strip() not in lines:
        lines.append(str(cause).strip().splitlines()[0])
    message = "\n".join(lines)
    return f"invalid configuration: {message}{_valid_keys_hint(message, RunConfig())}"


def load_run_config(overrides: Sequence[str] = (), config_name: str = "simulate") -> RunConfig:
    """Compose ``conf/<config_name>.yaml`` with Hydra overrides and validate it.

    Raises ConfigError with the valid keys when an override names an unknown key.
    """
    register_configs()
    try:
        with initialize_config_module(config_module=CONFIG_MODULE, version_base="1.3"):
            cfg = compose(config_name=config_name, overrides=list(overrides))
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(_describe_hydra_error(err)) from None
    return to_run_config(cfg)


def to_section(schema: type[T], values: DictConfig | dict) -> T:
    """Validate plain values against a config dataclass (types, unknown keys, rules)."""
    try:
        obj = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), values))
    except OmegaConfBaseException as err:
        message = str(err).strip()
        raise ConfigError(f"invalid configuration: {message}{_valid_keys_hint(message, schema())}") from None
    assert isinstance(obj, schema)
    return obj


def to_run_config(cfg: DictConfig | dict) -> RunConfig:
    """Validate a composed or saved config and turn it into a RunConfig."""
    return to_section(RunConfig, cfg)


def save_run_config(cfg: RunConfig, path: Path) -> None:
    write_text_atomic(path, OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def read_run_config(path: Path) -> RunConfig:
    if not path.is_file():
        raise ConfigError(f"run config file not found: {path}")
    return to_run_config(OmegaConf.load(path))


_ADDRESS_RULE = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):(\d{1,5})$")


@dataclass
class SiteConfig:
    """One hospital's SuperNode (``ctfed site --config site.yaml``; example in ``conf/site.yaml``).

    Relative paths are resolved against the YAML file's folder, so a site's folder can be
    moved as a whole. ``check_files`` is separate from ``__post_init__`` so a config can be
    validated for shape on a machine that does not hold the files.
    """

    # Name the coordinator knows this site by; appears in results.json.
    site_id: str = MISSING
    # A prepared cache (``ctfed prepare`` output): a folder with manifest.json.
    data_path: str = MISSING
    # SuperLink address as host:port; the host must be a name in the server certificate.
    superlink: str = MISSING
    # The federation CA certificate (``ca.crt`` from the coordinator).
    ca_cert: str = MISSING
    # This site's SuperNode auth key (OpenSSH EC private key from ``ctfed certs``).
    private_key: str = MISSING
    # This site's long-term secure-aggregation signing key (Ed25519, PEM; made AT the site by
    # ``ctfed site --make-signing-key``). It signs the site's key advertisements and survivor
    # sets. Empty: the site cannot authenticate itself and refuses secure-aggregation rounds.
    signing_key: str = ""
    # The federation roster pinned at this hospital: site id -> Ed25519 signing public key of
    # every site (YAML). Neighbours are verified against it, never against what the
    # coordinator forwards. Empty: the site refuses secure-aggregation rounds.
    roster: str = ""
    # Folder for the SuperNode's log, Flower home, privacy ledger and audit log (the site's
    # state folder). Empty: ``<data_path>/../.ctfed-site-<site_id>``.
    state_dir: str = ""
    # Local port of the SuperNode's Runtime API (127.0.0.1 only). 0: any free port, so
    # several SuperNodes can share one machine.
    runtime_port: int = 0
    # Give up (exit with the reason) when the SuperLink cannot be reached for this many
    # seconds: long enough for a coordinator restart, short enough that a wrong address does
    # not retry forever. 0: keep trying (e.g. under a supervisor that must never see an exit).
    max_wait_s: float = 600.0
    # What this site takes part in; checked against every round's instructions.
    policy: SitePolicy = field(default_factory=SitePolicy)

    def __post_init__(self) -> None:
        if MISSING in (self.site_id, self.data_path, self.superlink, self.ca_cert, self.private_key):
            # Only the bare schema (for error hints) has them; OmegaConf reports a config
            # that leaves one out as a missing mandatory value before we get here.
            return
        if not SITE_ID_RULE.match(self.site_id):
            raise ConfigError(
                f"site.site_id '{self.site_id}' must be letters, digits, '.', '_' or '-' "
                "(starting with a letter or digit, at most 63 characters)"
            )
        match = _ADDRESS_RULE.match(self.superlink)
        if match is None or not 0 < int(match.group(2)) < 65536:
            raise ConfigError(
                f"site.superlink '{self.superlink}' must be host:port without a URL scheme, e.g. 'fl.example.org:8000'"
            )
        for name in ("data_path", "ca_cert", "private_key"):
            if not str(getattr(self, name)).strip():
                raise ConfigError(f"site.{name} must not be empty")
        if not 0 <= self.runtime_port < 65536:
            raise ConfigError("site.runtime_port must be in [0, 65535] (0: a free port)")
        if self.max_wait_s < 0:
            raise ConfigError("site.max_wait_s must be >= 0 (0: keep trying)")

    def resolve_paths(self, base: Path) -> None:
        """Make relative paths absolute against ``base`` (the config file's folder)."""
        for name in ("data_path", "ca_cert", "private_key", "state_dir", "signing_key", "roster"):
            value = str(getattr(self, name))
            if value:
                setattr(self, name, str((base / Path(value).expanduser()).resolve()))

    @property
    def state_path(self) -> Path:
        if self.state_dir:
            return Path(self.state_dir)
        return Path(self.data_path).parent / f".ctfed-site-{self.site_id}"

    def check_files(self) -> None:
        """Fail before anything starts if a file the SuperNode needs is missing or unusable."""
        from ctfed.common.preprocess import MANIFEST  # heavy import (torch): only when checking

        data = Path(self.data_path)
        if not data.is_dir():
            raise ConfigError(f"site.data_path {data} is not a folder; run 'ctfed prepare --output {data}' first")
        if not (data / MANIFEST).is_file():
            raise ConfigError(
                f"site.data_path {data} has no {MANIFEST}: it is not a prepared cache; "
                f"run 'ctfed prepare --input <dicom> --output {data}'"
            )
        for name, what in (("ca_cert", "CA certificate"), ("private_key", "SuperNode private key")):
            path = Path(getattr(self, name))
            if not path.is_file():
                raise ConfigError(f"site.{name}: {what} {path} not found (the coordinator sends it; see 'ctfed certs')")
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.hazmat.primitives.serialization import load_ssh_private_key

        try:
            x509.load_pem_x509_certificates(Path(self.ca_cert).read_bytes())
        except ValueError as err:
            raise ConfigError(f"site.ca_cert {self.ca_cert} is not a PEM certificate: {err}") from None
        key_path = Path(self.private_key)
        try:
            key = load_ssh_private_key(key_path.read_bytes(), password=None)
        except (ValueError, TypeError) as err:
            raise ConfigError(
                f"site.private_key {key_path} is not an unencrypted OpenSSH private key ({err}); "
                "use the <site>.key file from 'ctfed certs'"
            ) from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ConfigError(f"site.private_key {key_path}: Flower needs an EC (NIST curve) key")
        if key_path.stat().st_mode & 0o077:
            raise ConfigError(f"site.private_key {key_path} is readable by others; run 'chmod 600 {key_path}'")
        if self.signing_key or self.roster:
            from ctfed.common.certs import check_site_signing  # keys module: only when checking

            check_site_signing(self.site_id, self.signing_key, self.roster)


def read_site_config(path: Path, overrides: Sequence[str] = ()) -> SiteConfig:
    """Load a site YAML with ``key=value`` overrides, validate it and resolve its paths."""
    if not path.is_file():
        raise ConfigError(f"site config file not found: {path}")
    try:
        values = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides)))
    except OmegaConfBaseException as err:
        raise ConfigError(f"invalid configuration in {path}: {err}") from None
    cfg = to_section(SiteConfig, values)
    cfg.resolve_paths(path.resolve().parent)
    return cfg
