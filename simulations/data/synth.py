"""Synthetic hospitals: head-CT studies written as DICOM the way different scanners do it.

Each site has a ``SiteProfile`` that fixes what a real site would vary: slice thickness and
pixel spacing, matrix size, noise and kernel sharpness, how often findings occur, gantry
tilt, transfer syntax (uncompressed, RLE, JPEG 2000; any syntax pydicom has an encoder
for, e.g. JPEG-LS with pyjpegls installed), signed or unsigned storage with its
rescale intercept, a padding value outside the field-of-view circle, and the folder layout
(flat ``.dcm`` files, or extension-less files under patient-named folders). Every series
carries fake but realistic-looking identifiers, so the privacy guarantees of ``prepare`` are
exercised, and each site also holds a localizer series that ``prepare`` must skip. A study
may get further ``Reconstruction`` series of the same acquisition (a thin bone-kernel series
beside the soft-tissue one, as scanners write them) for ``prepare``'s series selection.
Each site's ``labels.csv`` holds one 0/1 column per task (``LABEL_COLUMNS``): the haemorrhage
types, ``any`` haemorrhage, and the structural findings of ``phantom.STRUCTURAL_FINDINGS``,
whose prevalences are the ``synth.<finding>_prevalence`` knobs.

Everything -- pixels, identifiers and UIDs -- is a function of the seed, so two runs with
the same seed write byte-identical files.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
    generate_uid,
)

from ctfed.simulations.config import SynthConfig
from ctfed.simulations.data.phantom import FINDINGS, STRUCTURAL_FINDINGS, HeadModel, scanner_effects

logger = logging.getLogger(__name__)

# The haemorrhage types, ``any`` (any haemorrhage), then the structural findings.
LABEL_COLUMNS: tuple[str, ...] = FINDINGS + ("any",) + STRUCTURAL_FINDINGS
# labels.csv is keyed by the StudyInstanceUID; it stays in the site's input folder and
# ``prepare`` translates it to pseudonymous study keys.
LABELS_KEY_COLUMN = "StudyInstanceUID"

_LAST_NAMES = ("MILLER", "GARCIA", "NOVAK", "OKAFOR", "LINDQVIST", "TANAKA", "ROSSI", "DUBOIS", "KOWALSKI", "SINGH")
_FIRST_NAMES = ("ANNA", "JAMES", "MARIA", "LUCAS", "AMARA", "KENJI", "SOFIA", "PIERRE", "EWA", "RAVI")
_HOSPITALS = ("St. Elsewhere General Hospital", "Riverside University Clinic", "Northgate Medical Centre")


@dataclass(frozen=True)
class SiteProfile:
    """How one synthetic hospital acquires, stores and files its head CTs."""

    name: str
    matrix: int
    slices: int
    pixel_spacing_mm: float
    slice_thickness_mm: float
    noise_sd: float
    blur_sigma: float
    prevalence: float
    gantry_tilt_deg: float
    transfer_syntax: UID
    # Signed storage with intercept 0 (else unsigned 12-bit with intercept -1024).
    signed: bool
    # Stored value -2000 outside the reconstruction circle (needs signed storage).
    padding: bool
    # "flat": <study>/<instance>.dcm; "nested": <PATIENT_NAME>/<date>/SE<series>_<scan>/IM<n> (no extension)
    layout: str
    manufacturer: str
    kernel: str


PROFILES: tuple[SiteProfile, ...] = (
    SiteProfile("thin-sharp", 96, 40, 0.47, 1.0, 8.0, 0.5, 0.5, 0.0, ExplicitVRLittleEndian,
                False, False, "flat", "SIEMENS", "Hr38h"),
    SiteProfile("thick-rle-padded", 64, 24, 0.9, 5.0, 4.0, 1.2, 0.3, 0.0, RLELossless,
                True, True, "nested", "GE MEDICAL SYSTEMS", "STANDARD"),
    SiteProfile("tilted-j2k", 80, 32, 0.6, 2.5, 6.0, 0.8, 0.4, 12.0, JPEG2000Lossless,
                False, False, "flat", "CANON_MEC", "FC26"),
)

PADDING_VALUE = -2000
SLOPE = 1.0


@dataclass(frozen=True)
class Reconstruction:
    """Another series of the same acquisition: same study, patient and anatomy, other kernel.

    Slices cover the same z range as the profile's series at ``slice_thickness_mm``; a sharper
    kernel is a smaller ``blur_sigma``.
    """

    series_number: int
    kernel: str
    slice_thickness_mm: float
    blur_sigma: float
    description: str = ""  # default: "HEAD <thickness>mm <kernel>"


BONE_RECONSTRUCTION = Reconstruction(series_number=3, kernel="H70h", slice_thickness_mm=0.75, blur_sigma=0.2,
                                     description="HEAD BONE 0.75mm")


def site_profile(index: int) -> SiteProfile:
    """Profile of site ``index``; sites beyond the base profiles reuse them, noisier."""
    base = PROFILES[index % len(PROFILES)]
    generation = index // len(PROFILES)
    if generation == 0:
        return base
    return replace(base, name=f"{base.name}-{generation}", noise_sd=base.noise_sd * (1.0 + 0.25 * generation))


def _uid(seed: int, *parts: object) -> UID:
    """A deterministic, valid UID (pydicom's root + a hash of the seed and parts)."""
    return generate_uid(entropy_srcs=["ctfed-synth", str(seed), *map(str, parts)])


@dataclass(frozen=True)
class _Patient:
    name: str
    patient_id: str
    birth_date: str
    sex: str
    accession: str
    study_date: dt.date
    institution: str


def _fake_patient(rng: np.random.Generator, site: int) -> _Patient:
    birth = dt.date(1930, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 70)))
    study = dt.date(2019, 1, 1) + dt.timedelta(days=int(rng.integers(0, 365 * 5)))
    return _Patient(
        name=f"{rng.choice(_LAST_NAMES)}^{rng.choice(_FIRST_NAMES)}",
        patient_id=f"H{site}{int(rng.integers(10**6, 10**7))}",
        birth_date=birth.strftime("%Y%m%d"),
        sex=str(rng.choice(["F", "M"])),
        accession=f"ACC{int(rng.integers(10**7, 10**8))}",
        study_date=study,
        institution=_HOSPITALS[site % len(_HOSPITALS)],
    )


def _base_dataset(patient: _Patient, profile: SiteProfile, study_uid: UID, series_uid: UID, sop_uid: UID) -> Dataset:
    """Patient/study/series/equipment modules shared by every image of a series."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.AccessionNumber = patient.accession
    ds.InstitutionName = patient.institution
    ds.ReferringPhysicianName = "HOUSE^GREGORY"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = patient.study_date.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "101500"
    ds.StudyID = "1"
    ds.StudyDescription = "CT HEAD WITHOUT CONTRAST"
    ds.Modality = "CT"
    ds.Manufacturer = profile.manufacturer
    ds.ConvolutionKernel = profile.kernel
    ds.KVP = 120
    ds.PatientPosition = "HFS"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 16 if profile.signed else 12
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 1 if profile.signed else 0
    ds.RescaleIntercept = 0 if profile.signed else -1024
    ds.RescaleSlope = SLOPE
    ds.RescaleType = "HU"
    return ds


def _to_stored(hu: np.ndarray, profile: SiteProfile) -> np.ndarray:
    """HU -> stored integers for this site's storage convention (lossless round trip)."""
    intercept = 0.0 if profile.signed else -1024.0
    stored = np.rint((hu - intercept) / SLOPE)
    if profile.signed:
        return np.clip(stored, -2048, 4095).astype(np.int16)
    return np.clip(stored, 0, 4095).astype(np.uint16)


def _slice_geometry(profile: SiteProfile, z0: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row/column direction cosines and the IPP of every slice (LPS, mm).

    With gantry tilt the image plane is tilted about the x axis while the table still
    advances along z, so slice origins do not move along the slice normal -- the shear
    that readers must detect.
    """
    tilt = np.deg2rad(profile.gantry_tilt_deg)
    row = np.array([1.0, 0.0, 0.0])
    col = np.array([0.0, np.cos(tilt), np.sin(tilt)])
    half = (profile.matrix * profile.pixel_spacing_mm - profile.pixel_spacing_mm) / 2.0
    centres = np.stack(
        [np.zeros(profile.slices), np.zeros(profile.slices), z0 + np.arange(profile.slices) * profile.slice_thickness_mm],
        axis=1,
    )
    return row, col, centres - half * (row + col)


def _pick_findings(rng: np.random.Generator, prevalence: float) -> list[str]:
    if rng.random() >= prevalence:
        return []
    count = int(rng.integers(1, 3))
    return sorted(rng.choice(FINDINGS, size=count, replace=False).tolist())


# Appended to (seed, site, scan) for the stream of structural findings: a stream of its own
# keeps a scan's patient, pose, haemorrhages and noise whatever the structural prevalences.
_STRUCTURAL_STREAM = 0x5354


def structural_prevalence_of(prevalence: Mapping[str, float] | None) -> dict[str, float]:
    """Every structural finding's prevalence: ``prevalence`` (names from
    ``STRUCTURAL_FINDINGS``, missing ones 0) or, for None, the ``SynthConfig`` defaults."""
    if prevalence is None:
        return SynthConfig().structural_prevalence
    unknown = set(prevalence) - set(STRUCTURAL_FINDINGS)
    if unknown:
        raise ValueError(f"unknown structural findings {sorted(unknown)}; known: {', '.join(STRUCTURAL_FINDINGS)}")
    bad = {name: p for name, p in prevalence.items() if not 0.0 <= p <= 1.0}
    if bad:
        raise ValueError(f"structural prevalences must be in [0, 1], got {bad}")
    return {name: float(prevalence.get(name, 0.0)) for name in STRUCTURAL_FINDINGS}


@dataclass(frozen=True)
class _ScanDraw:
    """What a scan's seed decides before its pixels: patient, findings and the random streams."""

    rng: np.random.Generator
    structural_rng: np.random.Generator
    patient: _Patient
    haemorrhages: list[str]
    structural: list[str]


# (seed, site) -> the PatientIDs its scans 0, 1, ... draw (each from the scan's own stream).
_DRAWN_PATIENT_IDS: dict[tuple[int, int], list[str]] = {}


def _unique_patient(patient: _Patient, seed: int, site: int, scan: int) -> _Patient:
    """Every scan is another patient's: a PatientID that an earlier scan of the site drew too (a
    1-in-9e6 draw per pair; local DP refuses a cache in which one patient has two studies)
    gets the scan number appended. Only such a scan's bytes change, so every other scan keeps
    its content hash and the studies their splits."""
    drawn = _DRAWN_PATIENT_IDS.setdefault((seed, site), [])
    while len(drawn) < scan:
        drawn.append(_fake_patient(np.random.default_rng([seed, site, len(drawn)]), site).patient_id)
    if patient.patient_id not in drawn[:scan]:
        return patient
    return replace(patient, patient_id=f"{patient.patient_id}S{scan}")


def _draw_scan(seed: int, site: int, scan: int, profile: SiteProfile, prevalence: Mapping[str, float] | None) -> _ScanDraw:
    rng = np.random.default_rng([seed, site, scan])
    structural_rng = np.random.default_rng([seed, site, scan, _STRUCTURAL_STREAM])
    patient = _unique_patient(_fake_patient(rng, site), seed, site, scan)
    haemorrhages = _pick_findings(rng, profile.prevalence)
    # One draw per finding whether present or not: each prevalence knob moves only its label.
    chances = structural_prevalence_of(prevalence)
    draws = structural_rng.random(len(STRUCTURAL_FINDINGS))
    structural = [name for name, draw in zip(STRUCTURAL_FINDINGS, draws) if draw < chances[name]]
    return _ScanDraw(rng, structural_rng, patient, haemorrhages, structural)


def label_row(findings: Sequence[str]) -> dict[str, int]:
    """labels.csv's 0/1 columns (``LABEL_COLUMNS``) for a scan with these findings."""
    row = {name: int(name in findings) for name in FINDINGS}
    row["any"] = int(any(name in FINDINGS for name in findings))
    row.update({name: int(name in findings) for name in STRUCTURAL_FINDINGS})
    return row


def scan_labels(
    seed: int, site: int, scan: int, prevalence: Mapping[str, float] | None = None
) -> dict[str, int]:
    """The labels ``synthesize_federation`` gives scan ``scan`` of site ``site``, without
    writing it (``prevalence``: the structural prevalences, as there)."""
    draw = _draw_scan(seed, site, scan, site_profile(site), prevalence)
    return label_row(draw.haemorrhages + draw.structural)


def _series_path(site_dir: Path, profile: SiteProfile, patient: _Patient, scan: int, series_number: int, instance: int) -> Path:
    if profile.layout == "nested":
        folder = site_dir / patient.name.replace("^", "_") / patient.study_date.strftime("%Y%m%d") / f"SE{series_number}_{scan:03d}"
        return folder / f"IM{instance:05d}"
    return site_dir / f"study{scan:03d}_series{series_number}" / f"CT{instance:05d}.dcm"


def _check_encoder(syntax: UID) -> None:
    """Fail before writing anything if pydicom cannot encode ``syntax`` here."""
    if syntax == ExplicitVRLittleEndian:
        return
    from pydicom.pixels import get_encoder

    try:
        encoder = get_encoder(syntax)
    except NotImplementedError:
        raise ValueError(f"cannot write {syntax.name}: pydicom has no pixel data encoder for it") from None
    if not encoder.is_available:
        raise ValueError(
            f"cannot write {syntax.name}: no pixel data encoder installed (needs "
            f"{'; '.join(encoder.missing_dependencies) or 'an encoder plugin'})"
        )


def _save(ds: Dataset, path: Path, profile: SiteProfile) -> None:
    if profile.transfer_syntax != ExplicitVRLittleEndian:
        # Keep the deterministic SOPInstanceUID (pydicom would otherwise mint a new one).
        ds.compress(profile.transfer_syntax, generate_instance_uid=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_scan(
    site_dir: Path,
    profile: SiteProfile,
    site: int,
    scan: int,
    seed: int,
    reconstruction: Reconstruction | None = None,
    finding_scale: float = 1.0,
    structural_prevalence: Mapping[str, float] | None = None,
) -> tuple[UID, list[str]]:
    """Write one axial head-CT series; return its StudyInstanceUID and its findings
    (haemorrhages, then structural findings).

    With ``reconstruction``, write that series of the same study instead (same patient,
    anatomy and findings; its own series UID, kernel and slices). ``finding_scale``:
    ``HeadModel.random`` (1.0: realistic finding sizes). ``structural_prevalence``: the
    chance of each structural finding (``STRUCTURAL_FINDINGS``; None: ``SynthConfig``'s).
    """
    _check_encoder(profile.transfer_syntax)
    draw = _draw_scan(seed, site, scan, profile, structural_prevalence)
    rng, patient = draw.rng, draw.patient
    findings = draw.haemorrhages + draw.structural
    study_uid = _uid(seed, site, scan, "study")
    uid_parts: tuple[object, ...] = () if reconstruction is None else (reconstruction.series_number,)
    series_uid = _uid(seed, site, scan, "series", *uid_parts)
    z0 = float(rng.uniform(-80.0, -40.0))
    fov = profile.matrix * profile.pixel_spacing_mm
    extent = (fov, fov * np.cos(np.deg2rad(profile.gantry_tilt_deg)), profile.slices * profile.slice_thickness_mm)
    head = HeadModel.random(
        rng, extent, (0.0, 0.0, z0 + (profile.slices - 1) * profile.slice_thickness_mm / 2), findings, finding_scale,
        structural_rng=draw.structural_rng,
    )
    series_number = 2
    description = f"HEAD {profile.slice_thickness_mm:g}mm {profile.kernel}"
    if reconstruction is not None:
        # The same z range at the reconstruction's slice thickness, with its kernel.
        series_number = reconstruction.series_number
        slices = max(3, round(profile.slices * profile.slice_thickness_mm / reconstruction.slice_thickness_mm))
        profile = replace(profile, slices=slices, slice_thickness_mm=reconstruction.slice_thickness_mm,
                          kernel=reconstruction.kernel, blur_sigma=reconstruction.blur_sigma)
        description = reconstruction.description or f"HEAD {profile.slice_thickness_mm:g}mm {profile.kernel}"
    row, col, positions = _slice_geometry(profile, z0)

    grid = np.arange(profile.matrix, dtype=np.float64) * profile.pixel_spacing_mm
    plane = grid[None, :, None] * row + grid[:, None, None] * col  # (y, x, 3)
    points = positions[:, None, None, :] + plane[None]
    hu = scanner_effects(head.hu_at(points), rng, profile.noise_sd, profile.blur_sigma)
    stored = _to_stored(hu, profile)
    if profile.padding:
        centre = (profile.matrix - 1) / 2.0
        yy, xx = np.mgrid[: profile.matrix, : profile.matrix]
        outside = (yy - centre) ** 2 + (xx - centre) ** 2 > (profile.matrix / 2.0) ** 2
        stored[:, outside] = PADDING_VALUE

    for k in range(profile.slices):
        instance = k + 1
        ds = _base_dataset(patient, profile, study_uid, series_uid, _uid(seed, site, scan, "sop", *uid_parts, k))
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SeriesDescription = description
        ds.SeriesNumber = series_number
        ds.InstanceNumber = instance
        ds.FrameOfReferenceUID = _uid(seed, site, scan, "for")
        ds.ImagePositionPatient = [round(float(v), 4) for v in positions[k]]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in (*row, *col)]
        ds.SliceLocation = round(float(positions[k][2]), 4)
        ds.SliceThickness = profile.slice_thickness_mm
        ds.PixelSpacing = [profile.pixel_spacing_mm, profile.pixel_spacing_mm]
        ds.GantryDetectorTilt = profile.gantry_tilt_deg
        ds.Rows = ds.Columns = profile.matrix
        ds.WindowCenter, ds.WindowWidth = 40, 80
        if profile.padding:
            ds.PixelPaddingValue = PADDING_VALUE
        ds.PixelData = stored[k].tobytes()
        _save(ds, _series_path(site_dir, profile, patient, scan, series_number, instance), profile)
    return study_uid, findings


def write_localizer(site_dir: Path, profile: SiteProfile, site: int, seed: int) -> None:
    """A single-image scout series: valid CT, but ``prepare`` must not take it for a volume."""
    rng = np.random.default_rng([seed, site, 10**6])
    patient = _fake_patient(rng, site)
    size = 64
    ds = _base_dataset(patient, profile, _uid(seed, site, "loc", "study"), _uid(seed, site, "loc", "series"),
                       _uid(seed, site, "loc", "sop"))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "LOCALIZER"]
    ds.SeriesDescription = "TOPOGRAM"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [-128.0, 0.0, 60.0]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
    ds.PixelSpacing = [4.0, 4.0]
    ds.SliceThickness = 1.0
    ds.Rows = ds.Columns = size
    yy, xx = np.mgrid[:size, :size]
    hu = np.where((yy - 32) ** 2 / 24**2 + (xx - 32) ** 2 / 20**2 < 1, 300.0, -1000.0)
    ds.PixelData = _to_stored(hu, profile).tobytes()
    _save(ds, _series_path(site_dir, profile, patient, 999, 1, 1), profile)


def synthetic_site_secret(seed: int, site_name: str) -> bytes:
    """The pseudonym key of synthetic hospital ``site_name``'s cache, from the synth seed.

    A real site's secret is random (``common/privacy.py``), and its cache's order follows the
    keyed pseudonyms: with a fresh random secret per run, two ``ctfed simulate`` runs of one
    seed trained every site on its volumes in another order. Synthetic scans hold no patient,
    so their key may be as reproducible as their UIDs.
    """
    return hashlib.sha256("\x1f".join(("ctfed-synth-site-secret", str(seed), site_name)).encode("utf-8")).digest()


def synthesize_federation(
    out_dir: Path,
    sites: int,
    scans_per_site: int | Sequence[int],
    seed: int,
    *,
    reconstructions: Sequence[Reconstruction] = (),
    finding_scale: float = 1.0,
    structural_prevalence: Mapping[str, float] | None = None,
) -> list[Path]:
    """Write ``sites`` hospitals under ``out_dir/site_<k>``; return their folders.

    ``scans_per_site`` is one count for every site, or one count per site (sites of different
    sizes). A scan's pixels and labels depend only on (seed, site, scan), so a larger site
    holds the scans of a smaller one plus more. Each site folder holds its DICOM files, one
    localizer series and ``labels.csv`` (``StudyInstanceUID`` plus one 0/1 column per haemorrhage
    type, ``any`` haemorrhage and one per structural finding: ``LABEL_COLUMNS``).
    Each study also gets one series per entry of ``reconstructions`` (one labels row per study).
    ``finding_scale`` enlarges every finding (``HeadModel.random``) and changes nothing else.
    ``structural_prevalence``: each structural finding's chance per scan, independently
    (``synth.<finding>_prevalence``; None: the ``SynthConfig`` defaults); a prevalence moves
    only its own finding's labels and pixels.
    """
    prevalence = structural_prevalence_of(structural_prevalence)
    counts = [scans_per_site] * sites if isinstance(scans_per_site, int) else list(scans_per_site)
    if sites < 1 or len(counts) != sites or min(counts) < 1:
        raise ValueError(f"need sites >= 1 and one scan count >= 1 per site, got {sites} sites and {scans_per_site}")
    site_dirs = []
    for site, site_scans in enumerate(counts):
        profile = site_profile(site)
        site_dir = out_dir / f"site_{site}"
        site_dir.mkdir(parents=True, exist_ok=True)
        rows = []
        for scan in range(site_scans):
            study_uid, findings = write_scan(site_dir, profile, site, scan, seed, finding_scale=finding_scale,
                                             structural_prevalence=prevalence)
            for reconstruction in reconstructions:
                write_scan(site_dir, profile, site, scan, seed, reconstruction, finding_scale=finding_scale,
                           structural_prevalence=prevalence)
            labels = label_row(findings)
            rows.append([study_uid] + [labels[name] for name in LABEL_COLUMNS])
        write_localizer(site_dir, profile, site, seed)
        with open(site_dir / "labels.csv", "w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow([LABELS_KEY_COLUMN, *LABEL_COLUMNS])
            writer.writerows(rows)
        logger.debug("wrote site %d (%s)", site, profile.name)
        site_dirs.append(site_dir)
    return site_dirs
