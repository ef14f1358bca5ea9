"""Structural findings of the head phantom, measured on noise-free HU volumes.

Each test draws the same head (same seed) with and without one finding on a grid of a
180 mm head (64^3: 2.8 mm voxels; 32^3: 5.6 mm, the simulation's coarsest), so any difference
is the finding's doing.
"""

from __future__ import annotations

import numpy as np
import pytest

from ctfed.simulations.data.phantom import CSF_HU, FINDINGS, STRUCTURAL_FINDINGS, HeadModel

HEAD_MM = 180.0
BLOOD_HU = (55.0, 80.0)
PARENCHYMA_HU = (20.0, 40.0)  # white 27-30, grey 34-37 HU; CSF (5) and oedema (<= 22) mostly outside
BONE_HU = 300.0


def _head(findings: list[str], scale: float = 1.0, seed: int = 3, n: int = 64) -> tuple[HeadModel, np.ndarray, float]:
    spacing = HEAD_MM / n
    extent = np.full(3, HEAD_MM)
    head = HeadModel.random(np.random.default_rng(seed), extent, extent / 2.0, findings, scale)
    return head, head.on_grid((n, n, n), (spacing,) * 3), spacing


def _count(hu: np.ndarray, low: float, high: float) -> int:
    return int(np.count_nonzero((hu > low) & (hu < high)))


def _csf(hu: np.ndarray) -> np.ndarray:
    return np.isclose(hu, CSF_HU)


@pytest.mark.parametrize("finding", STRUCTURAL_FINDINGS)
def test_a_structural_finding_changes_nothing_else_in_the_head(finding: str) -> None:
    """Its parameters are drawn last: pose, tissues and haemorrhages stay those of the same seed."""
    plain, _, _ = _head(list(FINDINGS))
    with_finding, _, _ = _head([*FINDINGS, finding])
    assert set(with_finding.structural) == {finding} and not plain.structural
    for name in ("centre", "semi_axes", "rotation"):
        np.testing.assert_array_equal(getattr(plain, name), getattr(with_finding, name))
    assert (plain.skull_hu, plain.grey_hu, plain.white_hu) == (with_finding.skull_hu, with_finding.grey_hu, with_finding.white_hu)
    assert plain.findings.keys() == with_finding.findings.keys()
    for name, params in plain.findings.items():
        for key, value in params.items():
            np.testing.assert_array_equal(value, with_finding.findings[name][key])


@pytest.mark.parametrize("finding", STRUCTURAL_FINDINGS)
def test_structural_findings_are_not_blood(finding: str) -> None:
    _, healthy, _ = _head([])
    _, hu, _ = _head([finding], scale=3.0)
    assert _count(healthy, *BLOOD_HU) == 0
    assert _count(hu, *BLOOD_HU) == 0, finding


def test_hydrocephalus_enlarges_the_ventricles() -> None:
    _, healthy, _ = _head([])
    _, hu, _ = _head(["hydrocephalus"])
    assert np.count_nonzero(_csf(hu)) >= 2.5 * np.count_nonzero(_csf(healthy))
    # Only ventricles grew: the brain's outline and the skull are the same.
    np.testing.assert_array_equal(hu > BONE_HU, healthy > BONE_HU)
    assert np.all(_csf(healthy) <= _csf(hu))


def test_mass_effect_shifts_the_midline_away_from_the_mass() -> None:
    _, healthy, spacing = _head([])
    head, hu, _ = _head(["mass_effect"])
    side = head.structural["mass_effect"]["side"]

    def ventricle_centre_x_mm(volume: np.ndarray) -> float:
        # All CSF is ventricle here (no atrophy); x is the last grid axis, +x is the head's +x
        # up to its yaw of at most 10 degrees.
        return float(np.argwhere(_csf(volume))[:, 2].mean() * spacing)

    shift_mm = (ventricle_centre_x_mm(hu) - ventricle_centre_x_mm(healthy)) * -side
    assert shift_mm >= 5.0, shift_mm
    mass = head.structural["mass_effect"]
    assert _count(hu, mass["hu"] - 0.5, mass["hu"] + 0.5) > 0  # the mass itself
    assert _count(hu, 14.0, 23.0) > _count(healthy, 14.0, 23.0)  # its oedema


def test_infarct_is_a_wedge_10_to_20_hu_below_the_parenchyma() -> None:
    _, healthy, spacing = _head([])
    head, hu, _ = _head(["infarct"])
    darker = healthy - hu
    region = darker != 0
    assert np.all(darker[region] > 0)
    assert 10.0 <= darker[region].mean() <= 20.0
    assert np.count_nonzero(region) * spacing**3 / 1000.0 >= 5.0  # ml
    # Grey and white matter both: from the deep apex out to the cortex.
    assert {round(v) for v in np.unique(healthy[region])} == {round(head.grey_hu), round(head.white_hu)}
    # A wedge widens outward: most of it lies in the outer half of the brain.
    grid = (np.argwhere(region) + 0.5) * spacing
    rho = np.linalg.norm(head.to_head_coords(grid[:, ::-1]), axis=-1)
    assert np.mean(rho > 0.5) > 0.7 and rho.max() > 0.8


def test_fracture_cuts_through_the_whole_thickness_of_the_skull() -> None:
    _, healthy, _ = _head([])
    head, hu, _ = _head(["fracture"])
    removed = (healthy > BONE_HU) & (hu <= BONE_HU)
    assert np.count_nonzero(removed) >= 10
    assert np.all(hu[~removed] == healthy[~removed])  # nothing but bone changed
    fracture = head.structural["fracture"]
    assert 25.0 <= fracture["hu"] <= 45.0 and np.all(np.isin(hu[removed], np.float32(fracture["hu"])))

    def ray(model: HeadModel) -> np.ndarray:
        """HU from mid-brain out through the fracture's centre into the scalp."""
        t = np.linspace(0.8, 1.04, 200)[:, None]
        points = model.centre + (t * fracture["centre"] * model.semi_axes) @ model.rotation.T
        return model.hu_at(points)

    plain, _, _ = _head([])
    assert ray(plain).max() > 900.0  # the intact skull is crossed
    assert ray(head).max() < BONE_HU  # the fracture line has no bone across it


def test_atrophy_shrinks_the_brain_and_widens_csf_spaces() -> None:
    _, healthy, _ = _head([])
    _, hu, _ = _head(["atrophy"])
    assert _count(hu, *PARENCHYMA_HU) <= 0.9 * _count(healthy, *PARENCHYMA_HU)
    assert np.count_nonzero(_csf(hu)) >= 3 * np.count_nonzero(_csf(healthy))
    np.testing.assert_array_equal(hu > BONE_HU, healthy > BONE_HU)  # the skull is the same size


@pytest.mark.parametrize("finding", STRUCTURAL_FINDINGS)
def test_finding_scale_makes_structural_findings_larger_at_the_coarsest_grid(finding: str) -> None:
    """At 32^3 the compare preset's scale (3) changes more voxels than realistic sizes, and
    enough to see; everything stays inside the head."""
    _, healthy, _ = _head([], n=32)
    changed = {}
    for scale in (1.0, 3.0):
        _, hu, _ = _head([finding], scale=scale, n=32)
        difference = hu != healthy
        assert not np.any(difference & (healthy <= -999.0)), "a finding reached the air"
        changed[scale] = int(np.count_nonzero(difference))
    assert changed[3.0] > changed[1.0] > 0, changed
    assert changed[3.0] >= 8, changed


def test_unknown_finding_is_named() -> None:
    with pytest.raises(ValueError, match="unknown findings \\['stroke'\\]"):
        _head(["stroke"])
