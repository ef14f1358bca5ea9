"""What travels to the sites: the sections a coordinator sends with every round (model,
train with its augmentations, fine-tuning, monitor, privacy) and the preprocessing a site
prepares its cache with. A change here changes what deployed sites receive and check.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Optional

from ctfed.common.config.errors import ConfigError


@dataclass
class WindowConfig:
    """A CT display window mapped to one input channel in [0, 1]."""

    # Label of the channel in logs and the cache manifest (brain, subdural, bone).
    name: str = "brain"
    # Window centre in HU: the HU that maps to 0.5.
    level: float = 40.0
    # Window width in HU: level +- width/2 maps linearly onto [0, 1], clipped outside.
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

    # Preset name (conf/model/: tiny, small, vit_b). Policies' allowed_models and fine-tuning
    # check an encoder against it; defaults here are the tiny test/demo model.
    name: str = "tiny"
    # Side of the cubic input in voxels, which every crop is resized to (ViT-B / FM-CT: 96).
    image_size: int = 32
    # Side of one cubic patch in voxels: (image_size / patch_size)^3 tokens (tiny: 4^3 = 64).
    patch_size: int = 8
    # Input channels, one per CT window of the cache (preprocess.windows).
    in_channels: int = 3
    # Token width of the encoder; divisible by num_heads and by 6 (ViT-B: 768).
    hidden_size: int = 48
    # Transformer blocks of the encoder (ViT-B: 12); fine-tuning unfreezes them top first.
    num_layers: int = 2
    # Attention heads per encoder block (ViT-B: 12).
    num_heads: int = 3
    # Hidden width of each block's MLP (ViT-B: 3072, 4x hidden_size).
    mlp_dim: int = 96
    # Dropout rate after the position embedding and inside each block; 0 as in DINO/MAE pretraining.
    dropout: float = 0.0
    # DINO projection head: width of its hidden MLP layers (DINO: 2048).
    head_hidden: int = 64
    # Width of the head's L2-normalised bottleneck before the prototypes (DINO: 256).
    head_bottleneck: int = 32
    # Prototypes K: the output size of the DINO and iBOT heads and their centres
    # (DINO: 65536; 128 keeps the tiny model cheap).
    head_prototypes: int = 128
    # MAE's reconstruction decoder (only built with train.mim_objective=mae): a narrower
    # transformer over the encoder's patch tokens that predicts each patch's voxels.
    decoder_hidden: int = 48
    # Transformer blocks of the MAE decoder (FM-CT's MAE: 8).
    decoder_layers: int = 1
    # Attention heads per MAE decoder block; divides decoder_hidden.
    decoder_heads: int = 3
    # Per-channel standardisation of the [0, 1] window channels, (x - mean) / std, as the
    # encoder's first step (MAE/DINO standardise their inputs too). Without it the patch content
    # is a fraction of the fixed sin-cos position table and the untrained encoder maps every scan
    # to nearly the same features. Defaults: the brain/subdural/bone channels of head CT after
    # FM-CT's preprocessing (measured on ctfed's synthetic heads; `ctfed prepare` records a
    # cache's own figures in its manifest and warns the site when they are far from these).
    # They belong to the model: checkpoints carry them, so fine-tuning and inference agree.
    input_mean: list[float] = field(default_factory=lambda: [0.32, 0.25, 0.20])
    # Per-channel std of that standardisation (pairs with input_mean), > 0.
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
    # Regular expressions (case-insensitive, re.search) on SeriesDescription and
    # ConvolutionKernel, best first; an earlier match ranks a series higher.
    preferred: list[str] = field(default_factory=_preferred_series_patterns)
    # Patterns that rank a series last (taken only if its study has nothing else); win over preferred.
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

    # Isotropic voxel size in mm a series is resampled to before the foreground crop (FM-CT: 1 mm).
    spacing_mm: float = 1.0
    # Voxels above this HU define the head's bounding box (foreground crop).
    foreground_hu: float = 0.0
    # FM-CT's 96^3; `ctfed simulate` caches at the model's input size instead (conf/simulate.yaml, run.yaml).
    output_size: int = 96
    # CT windows, one input channel each (FM-CT: brain, subdural, bone).
    windows: list[WindowConfig] = field(default_factory=_fm_ct_windows)
    # Gantry-tilted stacks: "resample" them onto an orthogonal grid, or "reject".
    gantry_tilt: str = "resample"
    # A slice gap that deviates from the series' median gap by more than
    # max(slice_gap_tolerance x median, slice_gap_tolerance_mm) means missing or irregular
    # slices, and the series is rejected: resampling across it would invent anatomy. The mm
    # term covers positions rounded in the header (thin slices, few decimals).
    slice_gap_tolerance: float = 0.1
    # The absolute term of that bound, in mm (0: the relative term alone).
    slice_gap_tolerance_mm: float = 0.0
    series_selection: SeriesSelectionConfig = field(default_factory=SeriesSelectionConfig)
    # Processes that preprocess series in parallel, each on one torch thread (`ctfed prepare
    # --workers`); 1: in the calling process.
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
    # Bound of the rotation about each axis, degrees (at most 45).
    rotate_degrees: float = 10.0
    # Bound of the per-axis scale change, a fraction (0.1: +-10%; at most 0.5).
    scale: float = 0.1
    # Window jitter, per channel: the window width scales by 1 / (1 + c) with c uniform in
    # +-contrast (5% of 80 HU: 4 HU at the blood/brain step), the level moves by +-level_shift
    # of the width (3%: 2.4 HU in the brain window). Each applies with window_prob.
    window_prob: float = 0.8
    # Bound of the window-width jitter c, a fraction (at most 0.5).
    contrast: float = 0.05
    # Bound of the window-level shift, a fraction of the window width (at most 0.5).
    level_shift: float = 0.03
    # Additive Gaussian noise, std uniform in [0, noise_std] window units (0.02: 1.6 HU in
    # the brain window, below the 3-5 HU of a real soft-tissue kernel).
    noise_prob: float = 0.5
    # Upper bound of the noise std, window units (at most 0.5).
    noise_std: float = 0.02
    # Gaussian blur with sigma uniform in blur_sigma_mm (physical, converted with each view's
    # voxel size, which the cache's manifest records): [0.5, 1.5] mm is the spread between a
    # sharp and a soft reconstruction kernel. Without a known voxel size it is skipped (logged).
    blur_prob: float = 0.2
    # [low, high] of the blur sigma in mm, 0 < low <= high <= 10.
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

    # Optimiser steps per site and round. The one default of this knob: presets, the Flower
    # app's `local-steps` (0) and the ServerApp read it (2: the README demo's short rounds).
    local_steps: int = 2
    # Volumes per micro-batch (each gives 2 global + num_local_crops local crops); under
    # local DP-SGD the expected Poisson batch size.
    batch_size: int = 2
    # Base learning rate per lr_reference_batch volumes: AdamW runs at
    # lr * batch_size * accumulation_steps / lr_reference_batch (DINO's linear scaling rule, 5e-4 per 256). At a
    # site's small batches an unscaled 5e-4 lets the student reach the teacher's still
    # input-independent target within a few steps.
    lr: float = 5e-4
    # Batch size at which lr applies unscaled (DINO: 256).
    lr_reference_batch: int = 256
    # AdamW weight decay at the start of the cosine schedule (DINO: 0.04 -> 0.4); norms and biases get none.
    weight_decay: float = 0.04
    # Max L2 norm of the student's gradient per step (DINO: 3.0); 0: off. Local DP-SGD clips per volume instead.
    grad_clip: float = 3.0
    # EMA momentum of the teacher at the start; cosine to teacher_momentum_end (DINO: 0.996 -> 1).
    teacher_momentum: float = 0.994
    # Softmax temperature of the student's DINO and iBOT outputs (DINO: 0.1).
    student_temp: float = 0.1
    # Teacher temperature after its warm-up (DINO's 0.07; sharper early, see teacher_temp_warmup).
    teacher_temp: float = 0.07
    # EMA momentum of the DINO and iBOT centres of the teacher's outputs (DINO: 0.9).
    center_momentum: float = 0.9
    # [low, high] share of the volume's voxels a global crop keeps (two global crops per volume).
    global_crop_scale: list[float] = field(default_factory=lambda: [0.5, 1.0])
    # [low, high] share of the volume's voxels a local crop keeps (DINO's small views).
    local_crop_scale: list[float] = field(default_factory=lambda: [0.2, 0.5])
    # Local crops per volume, seen by the student only (DINO: 8-10; 2 keeps CPU steps cheap).
    num_local_crops: int = 2
    # Seed of the student's initialisation (encoder and head: the same at every site); the Flower
    # app adds the site's index for its data order, crops and masks.
    seed: int = 0
    # Cosine schedules run over the GLOBAL step (round * local_steps + local step), so a
    # federation and a standalone run with the same totals follow the same curves.
    min_lr: float = 1e-6
    # Weight decay at the end of its cosine schedule (DINO: 0.4).
    weight_decay_end: float = 0.4
    # Teacher EMA momentum at the end of its schedule (1: the teacher freezes, as in DINO).
    teacher_momentum_end: float = 1.0
    # Linear LR warm-up over this share of the schedule horizon (schedule_rounds x local_steps;
    # DINO: 10 of 100 epochs).
    warmup_fraction: float = 0.1
    # Rounds the schedules span; 0: RunConfig fills in federation.rounds (one round if used alone).
    schedule_rounds: int = 0
    # What a site's EMA teacher encoder does when a new global encoder arrives:
    # "reset" copies the global student into it, "keep" keeps the site's own EMA.
    teacher_on_new_global: str = "reset"
    # Whether the student's projection head (DINO's and iBOT's, one head, last layer included)
    # and the DINO/iBOT centres travel and are averaged with the encoder (each site's teacher
    # head then follows the global head by teacher_on_new_global). True: every site scores
    # against the same prototypes, at the cost of the head on the wire (bottleneck x
    # head_prototypes in the last layer: +12% at model=tiny, 23.1M values or +26% at ViT-B) and a share of
    # every norm bound (max_update_norm, central DP's clip). False: heads drift apart per site.
    # Default false: in a 3-site run (80 steps a site) the unshared heads barely drifted and
    # sharing changed neither loss nor probe (docs/studies.md, item 7); re-test at a real budget.
    share_heads: bool = False
    # Loss mix: total = dino_weight * DINO (CLS) + mim_weight * MIM (masked patch tokens, by
    # mim_objective). mim_weight = 0 switches masking off entirely and keeps the mask token frozen.
    dino_weight: float = 1.0
    # Weight of the masked-patch loss (see dino_weight).
    mim_weight: float = 1.0
    # Masked-image-modelling objective of the MIM loss.
    mim_objective: MIMObjective = MIMObjective.ibot
    # MAE: reconstruct each patch normalised by its own mean and std (MAE's norm_pix_loss,
    # which gives better features than raw voxels).
    mae_norm_pix_loss: bool = True
    # iBOT/DINOv2 block masking of the student's global crops (iBOT objective only): this
    # fraction of them is masked, each at a ratio drawn from [low, high]; the others (and all
    # local crops) stay whole.
    mask_ratio: list[float] = field(default_factory=lambda: [0.1, 0.5])
    # Share of the student's global crops that get masked (DINOv2: 0.5).
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
    # Share of the schedule horizon the teacher temperature warm-up lasts.
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


class FeatureStatistics(str, enum.Enum):
    """Where a federated phase 2's head gets its feature statistics (finetune.feature_statistics)."""

    # Each site fits its own on its cache in the first phase-2 round and sends them once, inside
    # that round's update (secure aggregation sums them like the rest); the coordinator fixes one
    # set from their mean, which every later round and every checkpoint carries.
    federated = "federated"
    # Each site fits its own on its cache every round; they never leave it.
    site = "site"


@dataclass
class FinetuneConfig:
    """Supervised fine-tuning of a pretrained encoder with progressive freezing.

    Every mode spends ``probe_steps + stage_steps`` optimizer steps, so the three baselines
    compare at an equal budget. Fractions and block LRs are listed top block first.
    """

    mode: str = "progressive"  # one of FINETUNE_MODES
    # Stage 0: head only (the paper's 10 epochs), then stage 1 (its 20 epochs), in steps.
    probe_steps: int = 10
    # Stage 1 in optimizer steps: the top blocks unfreeze (progressive), or the rest of the budget.
    stage_steps: int = 20
    # Progress of stage 1 at which the top, second and third block unfreeze.
    unfreeze_fractions: list[float] = field(default_factory=lambda: [0.1, 0.3, 0.6])
    # Peak OneCycle learning rate of the classification head.
    head_lr: float = 1e-3
    # Peak learning rates of the top, second and third block, one per unfreeze_fractions entry.
    block_lrs: list[float] = field(default_factory=lambda: [5e-4, 2.5e-4, 1e-4])
    # Stem and lower blocks in mode "full" (progressive never trains them).
    backbone_lr: float = 1e-4
    # AdamW weight decay of the trained parameters.
    weight_decay: float = 0.01
    # OneCycle warm-up share of each stage.
    warmup_fraction: float = 0.3
    # Max L2 norm of the trained parameters' gradient per step; 0: off.
    grad_clip: float = 1.0
    # Labelled volumes per optimizer step.
    batch_size: int = 4
    # Chance that a training volume is flipped left-right at each step: the one flip a head
    # presents (as the SSL views, train.augment.flip_lr_prob); with a few labelled scans and
    # hundreds of steps it halves how often the head sees the very same input. 0: off.
    flip_lr_prob: float = 0.5
    # One sigmoid output per name (1 name: binary task; K names: multi-label).
    label_names: list[str] = field(default_factory=lambda: ["label"])
    # The head's input: a local finding moves a few patch tokens, which the CLS token of an
    # encoder pretrained without DINO (MAE alone) does not summarise.
    pooling: FeaturePooling = FeaturePooling.cls
    # Seed of the head's initialisation and the batch order; phase 2 adds site and round.
    seed: int = 0
    # Federated phase 2 only (``federation.finetune_rounds``); the split of the standalone
    # compare study is ``compare.test_fraction`` / ``compare.split_seed``.
    # Optimizer steps per site per phase-2 round (0: train.local_steps).
    local_steps: int = 0
    # Share of each site's labelled scans held out (stratified) to evaluate on every round; a
    # site whose labels.csv has a ``finetune_split`` column (train/test) uses that instead.
    test_fraction: float = 0.5
    # Seed of that stratified split, the monitor's scan subset and the evaluation's bootstrap.
    split_seed: int = 0
    # Bootstrap resamples of the per-round evaluation's confidence intervals (small: it runs every round).
    eval_n_boot: int = 50
    # The head's feature statistics in phase 2 (FeatureStatistics). "site" refits them every
    # round at every site, so the head's inputs move with the encoder (the sites' loss stalls
    # near 0.45); "federated" fixes them after the first round and every checkpoint carries
    # them (`ctfed predict` needs no cache). Fixed, the loss falls, but validation AUROC rose
    # on the tuning seed (+0.05 federated arm) and fell on study seed 0 (-0.02 to -0.06, every
    # arm): no robust gain, so the default stays "site" (docs/studies.md). Under central DP the
    # statistics are never sent (the update's clip and noise are not sized for them).
    feature_statistics: FeatureStatistics = FeatureStatistics.site

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
        if not 0.0 <= self.flip_lr_prob <= 1.0:
            raise ConfigError(f"finetune.flip_lr_prob must be in [0, 1], got {self.flip_lr_prob}")
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

    # Score the received encoder before each phase-1 round at sites with labelled scans.
    enabled: bool = True
    # Neighbours of the kNN classifier (small: a site holds few labelled scans).
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


class PrivacyMode(str, enum.Enum):
    """Where differential-privacy noise is added (docs/decisions/local-dp-per-volume.md, central-dp.md)."""

    none = "none"
    # Sample-level DP-SGD at every site (Opacus); each site accounts its own epsilon.
    local = "local"
    # Site-level DP: sites clip their update, the coordinator noises the uniform mean.
    central = "central"
    # Site-level DP with the noise added by the sites: each clips its update, rounds it to
    # integers and adds Skellam noise before masking, so nobody sees an un-noised sum
    # (secure aggregation required; docs/security.md, "Distributed DP").
    distributed = "distributed"


@dataclass
class LocalDPConfig:
    """DP-SGD at a site: per-volume gradient clipping plus Gaussian noise, every local step."""

    # Gaussian noise std per step, in units of max_grad_norm (Opacus' sigma).
    noise_multiplier: float = 1.0
    # Per-volume L2 bound on the gradient (all crops of one volume together).
    max_grad_norm: float = 1.0
    # The delta of the (epsilon, delta) each site accounts (convention: below 1 / its volume count).
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
    # The delta of the site-level (epsilon, delta) the coordinator accounts (convention: below 1 / sites).
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not self.clip_norm > 0:
            raise ConfigError(f"privacy.central.clip_norm must be > 0, got {self.clip_norm}")
        if not self.noise_multiplier > 0:
            raise ConfigError(f"privacy.central.noise_multiplier must be > 0, got {self.noise_multiplier}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"privacy.central.delta must be in (0, 1), got {self.delta}")


@dataclass
class DistributedDPConfig:
    """Distributed DP: each site clips its whole update to ``clip_norm``, rounds it to a grid
    of ``clip_norm / granularity`` (stochastically) and adds integer Skellam noise before
    secure aggregation masks it; the coordinator only ever unmasks the noisy sum. Skellam
    noise is closed under sums, so the sum of k honest sites' noise is the same mechanism
    with k times the variance; each site accounts its own epsilon for the number of honest
    sites its own policy assumes (``policy.distributed_dp_honest_sites``), never for what the
    coordinator says."""

    # L2 bound on one site's update (all tensors together), before rounding.
    clip_norm: float = 1.0
    # Std of each site's own noise in units of its L2 sensitivity in grid steps (clip_norm /
    # step + sqrt(values), the rounding's worst case). The sum of n sites' noise has sqrt(n)
    # times it: for a multiplier z on the sum of n sites, use z / sqrt(n).
    noise_multiplier: float = 1.0
    # Grid steps per clip_norm. Finer: less rounding error and a sensitivity closer to
    # clip_norm's (the rounding adds up to sqrt(values) steps: 9,300 at ViT-B's 86M values,
    # 0.9% of 2**20); coarser: a smaller integer noise. Its Poisson means must stay below
    # 2**50 (the exact sampler's range): granularity x noise_multiplier below about 2**24.
    granularity: int = 2**20
    # The delta of the epsilon the sites report for this mode (each site's own policy.delta rules).
    delta: float = 1e-5

    def __post_init__(self) -> None:
        if not self.clip_norm > 0 or not self.noise_multiplier > 0:
            raise ConfigError("privacy.distributed.clip_norm and privacy.distributed.noise_multiplier must be > 0")
        if not 2**8 <= self.granularity <= 2**30:
            raise ConfigError(f"privacy.distributed.granularity must be in [2**8, 2**30], got {self.granularity}")
        if not 0 < self.delta < 1:
            raise ConfigError(f"privacy.distributed.delta must be in (0, 1), got {self.delta}")


@dataclass
class PrivacyConfig:
    """Differential privacy of a run; travels to the sites with every round's instructions."""

    mode: PrivacyMode = PrivacyMode.none
    local: LocalDPConfig = field(default_factory=LocalDPConfig)
    central: CentralDPConfig = field(default_factory=CentralDPConfig)
    distributed: DistributedDPConfig = field(default_factory=DistributedDPConfig)
