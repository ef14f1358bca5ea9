"""NIfTI input: CT volumes a site already converted (``.nii`` / ``.nii.gz``), read with nibabel.

A NIfTI file has no UIDs; ctfed knows it by an HMAC of its path under the input folder
(``nifti_key``), so re-runs find it again and a file name holding a patient's name never
reaches any output. Values are taken as HU after the header's scaling (``scl_slope`` /
``scl_inter``); a volume whose values cannot be CT in HU is rejected rather than cached.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ctfed.common.dicom import NIFTI_SUFFIXES, CTVolume, DicomError
from ctfed.common.privacy import pseudonym
# Air is about -1000 HU; a CT volume of a head holds air around it. A minimum above this
# means the values are not HU (e.g. already windowed to [0, 1] or stored unscaled).
MAX_PLAUSIBLE_MIN_HU = -500.0


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_key(secret: bytes, relative_path: str) -> str:
    """The series key of a NIfTI file (its path under the input folder, pseudonymised)."""
    return pseudonym(secret, "nifti", relative_path)


def load_nifti(path: Path) -> CTVolume:
    """A CTVolume (HU, z/y/x, LPS geometry) from a 3D NIfTI CT; DicomError says why not."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float32)  # applies scl_slope / scl_inter
    except Exception as err:  # noqa: BLE001 - nibabel raises many types for broken files
        raise DicomError(f"unreadable NIfTI ({type(err).__name__})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3 or min(data.shape) < 2:
        raise DicomError(f"NIfTI volume has shape {data.shape}; a 3D CT volume is needed")
    if not np.isfinite(data).all():
        raise DicomError("NIfTI volume contains NaN or infinite values")
    if float(data.min()) > MAX_PLAUSIBLE_MIN_HU:
        raise DicomError(f"NIfTI values start at {float(data.min()):.0f}, not CT in HU (air is about -1000)")
    affine_ras = np.asarray(image.affine, dtype=np.float64)
    affine_lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine_ras
    spacing_xyz = np.linalg.norm(affine_lps[:3, :3], axis=0)
    if not (spacing_xyz > 0).all():
        raise DicomError("NIfTI affine has a zero voxel size")
    direction = affine_lps[:3, :3] / spacing_xyz
    return CTVolume(
        hu=np.ascontiguousarray(data.transpose(2, 1, 0)),
        spacing_zyx=tuple(float(s) for s in spacing_xyz[::-1]),  # type: ignore[arg-type]
        origin=tuple(float(v) for v in affine_lps[:3, 3]),  # type: ignore[arg-type]
        direction=direction,
        slice_count=int(data.shape[2]),
    )
