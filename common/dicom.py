"""Reading a hospital's DICOM export into HU volumes, defensively.

``scan`` walks any folder tree (extension-less files, nested folders, junk) reading headers
only, and keeps CT image series whose transfer syntax an installed decoder reads; everything
else is recorded as a ``Rejection`` whose ``ref`` is a keyed hash (folder and file names at
hospitals often contain patient names). ``rank_study_series`` orders the series of each
study for ``prepare``, which by default caches only the best one that loads.
``load_series`` turns one series into a ``CTVolume`` in exact HU with geometry taken from
ImagePositionPatient/ImageOrientationPatient -- slices ordered along the slice normal,
spacing from positions rather than SliceThickness, duplicates dropped, missing slices and
gantry tilt detected (see /work/shared/notes/dicom-pitfalls.md for why each matters).

Error and warning texts never contain paths, UIDs or header values that could identify a
patient, so callers may log or store them as they are.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import secrets
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID
from scipy.ndimage import affine_transform

from ctfed.common.config import SeriesPerStudy, SeriesSelectionConfig, SeriesTieBreak
from ctfed.common.privacy import pseudonym

logger = logging.getLogger(__name__)

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.1"
LEGACY_ENHANCED_CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2.2"
CT_SOP_CLASSES = frozenset({CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, LEGACY_ENHANCED_CT_IMAGE_STORAGE})
MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
SECONDARY_CAPTURE_PREFIX = "1.2.840.10008.5.1.4.1.1.7"
SR_PREFIX = "1.2.840.10008.5.1.4.1.1.88"
AIR_HU = -1024.0
NATIVE_SYNTAXES = frozenset({
    "1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
})
# Header-level geometry must agree to this many mm / direction-cosine units.
_POSITION_TOL_MM = 1e-3
_ORIENTATION_TOL = 1e-4


@contextlib.contextmanager
def _quiet_pydicom() -> Iterator[None]:
    """Silence pydicom's warnings and log records for the duration of a read.

    pydicom puts file paths in them, and hospital folder names are often patient names;
    problems are reported instead through identifier-free ``Rejection``/``DicomError`` texts.
    """
    pydicom_logger = logging.getLogger("pydicom")
    previous = pydicom_logger.disabled
    pydicom_logger.disabled = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom_logger.disabled = previous


# NIfTI volumes in an export are not DICOM: scan() lists them for common/nifti.py to read.
NIFTI_SUFFIXES = (".nii", ".nii.gz")


class DicomError(ValueError):
    """A series that cannot be turned into a trustworthy volume; the message says why."""


@dataclass(frozen=True)
class Rejection:
    """Something under the input folder that was not used, and why (identifier-free)."""

    ref: str
    reason: str


@dataclass
class SeriesRef:
    """One CT series found by ``scan``: its files plus the header facts needed later.

    ``series_uid``/``study_uid`` and ``console_path`` identify the series for the site
    operator and for pseudonymisation; they are kept in memory and must never be written.
    """

    series_uid: str
    study_uid: str
    files: list[Path]
    rows: int
    columns: int
    transfer_syntax: str
    multiframe: bool
    console_path: str = field(repr=False, default="")
    # Free text from the header, for series selection only: matched against configured
    # patterns in memory; only the matching pattern may ever be written.
    description: str = field(repr=False, default="")
    kernel: str = field(repr=False, default="")
    slice_thickness_mm: float | None = None
    images: int = 0
    # For ``ctfed predict --id-column AccessionNumber`` only (a local CSV); never written otherwise.
    accession_number: str = field(repr=False, default="")
    # For the patient pseudonym (``patient_key``) only: never written, logged or sent in clear.
    patient_id: str = field(repr=False, default="")


@dataclass
class ScanResult:
    series: list[SeriesRef]
    rejected: list[Rejection]
    # NIfTI volumes found in the same tree (read by common/nifti.py, not as DICOM).
    nifti: list[Path] = field(default_factory=list)


@dataclass
class CTVolume:
    """A CT volume in HU on an orthogonal grid.

    ``hu`` is (z, y, x) float32; ``spacing_zyx`` in mm; ``origin`` the LPS position (mm) of
    voxel (0, 0, 0); ``direction`` a 3x3 matrix whose columns are the LPS unit vectors of
    the x, y and z index axes (SimpleITK's convention). ``warnings`` lists what was repaired.
    """

    hu: np.ndarray
    spacing_zyx: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: np.ndarray
    warnings: list[str] = field(default_factory=list)
    slice_count: int = 0
    tilt_corrected: bool = False

    @property
    def affine_lps(self) -> np.ndarray:
        """4x4 voxel (x, y, z index) -> LPS mm affine."""
        affine = np.eye(4)
        affine[:3, :3] = self.direction * np.asarray(self.spacing_zyx[::-1])
        affine[:3, 3] = self.origin
        return affine


def _is_dicom(path: Path, ds: Dataset) -> bool:
    """``force=True`` parses anything; accept only a preamble or the core identifying tags."""
    with open(path, "rb") as handle:
        handle.seek(128)
        if handle.read(4) == b"DICM":
            return True
    return "SOPClassUID" in ds and "SeriesInstanceUID" in ds


def _sop_class(ds: Dataset) -> str:
    sop = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", "")
    return str(sop or "")


@functools.lru_cache(maxsize=None)
def undecodable_reason(transfer_syntax: str) -> str | None:
    """Why pixel data in ``transfer_syntax`` cannot be decoded here, or None if it can.

    Checked at scan time from the header, so a series in a syntax no installed pydicom
    plugin handles is reported once, by name, instead of failing slice by slice later.
    """
    from pydicom.pixels import get_decoder

    with _quiet_pydicom():
        uid = UID(transfer_syntax)
        valid = uid.is_valid
    if not valid:
        return f"transfer syntax {transfer_syntax[:64]!r} is not a valid UID"
    if not uid.is_transfer_syntax:
        return f"unknown transfer syntax {uid} (no pixel data decoder exists for it)"
    if not uid.is_compressed:
        return None  # native (incl. deflated) pixel data: pydicom reads it itself
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"transfer syntax {uid.name} ({uid}): pydicom has no pixel data decoder for it"
    if decoder.is_available:
        return None
    missing = "; ".join(decoder.missing_dependencies) or "a decoder plugin"
    return f"transfer syntax {uid.name} ({uid}): no installed pixel data decoder (needs {missing})"


def _decoded_header(ds: Dataset) -> None:
    """Convert every element of the header now (pydicom converts raw elements when they are
    first read): a malformed one (an unknown VR, a length past the end, a value of the wrong
    kind) then fails here, inside ``_classify``, and not later when a field is read."""
    for _ in ds.file_meta.iterall() if getattr(ds, "file_meta", None) is not None else ():
        pass
    for _ in ds.iterall():
        pass


def _classify(path: Path) -> tuple[Dataset | None, str | None]:
    """Read a header; return (dataset, None) for a usable CT image or (None, reason).

    The file is untrusted input: whatever parsing it raises (pydicom raises many kinds, from
    NotImplementedError for an unknown VR to OverflowError for an absurd length) makes it a
    rejection with the exception's type as the reason, never an error of the scan."""
    try:
        with _quiet_pydicom():
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            _decoded_header(ds)
    except OSError as err:
        return None, f"unreadable file ({type(err).__name__})"
    except Exception as err:  # noqa: BLE001 - hostile bytes: any parse failure is a rejection
        return None, f"unreadable header ({type(err).__name__}; truncated or not DICOM)"
    try:
        if not _is_dicom(path, ds):
            return None, "not a DICOM file"
        sop = _sop_class(ds)
        if sop == MEDIA_STORAGE_DIRECTORY or "DirectoryRecordSequence" in ds:
            return None, "DICOMDIR (directory index, no images)"
        if sop.startswith(SR_PREFIX) or ds.get("Modality") == "SR":
            return None, "structured report / dose report"
        if sop.startswith(SECONDARY_CAPTURE_PREFIX):
            return None, "secondary capture"
        missing = [k for k in ("Modality", "SeriesInstanceUID", "Rows", "Columns", "BitsAllocated") if k not in ds]
        if missing:
            return None, f"incomplete header, missing {', '.join(missing)} (truncated?)"
        if ds.get("Modality") != "CT":
            return None, f"modality {str(ds.get('Modality', 'missing'))[:8]!r} is not CT"
        if sop not in CT_SOP_CLASSES:
            return None, "not a CT image storage object"
        image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
        if "LOCALIZER" in image_type:
            return None, "localizer / scout image"
        syntax = str(getattr(ds.file_meta, "TransferSyntaxUID", "1.2.840.10008.1.2"))
        undecodable = undecodable_reason(syntax)
        if undecodable is not None:
            return None, undecodable
        if syntax in NATIVE_SYNTAXES:
            frames = int(ds.get("NumberOfFrames") or 1)
            expected = int(ds.Rows) * int(ds.Columns) * int(ds.BitsAllocated) // 8 * frames
            if os.path.getsize(path) < expected:
                return None, "truncated pixel data"
        return ds, None
    except Exception as err:  # noqa: BLE001 - values of the wrong kind or size (a Rows that is text, a negative frame count)
        return None, f"malformed header ({type(err).__name__})"


def scan(root: Path, secret: bytes | None = None) -> ScanResult:
    """Find the usable CT series under ``root`` (headers only) and say why the rest was not.

    ``secret`` keys the hashes used as rejection refs (the site secret from
    ``privacy.site_secret`` keeps them stable between runs); without it a random one is used.
    Series-level rejections (e.g. a localizer series) are reported once per series.
    """
    if not root.is_dir():
        raise FileNotFoundError(f"input folder does not exist: {root}")
    salt = secret if secret is not None else secrets.token_bytes(32)
    files: dict[str, list[tuple[Path, Dataset]]] = defaultdict(list)
    rejected: list[Rejection] = []
    series_rejections: dict[tuple[str, str], int] = {}
    nifti: list[Path] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if path.suffix.lower() in (".csv", ".md", ".json", ".txt") and path.parent == root:
            continue  # the site's own side files (labels.csv, notes), not export content
        if path.name.lower().endswith(NIFTI_SUFFIXES):
            nifti.append(path)
            continue
        ds, reason = _classify(path)
        if ds is None:
            assert reason is not None
            uid = _safe_series_uid(path, reason)
            if uid is not None:
                series_rejections[(uid, reason)] = series_rejections.get((uid, reason), 0) + 1
            else:
                rejected.append(Rejection(f"file:{pseudonym(salt, 'file', rel, length=12)}", reason))
            continue
        files[str(ds.SeriesInstanceUID)].append((path, ds))
    for (uid, reason), count in sorted(series_rejections.items(), key=lambda item: item[1]):
        plural = f" ({count} files)" if count > 1 else ""
        rejected.append(Rejection(f"series:{pseudonym(salt, 'series', uid)}", reason + plural))

    series = []
    for uid, members in files.items():
        first = members[0][1]
        syntax = str(getattr(first.file_meta, "TransferSyntaxUID", "1.2.840.10008.1.2"))
        kernel = first.get("ConvolutionKernel") or _shared_item(first, "CTReconstructionSequence", "ConvolutionKernel")
        thickness = first.get("SliceThickness") or _shared_item(first, "PixelMeasuresSequence", "SliceThickness")
        series.append(SeriesRef(
            series_uid=uid,
            study_uid=str(first.get("StudyInstanceUID", "")),
            files=[p for p, _ in members],
            rows=int(first.Rows),
            columns=int(first.Columns),
            transfer_syntax=syntax,
            multiframe=any(int(d.get("NumberOfFrames") or 1) > 1 for _, d in members),
            console_path=members[0][0].parent.relative_to(root).as_posix(),
            description=str(first.get("SeriesDescription") or ""),
            kernel=_text(kernel),
            slice_thickness_mm=_positive_float(thickness),
            images=sum(int(d.get("NumberOfFrames") or 1) for _, d in members),
            accession_number=str(first.get("AccessionNumber") or ""),
            patient_id=str(first.get("PatientID") or "").strip(),
        ))
    logger.info("scan: %d CT series, %d NIfTI files, %d rejected entries", len(series), len(nifti), len(rejected))
    return ScanResult(series=series, rejected=rejected, nifti=nifti)


def _shared_item(ds: Dataset, sequence: str, keyword: str) -> object:
    """``keyword`` from an enhanced object's shared functional groups, if there."""
    groups = ds.get("SharedFunctionalGroupsSequence")
    if groups and sequence in groups[0] and groups[0][sequence]:
        return groups[0][sequence][0].get(keyword)
    return None


def _text(value: object) -> str:
    """A header value as one string (ConvolutionKernel may be multi-valued, e.g. "Hr38" + "3")."""
    if value is None:
        return ""
    if isinstance(value, (list, tuple, MultiValue)):
        return "\\".join(map(str, value))
    return str(value)


def _positive_float(value: object) -> float | None:
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


@dataclass(frozen=True)
class SeriesChoice:
    """The ranking of one study's series: ``ranked[0]`` is tried first."""

    ranked: list[SeriesRef]
    # Why each series ranks where it does (pattern text from the config, never header text).
    why: dict[str, str]


def _match(patterns: Sequence[str], ref: SeriesRef) -> str | None:
    for pattern in patterns:
        if re.search(pattern, ref.description, re.IGNORECASE) or re.search(pattern, ref.kernel, re.IGNORECASE):
            return pattern
    return None


def rank_study_series(series: Sequence[SeriesRef], cfg: SeriesSelectionConfig) -> list[SeriesChoice]:
    """Group CT series by study and rank each study's series per ``cfg`` (best first).

    With ``per_study=all`` every series is its own choice. Series of a study without a
    StudyInstanceUID cannot be grouped, so each stands alone.
    """
    if cfg.per_study == SeriesPerStudy.all:
        return [SeriesChoice([ref], {ref.series_uid: "all series kept (series_selection.per_study=all)"}) for ref in series]
    studies: dict[str, list[SeriesRef]] = defaultdict(list)
    for ref in series:
        studies[ref.study_uid or f"no-study:{ref.series_uid}"].append(ref)
    choices = []
    for members in studies.values():
        why: dict[str, str] = {}
        keys = {}
        for ref in members:
            excluded = _match(cfg.excluded, ref)
            preferred = _match(cfg.preferred, ref)
            if excluded is not None:
                rank, why[ref.series_uid] = len(cfg.preferred) + 1, f"matches excluded pattern {excluded!r}"
            elif preferred is not None:
                rank, why[ref.series_uid] = list(cfg.preferred).index(preferred), f"matches preferred pattern {preferred!r}"
            else:
                rank, why[ref.series_uid] = len(cfg.preferred), "matches no configured pattern"
            thickness = ref.slice_thickness_mm if ref.slice_thickness_mm is not None else float("inf")
            if ref.slice_thickness_mm is not None:
                why[ref.series_uid] += f", {ref.slice_thickness_mm:g} mm slices"
            why[ref.series_uid] += f", {ref.images} images"
            order = (thickness, -ref.images) if cfg.tie_break == SeriesTieBreak.thinnest else (-ref.images, thickness)
            # The UID last only makes the order deterministic; it is never shown.
            keys[ref.series_uid] = (rank, *order, ref.series_uid)
        choices.append(SeriesChoice(sorted(members, key=lambda r: keys[r.series_uid]), why))
    return choices


def _safe_series_uid(path: Path, reason: str) -> str | None:
    """Series UID of a rejected but well-formed object, so its files are reported as one."""
    if reason.startswith(("unreadable", "not a DICOM", "DICOMDIR", "truncated", "incomplete", "malformed")):
        return None
    try:
        with _quiet_pydicom():
            ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["SeriesInstanceUID"])
        return str(ds.SeriesInstanceUID) if "SeriesInstanceUID" in ds else None
    except Exception:  # noqa: BLE001 - a header that parsed once; any failure just means per-file
        return None


# What a _Slice's pixels become once load_series has converted them to HU.
_RELEASED = np.empty((0, 0), dtype=np.int16)


@dataclass
class _Slice:
    position: np.ndarray  # IPP, LPS mm
    orientation: np.ndarray  # 6 direction cosines
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    slope: float
    intercept: float
    pixels: np.ndarray  # stored values (rows, columns)
    padding: tuple[float, float] | None  # inclusive stored-value range treated as padding


def _first(*items: object) -> object:
    return next((item for item in items if item is not None), None)


def _group_item(ds: Dataset, frame: int, sequence: str) -> Dataset | None:
    """A functional-group item for one frame: per-frame first, then shared."""
    for groups_name, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        groups = ds.get(groups_name)
        if groups and len(groups) > index and sequence in groups[index] and groups[index][sequence]:
            return groups[index][sequence][0]
    return None


def _padding(ds: Dataset) -> tuple[float, float] | None:
    if "PixelPaddingValue" not in ds:
        return None
    value = float(ds.PixelPaddingValue)
    limit = float(ds.PixelPaddingRangeLimit) if "PixelPaddingRangeLimit" in ds else value
    return (min(value, limit), max(value, limit))


def _read_pixels(ds: Dataset) -> np.ndarray:
    syntax = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "1.2.840.10008.1.2"))
    undecodable = undecodable_reason(syntax)
    if undecodable is not None:
        raise DicomError(undecodable)
    try:
        with _quiet_pydicom():
            return np.asarray(ds.pixel_array)
    except BaseException as err:  # noqa: BLE001 - decoders raise anything; report class only
        # A Rust decoder's panic (pylibjpeg-rle on a corrupt RLE frame) is a BaseException
        # (pyo3's PanicException), not an Exception; only the interpreter's own exits pass.
        if isinstance(err, (KeyboardInterrupt, SystemExit, GeneratorExit)):
            raise
        name = UID(syntax).name if UID(syntax).is_transfer_syntax else syntax[:64]
        raise DicomError(
            f"pixel data could not be decoded ({type(err).__name__}; truncated or unsupported; transfer syntax {name})"
        ) from None


def _slices_from_file(path: Path) -> list[_Slice]:
    try:
        with _quiet_pydicom():
            ds = pydicom.dcmread(path, force=True)
    except Exception as err:  # noqa: BLE001
        raise DicomError(f"file unreadable ({type(err).__name__})") from None
    frames = int(ds.get("NumberOfFrames") or 1)
    pixels = _read_pixels(ds)
    if frames == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        pixels = pixels[None] if pixels.ndim == 2 else pixels
        try:
            return [_Slice(
                position=np.array(ds.ImagePositionPatient, float),
                orientation=np.array(ds.ImageOrientationPatient, float),
                pixel_spacing=(float(ds.PixelSpacing[0]), float(ds.PixelSpacing[1])),
                slope=float(ds.get("RescaleSlope", 1.0) or 1.0),
                intercept=float(ds.get("RescaleIntercept", 0.0) or 0.0),
                pixels=pixels[0],
                padding=_padding(ds),
            )]
        except AttributeError as err:
            raise DicomError(f"slice without geometry ({str(err).split()[-1]} missing)") from None
    pixels = pixels.reshape(frames, int(ds.Rows), int(ds.Columns))
    out = []
    for i in range(frames):
        plane = _group_item(ds, i, "PlanePositionSequence")
        orient = _group_item(ds, i, "PlaneOrientationSequence")
        measures = _group_item(ds, i, "PixelMeasuresSequence")
        transform = _group_item(ds, i, "PixelValueTransformationSequence")
        if plane is None or orient is None or measures is None:
            raise DicomError("enhanced CT frame without plane position/orientation/pixel measures")
        slope = _first(transform.get("RescaleSlope") if transform else None, ds.get("RescaleSlope"), 1.0)
        intercept = _first(transform.get("RescaleIntercept") if transform else None, ds.get("RescaleIntercept"), 0.0)
        out.append(_Slice(
            position=np.array(plane.ImagePositionPatient, float),
            orientation=np.array(orient.ImageOrientationPatient, float),
            pixel_spacing=(float(measures.PixelSpacing[0]), float(measures.PixelSpacing[1])),
            slope=float(slope), intercept=float(intercept),
            pixels=pixels[i], padding=_padding(ds),
        ))
    return out


def _series_files(source: SeriesRef | Path | Sequence[Path]) -> list[Path]:
    if isinstance(source, SeriesRef):
        return list(source.files)
    if isinstance(source, (str, Path)):
        path = Path(source)
        if path.is_file():
            return [path]
        if not path.is_dir():
            raise DicomError("series path does not exist")
        found = scan(path)
        if len(found.series) != 1:
            raise DicomError(f"folder holds {len(found.series)} CT series; pass one series' files")
        return found.series[0].files
    return [Path(p) for p in source]


def load_series(
    source: SeriesRef | Path | Sequence[Path],
    *,
    gantry_tilt: str = "resample",
    spacing_tolerance: float = 0.1,
    spacing_tolerance_mm: float = 0.0,
) -> CTVolume:
    """Load one CT series as HU on an orthogonal grid.

    ``source`` is a ``SeriesRef``, a list of slice files in any order, a single (possibly
    enhanced multi-frame) file, or a folder holding exactly one CT series. Slices sharing a
    position are de-duplicated (first kept, with a warning). Slice gaps that differ from the
    median by more than max(``spacing_tolerance`` x median, ``spacing_tolerance_mm``) mean
    missing or irregular slices and raise ``DicomError``: interpolating over them would
    silently invent anatomy. Gantry-
    tilted stacks are resampled onto the orthogonal grid (``"resample"``) or refused
    (``"reject"``).
    """
    if gantry_tilt not in ("resample", "reject"):
        raise ValueError("gantry_tilt must be 'resample' or 'reject'")
    files = _series_files(source)
    if not files:
        raise DicomError("series has no files")
    slices: list[_Slice] = []
    for path in files:
        slices.extend(_slices_from_file(path))
    warnings: list[str] = []

    orientation = slices[0].orientation
    if any(np.abs(s.orientation - orientation).max() > _ORIENTATION_TOL for s in slices):
        raise DicomError("slices have different orientations (mixed or reformatted series)")
    shapes = {s.pixels.shape for s in slices}
    if len(shapes) != 1:
        raise DicomError(f"slices have different matrix sizes {sorted(shapes)}")
    spacings = {s.pixel_spacing for s in slices}
    if len(spacings) != 1:
        raise DicomError("slices have different pixel spacings")
    row_dir, col_dir = orientation[:3], orientation[3:]
    normal = np.cross(row_dir, col_dir)
    if not np.isclose(np.linalg.norm(normal), 1.0, atol=1e-3):
        raise DicomError("ImageOrientationPatient is not two orthogonal unit vectors")
    normal /= np.linalg.norm(normal)

    slices.sort(key=lambda s: float(s.position @ normal))
    unique = [slices[0]]
    for s in slices[1:]:
        if np.linalg.norm(s.position - unique[-1].position) < _POSITION_TOL_MM:
            continue
        unique.append(s)
    if len(unique) < len(slices):
        dropped = len(slices) - len(unique)
        warnings.append(f"dropped {dropped} duplicate slice(s) at an already used position")
        slices = unique
    if len(slices) < 3:
        raise DicomError(f"only {len(slices)} distinct slice position(s); not a volume")

    projected = np.array([s.position @ normal for s in slices])
    gaps = np.diff(projected)
    dz = float(np.median(gaps))
    allowed_mm = max(spacing_tolerance * dz, spacing_tolerance_mm)
    irregular = np.abs(gaps - dz) > allowed_mm
    if irregular.any():
        missing = int(np.sum(np.maximum(np.rint(gaps[irregular] / dz) - 1, 0)))
        worst = float(np.abs(gaps - dz).max())
        raise DicomError(
            f"irregular slice spacing: {int(irregular.sum())} gap(s) deviate from the median {dz:.3f} mm "
            f"by up to {worst:.3f} mm, more than the tolerance of {allowed_mm:.3f} mm "
            f"(max of {spacing_tolerance:.0%} and {spacing_tolerance_mm:g} mm; about {missing} missing slice(s))"
        )

    dy, dx = slices[0].pixel_spacing
    # Slice by slice into one float32 HU volume, each slice's stored pixels released once
    # converted: a 512x512x600 series (315 MB of 16-bit pixels) then holds its HU volume and
    # the pixels not yet converted, not both plus a float32 copy of every stored value.
    hu = np.empty((len(slices), *slices[0].pixels.shape), dtype=np.float32)
    for k, s in enumerate(slices):
        stored = s.pixels.astype(np.float32)
        s.pixels = _RELEASED
        hu[k] = stored * s.slope + s.intercept
        if s.padding is not None:
            lo, hi = s.padding
            hu[k][(stored >= lo) & (stored <= hi)] = AIR_HU

    # Gantry tilt: slice origins drift within the image plane as the table advances.
    step = (slices[-1].position - slices[0].position) / (len(slices) - 1)
    shift_col = float(step @ col_dir)
    shift_row = float(step @ row_dir)
    tilted = max(abs(shift_col), abs(shift_row)) * (len(slices) - 1) > 0.1 * min(dx, dy)
    if tilted:
        angle = float(np.degrees(np.arctan2(np.hypot(shift_col, shift_row), dz)))
        if gantry_tilt == "reject":
            raise DicomError(f"gantry tilt of {angle:.1f} degrees (configured to reject tilted series)")
        # Output voxel (k, i, j) sits at origin + k*dz*n + i*dy*col + j*dx*row; in the
        # sheared input it is slice k, shifted back by k times the in-plane drift.
        matrix = np.array([[1.0, 0.0, 0.0], [-shift_col / dy, 1.0, 0.0], [-shift_row / dx, 0.0, 1.0]])
        hu = affine_transform(hu, matrix, order=1, mode="constant", cval=AIR_HU).astype(np.float32)
        warnings.append(f"gantry tilt of {angle:.1f} degrees resampled onto an orthogonal grid")
    direction = np.stack([row_dir, col_dir, normal], axis=1)
    return CTVolume(
        hu=hu,
        spacing_zyx=(dz, float(dy), float(dx)),
        origin=tuple(float(v) for v in slices[0].position),
        direction=direction,
        warnings=warnings,
        slice_count=len(slices),
        tilt_corrected=tilted,
    )


def series_key(secret: bytes, series_uid: str) -> str:
    """The pseudonymous key a series gets in every output."""
    return pseudonym(secret, "series", series_uid)


def study_key(secret: bytes, study_uid: str) -> str:
    """The pseudonymous key a study gets in every output (for patient-level splits)."""
    return pseudonym(secret, "study", study_uid)


def patient_key(secret: bytes, patient_id: str) -> str:
    """The pseudonymous key of a patient (local DP's privacy unit, client/privacy_unit.py);
    "" for a series without a PatientID (empty or blank), which then has no patient key."""
    patient_id = patient_id.strip()
    return pseudonym(secret, "patient", patient_id) if patient_id else ""

