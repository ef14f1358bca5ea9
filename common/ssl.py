"""Self-distillation pieces: DINO, iBOT and MAE losses, teacher EMA, schedules, 3D multi-crop.

Follows the DINO reference implementation (facebookresearch/dino) unit by unit, for one
process: the centre is not all-reduced, and all crops share one size (FM-CT resizes local
crops back to the global size), so student and teacher each take a single forward.
The iBOT patch loss follows DINOv2's ``dinov2/loss/ibot_patch_loss.py`` (centring variant).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import GaussianSmooth
from monai.data import get_track_meta, set_track_meta
from monai.utils import convert_to_tensor
from torch import nn

from ctfed.common.config import AugmentConfig

logger = logging.getLogger(__name__)


class DINOLoss(nn.Module):
    """Cross-entropy of student views against the centred, sharpened teacher on global views.

    Inputs are crop-major: ``student_output`` is ``ncrops`` chunks of B rows (the two global
    crops first), ``teacher_output`` is the two global chunks. A student view is never
    matched with the teacher's output on the same view.
    """

    center: torch.Tensor

    def __init__(
        self, out_dim: int, ncrops: int, student_temp: float, teacher_temp: float, center_momentum: float
    ) -> None:
        super().__init__()
        if ncrops < 2:
            raise ValueError(f"DINOLoss needs the 2 global crops at least, got ncrops={ncrops}")
        self.ncrops = ncrops
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.center_momentum = center_momentum
        # False: the owner updates the centre itself (local DP-SGD: from public reference heads).
        self.center_from_batch = True
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_output: torch.Tensor, teacher_output: torch.Tensor) -> torch.Tensor:
        batch = teacher_output.shape[0] // 2
        if teacher_output.shape[0] != 2 * batch or student_output.shape[0] != self.ncrops * batch:
            raise ValueError(
                f"expected student rows = {self.ncrops} crops x B and teacher rows = 2 x B, got "
                f"{student_output.shape[0]} and {teacher_output.shape[0]}"
            )
        student_views = (student_output / self.student_temp).chunk(self.ncrops)
        teacher_output = teacher_output.detach()
        teacher_views = F.softmax((teacher_output - self.center) / self.teacher_temp, dim=-1).chunk(2)

        total = student_output.new_zeros(())
        pairs = 0
        for t_index, target in enumerate(teacher_views):
            for s_index, view in enumerate(student_views):
                if s_index == t_index:
                    continue
                total = total + torch.sum(-target * F.log_softmax(view, dim=-1), dim=-1).mean()
                pairs += 1
        if self.center_from_batch:
            self.update_center(teacher_output)
        return total / pairs

    @torch.no_grad()
    def update_center(self, teacher_output: torch.Tensor) -> None:
        """EMA of the teacher's mean output; subtracting it keeps one prototype from winning."""
        batch_center = teacher_output.mean(dim=0, keepdim=True)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)


class iBOTPatchLoss(nn.Module):  # noqa: N801 - the method's own spelling
    """Masked patch tokens of the student predict the teacher's tokens at the same positions.

    The teacher saw the same global crop unmasked; its patch outputs are centred with this
    loss's own centre (patch-token statistics differ from CLS statistics) and sharpened.
    Per sample the cross-entropy is averaged over its masked tokens; samples are then
    averaged over the whole batch, unmasked samples counting as 0, as iBOT and DINOv2 do
    (so their loss weights carry over; the scale grows with ``mask_probability``).

    ``forward`` takes either dense logits (B, N, K) or only the masked rows (M, K) in
    ``mask.nonzero()`` order; the latter is what training uses, because the projection head
    on every patch token (512 x 65,536 per crop for ViT-B) is the expensive part.
    """

    center: torch.Tensor

    def __init__(self, out_dim: int, student_temp: float, teacher_temp: float, center_momentum: float) -> None:
        super().__init__()
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.center_momentum = center_momentum
        self.center_from_batch = True  # as in DINOLoss
        self.register_buffer("center", torch.zeros(1, out_dim))

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if mask.dtype != torch.bool or mask.ndim != 2:
            raise ValueError(f"mask must be a (B, N) bool tensor, got {mask.dtype} {tuple(mask.shape)}")
        if student_logits.ndim == 3:
            if student_logits.shape[:2] != mask.shape or teacher_logits.shape != student_logits.shape:
                raise ValueError(
                    f"dense logits must both be (B, N, K) with (B, N) = {tuple(mask.shape)}, got "
                    f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
                )
            student_logits, teacher_logits = student_logits[mask], teacher_logits[mask]
        n_masked = int(mask.sum())
        if student_logits.shape[0] != n_masked or teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"expected {n_masked} masked rows from student and teacher, got "
                f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
            )
        if n_masked == 0:
            # Keeps the graph connected (zero gradient) so every trainable parameter gets a grad.
            return student_logits.sum() * 0.0
        teacher_logits = teacher_logits.detach()
        target = F.softmax((teacher_logits - self.center) / self.teacher_temp, dim=-1)
        per_token = torch.sum(-target * F.log_softmax(student_logits / self.student_temp, dim=-1), dim=-1)
        # Each masked token weighs 1 / (masked tokens of its sample): a per-sample mean.
        weights = (1.0 / mask.sum(dim=1).clamp(min=1)).unsqueeze(1).expand_as(mask)[mask]
        if self.center_from_batch:
            self.update_center(teacher_logits)
        return (per_token * weights).sum() / mask.shape[0]

    @torch.no_grad()
    def update_center(self, teacher_masked: torch.Tensor) -> None:
        """EMA of the teacher's mean output over masked tokens (DINOv2's choice)."""
        batch_center = teacher_masked.mean(dim=0, keepdim=True)
        self.center.mul_(self.center_momentum).add_(batch_center, alpha=1.0 - self.center_momentum)


def patchify(volumes: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, S, S, S) -> (B, N, C * p^3): each patch's voxels, channel-major, in the
    encoder's token order (the conv patch grid's depth, height, width raster)."""
    if volumes.ndim != 5 or any(side % patch_size for side in volumes.shape[2:]):
        raise ValueError(f"volumes must be (B, C, S, S, S) with S a multiple of {patch_size}, got {tuple(volumes.shape)}")
    batch, channels, depth, height, width = volumes.shape
    grid = (depth // patch_size, height // patch_size, width // patch_size)
    patches = volumes.reshape(batch, channels, grid[0], patch_size, grid[1], patch_size, grid[2], patch_size)
    patches = patches.permute(0, 2, 4, 6, 1, 3, 5, 7)
    return patches.reshape(batch, grid[0] * grid[1] * grid[2], channels * patch_size**3)


class MAELoss(nn.Module):
    """MAE's reconstruction loss: mean squared error over the masked patches only.

    With ``norm_pix`` (MAE's ``norm_pix_loss``) each target patch is standardised by its own
    mean and (population) std first, so a flat patch cannot be matched by predicting the
    mean intensity of the scan. Averaged over all masked patches of the batch, as MAE does.
    """

    def __init__(self, patch_size: int, norm_pix: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.norm_pix = norm_pix
        self.eps = eps

    def forward(self, prediction: torch.Tensor, volumes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``prediction`` (B, N, C * p^3) from the decoder, ``volumes`` the unmasked input (B, C, S, S, S)."""
        target = patchify(volumes, self.patch_size).detach()
        if mask.dtype != torch.bool or mask.shape != target.shape[:2] or prediction.shape != target.shape:
            raise ValueError(
                f"expected prediction {tuple(target.shape)} and a bool mask {tuple(target.shape[:2])}, got "
                f"{tuple(prediction.shape)} and {mask.dtype} {tuple(mask.shape)}"
            )
        if not mask.any():
            return prediction.sum() * 0.0  # no masked patch: zero, with every parameter still in the graph
        if self.norm_pix:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True, correction=0)
            target = (target - mean) / (var + self.eps).sqrt()
        per_patch = (prediction - target).pow(2).mean(dim=-1)
        return (per_patch * mask).sum() / mask.sum()


class KoLeoLoss(nn.Module):
    """Kozachenko-Leonenko entropy estimator as a spreading term (Sablayrolles et al. 2019,
    used by DINOv2 on the student's CLS tokens, ``dinov2/loss/koleo_loss.py``).

    ``-mean_i log(min_{j != i} ||x_i - x_j||)`` over L2-normalised rows: minimising it pushes
    every embedding away from its nearest neighbour in the batch. DINO alone cannot do that
    when the encoder already maps every scan to nearly one point (a fresh tiny ViT does), so
    the teacher's target carries no information about the input.

    It couples the rows of a batch (a row's gradient depends on its neighbour), so it has no
    per-sample gradient and cannot run under per-volume DP-SGD.
    """

    def __init__(self, eps: float = 1e-8) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.ndim != 2 or features.shape[0] < 2:
            raise ValueError(f"KoLeoLoss needs (B >= 2, D) features, got shape {tuple(features.shape)}")
        x = F.normalize(features.float(), dim=-1, eps=self.eps)
        with torch.no_grad():
            # On the unit sphere the nearest neighbour has the largest dot product.
            dots = x @ x.T
            dots.fill_diagonal_(-2.0)
            nearest = dots.argmax(dim=1)
        distances = F.pairwise_distance(x, x[nearest], eps=self.eps)
        return -torch.log(distances + self.eps).mean()


@torch.no_grad()
def update_teacher(student: nn.Module, teacher: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    student_params = dict(student.named_parameters())
    teacher_params = dict(teacher.named_parameters())
    if student_params.keys() != teacher_params.keys():
        raise ValueError("student and teacher have different parameters; build the teacher with build_teacher()")
    for name, t_param in teacher_params.items():
        t_param.mul_(momentum).add_(student_params[name].detach(), alpha=1.0 - momentum)


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int = 0, start_warmup: float = 0.0
) -> Callable[[int], float]:
    """A function of the global step: linear warm-up from ``start_warmup`` to ``base``, then
    a half cosine from ``base`` (at ``warmup_steps``) to ``final`` (at ``total_steps - 1``).

    Steps past the horizon stay at ``final``, so a federation that runs longer than planned
    keeps a sane LR and momentum instead of wrapping around.
    """
    if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
        raise ValueError(
            f"cosine_schedule needs total_steps >= 1 and 0 <= warmup_steps <= total_steps, "
            f"got total_steps={total_steps}, warmup_steps={warmup_steps}"
        )
    decay_steps = max(total_steps - warmup_steps - 1, 1)

    def value(step: int) -> float:
        if step < 0:
            raise ValueError(f"schedule step must be >= 0, got {step}")
        if step < warmup_steps:
            return start_warmup + (base - start_warmup) * step / warmup_steps
        progress = min((step - warmup_steps) / decay_steps, 1.0)
        return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * progress))

    return value


class MultiCrop3D:
    """Two global and ``num_local`` local random cubic crops of one volume, all resized to
    ``out_size``^3 (equal token counts) and augmented independently with CT-appropriate
    views (``AugmentConfig``).

    ``global_scale`` / ``local_scale`` are [low, high] fractions of the volume's voxels.
    Volumes are the cache's (C, z, y, x) with x running left -> right (RAS), so the only
    flip is along spatial axis 2. ``voxel_mm`` is the cached voxel size (z, y, x) in mm
    (``site_voxel_mm``): a crop of ``side`` voxels resized to ``out_size`` has voxels
    ``side / out_size`` times that, which is what turns the blur's sigma from mm into voxels.
    Rotations and scales act on the voxel grid; the cache's voxels are anisotropic (the head's
    box is not a cube, and the cache resizes it to one), so a 10 degree rotation is off a
    physical rotation by a small shear, well within the views' own randomness.
    Randomness comes from one ``numpy.random.RandomState`` (the noise from a torch Generator
    seeded by it), so ``reseed`` makes the crops of a round reproducible.

    The views are the distribution MONAI's RandFlip, RandAffine (rotation then scale, MONAI's
    ``create_rotate`` / ``create_scale`` matrices about the grid centre, zeros outside),
    Rand{Scale,Shift}Intensity (channel-wise) and RandGaussianNoise (``sample_std``) drew; the blur
    is MONAI's GaussianSmooth. The rest is plain torch because it was most of a small model's CPU
    step (issue #11; per view at 32^3 on a loaded core, wall time): RandAffine built its grid and
    resampled the already resized crop (14 ms), the resize was a second pass (3.4 ms), the noise
    came from numpy's legacy normal (6.5 ms for 98k values), and Compose plus MetaTensor
    conversion added more. Here the crop box, its resize, the flip and the affine are composed
    into one map and ONE trilinear resampling of the volume (views without an affine keep the
    exact ``F.interpolate`` resize), the window jitter is one multiply-add per channel and the
    noise ``torch.randn`` from a Generator seeded by the RandomState. Measured with
    ``python -m ctfed.simulations.bench.views_bench`` (``docs/benchmarks.md``): 2.1-2.4x less CPU
    per volume at 32^3 and at 96^3. One resampling instead of two also blurs a rotated view slightly less.
    """

    # The cache's (C, z, y, x) volumes: spatial axis 2 is x, left -> right (RAS).
    LR_AXIS = 2

    def __init__(
        self,
        global_scale: Sequence[float],
        local_scale: Sequence[float],
        num_local: int,
        out_size: int,
        seed: int = 0,
        augment: AugmentConfig | None = None,
        voxel_mm: Sequence[float] | None = None,
    ) -> None:
        for name, scale in (("global_scale", global_scale), ("local_scale", local_scale)):
            if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
                raise ValueError(f"{name} must be [low, high] with 0 < low <= high <= 1, got {list(scale)}")
        if num_local < 0 or out_size < 1:
            raise ValueError(f"need num_local >= 0 and out_size >= 1, got {num_local}, {out_size}")
        self.global_scale = tuple(global_scale)
        self.local_scale = tuple(local_scale)
        self.num_local = num_local
        self.out_size = out_size
        self.voxel_mm = self._checked_voxel_mm(voxel_mm)
        self.config = augment if augment is not None else AugmentConfig()
        # The output grid's voxel centres about its centre, MONAI's create_grid convention.
        self._centred = torch.arange(out_size, dtype=torch.float32) - (out_size - 1) / 2
        self._noise = torch.Generator()
        self._warned_no_voxel_size = False
        self.reseed(seed)

    @staticmethod
    def site_voxel_mm(dataset: object) -> tuple[float, float, float] | None:
        """The cached voxel size (z, y, x) in mm a dataset reports (``CachedVolumes.cached_voxel_mm``),
        the median over the parts of a ``ConcatDataset`` of caches (pooled sites), or None."""
        parts = getattr(dataset, "datasets", None)
        if parts is not None:
            sizes = [size for size in (MultiCrop3D.site_voxel_mm(part) for part in parts) if size is not None]
            if not sizes:
                return None
            z, y, x = (float(v) for v in np.median(np.asarray(sizes, dtype=np.float64), axis=0))
            return z, y, x
        report = getattr(dataset, "cached_voxel_mm", None)
        return report() if callable(report) else None

    @staticmethod
    def _checked_voxel_mm(voxel_mm: Sequence[float] | None) -> tuple[float, float, float] | None:
        if voxel_mm is None:
            return None
        values = tuple(float(v) for v in voxel_mm)
        if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
            raise ValueError(f"voxel_mm must be 3 positive sizes (z, y, x) in mm, got {list(voxel_mm)}")
        return values  # type: ignore[return-value]

    @property
    def num_crops(self) -> int:
        return 2 + self.num_local

    def reseed(self, seed: int | np.random.SeedSequence) -> None:
        self.rng = np.random.RandomState(np.random.MT19937(seed))

    def __call__(self, volume: torch.Tensor, voxel_mm: Sequence[float] | None = None) -> list[torch.Tensor]:
        """The crops of ``volume`` (C, z, y, x); ``voxel_mm`` overrides the site's voxel size for this volume."""
        if volume.ndim != 4:
            raise ValueError(f"MultiCrop3D expects one volume (C, D, H, W), got shape {tuple(volume.shape)}")
        voxel = self._checked_voxel_mm(voxel_mm) if voxel_mm is not None else self.voxel_mm
        volume = volume.float()
        scales = [self.global_scale] * 2 + [self.local_scale] * self.num_local
        crops = []
        # The blur (MONAI) needs no metadata: plain tensors out, without MetaTensor overhead.
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            for scale in scales:
                view, sides = self._spatial_view(volume, scale)
                crop_voxel = None if voxel is None else tuple(v * side / self.out_size for v, side in zip(voxel, sides))
                crops.append(self._augment(view, crop_voxel))
        finally:
            set_track_meta(tracking)
        return crops

    def _spatial_view(self, volume: torch.Tensor, scale: tuple[float, float]) -> tuple[torch.Tensor, list[int]]:
        """A random resized crop, left-right flipped and affinely moved as drawn: (view, crop sides)."""
        cfg = self.config
        fraction = self.rng.uniform(*scale)
        # A cube keeping `fraction` of the voxels: each side shrinks by the cube root.
        sides = [max(1, round(size * fraction ** (1 / 3))) for size in volume.shape[1:]]
        starts = [int(self.rng.randint(0, size - side + 1)) for size, side in zip(volume.shape[1:], sides)]
        flip = bool(self.rng.uniform() < cfg.flip_lr_prob)
        # All affine draws are made whether or not it applies: a fixed number of draws per view.
        apply_affine = self.rng.uniform() < cfg.affine_prob
        angle = math.radians(cfg.rotate_degrees)
        angles = self.rng.uniform(-angle, angle, size=3)
        factors = 1.0 + self.rng.uniform(-cfg.scale, cfg.scale, size=3)
        matrix = self.affine_matrix(angles, factors) if apply_affine else None
        return self.resample(volume, starts, sides, flip, matrix), sides

    @staticmethod
    def affine_matrix(angles: Sequence[float], factors: Sequence[float]) -> torch.Tensor:
        """RandAffine's 3x3 map from output to input voxel offsets about the grid centre:
        MONAI's ``create_rotate`` (radians about spatial axes 0, 1, 2, intrinsic, in that order)
        times ``create_scale`` (per-axis factors), written out because MONAI's own costs 1 ms."""
        (sa, sb, sc), (ca, cb, cc) = np.sin(angles), np.cos(angles)
        about_0 = np.array([[1.0, 0.0, 0.0], [0.0, ca, -sa], [0.0, sa, ca]])
        about_1 = np.array([[cb, 0.0, sb], [0.0, 1.0, 0.0], [-sb, 0.0, cb]])
        about_2 = np.array([[cc, -sc, 0.0], [sc, cc, 0.0], [0.0, 0.0, 1.0]])
        return torch.from_numpy(about_0 @ about_1 @ about_2 * np.asarray(factors, dtype=np.float64)).float()

    def resample(
        self,
        volume: torch.Tensor,
        starts: Sequence[int],
        sides: Sequence[int],
        flip: bool,
        matrix: torch.Tensor | None,
    ) -> torch.Tensor:
        """The crop of ``volume`` at ``starts`` with ``sides`` resized to ``out_size``^3, flipped
        left-right if ``flip``, then moved by ``matrix`` (``affine_matrix``; None: no affine).

        With a matrix, the view is one trilinear resampling of the volume at the points the three
        steps compose to: the affine's point in the resized crop (zeros outside it, fading over the last
        voxel as zeros padding does), mapped to the crop's voxels as ``F.interpolate``
        (align_corners=False) maps them, clamped to the crop as it clamps.
        """
        size = self.out_size
        if matrix is None:
            crop = volume[
                :,
                starts[0] : starts[0] + sides[0],
                starts[1] : starts[1] + sides[1],
                starts[2] : starts[2] + sides[2],
            ]
            view = F.interpolate(crop[None], size=(size,) * 3, mode="trilinear", align_corners=False)[0]
            return torch.flip(view, dims=[1 + self.LR_AXIS]) if flip else view
        if flip:  # flipping the crop before the affine: the affine's x offset negated
            matrix = matrix * torch.tensor([1.0, 1.0, -1.0])[:, None]
        for axis in range(3):  # a single-voxel axis: doubled, so interpolation has a neighbour (weight 0)
            if volume.shape[1 + axis] < 2:
                volume = volume.repeat_interleave(2, dim=1 + axis)
        depth, height, width = volume.shape[1:]
        c = self._centred.double()
        # The sampler below reads the volume as one (D * H, W) image: x and the row in grid_sample's
        # [-1, 1] (align_corners=True), z in voxels (it picks the two slices a point lies between).
        to_grid = (1.0, 2.0 / (depth * height - 1), 2.0 / (width - 1))
        to_grid_shift = (0.0, -1.0, -1.0)
        coverage: torch.Tensor | None = None
        coordinates = []
        for axis in range(3):
            row = matrix[axis].double()
            # Resized-crop offset q -> the crop's voxel (F.interpolate's align_corners=False map)
            # -> the volume's voxel -> the sampler's unit: all affine, folded into one map.
            gain = sides[axis] / size
            shift = gain * (size - 1) / 2 + gain / 2 - 0.5 + starts[axis]
            scale, offset = gain * to_grid[axis], shift * to_grid[axis] + to_grid_shift[axis]
            plane = (scale * row[0] * c)[:, None, None] + (scale * row[1] * c)[None, :, None] + offset
            position = (plane.float() + (scale * row[2] * c).float()[None, None, :])  # (n, n, n), one pass
            # Zeros outside the resized crop, fading over its last voxel as grid_sample's zeros
            # padding does: weight clamp((n + 1) / 2 - |q|, 0, 1). Skipped where no corner reaches it.
            if float(row.abs().sum()) * (size - 1) / 2 > (size - 1) / 2 + 1e-9:
                weight = (position - offset).abs_().mul_(-1.0 / scale).add_((size + 1) / 2).clamp_(0.0, 1.0)
                coverage = weight if coverage is None else coverage.mul_(weight)
            # F.interpolate clamps to the crop's first and last voxel.
            low, high = (starts[axis] * to_grid[axis] + to_grid_shift[axis],
                         (starts[axis] + sides[axis] - 1) * to_grid[axis] + to_grid_shift[axis])
            coordinates.append(position.clamp_(low, high))
        view = self._trilinear(volume, *coordinates)
        return view if coverage is None else view.mul_(coverage)

    @staticmethod
    def _trilinear(volume: torch.Tensor, z: torch.Tensor, row_in_slice: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``volume`` (C, D, H, W), D, H, W >= 2, sampled trilinearly at points (each (n, n, n)) given
        by z in voxels and, in grid_sample's align_corners=True units of the (D * H, W) image the
        volume is laid out as, the row within slice 0 and x: (C, n, n, n).

        Two bilinear ``grid_sample`` passes over that image, at slices z0 and z0 + 1, blended along z:
        PyTorch's 2D CPU sampler is vectorised, its 3D one is not (one thread, CPU time: 0.9 vs
        1.6 ms at 32^3, equal at 96^3). Rows never mix slices, as y stays within [0, H - 1].
        float32 coordinates over D * H rows are exact to ~1e-4 voxel at 32^3 and ~7e-4 at 96^3,
        below what bilinear interpolation itself blurs.
        """
        channels, depth, height, width = volume.shape
        lower = z.floor().clamp_(max=depth - 2)
        slice_rows = 2.0 * height / (depth * height - 1)
        grid = torch.empty(2, *z.shape, 2)
        grid[0, ..., 0] = x
        grid[1, ..., 0] = x
        torch.addcmul(row_in_slice, lower, torch.tensor(slice_rows), out=grid[0, ..., 1])
        torch.add(grid[0, ..., 1], slice_rows, out=grid[1, ..., 1])
        image = volume.reshape(1, channels, depth * height, width)
        slices = F.grid_sample(image, grid.view(1, 2, -1, 2), mode="bilinear", align_corners=True)[0]
        return torch.lerp(slices[:, 0], slices[:, 1], z.sub_(lower).view(-1)).view(channels, *z.shape)

    def _augment(self, view: torch.Tensor, voxel_mm: tuple[float, ...] | None) -> torch.Tensor:
        cfg = self.config
        view = convert_to_tensor(self._blur(view, voxel_mm), track_meta=False, dtype=torch.float32)
        channels = view.shape[0]
        # Window jitter per channel about the window's centre (0.5): width, then level.
        gain = np.ones(channels)
        offset = np.zeros(channels)
        if self.rng.uniform() < cfg.window_prob:
            gain = 1.0 + self.rng.uniform(-cfg.contrast, cfg.contrast, size=channels)
        if self.rng.uniform() < cfg.window_prob:
            offset = self.rng.uniform(-cfg.level_shift, cfg.level_shift, size=channels)
        apply_noise = self.rng.uniform() < cfg.noise_prob
        noise_std = self.rng.uniform(0.0, cfg.noise_std)
        noise_seed = int(self.rng.randint(0, 2**31 - 1))
        jitter = bool(np.any(gain != 1.0) or np.any(offset != 0.0))
        if not (jitter or apply_noise):
            return view.clamp_(0.0, 1.0)
        # Voxels the window clipped (air at -1000 HU in every window, bone in the brain window) lie
        # far outside it: a few % of window jitter or a few HU of noise leave them clipped, as
        # re-windowing the scan would. (Noise on air would also hand MAE's per-patch normalised
        # target pure noise to reconstruct.)
        shown = (view > 0.0) & (view < 1.0)
        if jitter:
            shape = (channels, 1, 1, 1)
            changed = torch.addcmul(
                torch.from_numpy(0.5 - 0.5 * gain + offset).float().view(shape),
                view,
                torch.from_numpy(gain).float().view(shape),
            )
        else:
            changed = view.clone()
        if apply_noise:
            self._noise.manual_seed(noise_seed)
            changed.add_(torch.randn(view.shape, generator=self._noise), alpha=noise_std)
        # One clamp for both: a shown voxel's new value, a clipped voxel's old one (<= 0 or >= 1).
        return torch.where(shown, changed, view).clamp_(0.0, 1.0)

    def _blur(self, view: torch.Tensor, voxel_mm: tuple[float, ...] | None) -> torch.Tensor:
        cfg = self.config
        # Both draws are made whether or not the blur applies, so the voxel size never
        # changes the other random choices of a round.
        apply = self.rng.uniform() < cfg.blur_prob
        sigma_mm = self.rng.uniform(*cfg.blur_sigma_mm)
        if not apply:
            return view
        if voxel_mm is None:
            if not self._warned_no_voxel_size:
                logger.warning(
                    "augment: blur skipped, the volumes' voxel size is unknown (no cached_voxel_zyx_mm in the "
                    "manifest; re-run prepare to record it)"
                )
                self._warned_no_voxel_size = True
            return view
        return GaussianSmooth(sigma=[sigma_mm / v for v in voxel_mm])(view)
