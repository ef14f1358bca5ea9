"""Synthetic hospitals: deterministic, heterogeneous, and valid DICOM."""

from __future__ import annotations

import csv
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.uid import JPEGLosslessSV1

from ctfed.common.config import ConfigError
from ctfed.simulations.config import load_simulation_config
from ctfed.simulations.data.phantom import FINDINGS, STRUCTURAL_FINDINGS, head_phantom
from ctfed.simulations.data.synth import (
    BONE_RECONSTRUCTION,
    LABEL_COLUMNS,
    PROFILES,
    _draw_scan,
    _unique_patient,
    scan_labels,
    site_profile,
    synthesize_federation,
    write_scan,
)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _series_files(site_dir: Path) -> dict[str, list[Path]]:
    series: dict[str, list[Path]] = {}
    for path in site_dir.rglob("*"):
        if path.is_file() and path.name != "labels.csv":
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            if "LOCALIZER" not in ds.ImageType:
                series.setdefault(str(ds.SeriesInstanceUID), []).append(path)
    return series


def test_phantom_has_head_ct_values() -> None:
    rng = np.random.default_rng(0)
    hu = head_phantom((64, 128, 128), (2.5, 0.5, 0.5), rng, FINDINGS, noise_sd=0.0, blur_sigma=0.0)
    assert hu.dtype == np.float32 and hu.shape == (64, 128, 128)
    values = set(np.unique(np.round(hu)).tolist())
    assert -1000.0 in values and 40.0 in values and 5.0 in values  # air, scalp, CSF
    assert hu.max() >= 900.0  # skull
    assert np.any((hu >= 60) & (hu <= 80))  # haemorrhage


def test_same_seed_same_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    a = _files(synthesize_federation(tmp_path / "a", 2, 1, seed=7)[0].parent)
    b = _files(synthesize_federation(tmp_path / "b", 2, 1, seed=7)[0].parent)
    c = _files(synthesize_federation(tmp_path / "c", 2, 1, seed=8)[0].parent)
    assert a == b
    assert a != c
    pixels_a = pydicom.dcmread(tmp_path / "a" / "site_0" / "study000_series2" / "CT00010.dcm").PixelData
    pixels_c = pydicom.dcmread(tmp_path / "c" / "site_0" / "study000_series2" / "CT00010.dcm").PixelData
    assert pixels_a != pixels_c


def test_sites_differ_and_are_valid_dicom(tmp_path: Path) -> None:
    site_dirs = synthesize_federation(tmp_path, sites=3, scans_per_site=2, seed=0)
    seen = []
    for site_dir in site_dirs:
        series = _series_files(site_dir)
        assert len(series) == 2
        first = pydicom.dcmread(next(iter(series.values()))[0])
        assert first.SOPClassUID == pydicom.uid.CTImageStorage and first.Modality == "CT"
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "InstitutionName"):
            assert str(first.get(keyword, "")), keyword
        seen.append((first.Rows, float(first.SliceThickness), str(first.file_meta.TransferSyntaxUID),
                     float(first.RescaleIntercept)))
        with open(site_dir / "labels.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [r for r in rows[0]] == ["StudyInstanceUID", *LABEL_COLUMNS]
        study_uids = {str(pydicom.dcmread(f[0], stop_before_pixels=True).StudyInstanceUID) for f in series.values()}
        assert {r["StudyInstanceUID"] for r in rows} == study_uids
    assert len(set(seen)) == 3
    assert len({s[2] for s in seen}) == 3  # uncompressed, RLE, JPEG 2000
    # No-extension nested layout at site 1, .dcm elsewhere.
    assert all(p.suffix == "" for p in _series_files(site_dirs[1]).popitem()[1])
    # SimpleITK (GDCM) reads the untilted sites as volumes.
    for site_dir in site_dirs[:2]:
        files = sorted(next(iter(_series_files(site_dir).values())))
        folder = str(files[0].parent)
        reader = sitk.ImageSeriesReader()
        reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder))
        image = sitk.GetArrayFromImage(reader.Execute())
        assert image.shape[0] == len(files)
        assert image.max() > 900


def test_rejects_bad_counts(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        synthesize_federation(tmp_path, 0, 1, 0)


def test_reconstruction_is_another_series_of_the_same_study(tmp_path: Path) -> None:
    site = synthesize_federation(tmp_path, sites=1, scans_per_site=1, seed=2, reconstructions=[BONE_RECONSTRUCTION])[0]
    series = _series_files(site)
    assert len(series) == 2
    heads = {uid: pydicom.dcmread(files[0], stop_before_pixels=True) for uid, files in series.items()}
    assert len({str(h.StudyInstanceUID) for h in heads.values()}) == 1
    assert len({str(h.PatientID) for h in heads.values()}) == 1
    by_kernel = {str(h.ConvolutionKernel): (h, len(series[uid])) for uid, h in heads.items()}
    assert set(by_kernel) == {"Hr38h", "H70h"}
    bone, bone_slices = by_kernel["H70h"]
    assert bone.SeriesDescription == "HEAD BONE 0.75mm" and float(bone.SliceThickness) == 0.75
    assert bone_slices == 53 and by_kernel["Hr38h"][1] == 40  # the same 40 mm of head
    with open(site / "labels.csv", newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 1  # one row per study


def test_syntax_without_an_encoder_fails_before_writing(tmp_path: Path) -> None:
    # pydicom cannot encode JPEG Lossless (Process 14); pydicom-data's CT sample covers decoding.
    profile = replace(PROFILES[0], transfer_syntax=JPEGLosslessSV1)
    with pytest.raises(ValueError, match="cannot write JPEG Lossless.*no pixel data encoder"):
        write_scan(tmp_path, profile, site=0, scan=0, seed=0)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("scale", ["0", "-1.5"])
def test_finding_scale_must_be_positive(scale: str) -> None:
    with pytest.raises(ConfigError, match="synth.finding_scale"):
        load_simulation_config([f"synth.finding_scale={scale}"])


def test_compare_preset_enlarges_findings_and_defaults_stay_realistic() -> None:
    assert load_simulation_config().synth.finding_scale == 1.0
    assert load_simulation_config(["preset=quick"]).synth.finding_scale == 1.0
    assert load_simulation_config(["preset=compare"]).synth.finding_scale > 1.0


@pytest.mark.parametrize("finding", FINDINGS)
def test_larger_finding_scale_puts_more_voxels_in_the_blood_range(finding: str) -> None:
    """Same seed, same head: only the finding grows (32^3, noise-free so counts are exact)."""

    def blood_voxels(scale: float) -> int:
        hu = head_phantom((32, 32, 32), (5.0, 5.0, 5.0), np.random.default_rng(3), [finding], finding_scale=scale)
        return int(np.count_nonzero((hu >= 55.0) & (hu <= 80.0)))

    healthy = head_phantom((32, 32, 32), (5.0, 5.0, 5.0), np.random.default_rng(3))
    assert np.count_nonzero((healthy >= 55.0) & (healthy <= 80.0)) == 0
    realistic, enlarged = blood_voxels(1.0), blood_voxels(3.0)
    assert enlarged >= 2 * max(realistic, 1), (finding, realistic, enlarged)


def test_finding_scale_keeps_labels_and_identifiers(tmp_path: Path) -> None:
    plain = synthesize_federation(tmp_path / "plain", 1, 1, seed=5)[0]
    scaled = synthesize_federation(tmp_path / "scaled", 1, 1, seed=5, finding_scale=3.0)[0]
    assert (plain / "labels.csv").read_text() == (scaled / "labels.csv").read_text()
    first = sorted(p for p in plain.rglob("*.dcm"))[0]
    a = pydicom.dcmread(first)
    b = pydicom.dcmread(scaled / first.relative_to(plain))
    assert (a.PatientID, a.SOPInstanceUID) == (b.PatientID, b.SOPInstanceUID)


def _labels(site_dir: Path) -> list[dict[str, str]]:
    with open(site_dir / "labels.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _pixels(site_dir: Path) -> dict[str, bytes]:
    """Pixel data of every image of the site's series, keyed by its path under ``site_dir``."""
    return {
        p.relative_to(site_dir).as_posix(): pydicom.dcmread(p).PixelData
        for files in _series_files(site_dir).values()
        for p in files
    }


def test_labels_csv_has_every_task_and_any_means_any_haemorrhage(tmp_path: Path) -> None:
    site_dir = synthesize_federation(tmp_path, sites=1, scans_per_site=3, seed=1)[0]
    rows = _labels(site_dir)
    assert list(rows[0]) == ["StudyInstanceUID", *FINDINGS, "any", *STRUCTURAL_FINDINGS]
    for scan, row in enumerate(rows):
        assert {k: int(v) for k, v in row.items() if k != "StudyInstanceUID"} == scan_labels(1, 0, scan)
        assert int(row["any"]) == max(int(row[name]) for name in FINDINGS)


def test_every_task_has_positives_and_negatives_at_the_default_prevalence() -> None:
    rows = [scan_labels(0, site, scan) for site in range(3) for scan in range(40)]
    for task in STRUCTURAL_FINDINGS:
        positives = sum(row[task] for row in rows)
        assert 0.2 * len(rows) <= positives <= 0.4 * len(rows), (task, positives)  # default 0.3
    for task in LABEL_COLUMNS:
        assert 0 < sum(row[task] for row in rows) < len(rows), task
    # Independent draws: all five structural findings together are rare, not the rule.
    assert sum(all(row[t] for t in STRUCTURAL_FINDINGS) for row in rows) <= 3


def test_the_seed_changes_every_scan_and_its_labels(tmp_path: Path) -> None:
    a = synthesize_federation(tmp_path / "a", 1, 2, seed=7)[0]
    b = synthesize_federation(tmp_path / "b", 1, 2, seed=8)[0]
    pixels_a, pixels_b = _pixels(a), _pixels(b)
    assert pixels_a.keys() == pixels_b.keys()
    for scan in range(2):
        # Same index, other seed: another head in every slice.
        slices = [k for k in pixels_a if k.startswith(f"study{scan:03d}_")]
        assert len(slices) == 40 and all(pixels_a[k] != pixels_b[k] for k in slices)
    # Label draws: 60 scans per site under each seed do not share their label table.
    for site in range(3):
        draws = {seed: [scan_labels(seed, site, scan) for scan in range(60)] for seed in (7, 8)}
        assert draws[7] != draws[8]
        for task in ("any", *STRUCTURAL_FINDINGS):
            assert [r[task] for r in draws[7]] != [r[task] for r in draws[8]], (site, task)


def test_a_prevalence_moves_only_its_own_finding() -> None:
    never = {name: 0.0 for name in STRUCTURAL_FINDINGS}
    for scan in range(30):
        base = scan_labels(2, 1, scan, never)
        always = scan_labels(2, 1, scan, {**never, "infarct": 1.0})
        assert always["infarct"] == 1 and base["infarct"] == 0
        assert {k: v for k, v in always.items() if k != "infarct"} == {k: v for k, v in base.items() if k != "infarct"}


def test_zero_prevalence_leaves_the_pixels_of_scans_without_that_finding(tmp_path: Path) -> None:
    """A scan's pose, haemorrhages and noise do not depend on the structural draws."""
    profile = PROFILES[1]  # the smallest series (64 x 64 x 24)
    labels = [scan_labels(0, 1, scan) for scan in range(12)]
    without = next(k for k, row in enumerate(labels) if not any(row[t] for t in STRUCTURAL_FINDINGS))
    with_one = next(k for k, row in enumerate(labels) if any(row[t] for t in STRUCTURAL_FINDINGS))
    for scan, same in ((without, True), (with_one, False)):
        write_scan(tmp_path / "none", profile, site=1, scan=scan, seed=0, structural_prevalence={})
        _, findings = write_scan(tmp_path / "default", profile, site=1, scan=scan, seed=0)
        assert set(findings) & set(STRUCTURAL_FINDINGS) == ({t for t in STRUCTURAL_FINDINGS if labels[scan][t]})
    none, default = _pixels(tmp_path / "none"), _pixels(tmp_path / "default")
    assert none.keys() == default.keys()
    changed = {k.split("/")[-2] for k in none if none[k] != default[k]}
    assert len(changed) == 1 and f"SE2_{with_one:03d}" in changed


def test_sites_of_different_sizes(tmp_path: Path) -> None:
    cfg = load_simulation_config(["synth.sites=2", "synth.scans_per_site_list=[1,2]"]).synth
    small, large = synthesize_federation(tmp_path, cfg.sites, cfg.scan_counts, cfg.seed)
    assert [len(_series_files(d)) for d in (small, large)] == [1, 2]
    assert [len(_labels(d)) for d in (small, large)] == [1, 2]


@pytest.mark.parametrize("override", ["synth.infarct_prevalence=1.5", "synth.atrophy_prevalence=-0.1"])
def test_prevalence_must_be_a_chance(override: str) -> None:
    with pytest.raises(ConfigError, match=override.split("=")[0].replace(".", "\\.") + " must be in \\[0, 1\\]"):
        load_simulation_config([override])


def test_unknown_structural_finding_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown structural findings \\['stroke'\\]"):
        synthesize_federation(tmp_path, 1, 1, seed=0, structural_prevalence={"stroke": 0.5})


def test_every_scan_of_a_site_is_another_patient() -> None:
    """A PatientID an earlier scan drew (local DP refuses two studies of one patient) gets the
    scan number; a first draw is kept as it was, so no other scan's bytes move."""
    seed, site = 0, 1
    first = _draw_scan(seed, site, 0, site_profile(site), None).patient
    later = _draw_scan(seed, site, 5, site_profile(site), None).patient
    collided = _unique_patient(replace(later, patient_id=first.patient_id), seed, site, 5)
    assert collided.patient_id == f"{first.patient_id}S5"
    assert _unique_patient(later, seed, site, 5) == later
    ids = [_draw_scan(seed, site, scan, site_profile(site), None).patient.patient_id for scan in range(300)]
    assert len(set(ids)) == len(ids)
