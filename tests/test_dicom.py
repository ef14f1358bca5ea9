"""DICOM ingest against real files: geometry, HU, repairs and rejections."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from ctfed.common.dicom import DicomError, load_series, scan
from ctfed.simulations.synth import synthesize_federation

ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return synthesize_federation(tmp_path_factory.mktemp("fed"), sites=3, scans_per_site=1, seed=1)


def _only_series(site_dir: Path) -> list[Path]:
    result = scan(site_dir)
    assert len(result.series) == 1
    return result.series[0].files


def _sitk_read(files: list[Path]) -> sitk.Image:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(files[0].parent)))
    return reader.Execute()


@pytest.mark.parametrize("site", [0, 1])
def test_hu_and_geometry_match_simpleitk(federation: list[Path], site: int) -> None:
    files = _only_series(federation[site])
    volume = load_series(files)
    image = _sitk_read(files)
    reference = sitk.GetArrayFromImage(image).astype(np.float32)
    assert volume.hu.dtype == np.float32
    assert volume.hu.shape == reference.shape
    # SimpleITK does not apply PixelPaddingValue (site 1 pads with -2000); we map it to air.
    padded = reference <= -2000
    np.testing.assert_allclose(volume.hu[~padded], reference[~padded])
    assert np.all(volume.hu[padded] == -1024.0)
    assert padded.any() == (site == 1)
    np.testing.assert_allclose(volume.spacing_zyx, image.GetSpacing()[::-1], rtol=1e-6)
    np.testing.assert_allclose(volume.origin, image.GetOrigin(), atol=1e-4)
    np.testing.assert_allclose(volume.direction, np.array(image.GetDirection()).reshape(3, 3), atol=1e-6)


def test_spacing_comes_from_positions_not_slice_thickness(federation: list[Path], tmp_path: Path) -> None:
    files = _only_series(federation[0])
    for path in files:  # a wrong SliceThickness must not matter
        ds = pydicom.dcmread(path)
        ds.SliceThickness = 9.0
        ds.save_as(tmp_path / path.name)
    assert load_series(sorted(tmp_path.iterdir())).spacing_zyx[0] == pytest.approx(1.0)


def test_shuffled_extensionless_nested_files(federation: list[Path], tmp_path: Path) -> None:
    files = _only_series(federation[0])
    expected = load_series(files).hu
    shuffled = list(files)
    random.Random(0).shuffle(shuffled)
    for i, path in enumerate(shuffled):
        target = tmp_path / f"d{i % 3}" / f"x{i % 2}" / f"{i:04x}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    found = scan(tmp_path)
    assert len(found.series) == 1 and not found.rejected
    np.testing.assert_array_equal(load_series(found.series[0]).hu, expected)
    np.testing.assert_array_equal(load_series(tmp_path).hu, expected)


def test_duplicate_slice_is_dropped_with_warning(federation: list[Path], tmp_path: Path) -> None:
    files = sorted(_only_series(federation[0]))
    expected = load_series(files)
    duplicate = tmp_path / "copy_of_slice"
    shutil.copy(files[5], duplicate)
    volume = load_series(files + [duplicate])
    assert volume.hu.shape == expected.hu.shape
    assert any("duplicate" in w for w in volume.warnings)


def test_missing_slice_is_detected(federation: list[Path]) -> None:
    files = load_order(_only_series(federation[0]))
    with pytest.raises(DicomError, match="missing slice"):
        load_series(files[:10] + files[11:])
    # A generous tolerance accepts the gap (the operator's decision, not a silent default).
    assert load_series(files[:10] + files[11:], spacing_tolerance=1.5).hu.shape[0] == len(files) - 1


def load_order(files: list[Path]) -> list[Path]:
    return sorted(files, key=lambda p: float(pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[2]))


def test_gantry_tilt_resampled_or_rejected(federation: list[Path]) -> None:
    files = _only_series(federation[2])
    volume = load_series(files)
    assert volume.tilt_corrected and any("tilt of 12.0" in w for w in volume.warnings)
    assert volume.spacing_zyx[0] == pytest.approx(2.5 * np.cos(np.deg2rad(12.0)), rel=1e-4)
    assert np.allclose(volume.direction.T @ volume.direction, np.eye(3), atol=1e-6)
    with pytest.raises(DicomError, match="gantry tilt"):
        load_series(files, gantry_tilt="reject")


def test_junk_localizer_and_truncated_files_are_rejected(federation: list[Path], tmp_path: Path) -> None:
    root = tmp_path / "DOE_JANE_ZZFOLDER"
    shutil.copytree(federation[0], root)
    files = sorted(_only_series(root))
    (root / "notes_ZZFOLDER.txt").write_text("not dicom at all\n" * 20)
    (root / "sub").mkdir()
    (root / "sub" / "random.bin").write_bytes(bytes(range(256)) * 8)
    header_cut = root / "sub" / "cut_header"
    header_cut.write_bytes(files[0].read_bytes()[:300])
    pixel_cut = root / "sub" / "cut_pixels.dcm"
    pixel_cut.write_bytes(files[1].read_bytes()[:-2000])
    sr = pydicom.dcmread(files[2])
    sr.SOPClassUID = sr.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.67"  # dose report
    sr.Modality = "SR"
    sr.save_as(root / "sub" / "dose")
    result = scan(root)
    assert len(result.series) == 1
    reasons = sorted(r.reason for r in result.rejected)
    assert any("localizer" in r for r in reasons)
    assert any("structured report" in r for r in reasons)
    assert any("truncated pixel data" in r for r in reasons)

    assert sum("unreadable header" in r or "not a DICOM" in r or "incomplete" in r for r in reasons) == 2
    for rejection in result.rejected:
        assert "ZZFOLDER" not in rejection.ref and "/" not in rejection.ref
        assert rejection.ref.startswith(("file:", "series:"))


def test_rle_series_decodes_like_uncompressed(federation: list[Path], tmp_path: Path) -> None:
    files = _only_series(federation[0])
    for path in files:
        ds = pydicom.dcmread(path)
        ds.compress(RLELossless, generate_instance_uid=False)
        ds.save_as(tmp_path / path.name)
    assert str(pydicom.dcmread(tmp_path / files[0].name).file_meta.TransferSyntaxUID) == RLELossless
    np.testing.assert_array_equal(load_series(sorted(tmp_path.iterdir())).hu, load_series(files).hu)


def _enhanced_from(files: list[Path], path: Path) -> None:
    """Build a small Enhanced CT multi-frame file from single-frame slices (shuffled frames)."""
    slices = [pydicom.dcmread(p) for p in files]
    random.Random(1).shuffle(slices)
    first = slices[0]
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ENHANCED_CT
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ENHANCED_CT
    for keyword in ("PatientName", "PatientID", "StudyInstanceUID", "SeriesInstanceUID", "Modality", "Rows",
                    "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated", "BitsStored",
                    "HighBit", "PixelRepresentation"):
        setattr(ds, keyword, getattr(first, keyword))
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = len(slices)
    shared = Dataset()
    orientation, measures, transform = Dataset(), Dataset(), Dataset()
    orientation.ImageOrientationPatient = first.ImageOrientationPatient
    measures.PixelSpacing = first.PixelSpacing
    measures.SliceThickness = first.SliceThickness
    transform.RescaleIntercept, transform.RescaleSlope = first.RescaleIntercept, first.RescaleSlope
    transform.RescaleType = "HU"
    shared.PlaneOrientationSequence = Sequence([orientation])
    shared.PixelMeasuresSequence = Sequence([measures])
    shared.PixelValueTransformationSequence = Sequence([transform])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])
    per_frame = []
    for s in slices:
        item, position = Dataset(), Dataset()
        position.ImagePositionPatient = s.ImagePositionPatient
        item.PlanePositionSequence = Sequence([position])
        per_frame.append(item)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    ds.PixelData = b"".join(s.PixelData for s in slices)
    ds.save_as(path, enforce_file_format=True)


def test_enhanced_multiframe_ct(federation: list[Path], tmp_path: Path) -> None:
    files = _only_series(federation[0])
    _enhanced_from(files, tmp_path / "enhanced.dcm")
    found = scan(tmp_path)
    assert len(found.series) == 1 and found.series[0].multiframe
    volume, reference = load_series(found.series[0]), load_series(files)
    np.testing.assert_array_equal(volume.hu, reference.hu)
    assert volume.spacing_zyx == pytest.approx(reference.spacing_zyx)
    assert volume.origin == pytest.approx(reference.origin)


def test_unusable_series_raise_dicom_error(federation: list[Path], tmp_path: Path) -> None:
    files = sorted(_only_series(federation[0]))
    with pytest.raises(DicomError, match="not a volume"):
        load_series(files[:2])
    odd = pydicom.dcmread(files[3])
    odd.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]
    odd.save_as(tmp_path / "odd")
    with pytest.raises(DicomError, match="orientations"):
        load_series(files + [tmp_path / "odd"])
