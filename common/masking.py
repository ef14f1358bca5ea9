"""3D block masking for masked image modelling (iBOT / DINOv2).

A 3D port of DINOv2's ``dinov2/data/masking.py`` ``MaskingGenerator``: random cuboids are
added until about ``ratio`` of the token grid is masked. Blocks rather than scattered tokens
make the task harder to solve by interpolating from neighbours, which is the point of MIM.

Two changes from DINOv2, both to make the masked count exact in practice:

* once fewer than ``min_block`` tokens remain to be masked, blocks may be as small as one
  token (DINOv2 then gives up, undershooting by up to ``min_block``);
* a block may span the whole grid side (DINOv2 forbids it), which matters on small grids
  such as the tiny model's 4^3.

Masks are flat, in the encoder's token order: the conv patch grid (depth, height, width)
flattened in C order, i.e. index = (d * grid + h) * grid + w.

All randomness comes from one ``torch.Generator`` so a seeded run masks identically.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

# Attempts at placing one block before giving up (DINOv2 uses 10; more keeps counts exact).
_TRIES_PER_BLOCK = 50


def _uniform(generator: torch.Generator | None, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator))


def _randint(generator: torch.Generator | None, low: int, high: int) -> int:
    """Uniform integer in [low, high] (inclusive, like ``random.randint``)."""
    return int(torch.randint(low, high + 1, (), generator=generator))


def _add_block(
    mask: torch.Tensor,
    max_new: int,
    min_block: int,
    max_block: int,
    log_aspect: float,
    generator: torch.Generator | None,
) -> int:
    """Mask one random cuboid that adds between 1 and ``max_new`` tokens; returns how many."""
    grid = mask.shape[0]
    for _ in range(_TRIES_PER_BLOCK):
        volume = _uniform(generator, min(min_block, max_new), min(max_new, max_block))
        # Two free log-aspects; the third side makes the product ~ volume.
        a, b = _uniform(generator, -log_aspect, log_aspect), _uniform(generator, -log_aspect, log_aspect)
        side = volume ** (1 / 3)
        dims = [min(grid, max(1, round(side * math.exp(e)))) for e in (a, b, -a - b)]
        starts = [_randint(generator, 0, grid - d) for d in dims]
        region = mask[
            starts[0] : starts[0] + dims[0], starts[1] : starts[1] + dims[1], starts[2] : starts[2] + dims[2]
        ]
        new = region.numel() - int(region.sum())
        # Overlapping earlier blocks is allowed; only the newly masked tokens count.
        if 0 < new <= max_new:
            region.fill_(True)
            return new
    return 0


def block_mask_3d(
    grid: int,
    ratio: float,
    generator: torch.Generator | None = None,
    min_block: int = 4,
    max_aspect: float = 3.0,
    max_block_fraction: float = 0.5,
) -> torch.Tensor:
    """A flat (grid**3,) bool mask of random cuboids covering ``round(ratio * grid**3)`` tokens.

    ``min_block`` is the smallest block volume (in tokens) drawn while many tokens remain,
    ``max_aspect`` bounds each side ratio, and no single block exceeds ``max_block_fraction``
    of the grid (DINOv2's ``max_num_patches = 0.5 * N``). The count is exact unless no block
    fits after many tries, which leaves it short by a few tokens (logged at debug level).
    """
    if grid < 1:
        raise ValueError(f"grid must be >= 1, got {grid}")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"mask ratio must be in [0, 1], got {ratio}")
    if min_block < 1 or max_aspect < 1.0 or not 0 < max_block_fraction <= 1:
        raise ValueError(
            f"need min_block >= 1, max_aspect >= 1 and 0 < max_block_fraction <= 1, got "
            f"{min_block}, {max_aspect}, {max_block_fraction}"
        )
    total = grid**3
    target = round(ratio * total)
    max_block = max(1, int(max_block_fraction * total))
    mask = torch.zeros(grid, grid, grid, dtype=torch.bool)
    count = 0
    while count < target:
        added = _add_block(mask, target - count, min_block, max_block, math.log(max_aspect), generator)
        if added == 0:
            logger.debug("block masking stopped at %d of %d tokens: no block fits", count, target)
            break
        count += added
    return mask.flatten()


def sample_masks(
    batch: int,
    grid: int,
    ratio_range: Sequence[float] = (0.1, 0.5),
    mask_probability: float = 0.5,
    generator: torch.Generator | None = None,
    min_block: int = 4,
    max_aspect: float = 3.0,
) -> torch.Tensor:
    """Masks (batch, grid**3) for a batch of global crops, as DINOv2's collate function.

    ``batch * mask_probability`` rows are masked (a fractional row by a coin flip, so small
    odd batches still mask the right share on average); their ratios are stratified over
    ``ratio_range`` (one draw per equal sub-interval, as DINOv2) so a batch spans easy and
    hard masks; which rows get them is random. The other rows are all False.
    """
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")
    if len(ratio_range) != 2 or not 0 <= ratio_range[0] <= ratio_range[1] <= 1:
        raise ValueError(f"ratio_range must be (low, high) with 0 <= low <= high <= 1, got {tuple(ratio_range)}")
    if not 0.0 <= mask_probability <= 1.0:
        raise ValueError(f"mask_probability must be in [0, 1], got {mask_probability}")
    expected = batch * mask_probability
    n_masked = math.floor(expected)
    if float(torch.rand((), generator=generator)) < expected - n_masked:
        n_masked += 1
    masks = torch.zeros(batch, grid**3, dtype=torch.bool)
    low, high = ratio_range
    edges = torch.linspace(low, high, n_masked + 1).tolist()
    rows = torch.randperm(batch, generator=generator)[:n_masked].tolist()
    for row, lo, hi in zip(rows, edges[:-1], edges[1:]):
        masks[row] = block_mask_3d(grid, _uniform(generator, lo, hi), generator, min_block, max_aspect)
    return masks


def random_keep(
    batch: int, num_patches: int, mask_ratio: float, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """MAE's random masking: every row hides exactly ``round(mask_ratio * num_patches)``
    patches (at least one stays visible). Returns ``keep`` (B, V) long, the visible patch
    indices in ascending order, and ``mask`` (B, N) bool, True where hidden.

    The count is the same in every row, so the visible tokens of a batch form one tensor
    and the encoder can drop the hidden ones (``ViTEncoder(keep=...)``).
    """
    if not 0 <= mask_ratio < 1 or num_patches < 1 or batch < 0:
        raise ValueError(
            f"random_keep needs 0 <= mask_ratio < 1, num_patches >= 1, batch >= 0; "
            f"got {mask_ratio}, {num_patches}, {batch}"
        )
    visible = max(1, num_patches - round(mask_ratio * num_patches))
    noise = torch.rand(batch, num_patches, generator=generator)
    keep = noise.argsort(dim=1)[:, :visible].sort(dim=1).values
    mask = torch.ones(batch, num_patches, dtype=torch.bool)
    mask.scatter_(1, keep, False)
    return keep, mask
