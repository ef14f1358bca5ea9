"""NIfTI input: the same volume as DICOM or as NIfTI gives the same cache; names stay private."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from ctfed.common.config import PreprocessConfig
from ctfed.common.dicom import DicomError, load_series, scan
from ctfed.common.nifti import load_nifti
from ctfed.common.preprocess import CachedVolumes, prepare
from ctfed.simulations.data.synth import synthesize_federation

PATIENT_FILE = "DOE_JOHN_19520314.nii.gz"


def _cfg() -> PreprocessConfig:
    return PreprocessConfig(output_size=16, spacing_mm=2.0)


def _write_nifti(volume, path: Path, scale: float = 1.0) -> None:  # noqa: ANN001 - a CTVolume
    """Write a CTVolume as NIfTI the way converters do: RAS affine, (x, y, z) data."""
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine_lps
    data = volume.hu.transpose(2, 1, 0)
    image = nib.Nifti1Image((data / scale).astype(np.float32), affine_ras)
    image.header.set_slope_inter(scale, 0.0)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(image, str(path))


@pytest.fixture(scope="module")
def series_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    site = synthesize_federation(tmp_path_factory.mktemp("dicom"), sites=1, scans_per_site=1, seed=5)[0]
    return next(ref.files[0].parent for ref in scan(site).series)


def test_nifti_volume_equals_the_dicom_it_came_from(series_dir: Path, tmp_path: Path) -> None:
    volume = load_series(series_dir)
    _write_nifti(volume, tmp_path / "a.nii.gz", scale=2.0)  # scl_slope must be applied
    back = load_nifti(tmp_path / "a.nii.gz")
    assert back.hu.shape == volume.hu.shape
    assert np.allclose(back.hu, volume.hu, atol=1e-3)
    assert np.allclose(back.spacing_zyx, volume.spacing_zyx)
    assert np.allclose(back.affine_lps, volume.affine_lps, atol=1e-5)


def test_prepare_nifti_matches_dicom_and_hides_the_file_name(series_dir: Path, tmp_path: Path) -> None:
    volume = load_series(series_dir)
    nifti_root = tmp_path / "nifti"
    _write_nifti(volume, nifti_root / "export" / PATIENT_FILE)
    (nifti_root / "export" / "broken.nii").write_bytes(b"not a nifti at all")
    (nifti_root / "labels.csv").write_text(f"file,any\nexport/{PATIENT_FILE},1\n")

    from_dicom = prepare(series_dir, tmp_path / "cache-dicom", _cfg(), progress=False)
    summary = prepare(nifti_root, tmp_path / "cache-nifti", _cfg(), labels_csv=nifti_root / "labels.csv", progress=False)
    assert (from_dicom.accepted, summary.accepted, summary.rejected) == (1, 1, 1)
    manifest = json.loads((tmp_path / "cache-nifti" / "manifest.json").read_text())
    entry = manifest["series"][0]
    assert entry["source"] == "nifti" and entry["label"] == {"any": 1}
    assert entry["shape_zyx"] == list(volume.hu.shape)
    assert "unreadable NIfTI" in manifest["rejected"][0]["reason"]
    a, b = CachedVolumes(tmp_path / "cache-dicom")[0], CachedVolumes(tmp_path / "cache-nifti")[0]
    assert float((a - b).abs().max()) < 1e-2  # float16 cache of the same HU volume

    # The file name (a patient's name and birth date) is nowhere in the cache.
    for path in (tmp_path / "cache-nifti").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for fragment in (b"DOE_JOHN", b"19520314", b"export/"):
                assert fragment not in data, f"{fragment!r} in {path}"

    again = prepare(nifti_root, tmp_path / "cache-nifti", _cfg(), progress=False)
    assert (again.accepted, again.cached) == (0, 1)


def test_values_that_are_not_hu_are_refused(series_dir: Path, tmp_path: Path) -> None:
    volume = load_series(series_dir)
    volume.hu = (volume.hu - volume.hu.min()) / (volume.hu.max() - volume.hu.min())  # windowed to [0, 1]
    _write_nifti(volume, tmp_path / "windowed.nii.gz")
    with pytest.raises(DicomError, match="not CT in HU"):
        load_nifti(tmp_path / "windowed.nii.gz")
