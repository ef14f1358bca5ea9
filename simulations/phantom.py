"""Analytic head-CT phantom in Hounsfield units.

The head is a set of implicit shapes (ellipsoidal scalp, skull shell of varying thickness,
grey/white matter, ventricles, optional haemorrhages) evaluated at arbitrary physical
points. Evaluating at points rather than drawing into a grid lets the synthetic scanner
sample the same head on any geometry -- thick or thin slices, coarse or fine pixels, and
gantry-tilted stacks whose slices are not perpendicular to the table -- and the loader's
tilt correction can then be checked against the truth.

The head is sized to the scanner's field of view (``HeadModel.random`` takes the extent),
so the tiny matrices used in tests still hold a whole head; absolute sizes are therefore
not anatomical, only the tissue layout and HU values are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

FINDINGS: tuple[str, ...] = (
    "intraparenchymal",
    "subdural",
    "epidural",
    "subarachnoid",
    "intraventricular",
)

AIR_HU = -1000.0
SCALP_HU = 40.0
CSF_HU = 5.0
# Thickness of the scalp and the skull, as fractions of the head's (normalised) radius.
SCALP_FRACTION = 0.05
SKULL_FRACTION = 0.07


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation matrix (radians) about z, then x, then y."""
    cz, sz = np.cos(yaw), np.sin(yaw)
    cx, sx = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(roll), np.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return ry @ rx @ rz


@dataclass(frozen=True)
class HeadModel:
    """One random head: pose, size, tissue values and the findings it carries.

    Points are mapped to head coordinates ``u = R^T (p - centre) / semi_axes`` in which the
    outer skull surface is the unit sphere; every structure is defined in ``u``.
    """

    centre: np.ndarray
    semi_axes: np.ndarray
    rotation: np.ndarray
    skull_hu: float
    grey_hu: float
    white_hu: float
    findings: dict[str, dict[str, np.ndarray | float]] = field(default_factory=dict)

    @classmethod
    def random(
        cls,
        rng: np.random.Generator,
        extent_xyz: Sequence[float],
        centre_xyz: Sequence[float],
        findings: Sequence[str] = (),
        finding_scale: float = 1.0,
    ) -> "HeadModel":
        """Draw a head that fills most of a field of view of ``extent_xyz`` mm.

        ``finding_scale`` multiplies every finding's thickness (haematoma radii, the width of
        subdural/epidural collections, the sulcal blood lines; blood-filled ventricles dilate);
        1.0 keeps the realistic sizes. Larger findings survive resampling to the coarse grids
        of a small model (``synth.finding_scale``). It draws the same random numbers whatever
        its value, so a scaled hospital holds the same heads, labels and identifiers.
        """
        unknown = set(findings) - set(FINDINGS)
        if unknown:
            raise ValueError(f"unknown findings {sorted(unknown)}; known: {', '.join(FINDINGS)}")
        if finding_scale <= 0:
            raise ValueError(f"finding_scale must be > 0, got {finding_scale}")
        extent = np.asarray(extent_xyz, dtype=float)
        fill = np.array([0.36, 0.42, 0.5]) * rng.uniform(0.92, 1.05, size=3)
        semi_axes = extent * fill
        centre = np.asarray(centre_xyz, float) + rng.uniform(-0.03, 0.03, 3) * extent
        rotation = _rotation(*np.deg2rad(rng.uniform([-10, -8, -5], [10, 8, 5])))
        params: dict[str, dict[str, np.ndarray | float]] = {}
        side = rng.choice([-1.0, 1.0])
        for name in findings:
            hu = float(rng.uniform(60.0, 80.0))
            if name == "intraparenchymal":
                where = rng.uniform([-0.4, -0.4, -0.3], [0.4, 0.4, 0.4])
                params[name] = {"centre": where, "radius": finding_scale * rng.uniform(0.08, 0.16, 3), "hu": hu}
            elif name in ("subdural", "epidural"):
                direction = np.array([side, rng.uniform(-0.5, 0.5), rng.uniform(-0.2, 0.6)])
                params[name] = {
                    "direction": direction / np.linalg.norm(direction),
                    "width": finding_scale * float(rng.uniform(0.05, 0.09)),
                    "extent": float(rng.uniform(0.5, 0.8) if name == "subdural" else rng.uniform(0.3, 0.45)),
                    "hu": hu,
                }
            elif name == "subarachnoid":
                params[name] = {
                    "side": -side,
                    "frequency": float(rng.uniform(9, 14)),
                    # |sin sin| below this marks a sulcus: the lines' share of the cortical band.
                    "line_width": min(0.12 * finding_scale, 1.0),
                    "hu": hu - 5.0,
                }
            elif name == "intraventricular":
                # The ventricles are too narrow to hold a thicker layer, so a larger scale
                # dilates the blood-filled ventricles (as with the hydrocephalus that often
                # accompanies intraventricular haemorrhage).
                params[name] = {"level": float(rng.uniform(0.0, 0.05)), "dilation": finding_scale, "hu": hu}
        return cls(
            centre=centre,
            semi_axes=semi_axes,
            rotation=rotation,
            skull_hu=float(rng.uniform(1000.0, 1500.0)),
            grey_hu=float(rng.uniform(34.0, 37.0)),
            white_hu=float(rng.uniform(27.0, 30.0)),
            findings=params,
        )

    def to_head_coords(self, points_xyz: np.ndarray) -> np.ndarray:
        """Map physical points (..., 3) in mm to normalised head coordinates (..., 3)."""
        # float32 halves the memory traffic; HU maps need no more precision than that.
        points = np.asarray(points_xyz, dtype=np.float32)
        f32 = np.float32
        return ((points - self.centre.astype(f32)) @ self.rotation.astype(f32)) / self.semi_axes.astype(f32)

    def hu_at(self, points_xyz: np.ndarray) -> np.ndarray:
        """Noise-free HU at physical points (..., 3) in mm, as float32 (...)."""
        u = self.to_head_coords(points_xyz)
        rho = np.linalg.norm(u, axis=-1)
        safe = np.maximum(rho, 1e-6)
        # Skull thickness varies smoothly with direction (thicker frontally and at the base).
        thickness = SKULL_FRACTION * (1.0 + 0.35 * u[..., 1] / safe - 0.25 * u[..., 2] / safe)
        inner = 1.0 - thickness
        hu = np.full(rho.shape, AIR_HU, dtype=np.float32)
        hu[rho <= 1.0 + SCALP_FRACTION] = SCALP_HU
        skull = (rho <= 1.0) & (rho > inner)
        # Dense outer and inner tables, softer diploe between them.
        depth = np.abs(2.0 * (rho - (1.0 - thickness / 2.0)) / thickness)
        hu[skull] = (self.skull_hu - 450.0 * (1.0 - depth[skull])).astype(np.float32)
        brain = rho <= inner
        grey = brain & (rho > 0.72 * inner)
        hu[brain] = self.white_hu
        hu[grey] = self.grey_hu
        ventricles = self._ventricles(u)
        hu[ventricles & brain] = CSF_HU
        for name, p in self.findings.items():
            mask = self._finding_mask(name, p, u, rho, inner, brain, ventricles)
            hu[mask] = p["hu"]
        return hu

    @staticmethod
    def _ventricles(u: np.ndarray, dilation: float = 1.0) -> np.ndarray:
        """Two lateral ventricles either side of the midline."""
        mask = np.zeros(u.shape[:-1], dtype=bool)
        for side in (-1.0, 1.0):
            d = (u - np.array([0.13 * side, 0.0, 0.12])) / (dilation * np.array([0.08, 0.3, 0.14]))
            mask |= np.sum(d * d, axis=-1) <= 1.0
        return mask

    @staticmethod
    def _finding_mask(
        name: str,
        p: dict[str, np.ndarray | float],
        u: np.ndarray,
        rho: np.ndarray,
        inner: np.ndarray,
        brain: np.ndarray,
        ventricles: np.ndarray,
    ) -> np.ndarray:
        if name == "intraparenchymal":
            d = (u - p["centre"]) / p["radius"]
            return brain & (np.sum(d * d, axis=-1) <= 1.0)
        if name in ("subdural", "epidural"):
            cos_angle = (u @ p["direction"]) / np.maximum(rho, 1e-6)
            # 0 at the edge of the collection, 1 at its centre.
            closeness = np.clip((cos_angle - np.cos(p["extent"])) / (1.0 - np.cos(p["extent"])), 0.0, 1.0)
            if name == "subdural":
                # Crescent: nearly constant width along the inner table, thinning at the tips.
                width = p["width"] * np.sqrt(closeness)
            else:
                # Lens: thickest in the middle, tapering fast.
                width = 1.6 * p["width"] * closeness**2
            return brain & (closeness > 0) & (rho > inner - width)
        if name == "subarachnoid":
            # Thin bright lines in the cortical band along sulci on one hemisphere.
            band = brain & (rho > 0.78 * inner) & (u[..., 0] * p["side"] > 0.1)
            f = p["frequency"]
            sulci = np.abs(np.sin(f * u[..., 1]) * np.sin(f * u[..., 2])) < p["line_width"]
            return band & sulci
        if name == "intraventricular":
            # Blood layers in the dependent (posterior, patient supine) part of the ventricle.
            dilation = float(p.get("dilation", 1.0))
            filled = ventricles if dilation == 1.0 else HeadModel._ventricles(u, dilation)
            return filled & brain & (u[..., 1] < -p["level"])
        raise ValueError(f"unknown finding {name!r}")


def head_phantom(
    shape_zyx: Sequence[int],
    spacing_zyx: Sequence[float],
    rng: np.random.Generator,
    findings: Sequence[str] = (),
    noise_sd: float = 0.0,
    blur_sigma: float = 0.0,
    finding_scale: float = 1.0,
) -> np.ndarray:
    """A whole-head volume on an axis-aligned grid (float32 HU, z,y,x) -- for quick looks.

    ``blur_sigma`` (voxels, in-plane) mimics a soft reconstruction kernel and ``noise_sd``
    (HU) the quantum noise of a scanner; the synthetic hospitals sample ``HeadModel``
    directly on their own geometry instead.
    """
    shape = np.asarray(shape_zyx)
    spacing = np.asarray(spacing_zyx, float)
    extent_xyz = (shape * spacing)[::-1]
    head = HeadModel.random(rng, extent_xyz, extent_xyz / 2.0, findings, finding_scale)
    z, y, x = (np.arange(n, dtype=np.float32) * s + s / 2 for n, s in zip(shape, spacing))
    points = np.stack(np.meshgrid(x, y, z, indexing="ij"), axis=-1).transpose(2, 1, 0, 3)
    return scanner_effects(head.hu_at(points), rng, noise_sd, blur_sigma)


def scanner_effects(
    hu: np.ndarray, rng: np.random.Generator, noise_sd: float, blur_sigma: float
) -> np.ndarray:
    """Apply an in-plane reconstruction-kernel blur and Gaussian noise to a (z,y,x) volume."""
    out = hu.astype(np.float32, copy=True)
    if blur_sigma > 0:
        out = gaussian_filter(out, sigma=(0.0, blur_sigma, blur_sigma), mode="nearest")
    if noise_sd > 0:
        out += rng.normal(0.0, noise_sd, size=out.shape).astype(np.float32)
    return out
