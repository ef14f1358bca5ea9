"""DINO and iBOT losses, teacher EMA, schedules and 3D multi-crop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ctfed.common.config import AugmentConfig, ConfigError, PreprocessConfig
from ctfed.common.dicom import CTVolume
from ctfed.common.preprocess import AXES, volume_to_tensor
from ctfed.common.ssl import (
    DINOLoss,
    KoLeoLoss,
    MAELoss,
    MultiCrop3D,
    cosine_schedule,
    iBOTPatchLoss,
    patchify,
    update_teacher,
)


def test_dino_loss_identical_views_equals_teacher_entropy() -> None:
    # softmax([0, ln 3]) = [1/4, 3/4]; with equal temperatures and a zero centre every
    # cross-view term is the entropy of that distribution.
    loss_fn = DINOLoss(out_dim=2, ncrops=2, student_temp=1.0, teacher_temp=1.0, center_momentum=0.9)
    logits = torch.tensor([[0.0, math.log(3.0)]])
    loss = loss_fn(torch.cat([logits, logits]), torch.cat([logits, logits]))
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_dino_loss_skips_same_view_pairs_and_sharpens_teacher() -> None:
    torch.manual_seed(0)
    student_t, teacher_t = 0.1, 0.04
    loss_fn = DINOLoss(out_dim=5, ncrops=3, student_temp=student_t, teacher_temp=teacher_t, center_momentum=0.9)
    student = torch.randn(3 * 2, 5)
    teacher = torch.randn(2 * 2, 5)
    s_views = [torch.log_softmax(v / student_t, dim=-1) for v in student.chunk(3)]
    t_views = [torch.softmax(v / teacher_t, dim=-1) for v in teacher.chunk(2)]
    terms = [(-t_views[t] * s_views[s]).sum(-1).mean() for t in range(2) for s in range(3) if s != t]
    assert len(terms) == 4
    assert loss_fn(student, teacher).item() == pytest.approx(torch.stack(terms).mean().item(), rel=1e-5)


def test_dino_loss_gives_teacher_no_gradient_and_moves_centre() -> None:
    momentum = 0.9
    loss_fn = DINOLoss(out_dim=4, ncrops=4, student_temp=0.1, teacher_temp=0.04, center_momentum=momentum)
    student = torch.randn(4 * 3, 4, requires_grad=True)
    teacher = torch.randn(2 * 3, 4, requires_grad=True)
    loss_fn(student, teacher).backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0
    expected_centre = (1 - momentum) * teacher.detach().mean(0, keepdim=True)
    assert torch.allclose(loss_fn.center, expected_centre)
    second = torch.randn(2 * 3, 4)
    loss_fn(student.detach(), second)
    assert torch.allclose(loss_fn.center, momentum * expected_centre + (1 - momentum) * second.mean(0, keepdim=True))


def test_dino_loss_rejects_mismatched_crop_counts() -> None:
    loss_fn = DINOLoss(out_dim=4, ncrops=4, student_temp=0.1, teacher_temp=0.04, center_momentum=0.9)
    with pytest.raises(ValueError, match="crops"):
        loss_fn(torch.randn(8, 4), torch.randn(6, 4))


def test_update_teacher_is_exact_ema() -> None:
    torch.manual_seed(0)
    student, teacher = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    before = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    update_teacher(student, teacher, momentum=0.75)
    for name, param in teacher.named_parameters():
        expected = 0.75 * before[name] + 0.25 * dict(student.named_parameters())[name]
        assert torch.allclose(param, expected)
        assert param.grad is None
    update_teacher(student, teacher, momentum=0.0)
    assert all(torch.equal(s, t) for s, t in zip(student.parameters(), teacher.parameters()))


def test_cosine_schedule_endpoints_and_warmup() -> None:
    schedule = cosine_schedule(1.0, 0.1, total_steps=11)
    assert schedule(0) == pytest.approx(1.0)
    assert schedule(5) == pytest.approx(0.55)
    assert schedule(10) == pytest.approx(0.1)
    assert schedule(100) == pytest.approx(0.1)  # past the horizon it holds the final value

    warm = cosine_schedule(1.0, 0.0, total_steps=20, warmup_steps=4, start_warmup=0.2)
    assert [warm(s) for s in range(5)] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert warm(19) == pytest.approx(0.0)
    values = [warm(s) for s in range(4, 20)]
    assert all(a >= b for a, b in zip(values, values[1:]))

    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, total_steps=3, warmup_steps=4)


def test_multicrop_shapes_count_and_determinism() -> None:
    volume = torch.rand(3, 40, 40, 40)
    crops = MultiCrop3D([0.5, 1.0], [0.2, 0.5], num_local=3, out_size=16, seed=7)(volume)
    assert len(crops) == 5
    assert all(c.shape == (3, 16, 16, 16) and c.dtype == torch.float32 for c in crops)
    assert all(type(c) is torch.Tensor for c in crops)  # plain tensors, not MONAI MetaTensors

    again = MultiCrop3D([0.5, 1.0], [0.2, 0.5], num_local=3, out_size=16, seed=7)(volume)
    assert all(torch.equal(a, b) for a, b in zip(crops, again))
    other = MultiCrop3D([0.5, 1.0], [0.2, 0.5], num_local=3, out_size=16, seed=8)(volume)
    assert not all(torch.equal(a, b) for a, b in zip(crops, other))

    reseeded = MultiCrop3D([0.5, 1.0], [0.2, 0.5], num_local=3, out_size=16, seed=0)
    reseeded.reseed(np.random.SeedSequence(7))
    assert all(torch.equal(a, b) for a, b in zip(crops, reseeded(volume)))


def test_multicrop_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="local_scale"):
        MultiCrop3D([0.5, 1.0], [0.5, 0.2], num_local=2, out_size=16)
    with pytest.raises(ValueError, match="one volume"):
        MultiCrop3D([0.5, 1.0], [0.2, 0.5], num_local=2, out_size=16)(torch.rand(1, 3, 8, 8, 8))


# Every view off: what a single augmentation is tested against.
NO_VIEWS = dict(flip_lr_prob=0.0, affine_prob=0.0, window_prob=0.0, noise_prob=0.0, blur_prob=0.0)


def _windowed(hu: np.ndarray) -> torch.Tensor:
    """HU (z, y, x) -> the cache's three [0, 1] window channels (PreprocessConfig's FM-CT windows)."""
    channels = [
        np.clip((hu - (w.level - w.width / 2)) / w.width, 0.0, 1.0) for w in PreprocessConfig().windows
    ]
    return torch.from_numpy(np.stack(channels).astype(np.float32))


def test_views_flip_left_right_only() -> None:
    # Every voxel distinct, so any flip or other change shows.
    volume = torch.linspace(0.0, 1.0, 3 * 8 * 8 * 8).reshape(3, 8, 8, 8)
    mirrored = torch.flip(volume, dims=[1 + MultiCrop3D.LR_AXIS])
    crops = MultiCrop3D([1.0, 1.0], [1.0, 1.0], num_local=0, out_size=8, seed=3,
                        augment=AugmentConfig(**{**NO_VIEWS, "flip_lr_prob": 0.5}))
    seen = {"unchanged": 0, "left-right": 0}
    for _ in range(100):
        for view in crops(volume):
            if torch.allclose(view, volume, atol=1e-6):
                seen["unchanged"] += 1
            elif torch.allclose(view, mirrored, atol=1e-6):
                seen["left-right"] += 1
            else:
                pytest.fail("a view that is neither the volume nor its left-right mirror")
    assert min(seen.values()) > 60, seen

    # With every default view on (rotations, scales, window, noise, blur): a marker in the
    # inferior posterior octant stays there in every draw, while left and right both occur.
    marked = torch.zeros(3, 16, 16, 16)
    marked[:, 2:6, 2:6, 2:6] = 1.0  # low z (inferior), low y (posterior), low x (left)
    crops = MultiCrop3D([1.0, 1.0], [1.0, 1.0], num_local=0, out_size=16, seed=4, voxel_mm=(6.0, 6.0, 6.0))
    sides = set()
    grid = torch.arange(16, dtype=torch.float32)
    for _ in range(60):
        for view in crops(marked):
            weight = (view[0] > 0.5).float()
            assert weight.sum() > 0
            z, y, x = (float((weight.sum(dim=tuple(d for d in range(3) if d != axis)) * grid).sum() / weight.sum())
                       for axis in range(3))
            assert z < 7.5 and y < 7.5, f"the marker moved to z={z:.1f}, y={y:.1f}: an SI or AP flip"
            sides.add("left" if x < 7.5 else "right")
    assert sides == {"left", "right"}


def test_the_left_right_flip_is_the_patients_left_right() -> None:
    """The cache's RAS order (preprocess.AXES) puts left-right on the last axis: a marker on the
    patient's left (LPS +x) comes out on the right after the flip, nothing else moves."""
    assert AXES.split(",")[1 + MultiCrop3D.LR_AXIS] == "x(left->right)"
    hu = np.full((20, 20, 20), 40.0, dtype=np.float32)
    hu[4:8, 4:8, 14:18] = 2000.0  # LPS: low z (inferior), low y (anterior), high x (the patient's left)
    volume = CTVolume(hu=hu, spacing_zyx=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3))
    cached = torch.from_numpy(volume_to_tensor(volume, PreprocessConfig(output_size=16)).astype(np.float32))
    flip = MultiCrop3D([1.0, 1.0], [1.0, 1.0], num_local=0, out_size=16,
                       augment=AugmentConfig(**{**NO_VIEWS, "flip_lr_prob": 1.0}))
    before = np.unravel_index(int(torch.argmax(cached[2])), (16, 16, 16))
    after = np.unravel_index(int(torch.argmax(flip(cached)[0][2])), (16, 16, 16))
    assert before[2] < 8 <= after[2]  # patient's left (low RAS x) -> right
    assert before[:2] == after[:2]


def test_blood_stays_brighter_than_brain_in_every_view() -> None:
    """A 70 HU blob in 35 HU brain is 0.4375 brighter in the brain window (L40/W80). Over many
    draws of the default views its core stays >= 0.35 (28 HU) above the surrounding brain.
    (The former views failed this: gamma 0.2 left 0.13 of the step.)"""
    size, centre = 32, 15.5
    z, y, x = np.meshgrid(*(np.arange(size),) * 3, indexing="ij")
    radius = np.sqrt((z - centre) ** 2 + (y - centre) ** 2 + (x - centre) ** 2)
    hu = np.where(radius < 14, 35.0, -1000.0)  # brain in air
    hu = np.where(radius < 6, 70.0, hu)  # the haematoma: 12 mm across at 2 mm voxels (96^3)
    volume = _windowed(hu)[:1]  # the brain window
    core = torch.from_numpy(radius < 3)
    brain = torch.from_numpy((radius > 9) & (radius < 12))
    margin = 28.0 / 80.0
    assert float(volume[0][core].mean() - volume[0][brain].mean()) == pytest.approx(35.0 / 80.0)
    crops = MultiCrop3D([1.0, 1.0], [1.0, 1.0], num_local=0, out_size=size, seed=5, voxel_mm=(2.0, 2.0, 2.0))
    steps = []
    for _ in range(50):
        for view in crops(volume):
            steps.append(float(view[0][core].mean() - view[0][brain].mean()))
    assert min(steps) >= margin, f"blood/brain step fell to {min(steps):.3f} (window units)"
    assert max(steps) - min(steps) > 0.01  # the views did vary


@pytest.mark.parametrize("voxel", [(6.0, 6.0, 6.0), (3.0, 3.0, 3.0), (3.0, 6.0, 6.0)])
def test_blur_sigma_is_in_millimetres(voxel: tuple[float, float, float]) -> None:
    """A point in a 192 mm head at 32^3 (6 mm voxels), 64^3 (3 mm) and an anisotropic grid:
    a 6 mm blur spreads it by the same variance in mm^2 along every axis (a sigma in voxels
    would give 4x the spread at 6 mm voxels)."""
    shape = tuple(round(192 / v) for v in voxel)
    volume = torch.zeros(1, *shape)
    volume[0, shape[0] // 2, shape[1] // 2, shape[2] // 2] = 1.0
    blur = AugmentConfig(**{**NO_VIEWS, "blur_prob": 1.0, "blur_sigma_mm": [6.0, 6.0]})
    crops = MultiCrop3D([1.0, 1.0], [1.0, 1.0], num_local=0, out_size=shape[0], augment=blur, voxel_mm=voxel)
    if len(set(shape)) > 1:  # crops are cubes; the anisotropic grid goes through the blur alone
        view = crops._blur(volume, voxel)
    else:
        view = crops(volume)[0]
    weight = view[0] / view[0].sum()
    for axis, size_mm in enumerate(voxel):
        position = torch.arange(shape[axis], dtype=torch.float32) * size_mm
        profile = weight.sum(dim=tuple(d for d in range(3) if d != axis))
        mean = (profile * position).sum()
        variance = (profile * (position - mean) ** 2).sum()
        assert float(variance) == pytest.approx(36.0, rel=0.1), (axis, float(variance))


def test_local_crops_blur_in_their_own_voxel_size() -> None:
    """A local crop of half the side is resized to the same grid, so its voxels are half the size:
    the same sigma in mm is twice as many of its voxels."""
    augment = AugmentConfig(**{**NO_VIEWS, "blur_prob": 1.0, "blur_sigma_mm": [4.0, 4.0]})
    crops = MultiCrop3D([1.0, 1.0], [0.125, 0.125], num_local=1, out_size=16, augment=augment, voxel_mm=(4.0, 4.0, 4.0))
    sigmas = []
    original = crops._blur
    crops._blur = lambda view, voxel_mm: sigmas.append(voxel_mm) or original(view, voxel_mm)  # type: ignore[method-assign]
    crops(torch.rand(1, 16, 16, 16))
    assert sigmas == [(4.0, 4.0, 4.0), (4.0, 4.0, 4.0), (2.0, 2.0, 2.0)]


def test_window_jitter_and_noise_leave_clipped_voxels_clipped() -> None:
    """Air (0 in every window) and bone in the brain window (1) lie far outside the window: jitter
    and noise move only what the window shows, as re-windowing the scan would."""
    volume = torch.full((1, 8, 8, 8), 0.5)
    volume[:, :, :, :2] = 0.0
    volume[:, :, :, -2:] = 1.0
    intensity = AugmentConfig(**{**NO_VIEWS, "window_prob": 1.0, "noise_prob": 1.0})
    crops = MultiCrop3D([1.0, 1.0], [1.0, 1.0], 0, 8, seed=2, augment=intensity)
    for _ in range(10):
        for view in crops(volume):
            assert torch.all(view[:, :, :, :2] == 0.0) and torch.all(view[:, :, :, -2:] == 1.0)
            assert not torch.allclose(view[:, :, :, 2:-2], volume[:, :, :, 2:-2])


def test_every_view_is_reproducible_from_its_seed() -> None:
    volume = torch.rand(3, 16, 16, 16)
    every_view = AugmentConfig(flip_lr_prob=0.5, affine_prob=1.0, window_prob=1.0, noise_prob=1.0, blur_prob=1.0)

    def crops(seed: int) -> list[torch.Tensor]:
        return MultiCrop3D([0.5, 1.0], [0.2, 0.5], 2, 16, seed=seed, augment=every_view, voxel_mm=(5.0, 6.0, 5.5))(volume)

    first = crops(11)
    assert all(torch.equal(a, b) for a, b in zip(first, crops(11)))
    assert not any(torch.equal(a, b) for a, b in zip(first, crops(12)))
    assert all(float(c.min()) >= 0.0 and float(c.max()) <= 1.0 for c in first)


def test_views_without_a_voxel_size_skip_the_blur_and_say_so(caplog: pytest.LogCaptureFixture) -> None:
    volume = torch.rand(1, 8, 8, 8)
    augment = AugmentConfig(**{**NO_VIEWS, "blur_prob": 1.0})
    with caplog.at_level("WARNING"):
        views = MultiCrop3D([1.0, 1.0], [1.0, 1.0], 0, 8, augment=augment)(volume)
    assert all(torch.allclose(v, volume, atol=1e-6) for v in views)
    assert "blur skipped" in caplog.text
    with pytest.raises(ValueError, match="voxel_mm"):
        MultiCrop3D([1.0, 1.0], [1.0, 1.0], 0, 8, voxel_mm=(1.0, 0.0, 1.0))


def _smooth_volume(size: int) -> torch.Tensor:
    """Three channels of slowly varying intensity in [0, 1], distinct along every axis."""
    z, y, x = torch.meshgrid(*(torch.linspace(0.0, 1.0, size),) * 3, indexing="ij")
    return torch.stack([
        0.5 + 0.4 * torch.sin(2.0 * z + 1.0 * y + 0.5 * x),
        0.5 + 0.4 * torch.cos(1.5 * x - 1.0 * z),
        0.2 + 0.6 * y * x,
    ])


def test_the_affine_matrix_is_monais_rotation_then_scale() -> None:
    from monai.transforms.utils import create_rotate, create_scale

    angles, factors = [0.1, -0.15, 0.12], [1.05, 0.95, 1.08]
    expected = create_rotate(3, angles)[:3, :3] @ create_scale(3, factors)[:3, :3]
    assert torch.allclose(MultiCrop3D.affine_matrix(angles, factors), torch.from_numpy(expected).float(), atol=1e-6)


@pytest.mark.parametrize("flip", [False, True])
@pytest.mark.parametrize(("starts", "sides"), [((0, 0, 0), (24, 24, 24)), ((3, 5, 2), (20, 18, 22)), ((1, 2, 3), (11, 9, 10))])
def test_one_resampling_equals_crop_resize_flip_then_affine(
    starts: tuple[int, int, int], sides: tuple[int, int, int], flip: bool
) -> None:
    """The view's single grid_sample against the former three steps: the crop resized by
    F.interpolate, flipped, then MONAI's Affine (rotation, scale, zeros outside) on the result.
    Downsampled (24 -> 16), upsampled (local crops) and anisotropic crops."""
    from monai.transforms import Affine

    size = 16
    volume = _smooth_volume(24)
    views = MultiCrop3D([1.0, 1.0], [1.0, 1.0], 0, size)
    crop = volume[:, starts[0]:starts[0] + sides[0], starts[1]:starts[1] + sides[1], starts[2]:starts[2] + sides[2]]
    resized = torch.nn.functional.interpolate(crop[None], size=(size,) * 3, mode="trilinear", align_corners=False)[0]
    if flip:
        resized = torch.flip(resized, dims=[1 + MultiCrop3D.LR_AXIS])

    # Identity: exactly the crop and resize (flip included) as before.
    identity = views.resample(volume, starts, sides, flip, torch.eye(3))
    assert torch.allclose(identity, resized, atol=1e-5), float((identity - resized).abs().max())
    assert torch.equal(views.resample(volume, starts, sides, flip, None), resized)

    angles, factors = [0.15, -0.1, 0.17], [1.1, 0.92, 1.05]
    affine = Affine(rotate_params=angles, scale_params=factors, mode="bilinear", padding_mode="zeros", image_only=True)
    expected = torch.as_tensor(affine(resized)).as_subclass(torch.Tensor)
    view = views.resample(volume, starts, sides, flip, MultiCrop3D.affine_matrix(angles, factors))
    difference = (view - expected).abs()
    # One interpolation instead of two: equal up to the second pass's smoothing of a smooth volume.
    assert float(difference.mean()) < 2e-3 and float(difference.max()) < 0.03, (float(difference.mean()), float(difference.max()))
    # Outside the field of view is air in both (the scale > 1 axis reaches past the crop).
    outside = expected.abs().sum(dim=0) == 0
    assert outside.any() and torch.all(view[:, outside] == 0)


def test_view_statistics_match_the_augment_config() -> None:
    """Over 400 views: the flip rate, the window's gain and level jitter (recovered from two
    known intensities per channel) and the noise's std lie in AugmentConfig's ranges at its rates."""
    cfg = AugmentConfig()
    volume = torch.full((3, 8, 8, 8), 0.25)
    volume[:, :, :, 4:] = 0.75
    volume[:, 0, 0, 0] = 0.1  # an asymmetric marker: a left-right flip moves it
    crops = MultiCrop3D([1.0, 1.0], [1.0, 1.0], 0, 8, seed=9,
                        augment=AugmentConfig(**{**NO_VIEWS, "flip_lr_prob": cfg.flip_lr_prob, "window_prob": cfg.window_prob}))
    flips, gains, offsets = 0, [], []
    for _ in range(200):
        for view in crops(volume):
            flipped = bool(view[0, 0, 0, 7] < view[0, 0, 0, 0])
            flips += flipped
            if flipped:
                view = torch.flip(view, dims=[1 + MultiCrop3D.LR_AXIS])
            low, high = view[:, 1:, 1:, :4].mean(dim=(1, 2, 3)), view[:, 1:, 1:, 4:].mean(dim=(1, 2, 3))
            gains.append((high - low) / 0.5 - 1.0)
            offsets.append((high + low) / 2 - 0.5)
    assert 0.4 < flips / 400 < 0.6
    gain, offset = torch.stack(gains), torch.stack(offsets)  # (views, channels)
    assert float(gain.abs().max()) <= cfg.contrast + 1e-5 and float(offset.abs().max()) <= cfg.level_shift + 1e-5
    # Jitter applies per view with window_prob and draws per channel: channels differ.
    assert 0.7 < float((gain[:, 0].abs() > 1e-5).float().mean()) < 0.9
    assert 0.7 < float((offset[:, 0].abs() > 1e-5).float().mean()) < 0.9
    assert float(gain.abs().max()) > 0.9 * cfg.contrast and float(offset.abs().max()) > 0.9 * cfg.level_shift
    assert float((gain[:, 0] - gain[:, 1]).abs().max()) > 0.01

    noisy = MultiCrop3D([1.0, 1.0], [1.0, 1.0], 0, 16, seed=10,
                        augment=AugmentConfig(**{**NO_VIEWS, "noise_prob": cfg.noise_prob}))
    flat = torch.full((3, 16, 16, 16), 0.5)
    stds = torch.tensor([float((view - flat).std()) for _ in range(200) for view in noisy(flat)])
    applied = stds > 0
    assert 0.4 < float(applied.float().mean()) < 0.6
    # std uniform in [0, noise_std]: mean noise_std / 2, none above it.
    assert float(stds.max()) <= cfg.noise_std * 1.05
    assert float(stds[applied].mean()) == pytest.approx(cfg.noise_std / 2, rel=0.15)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"flip_lr_prob": 1.5}, "flip_lr_prob"),
        ({"noise_prob": float("nan")}, "noise_prob"),
        ({"rotate_degrees": 90.0}, "rotate_degrees"),
        ({"contrast": -0.1}, "contrast"),
        ({"blur_sigma_mm": [2.0, 1.0]}, "blur_sigma_mm"),
        ({"blur_sigma_mm": [0.0, 1.0]}, "blur_sigma_mm"),
    ],
)
def test_augment_config_is_validated(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AugmentConfig(**kwargs)


def test_ibot_loss_known_value_per_sample_then_batch_mean() -> None:
    # Teacher rows softmax to [1/4, 3/4] (temperature 1, zero centre); a uniform student gives
    # cross-entropy ln 2 per token, a student equal to the teacher gives the teacher's entropy.
    loss_fn = iBOTPatchLoss(out_dim=2, student_temp=1.0, teacher_temp=1.0, center_momentum=0.9)
    teacher = torch.tensor([0.0, math.log(3.0)]).expand(3, 4, 2).clone()
    student = torch.zeros(3, 4, 2)
    student[1] = teacher[1]
    mask = torch.zeros(3, 4, dtype=torch.bool)
    mask[0, :1] = True  # one token
    mask[1, :3] = True  # three tokens, each weighted 1/3
    entropy = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    # Sample 2 has no masked token: it counts as 0 in the batch mean (iBOT/DINOv2).
    expected = (math.log(2.0) + entropy) / 3
    assert loss_fn(student, teacher, mask).item() == pytest.approx(expected, rel=1e-6)
    # Masked rows only, in mask.nonzero() order, give the same value.
    fresh = iBOTPatchLoss(out_dim=2, student_temp=1.0, teacher_temp=1.0, center_momentum=0.9)
    assert fresh(student[mask], teacher[mask], mask).item() == pytest.approx(expected, rel=1e-6)


def test_ibot_loss_ignores_unmasked_tokens_and_teacher_gets_no_gradient() -> None:
    torch.manual_seed(0)
    mask = torch.rand(4, 10) < 0.4
    mask[0, 0], mask[0, 1] = True, False
    student = torch.randn(4, 10, 6, requires_grad=True)
    teacher = torch.randn(4, 10, 6, requires_grad=True)
    loss = iBOTPatchLoss(6, 0.1, 0.04, 0.9)(student, teacher, mask)
    changed = student.detach().clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 6) * 10
    assert iBOTPatchLoss(6, 0.1, 0.04, 0.9)(changed, teacher, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    loss.backward()
    assert teacher.grad is None
    assert student.grad is not None
    assert student.grad[~mask].abs().sum() == 0 and student.grad[mask].abs().sum() > 0


def test_ibot_centre_is_ema_of_masked_teacher_tokens() -> None:
    momentum = 0.8
    loss_fn = iBOTPatchLoss(3, 0.1, 0.04, momentum)
    teacher = torch.randn(2, 5, 3)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, 1:3] = True
    mask[1, 4] = True
    loss_fn(torch.randn(2, 5, 3), teacher, mask)
    first = (1 - momentum) * teacher[mask].mean(0, keepdim=True)
    assert torch.allclose(loss_fn.center, first)
    second = torch.randn(2, 5, 3)
    loss_fn(torch.randn(2, 5, 3), second, mask)
    assert torch.allclose(loss_fn.center, momentum * first + (1 - momentum) * second[mask].mean(0, keepdim=True))
    # No masked token: loss 0 (still differentiable) and the centre stays put.
    student = torch.randn(2, 5, 3, requires_grad=True)
    empty = loss_fn(student, second, torch.zeros(2, 5, dtype=torch.bool))
    assert empty.item() == 0.0 and empty.requires_grad
    assert torch.allclose(loss_fn.center, momentum * first + (1 - momentum) * second[mask].mean(0, keepdim=True))


def test_ibot_loss_rejects_mismatched_rows() -> None:
    loss_fn = iBOTPatchLoss(3, 0.1, 0.04, 0.9)
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 0] = True
    with pytest.raises(ValueError, match="masked rows"):
        loss_fn(torch.randn(2, 3), torch.randn(2, 3), mask)
    with pytest.raises(ValueError, match="bool"):
        loss_fn(torch.randn(1, 3), torch.randn(1, 3), mask.float())


def test_koleo_known_value_on_crafted_points() -> None:
    # Rows are normalised first (the scale must not matter). On the unit circle at 0, 90 and
    # 180 degrees: a and c each have b at distance sqrt(2) as nearest neighbour, b has both
    # at sqrt(2); so the loss is -log(sqrt(2)) whatever the third point's tie-break.
    points = torch.tensor([[3.0, 0.0], [0.0, 0.5], [-2.0, 0.0]])
    assert KoLeoLoss()(points).item() == pytest.approx(-math.log(math.sqrt(2.0)), rel=1e-6)
    # Two close points and one far: the close pair dominates with -log(their distance).
    angle = 0.1
    points = torch.tensor([[1.0, 0.0], [math.cos(angle), math.sin(angle)], [-1.0, 0.0]])
    close = 2 * math.sin(angle / 2)
    far = 2 * math.sin((math.pi - angle) / 2)
    expected = -(2 * math.log(close) + math.log(far)) / 3
    assert KoLeoLoss()(points).item() == pytest.approx(expected, rel=1e-5)


def test_koleo_gradient_pushes_nearest_neighbours_apart() -> None:
    torch.manual_seed(0)
    points = torch.randn(6, 8)
    points[1] = points[0] + 0.01 * torch.randn(8)  # a near-duplicate pair
    x = points.clone().requires_grad_(True)
    KoLeoLoss()(x).backward()
    stepped = torch.nn.functional.normalize(x.detach() - 0.5 * x.grad, dim=-1)
    before = torch.nn.functional.normalize(points, dim=-1)
    assert torch.dist(stepped[0], stepped[1]) > torch.dist(before[0], before[1])
    assert KoLeoLoss()(x.detach() - 0.5 * x.grad) < KoLeoLoss()(points)


def test_koleo_needs_two_rows() -> None:
    with pytest.raises(ValueError, match="B >= 2"):
        KoLeoLoss()(torch.randn(1, 4))


def test_patchify_follows_the_encoders_token_order() -> None:
    """Patch n of ``patchify`` is what the conv patch embedding turns into token n."""
    torch.manual_seed(0)
    volumes = torch.rand(2, 3, 16, 8, 24)
    patches = patchify(volumes, 8)
    assert patches.shape == (2, 2 * 1 * 3, 3 * 8**3)
    # A conv of all-ones per channel sums each patch: flattened, it is the encoder's token order.
    conv = torch.nn.Conv3d(3, 3, kernel_size=8, stride=8, groups=3, bias=False)
    torch.nn.init.ones_(conv.weight)
    sums = conv(volumes).flatten(2).transpose(1, 2)  # (B, N, C)
    assert torch.allclose(patches.reshape(2, 6, 3, 8**3).sum(-1), sums, atol=1e-4)
    # Within a patch: channel-major, then the voxels in raster order.
    assert torch.equal(patches[1, 4].reshape(3, 8, 8, 8), volumes[1, :, 8:16, 0:8, 8:16])
    with pytest.raises(ValueError, match="multiple of 8"):
        patchify(torch.rand(1, 3, 12, 8, 8), 8)


def test_mae_loss_counts_masked_patches_only_and_normalises_each_patch() -> None:
    torch.manual_seed(0)
    volumes = torch.rand(2, 1, 8, 8, 8) * 5 + 3
    loss_fn = MAELoss(patch_size=4, norm_pix=True, eps=0.0)
    target = patchify(volumes, 4)
    normalised = (target - target.mean(-1, keepdim=True)) / target.std(-1, keepdim=True, correction=0)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[0, [1, 5]] = True
    mask[1, 2] = True
    # Exact on the masked patches, garbage elsewhere: zero loss.
    prediction = torch.where(mask.unsqueeze(-1), normalised, torch.full_like(normalised, 100.0))
    assert float(loss_fn(prediction, volumes, mask)) == pytest.approx(0.0, abs=1e-10)
    # Predicting zeros misses a standardised patch by exactly its variance, 1, per voxel.
    assert float(loss_fn(torch.zeros_like(target), volumes, mask)) == pytest.approx(1.0, abs=1e-5)
    # Raw voxels: the mean squared error over the 3 masked patches.
    raw = MAELoss(patch_size=4, norm_pix=False)(torch.zeros_like(target), volumes, mask)
    assert float(raw) == pytest.approx(float(target[mask].pow(2).mean()), rel=1e-6)


def test_mae_loss_without_masked_patches_is_zero_and_keeps_the_graph() -> None:
    prediction = torch.rand(2, 8, 64, requires_grad=True)
    loss = MAELoss(patch_size=4)(prediction, torch.rand(2, 1, 8, 8, 8), torch.zeros(2, 8, dtype=torch.bool))
    loss.backward()
    assert float(loss) == 0.0 and prediction.grad is not None and not prediction.grad.any()
    with pytest.raises(ValueError, match="bool mask"):
        MAELoss(patch_size=4)(prediction, torch.rand(2, 1, 8, 8, 8), torch.zeros(2, 7, dtype=torch.bool))


def test_a_sites_voxel_size_and_views_reach_its_trainer() -> None:
    from ctfed.client.train import LocalTrainer
    from ctfed.common.config import ModelConfig, TrainConfig

    class Cache(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return 2

        def __getitem__(self, index: int) -> torch.Tensor:
            return torch.rand(3, 32, 32, 32)

        def cached_voxel_mm(self) -> tuple[float, float, float]:
            return (5.0, 6.0, 7.0)

    train = TrainConfig(augment=AugmentConfig(rotate_degrees=5.0))
    trainer = LocalTrainer(ModelConfig(), train, Cache())
    assert trainer.multicrop.voxel_mm == (5.0, 6.0, 7.0) and trainer.multicrop.config is train.augment
    assert MultiCrop3D.site_voxel_mm(torch.utils.data.TensorDataset(torch.zeros(1))) is None
    # Pooled sites (centralized training, label_signal): the median over the caches.
    class Other(Cache):
        def cached_voxel_mm(self) -> tuple[float, float, float]:
            return (7.0, 6.0, 5.0)

    pooled = torch.utils.data.ConcatDataset([Cache(), Other(), Other()])
    assert MultiCrop3D.site_voxel_mm(pooled) == (7.0, 6.0, 5.0)


def test_views_are_set_from_the_command_line_and_travel_to_the_sites() -> None:
    from ctfed.common.config import load_run_config
    from ctfed.common.exchange import RoundInstructions

    cfg = load_run_config(["train.augment.rotate_degrees=15", "train.augment.blur_sigma_mm=[1.0,2.0]"])
    assert cfg.train.augment.rotate_degrees == 15.0 and cfg.train.augment.blur_sigma_mm == [1.0, 2.0]
    sent = RoundInstructions(server_round=1, model=cfg.model, train=cfg.train).to_record()
    assert RoundInstructions.from_record(sent).train.augment == cfg.train.augment
    with pytest.raises(ConfigError, match="rotate_degrees"):
        load_run_config(["train.augment.rotate_degrees=90"])
    sent["train.augment.noise_std"] = float("nan")  # a coordinator cannot smuggle in a NaN
    with pytest.raises(ConfigError, match="noise_std"):
        RoundInstructions.from_record(sent)
