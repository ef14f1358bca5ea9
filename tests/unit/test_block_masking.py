"""3D block masking: counts, cuboid structure, determinism, per-batch masking rate."""

from __future__ import annotations

import pytest
import torch

from ctfed.common.masking import block_mask_3d, sample_masks


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("grid", [4, 8])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.75])
def test_masked_count_matches_ratio(grid: int, ratio: float) -> None:
    target = round(ratio * grid**3)
    generator = _gen(0)
    for _ in range(20):
        mask = block_mask_3d(grid, ratio, generator)
        assert mask.shape == (grid**3,) and mask.dtype == torch.bool
        # Exact in practice; the documented fallback may stop a few tokens short, never over.
        assert target - 2 <= int(mask.sum()) <= target


def test_single_block_is_a_contiguous_cuboid() -> None:
    grid = 8
    generator = _gen(1)
    for _ in range(30):
        # Aspect 1 and min_block = target: the first block is a 3x3x3 cube that fills the count.
        mask = block_mask_3d(grid, 27 / grid**3, generator, min_block=27, max_aspect=1.0)
        cube = mask.view(grid, grid, grid)
        coords = cube.nonzero()
        lo, hi = coords.min(0).values, coords.max(0).values
        assert (hi - lo + 1).tolist() == [3, 3, 3]
        assert cube[lo[0] : hi[0] + 1, lo[1] : hi[1] + 1, lo[2] : hi[2] + 1].all()
        assert int(mask.sum()) == 27


def test_blocks_are_spatially_clustered() -> None:
    # A random token subset of the same size would rarely have masked neighbours; blocks do.
    grid = 8
    mask = block_mask_3d(grid, 0.3, _gen(2)).view(grid, grid, grid)
    shifted = mask[1:] & mask[:-1]
    neighbour_rate = shifted.sum() / mask[:-1].sum()
    assert neighbour_rate > 0.6


def test_raster_order_matches_conv_flatten() -> None:
    # Index (d * grid + h) * grid + w, as the encoder's flatten(2) of a (B, D, H, W) grid.
    grid = 4
    mask = block_mask_3d(grid, 0.25, _gen(3))
    assert torch.equal(mask.view(1, grid, grid, grid).flatten(1)[0], mask)


def test_masks_are_deterministic_per_seed() -> None:
    a = sample_masks(8, 4, (0.1, 0.5), 0.5, _gen(7))
    b = sample_masks(8, 4, (0.1, 0.5), 0.5, _gen(7))
    c = sample_masks(8, 4, (0.1, 0.5), 0.5, _gen(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sample_masks_masks_about_mask_probability_of_rows() -> None:
    generator = _gen(0)
    grid, batch = 4, 4
    masked_rows, ratios = 0, []
    trials = 200
    for _ in range(trials):
        masks = sample_masks(batch, grid, (0.1, 0.5), 0.5, generator)
        assert masks.shape == (batch, grid**3)
        masked = masks.any(dim=1)
        # batch * p = 2 exactly: always two masked rows, ratios within the range.
        assert int(masked.sum()) == 2
        masked_rows += int(masked.sum())
        ratios += (masks[masked].float().mean(1)).tolist()
    assert all(0.1 - 1 / 64 <= r <= 0.5 + 1 / 64 for r in ratios)
    # Odd batches: the fractional row is a coin flip, so the rate is right on average.
    odd = [int(sample_masks(3, grid, (0.1, 0.5), 0.5, generator).any(1).sum()) for _ in range(trials)]
    assert sum(odd) / (3 * trials) == pytest.approx(0.5, abs=0.07)
    assert not sample_masks(4, grid, (0.1, 0.5), 0.0, generator).any()
    assert sample_masks(4, grid, (0.1, 0.5), 1.0, generator).any(1).all()


def test_bad_arguments_are_clear_errors() -> None:
    with pytest.raises(ValueError, match="ratio"):
        block_mask_3d(4, 1.5)
    with pytest.raises(ValueError, match="ratio_range"):
        sample_masks(2, 4, (0.5, 0.1))
    with pytest.raises(ValueError, match="mask_probability"):
        sample_masks(2, 4, (0.1, 0.5), 2.0)


def test_random_keep_hides_the_same_count_in_every_row() -> None:
    from ctfed.common.masking import random_keep

    keep, mask = random_keep(5, 64, 0.75, torch.Generator().manual_seed(0))
    assert keep.shape == (5, 16) and keep.dtype == torch.long and mask.shape == (5, 64)
    assert (mask.sum(dim=1) == 48).all()
    for row in range(5):
        assert torch.equal(keep[row], (~mask[row]).nonzero().flatten())  # ascending, the visible ones
    again, _ = random_keep(5, 64, 0.75, torch.Generator().manual_seed(0))
    assert torch.equal(keep, again)
    assert random_keep(2, 8, 0.99)[0].shape == (2, 1)  # one patch always stays visible
    with pytest.raises(ValueError, match="mask_ratio"):
        random_keep(2, 8, 1.0)
