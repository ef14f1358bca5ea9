"""Public reference volumes: simple analytic heads that stand in for a site's scans where a
statistic must not depend on private data (the DINO and iBOT centres under local DP-SGD).

Each head is built in HU (air, scalp, skull, brain, ventricles), cropped like ``ctfed
prepare``'s foreground crop (the head fills the cube) and mapped to the window channels in
[0, 1], so it has the intensity statistics of a prepared cache without being anyone's scan.
Anyone can rebuild them from (count, size, seed): they are data-independent by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

# HU of the tissues the heads are made of.
_AIR, _SCALP, _BONE, _BRAIN, _CSF = -1000.0, 40.0, 1000.0, 35.0, 5.0
# FM-CT's windows (level, width), the default channels of a prepared cache.
FM_CT_WINDOWS: tuple[tuple[float, float], ...] = ((40.0, 80.0), (80.0, 200.0), (600.0, 2800.0))


def reference_heads(
    count: int, size: int, windows: Sequence[tuple[float, float]] = FM_CT_WINDOWS, seed: int = 0
) -> torch.Tensor:
    """``count`` analytic heads (count, len(windows), size, size, size), float32 in [0, 1]."""
    if count < 1 or size < 4 or not windows:
        raise ValueError(f"reference_heads needs count >= 1, size >= 4 and windows, got {count}, {size}, {windows}")
    rng = np.random.default_rng(seed)
    axis = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    z, y, x = np.meshgrid(axis, axis, axis, indexing="ij")
    heads = []
    for _ in range(count):
        # A rounded box (superellipsoid) that fills the cube, as the foreground crop and the
        # resize to a cube make a head do.
        radii = rng.uniform(0.95, 1.0, size=3)
        centre = rng.uniform(-0.03, 0.03, size=3)
        power = rng.uniform(2.5, 3.5)
        r = (np.abs((z - centre[0]) / radii[0]) ** power + np.abs((y - centre[1]) / radii[1]) ** power
             + np.abs((x - centre[2]) / radii[2]) ** power) ** (1.0 / power)
        skull_inner = rng.uniform(0.84, 0.9)
        hu = np.full(r.shape, _AIR, dtype=np.float32)
        hu[r < 1.0] = _SCALP
        hu[r < 0.96] = _BONE
        hu[r < skull_inner] = _BRAIN + rng.normal(0.0, 3.0, size=(r < skull_inner).sum()).astype(np.float32)
        # Two lateral ventricles, mirrored about the midline (x = 0).
        vy, vz, spread = rng.uniform(-0.15, 0.1), rng.uniform(-0.05, 0.2), rng.uniform(0.12, 0.2)
        for side in (-1.0, 1.0):
            v = ((x - side * spread) / 0.09) ** 2 + ((y - vy) / 0.3) ** 2 + ((z - vz) / 0.16) ** 2
            hu[v < 1.0] = _CSF
        channels = [np.clip((hu - (level - width / 2)) / width, 0.0, 1.0) for level, width in windows]
        heads.append(np.stack(channels))
    return torch.from_numpy(np.stack(heads).astype(np.float32))
