"""DICOM ingest against real files: geometry, HU, repairs and rejections."""

from __future__ import annotations

import locale
import random
import re
import shutil
from dataclasses import replace
from pathlib import Path

import data_store
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import pixel_array
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from ctfed.common.dicom import DicomError, load_series, scan
from ctfed.simulations.data.synth import PROFILES, synthesize_federation, write_scan

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


# ---------------------------------------------------------------------------------------
# Real-world samples shipped by pydicom-data and pydicom (the test extra installs both).
# ---------------------------------------------------------------------------------------

SAMPLES = Path(data_store.__file__).parent / "data"


def _as_series(sample: Path, folder: Path, count: int = 3) -> list[Path]:
    """``count`` copies of a single-slice sample stacked along its slice normal.

    The pixel data is copied byte for byte (still compressed), so the series tests exactly
    the sample's codestream; only the slice position and the instance UID change.
    """
    folder.mkdir(parents=True)
    ds = pydicom.dcmread(sample)
    orientation = np.array(ds.ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    origin = np.array(ds.ImagePositionPatient, float)
    paths = []
    for k in range(count):
        ds.ImagePositionPatient = [round(float(v), 4) for v in origin + 2.0 * k * normal]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[sample.name, str(k)])
        paths.append(folder / f"slice{k}.dcm")
        ds.save_as(paths[-1])
    return paths


def _stored_hu(sample: Path) -> np.ndarray:
    """The sample's HU as the header defines them, read independently of ctfed."""
    ds = pydicom.dcmread(sample)
    return ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)


def test_jpeg2000_ct_sample_decodes_to_its_uncompressed_twin(tmp_path: Path) -> None:
    j2k = load_series(_as_series(SAMPLES / "693_J2KR.dcm", tmp_path / "j2k"))
    plain = load_series(_as_series(SAMPLES / "693_UNCR.dcm", tmp_path / "plain"))
    assert str(pydicom.dcmread(tmp_path / "j2k" / "slice0.dcm").file_meta.TransferSyntaxUID) == JPEG2000Lossless
    np.testing.assert_array_equal(j2k.hu, plain.hu)
    reference = _stored_hu(SAMPLES / "693_UNCR.dcm")
    padding = pydicom.dcmread(SAMPLES / "693_UNCR.dcm").PixelPaddingValue  # -2000 stored: outside the FOV
    stored = pydicom.dcmread(SAMPLES / "693_UNCR.dcm").pixel_array
    assert (stored == padding).any()
    np.testing.assert_array_equal(j2k.hu[1][stored != padding], reference[stored != padding])
    assert np.all(j2k.hu[1][stored == padding] == -1024.0)
    assert j2k.spacing_zyx == pytest.approx((2.0, 0.478516, 0.478516))


# The sample's own header carries a malformed UID (hence its name); pydicom warns on reading it.
@pytest.mark.filterwarnings("ignore:Invalid value for VR UI")
def test_jpeg_lossless_ct_sample_matches_simpleitk(tmp_path: Path) -> None:
    sample = SAMPLES / "bad_sequence.dcm"  # JPEG Lossless, Process 14 SV1, 12-bit unsigned
    assert str(pydicom.dcmread(sample, stop_before_pixels=True).file_meta.TransferSyntaxUID) == JPEGLosslessSV1
    volume = load_series(_as_series(sample, tmp_path / "series"))
    reference = sitk.GetArrayFromImage(sitk.ReadImage(str(sample)))[0].astype(np.float32)
    assert reference.min() < -900 and reference.max() > 1000  # air to bone, in HU
    for plane in volume.hu:
        np.testing.assert_array_equal(plane, reference)
    np.testing.assert_array_equal(volume.hu[0], _stored_hu(sample))


def test_enhanced_ct_sample_frames_keep_the_files_geometry(tmp_path: Path) -> None:
    """eCT_Supplemental: Enhanced CT, 2 frames 10 mm apart, orientation and HU rescale in the
    shared functional groups, positions per frame; rows run towards patient right (-x)."""
    sample = SAMPLES / "eCT_Supplemental.dcm"
    first = tmp_path / "study" / "part1.dcm"
    first.parent.mkdir()
    shutil.copy(sample, first)
    found = scan(tmp_path)
    assert not found.rejected and len(found.series) == 1
    assert found.series[0].multiframe and found.series[0].images == 2
    with pytest.raises(DicomError, match="only 2 distinct slice position"):
        load_series(first)  # two frames are not a volume
    # The same series continued by a second multi-frame file 20 mm further along -z.
    ds = pydicom.dcmread(sample)
    for item in ds.PerFrameFunctionalGroupsSequence:
        position = item.PlanePositionSequence[0].ImagePositionPatient
        position[2] = float(position[2]) - 20.0
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["eCT part 2"])
    ds.save_as(tmp_path / "study" / "part2.dcm")
    found = scan(tmp_path)
    assert len(found.series) == 1 and found.series[0].images == 4
    volume = load_series(found.series[0])

    frames = pydicom.dcmread(sample).pixel_array.astype(np.float32) - 1024.0  # slope 1, intercept -1024
    assert volume.hu.shape == (4, 512, 512)
    assert volume.spacing_zyx == pytest.approx((10.0, 0.388672, 0.388672))
    # Normal = row x column = (-1,0,0) x (0,1,0) = (0,0,-1): the slice at z=-149 comes first.
    np.testing.assert_allclose(volume.direction, [[-1, 0, 0], [0, 1, 0], [0, 0, -1]], atol=1e-6)
    assert volume.origin == pytest.approx((99.5, -301.5, -149.0))
    for index, frame in enumerate((1, 0, 1, 0)):
        np.testing.assert_array_equal(volume.hu[index], frames[frame])


def test_non_ct_samples_are_rejected_with_a_reason(tmp_path: Path) -> None:
    for source in (SAMPLES / "emri_small_jpeg_ls_lossless.dcm", Path(get_testdata_file("MR_small.dcm")),
                   Path(get_testdata_file("CT_small.dcm"))):
        folder = tmp_path / source.stem
        folder.mkdir()
        shutil.copy(source, folder / "image")
    found = scan(tmp_path)
    assert len(found.series) == 1  # CT_small
    assert found.series[0].transfer_syntax == ExplicitVRLittleEndian
    assert sorted(r.reason for r in found.rejected) == ["modality 'MR' is not CT"] * 2


def test_jpeg_ls_series_matches_uncompressed_and_simpleitk(tmp_path: Path) -> None:
    """JPEG-LS lossless, written by pyjpegls through synth; decoded by the runtime plugin."""
    for index, base in enumerate(PROFILES[:2]):  # unsigned 12-bit, and signed with padding
        profile = replace(base, matrix=48, slices=6, transfer_syntax=JPEGLSLossless)
        write_scan(tmp_path / f"jls{index}", profile, site=index, scan=0, seed=4)
        write_scan(tmp_path / f"plain{index}", replace(profile, transfer_syntax=ExplicitVRLittleEndian),
                   site=index, scan=0, seed=4)
        jls_files = _only_series(tmp_path / f"jls{index}")
        assert str(pydicom.dcmread(jls_files[0]).file_meta.TransferSyntaxUID) == JPEGLSLossless
        # pyjpegls is a test dependency only: the runtime's pylibjpeg-libjpeg must decode it alike.
        np.testing.assert_array_equal(
            pixel_array(jls_files[0], decoding_plugin="pylibjpeg"), pixel_array(jls_files[0], decoding_plugin="pyjpegls")
        )
        volume = load_series(jls_files)
        np.testing.assert_array_equal(volume.hu, load_series(_only_series(tmp_path / f"plain{index}")).hu)
        reference = sitk.GetArrayFromImage(_sitk_read(jls_files)).astype(np.float32)
        padded = reference <= -2000  # SimpleITK leaves PixelPaddingValue as stored
        np.testing.assert_array_equal(volume.hu[~padded], reference[~padded])
        assert padded.any() == (index == 1)


@pytest.mark.parametrize(
    ("syntax", "reason"),
    [
        # A standard syntax pydicom knows but has no decoder for.
        ("1.2.840.10008.1.2.4.100", r"MPEG2 Main Profile / Main Level \(1\.2\.840\.10008\.1\.2\.4\.100\): pydicom has no "
                                    r"pixel data decoder"),
        # A vendor's private syntax (or one newer than the installed pydicom, e.g. JPEG XL).
        ("1.2.826.0.1.3680043.9.7433.9.1", r"unknown transfer syntax 1\.2\.826\.0\.1\.3680043\.9\.7433\.9\.1"),
    ],
)
def test_series_in_an_undecodable_transfer_syntax_is_rejected_by_name(
    federation: list[Path], tmp_path: Path, syntax: str, reason: str
) -> None:
    files = _only_series(federation[0])
    for path in files[:5]:
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = syntax
        ds.PixelData = encapsulate([ds.PixelData])
        ds["PixelData"].VR = "OB"
        ds.save_as(tmp_path / path.name, implicit_vr=False, little_endian=True)
    found = scan(tmp_path)
    assert not found.series
    assert len(found.rejected) == 1 and found.rejected[0].ref.startswith("series:")
    assert re.search(reason, found.rejected[0].reason) and found.rejected[0].reason.endswith("(5 files)")
    with pytest.raises(DicomError, match=reason):
        load_series(sorted(tmp_path.iterdir()))


def test_series_written_by_simpleitk_gdcm_reads_back_exactly(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """A CT series written by another tool (SimpleITK's GDCM ImageSeriesWriter, its own UIDs,
    tag layout and rescale) loads with the HU, spacing and origin it was written with."""
    rng = np.random.default_rng(7)
    hu = rng.integers(-1024, 2000, size=(6, 20, 24), dtype=np.int16)
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing((0.7, 0.8, 2.5))  # x, y, z
    image.SetOrigin((-12.0, -30.5, 40.0))
    series_uid = generate_uid()
    shared = {
        "0008|0060": "CT", "0008|0008": "ORIGINAL\\PRIMARY\\AXIAL", "0020|000e": series_uid,
        "0020|000d": generate_uid(), "0020|0037": "1\\0\\0\\0\\1\\0", "0008|103e": "written by GDCM",
        "0028|1052": "0", "0028|1053": "1",
    }
    writer = sitk.ImageFileWriter()
    writer.SetImageIO("GDCMImageIO")  # the file names have no extension to choose it by
    writer.KeepOriginalImageUIDOn()
    order = [3, 0, 5, 1, 4, 2]  # files named out of slice order
    # GDCM's writer switches the process's C locale to "C", which would turn Python's default
    # text encoding to ASCII for every later test; put it back.
    saved_locale = locale.setlocale(locale.LC_ALL)
    request.addfinalizer(lambda: locale.setlocale(locale.LC_ALL, saved_locale))
    for name_index, z in enumerate(order):
        plane = image[:, :, z]
        for tag, value in shared.items():
            plane.SetMetaData(tag, value)
        plane.SetMetaData("0020|0032", "\\".join(str(v) for v in image.TransformIndexToPhysicalPoint((0, 0, z))))
        plane.SetMetaData("0020|0013", str(z + 1))
        plane.SetMetaData("0008|0018", generate_uid())
        writer.SetFileName(str(tmp_path / f"IM{name_index:04d}"))
        writer.Execute(plane)

    [series] = scan(tmp_path).series
    volume = load_series(series.files)
    np.testing.assert_array_equal(volume.hu, hu.astype(volume.hu.dtype))
    np.testing.assert_allclose(volume.spacing_zyx, (2.5, 0.8, 0.7), atol=1e-4)
    np.testing.assert_allclose(np.asarray(volume.origin, dtype=float), (-12.0, -30.5, 40.0), atol=1e-4)
