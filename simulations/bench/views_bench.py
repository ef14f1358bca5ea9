"""Cost of the SSL multi-crop views: ms per volume of ``common/ssl.py`` MultiCrop3D against the
former MONAI-transform path (kept here only, for the ratio), and a tiny model's training step
with each, measured in one run (issue #11).

    .ci/in-env python -m ctfed.simulations.bench.views_bench            # 32^3 and 96^3, trainer steps
    .ci/in-env python -m ctfed.simulations.bench.views_bench --quick    # fewer repeats

Old and new alternate in blocks after one untimed warm-up each, so a change in the machine's
load hits both, and the figures are this process's CPU time (``time.process_time``), which
other jobs on a shared core inflate far less than wall time. One torch thread by default, as
a site's single loader process runs.
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import get_track_meta, set_track_meta
from monai.transforms import (
    Compose,
    RandAffine,
    RandFlip,
    RandGaussianNoise,
    RandScaleIntensity,
    RandShiftIntensity,
    ShiftIntensity,
)
from monai.utils import convert_to_tensor
from torch.utils.data import Dataset

from ctfed.common.config import AugmentConfig, load_run_config
from ctfed.common.ssl import MultiCrop3D


class FormerMultiCrop3D(MultiCrop3D):
    """The views as MultiCrop3D made them before issue #11's speed-up: a crop resized with
    ``F.interpolate``, then MONAI RandFlip + RandAffine (a second resampling), the blur, then
    MONAI's window jitter and numpy-drawn noise. For the benchmark's ratio only."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        cfg = self.config
        angle = math.radians(cfg.rotate_degrees)
        self.spatial = Compose([
            RandFlip(prob=cfg.flip_lr_prob, spatial_axis=self.LR_AXIS),
            RandAffine(prob=cfg.affine_prob, rotate_range=(angle,) * 3, scale_range=(cfg.scale,) * 3,
                       mode="bilinear", padding_mode="zeros"),
        ])
        self.intensity = Compose([
            ShiftIntensity(-0.5),
            RandScaleIntensity(factors=cfg.contrast, prob=cfg.window_prob, channel_wise=True),
            ShiftIntensity(0.5),
            RandShiftIntensity(offsets=cfg.level_shift, prob=cfg.window_prob, channel_wise=True),
            RandGaussianNoise(prob=cfg.noise_prob, mean=0.0, std=cfg.noise_std, sample_std=True),
        ])
        # MultiCrop3D.__init__ seeded self.rng before these existed: hand them the same state.
        self.spatial.set_random_state(state=self.rng)
        self.intensity.set_random_state(state=self.rng)

    def reseed(self, seed: int | np.random.SeedSequence) -> None:
        super().reseed(seed)
        if hasattr(self, "spatial"):
            self.spatial.set_random_state(state=self.rng)
            self.intensity.set_random_state(state=self.rng)

    def __call__(self, volume: torch.Tensor, voxel_mm: Sequence[float] | None = None) -> list[torch.Tensor]:
        voxel = self._checked_voxel_mm(voxel_mm) if voxel_mm is not None else self.voxel_mm
        tracking = get_track_meta()
        set_track_meta(False)
        try:
            crops = []
            for scale in [self.global_scale] * 2 + [self.local_scale] * self.num_local:
                fraction = self.rng.uniform(*scale)
                sides = [max(1, round(size * fraction ** (1 / 3))) for size in volume.shape[1:]]
                starts = [int(self.rng.randint(0, size - side + 1)) for size, side in zip(volume.shape[1:], sides)]
                crop = volume[:, starts[0]:starts[0] + sides[0], starts[1]:starts[1] + sides[1], starts[2]:starts[2] + sides[2]]
                crop = F.interpolate(crop[None].float(), size=(self.out_size,) * 3, mode="trilinear", align_corners=False)[0]
                crop_voxel = None if voxel is None else tuple(v * side / self.out_size for v, side in zip(voxel, sides))
                view = convert_to_tensor(self._blur(self.spatial(crop), crop_voxel), track_meta=False, dtype=torch.float32)
                below, above = view <= 0.0, view >= 1.0
                view = convert_to_tensor(self.intensity(view), track_meta=False, dtype=torch.float32).clamp_(0.0, 1.0)
                crops.append(view.masked_fill_(below, 0.0).masked_fill_(above, 1.0))
            return crops
        finally:
            set_track_meta(tracking)


class _RandomVolumes(Dataset):
    """Random (3, S, S, S) volumes in [0, 1] with a reported voxel size, so the blur applies."""

    def __init__(self, count: int, size: int, voxel_mm: float) -> None:
        gen = torch.Generator().manual_seed(0)
        self.volumes = [torch.rand(3, size, size, size, generator=gen) for _ in range(count)]
        self.voxel_mm = voxel_mm

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.volumes[index]

    def cached_voxel_mm(self) -> tuple[float, float, float]:
        return (self.voxel_mm,) * 3


def _alternating(timers: dict[str, Callable[[], float]], blocks: int) -> dict[str, float]:
    """Each timer's median over ``blocks`` rounds, old and new taking turns."""
    for timer in timers.values():
        timer()  # untimed warm-up
    seconds: dict[str, list[float]] = {name: [] for name in timers}
    for _ in range(blocks):
        for name, timer in timers.items():
            seconds[name].append(timer())
    return {name: float(np.median(values)) for name, values in seconds.items()}


def views_ms_per_volume(size: int, voxel_mm: float, volumes: int, blocks: int) -> dict[str, float]:
    """CPU ms per volume (2 global + 2 local views, default AugmentConfig) of the former and current path."""
    volume = torch.rand(3, size, size, size, generator=torch.Generator().manual_seed(1))
    kwargs = dict(global_scale=[0.5, 1.0], local_scale=[0.2, 0.5], num_local=2, out_size=size,
                  augment=AugmentConfig(), voxel_mm=(voxel_mm,) * 3)
    makers = {"former": FormerMultiCrop3D(seed=0, **kwargs), "current": MultiCrop3D(seed=0, **kwargs)}

    def timer(maker: MultiCrop3D) -> Callable[[], float]:
        def run() -> float:
            started = time.process_time()
            for _ in range(volumes):
                maker(volume)
            return (time.process_time() - started) / volumes * 1000
        return run

    result = _alternating({name: timer(maker) for name, maker in makers.items()}, blocks)
    return {"size": size, "former_ms": result["former"], "current_ms": result["current"],
            "speedup": result["former"] / result["current"]}


def trainer_step_s(batch: int, steps: int, blocks: int) -> dict[str, float]:
    """CPU seconds per LocalTrainer step (model=tiny, default views) with the former and current views."""
    from ctfed.client.train import LocalTrainer  # the site side, only for this figure

    cfg = load_run_config(["model=tiny", f"train.batch_size={batch}", f"train.local_steps={steps}"])
    dataset = _RandomVolumes(2 * batch, cfg.model.image_size, voxel_mm=6.0)
    trainer = LocalTrainer(cfg.model, cfg.train, dataset, seed=0)
    current = trainer.multicrop
    former = FormerMultiCrop3D(cfg.train.global_crop_scale, cfg.train.local_crop_scale, cfg.train.num_local_crops,
                               cfg.model.image_size, augment=cfg.train.augment, voxel_mm=dataset.cached_voxel_mm())
    rounds = iter(range(10**6))

    def timer(views: MultiCrop3D) -> Callable[[], float]:
        def run() -> float:
            trainer.multicrop = views
            started = time.process_time()
            trainer.train_round(next(rounds))
            return (time.process_time() - started) / steps
        return run

    result = _alternating({"former": timer(former), "current": timer(current)}, blocks)
    return {"batch": batch, "steps": steps, "former_step_s": result["former"], "current_step_s": result["current"],
            "speedup": result["former"] / result["current"]}


def build_parser() -> argparse.ArgumentParser:
    """The command line of ``main`` (tests/unit/test_doc_commands.py parses the docs' commands with it)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (about a minute on one core)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (a site's loader: 1)")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    blocks = 3 if args.quick else 5
    for size, voxel_mm, volumes in ((32, 6.0, 10 if args.quick else 20), (96, 2.0, 1)):
        row = views_ms_per_volume(size, voxel_mm, volumes, blocks)
        print(f"views {size}^3, 4 views per volume: former {row['former_ms']:.1f} ms, "
              f"current {row['current_ms']:.1f} ms per volume -> {row['speedup']:.2f}x", flush=True)
    row = trainer_step_s(batch=8, steps=20, blocks=1 if args.quick else 2)
    print(f"LocalTrainer step, model=tiny, batch {row['batch']}, {row['steps']} steps: former "
          f"{row['former_step_s'] * 1000:.0f} ms, current {row['current_step_s'] * 1000:.0f} ms -> {row['speedup']:.2f}x")


if __name__ == "__main__":
    main()
