"""Analytic head-CT phantom in Hounsfield units.

The head is a set of implicit shapes (ellipsoidal scalp, skull shell of varying thickness,
grey/white matter, ventricles, optional findings) evaluated at arbitrary physical
points. Evaluating at points rather than drawing into a grid lets the synthetic scanner
sample the same head on any geometry -- thick or thin slices, coarse or fine pixels, and
gantry-tilted stacks whose slices are not perpendicular to the table -- and the loader's
tilt correction can then be checked against the truth.

The head is sized to the scanner's field of view (``HeadModel.random`` takes the extent),
so the tiny matrices used in tests still hold a whole head; absolute sizes are therefore
not anatomical, only the tissue layout and HU values are. Sizes below are given in head
units (the outer skull surface is the unit sphere) and, in brackets, for a nominal head in
a 180 mm field of view (semi-axes about 61, 75 and 90 mm left-right, front-back and
head-foot: 0.01 unit is 0.6-0.9 mm; brain about 1.36 l); prepared at 32^3 one voxel is about 0.065 unit, at 64^3 about 0.033. Volumes
and shifts quoted were measured on that head at 96^3 (12 seeds, ``finding_scale`` 1).

Normal tissue: air -1000, scalp 40, skull 1000-1500 at the tables and 450 less in the
diploe, grey matter 34-37, white matter 27-30, CSF 5 HU.

Haemorrhages (``FINDINGS``; the ``any`` label means any of them), all 60-80 HU blood
(subarachnoid 5 HU less): intraparenchymal (ellipsoid, semi-axes 0.08-0.16), subdural
(crescent along the inner table, 0.05-0.09 wide), epidural (lens, up to 1.6 x 0.05-0.09),
subarachnoid (lines along one hemisphere's sulci), intraventricular (layering in the
ventricles).

Structural findings (``STRUCTURAL_FINDINGS``), none of them bright voxels. Their parameters
come from a random stream of their own, drawn for all five whether present or not, so a
structural finding changes nothing else in the head:

- ``hydrocephalus``: lateral ventricles enlarged without blood: widths x 1.6-2.2, lengths
  x 1.2-1.4, heights x 1.3-1.6 (Evans index about 0.32-0.41 against 0.23 in the normal
  head; ventricular volume x 3-4.7), their centres moved apart so that the septum between
  them stays. CSF 5 HU; the brain outline is unchanged.
- ``mass_effect``: a mildly hyperdense mass (36-46 HU, like a cellular tumour or a
  meningioma; radius 0.12-0.2 [8-16 mm]) in one hemisphere, in a rim of vasogenic oedema
  (white matter minus 8-14 HU, so 13-22 HU, out to 1.5 radii). It pushes both lateral
  ventricles across the midline by 0.07-0.15 [4-9 mm] and squeezes the one on its side to
  half its width: the ventricular system's centre moves 8-13 mm away from the mass. (The
  falx, 1-2 mm thick, is below every simulation grid and not drawn; the ventricles carry
  the midline.)
- ``infarct``: an ischaemic, vascular-territory-like wedge: a cone from a deep apex near the
  basal ganglia out through the cortex, half-angle 0.25-0.4 rad [about 12-25 ml], in which the
  parenchyma is 10-20 HU darker than it would be (white matter about 7-20, grey matter
  about 14-27 HU: an early to subacute infarct). CSF inside it stays CSF.
- ``fracture``: a linear skull fracture: a slab 0.02-0.035 wide [1.2-3 mm] through the full
  thickness of the skull along a great circle, 0.25-0.5 rad either side of its centre on
  the convexity [3-9 cm long], in which bone is replaced by soft tissue and clot of
  25-45 HU (below the blood range).
- ``atrophy``: a smaller brain, its surface 0.03-0.07 [2-6 mm] inside the inner table with
  CSF in the space, widened CSF-filled sulci through the outer cortex of both hemispheres,
  and ventricles enlarged ex vacuo (widths x 1.25-1.5, lengths and heights x 1.1-1.3):
  17-25% less parenchyma.

``finding_scale`` multiplies every finding's thickness -- haematoma radii and widths, the
sulcal lines, the ventricles' dilation beyond normal, the mass's radius and midline shift,
the infarct's half-angle, the fracture's width, the atrophy's brain-surface gap and sulcal
width -- within caps that keep each inside the skull. 1.0 keeps the realistic sizes above,
several of which (the fracture, normal ventricles, a thin subdural) are below a 32^3 voxel;
at 3.0 (the compare preset) a fracture is 1-1.6 voxels wide at 32^3.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy.ndimage import gaussian_filter

# Haemorrhage types: the ``any`` label of labels.csv means "any of these".
FINDINGS: tuple[str, ...] = (
    "intraparenchymal",
    "subdural",
    "epidural",
    "subarachnoid",
    "intraventricular",
)
# Findings that are not bright voxels (module docstring); each is its own label column.
STRUCTURAL_FINDINGS: tuple[str, ...] = (
    "hydrocephalus",
    "mass_effect",
    "infarct",
    "fracture",
    "atrophy",
)

AIR_HU = -1000.0
SCALP_HU = 40.0
CSF_HU = 5.0
# Thickness of the scalp and the skull, as fractions of the head's (normalised) radius.
SCALP_FRACTION = 0.05
SKULL_FRACTION = 0.07
# The normal lateral ventricles: centres at (+-x, y, z) and semi-axes, in head units.
VENTRICLE_CENTRE = (0.13, 0.0, 0.12)
VENTRICLE_SEMI_AXES = (0.08, 0.3, 0.14)
# When a ventricle widens by w, its centre moves out by this share of w: the septum
# pellucidum between the two stays (a merged single ventricle is not hydrocephalus).
VENTRICLE_SPREAD = 0.8
# Ventricle dilation caps (per axis) for large finding scales: the ventricles stay in the
# white matter, clear of the cortex.
MAX_VENTRICLE_DILATION = np.array([3.5, 2.0, 2.5])
# The grey-matter band starts at this share of the brain's radius.
GREY_FRACTION = 0.72


def _rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
    """Rotation matrix (radians) about z, then x, then y."""
    cz, sz = np.cos(yaw), np.sin(yaw)
    cx, sx = np.cos(pitch), np.sin(pitch)
    cy, sy = np.cos(roll), np.sin(roll)
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    return ry @ rx @ rz


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / np.linalg.norm(vector)


def _scaled_dilation(dilation: np.ndarray, finding_scale: float) -> np.ndarray:
    """Dilation beyond normal (dilation - 1) multiplied by the finding scale, capped."""
    return np.minimum(1.0 + finding_scale * (dilation - 1.0), MAX_VENTRICLE_DILATION)


def _structural_parameters(rng: np.random.Generator, finding_scale: float) -> dict[str, dict[str, np.ndarray | float]]:
    """Parameters of every structural finding, present or not: a fixed number of draws, so a
    finding's geometry does not depend on which other findings a head carries, nor on the scale."""
    s = finding_scale
    params: dict[str, dict[str, np.ndarray | float]] = {}
    params["hydrocephalus"] = {
        "dilation": _scaled_dilation(rng.uniform([1.6, 1.2, 1.3], [2.2, 1.4, 1.6]), s),
    }
    side = float(rng.choice([-1.0, 1.0]))
    params["mass_effect"] = {
        "side": side,
        "centre": np.array([side * rng.uniform(0.4, 0.55), rng.uniform(-0.35, 0.35), rng.uniform(0.0, 0.35)]),
        "radius": min(s * float(rng.uniform(0.12, 0.2)), 0.32),
        "hu": float(rng.uniform(36.0, 46.0)),
        "oedema_drop": float(rng.uniform(8.0, 14.0)),
        "shift": min(s * float(rng.uniform(0.07, 0.15)), 0.3),
    }
    infarct_side = float(rng.choice([-1.0, 1.0]))
    azimuth = float(rng.uniform(-0.7, 0.7))
    axis = _unit(np.array([infarct_side * np.cos(azimuth), np.sin(azimuth), rng.uniform(-0.1, 0.4)]))
    params["infarct"] = {
        "apex": 0.2 * axis,
        "axis": axis,
        "half_angle": min(s * float(rng.uniform(0.25, 0.4)), 0.7),
        "drop": float(rng.uniform(10.0, 20.0)),
    }
    fracture_side = float(rng.choice([-1.0, 1.0]))
    centre = _unit(np.array([fracture_side * rng.uniform(0.5, 1.0), rng.uniform(-0.8, 0.8), rng.uniform(-0.1, 0.6)]))
    # The fracture line runs along a great circle through its centre: the slab's normal is
    # perpendicular to the centre direction.
    normal = _unit(np.cross(centre, _unit(rng.normal(size=3))))
    params["fracture"] = {
        "centre": centre,
        "normal": normal,
        "width": s * float(rng.uniform(0.02, 0.035)),
        "half_length": float(rng.uniform(0.25, 0.5)),
        "hu": float(rng.uniform(25.0, 45.0)),
    }
    params["atrophy"] = {
        "gap": min(s * float(rng.uniform(0.03, 0.07)), 0.12),
        "dilation": _scaled_dilation(rng.uniform([1.25, 1.1, 1.1], [1.5, 1.3, 1.3]), s),
        "frequency": float(rng.uniform(7.0, 11.0)),
        "phase": rng.uniform(0.0, 2.0 * np.pi, 2),
        # |sin sin| below this marks a widened sulcus: the sulci's share of the outer cortex.
        "sulcal_width": min(0.08 * s, 0.24),
    }
    return params


@dataclass(frozen=True)
class HeadModel:
    """One random head: pose, size, tissue values and the findings it carries.

    Points are mapped to head coordinates ``u = R^T (p - centre) / semi_axes`` in which the
    outer skull surface is the unit sphere; every structure is defined in ``u``.
    ``findings`` holds the parameters of the haemorrhages present, ``structural`` those of
    the structural findings present (``STRUCTURAL_FINDINGS``).
    """

    centre: np.ndarray
    semi_axes: np.ndarray
    rotation: np.ndarray
    skull_hu: float
    grey_hu: float
    white_hu: float
    findings: dict[str, dict[str, np.ndarray | float]] = field(default_factory=dict)
    structural: dict[str, dict[str, np.ndarray | float]] = field(default_factory=dict)

    @classmethod
    def random(
        cls,
        rng: np.random.Generator,
        extent_xyz: Sequence[float],
        centre_xyz: Sequence[float],
        findings: Sequence[str] = (),
        finding_scale: float = 1.0,
        structural_rng: np.random.Generator | None = None,
    ) -> "HeadModel":
        """Draw a head that fills most of a field of view of ``extent_xyz`` mm.

        ``findings`` names haemorrhages (``FINDINGS``) and structural findings
        (``STRUCTURAL_FINDINGS``). ``finding_scale`` multiplies every finding's thickness
        (module docstring); 1.0 keeps the realistic sizes. Larger findings survive
        resampling to the coarse grids of a small model (``synth.finding_scale``). It draws
        the same random numbers whatever its value, so a scaled hospital holds the same
        heads, labels and identifiers. The structural findings' parameters come from
        ``structural_rng`` (default: ``rng``, after everything else), all of them whichever
        are present, so adding a structural finding changes nothing else in the head.
        """
        unknown = set(findings) - set(FINDINGS) - set(STRUCTURAL_FINDINGS)
        if unknown:
            raise ValueError(
                f"unknown findings {sorted(unknown)}; known: {', '.join(FINDINGS + STRUCTURAL_FINDINGS)}"
            )
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
            if name in STRUCTURAL_FINDINGS:
                continue
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
        skull_hu = float(rng.uniform(1000.0, 1500.0))
        grey_hu = float(rng.uniform(34.0, 37.0))
        white_hu = float(rng.uniform(27.0, 30.0))
        drawn = _structural_parameters(rng if structural_rng is None else structural_rng, finding_scale)
        return cls(
            centre=centre,
            semi_axes=semi_axes,
            rotation=rotation,
            skull_hu=skull_hu,
            grey_hu=grey_hu,
            white_hu=white_hu,
            findings=params,
            structural={name: drawn[name] for name in STRUCTURAL_FINDINGS if name in findings},
        )

    def to_head_coords(self, points_xyz: np.ndarray) -> np.ndarray:
        """Map physical points (..., 3) in mm to normalised head coordinates (..., 3)."""
        # float32 halves the memory traffic; HU maps need no more precision than that.
        points = np.asarray(points_xyz, dtype=np.float32)
        f32 = np.float32
        return ((points - self.centre.astype(f32)) @ self.rotation.astype(f32)) / self.semi_axes.astype(f32)

    def on_grid(self, shape_zyx: Sequence[int], spacing_zyx: Sequence[float]) -> np.ndarray:
        """Noise-free HU on an axis-aligned (z,y,x) grid whose corner is the origin (float32)."""
        z, y, x = (np.arange(n, dtype=np.float32) * s + s / 2 for n, s in zip(shape_zyx, spacing_zyx))
        points = np.stack(np.meshgrid(x, y, z, indexing="ij"), axis=-1).transpose(2, 1, 0, 3)
        return self.hu_at(points)

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
        if "fracture" in self.structural:
            gap = skull & self._fracture_mask(self.structural["fracture"], u, safe)
            hu[gap] = self.structural["fracture"]["hu"]
        intracranial = rho <= inner
        atrophy = self.structural.get("atrophy")
        if atrophy is None:
            brain_radius, brain = inner, intracranial
        else:
            # The shrunken brain leaves CSF between its surface and the inner table.
            hu[intracranial] = CSF_HU
            brain_radius = inner * (1.0 - atrophy["gap"])
            brain = rho <= brain_radius
        grey = brain & (rho > GREY_FRACTION * brain_radius)
        hu[brain] = self.white_hu
        hu[grey] = self.grey_hu
        if atrophy is not None:
            sulci = grey & (rho > 0.86 * brain_radius) & self._sulci(atrophy, u, safe)
            hu[sulci] = CSF_HU
            brain = brain & ~sulci
        if "infarct" in self.structural:
            infarct = self.structural["infarct"]
            region = brain & self._cone(infarct, u)
            hu[region] -= np.float32(infarct["drop"])
        mass = self.structural.get("mass_effect")
        if mass is not None:
            distance = np.linalg.norm(u - mass["centre"], axis=-1)
            oedema = brain & (distance <= 1.5 * mass["radius"])
            hu[oedema] = np.float32(self.white_hu - mass["oedema_drop"])
        ventricles = self._ventricles(u)
        hu[ventricles & intracranial] = CSF_HU
        if mass is not None:
            # Painted after the ventricles: the mass takes the space of what it compresses.
            hu[brain & (distance <= mass["radius"])] = mass["hu"]
        for name, p in self.findings.items():
            mask = self._finding_mask(name, p, u, rho, inner, intracranial, ventricles)
            hu[mask] = p["hu"]
        return hu

    def ventricle_shapes(self, dilation: float = 1.0) -> list[tuple[np.ndarray, np.ndarray]]:
        """(centre, semi-axes) of the two lateral ventricles, in head units, after this head's
        hydrocephalus, atrophy and mass effect; ``dilation`` (the blood-filled ventricles of a
        scaled intraventricular haemorrhage) enlarges normal ventricles about their centres,
        and enlarged ones only where it exceeds their own dilation (never both multiplied)."""
        widen = np.ones(3)
        for name in ("hydrocephalus", "atrophy"):
            if name in self.structural:
                widen = widen * self.structural[name]["dilation"]
        widen = np.minimum(widen, MAX_VENTRICLE_DILATION)
        mass = self.structural.get("mass_effect")
        shapes = []
        for side in (-1.0, 1.0):
            centre = np.array([VENTRICLE_CENTRE[0] * side, VENTRICLE_CENTRE[1], VENTRICLE_CENTRE[2]])
            semi = dilation * np.array(VENTRICLE_SEMI_AXES)
            if not np.all(widen == 1.0):
                grown = np.array(VENTRICLE_SEMI_AXES) * widen
                centre[0] += side * VENTRICLE_SPREAD * (grown[0] - VENTRICLE_SEMI_AXES[0])
                semi = np.array(VENTRICLE_SEMI_AXES) * np.maximum(widen, dilation)
            if mass is not None:
                # Both ventricles move away from the mass; the one on its side is squeezed.
                centre[0] -= mass["side"] * mass["shift"]
                if side == mass["side"]:
                    semi = semi * np.array([0.5, 1.0, 1.0])
            shapes.append((centre, semi))
        return shapes

    def _ventricles(self, u: np.ndarray, dilation: float = 1.0) -> np.ndarray:
        """Two lateral ventricles either side of the midline."""
        mask = np.zeros(u.shape[:-1], dtype=bool)
        for centre, semi in self.ventricle_shapes(dilation):
            d = (u - centre) / semi
            mask |= np.sum(d * d, axis=-1) <= 1.0
        return mask

    @staticmethod
    def _sulci(p: dict[str, np.ndarray | float], u: np.ndarray, rho: np.ndarray) -> np.ndarray:
        """A grid of clefts in azimuth and elevation: radial gaps in every axial section."""
        f, phase = p["frequency"], p["phase"]
        azimuth = np.arctan2(u[..., 1], u[..., 0])
        elevation = np.arcsin(np.clip(u[..., 2] / rho, -1.0, 1.0))
        return np.abs(np.sin(f * azimuth + phase[0]) * np.sin(f * elevation + phase[1])) < p["sulcal_width"]

    @staticmethod
    def _cone(p: dict[str, np.ndarray | float], u: np.ndarray) -> np.ndarray:
        """Points within ``half_angle`` of the axis, seen from the apex: a wedge in every
        section through the axis, its base on the cortex."""
        offset = u - p["apex"]
        along = offset @ p["axis"]
        length = np.linalg.norm(offset, axis=-1)
        return (along > 0) & (along >= np.cos(p["half_angle"]) * length)

    @staticmethod
    def _fracture_mask(p: dict[str, np.ndarray | float], u: np.ndarray, rho: np.ndarray) -> np.ndarray:
        """A slab ``width`` thick along a great circle, within ``half_length`` rad of its centre."""
        cos_angle = (u @ p["centre"]) / rho
        return (np.abs(u @ p["normal"]) < p["width"] / 2.0) & (cos_angle > np.cos(p["half_length"]))

    def _finding_mask(
        self,
        name: str,
        p: dict[str, np.ndarray | float],
        u: np.ndarray,
        rho: np.ndarray,
        inner: np.ndarray,
        intracranial: np.ndarray,
        ventricles: np.ndarray,
    ) -> np.ndarray:
        if name == "intraparenchymal":
            d = (u - p["centre"]) / p["radius"]
            return intracranial & (np.sum(d * d, axis=-1) <= 1.0)
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
            return intracranial & (closeness > 0) & (rho > inner - width)
        if name == "subarachnoid":
            # Thin bright lines in the cortical band along sulci on one hemisphere.
            band = intracranial & (rho > 0.78 * inner) & (u[..., 0] * p["side"] > 0.1)
            f = p["frequency"]
            sulci = np.abs(np.sin(f * u[..., 1]) * np.sin(f * u[..., 2])) < p["line_width"]
            return band & sulci
        if name == "intraventricular":
            # Blood layers in the dependent (posterior, patient supine) part of the ventricle.
            dilation = float(p.get("dilation", 1.0))
            filled = ventricles if dilation == 1.0 else self._ventricles(u, dilation)
            return filled & intracranial & (u[..., 1] < -p["level"])
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
    return scanner_effects(head.on_grid(shape_zyx, spacing_zyx), rng, noise_sd, blur_sigma)


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
