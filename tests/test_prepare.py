"""prepare(): cache contents, incrementality, robustness, privacy, dataset and CLI."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from ctfed.common.cli import main
from ctfed.common.config import PreprocessConfig
from ctfed.common.preprocess import CachedVolumes, prepare
from ctfed.simulations.synth import synthesize_federation

SIZE = 16


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    return synthesize_federation(tmp_path_factory.mktemp("fed"), sites=2, scans_per_site=2, seed=3)


def _cfg(**kwargs: object) -> PreprocessConfig:
    return PreprocessConfig(output_size=SIZE, spacing_mm=2.0, **kwargs)  # type: ignore[arg-type]


def test_manifest_cache_and_rerun(federation: list[Path], tmp_path: Path) -> None:
    site = federation[0]
    summary = prepare(site, tmp_path, _cfg(), labels_csv=site / "labels.csv", progress=False)
    assert (summary.accepted, summary.cached, summary.rejected) == (2, 0, 1)  # the localizer
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == 1
    assert manifest["preprocessing"]["output_size"] == SIZE
    assert [w["name"] for w in manifest["preprocessing"]["windows"]] == ["brain", "subdural", "bone"]
    assert manifest["rejected"][0]["reason"] == "localizer / scout image"
    for entry in manifest["series"]:
        assert set(entry) >= {"key", "file", "content_hash", "shape_zyx", "spacing_zyx_mm", "hu_min", "hu_max",
                              "hu_mean", "slice_count", "label"}
        assert entry["shape_zyx"] == [40, 96, 96] and entry["slice_count"] == 40
        assert entry["spacing_zyx_mm"] == pytest.approx([1.0, 0.47, 0.47])
        assert entry["hu_min"] >= -1024 and entry["hu_max"] > 900
        assert set(entry["label"]) == {"intraparenchymal", "subdural", "epidural", "subarachnoid",
                                       "intraventricular", "any"}
        array = np.load(tmp_path / entry["file"])
        assert array.dtype == np.float16 and array.shape == (3, SIZE, SIZE, SIZE)
        assert array.min() >= 0.0 and array.max() <= 1.0
        assert array[2].max() > 0.5  # bone window sees the skull
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.npy")}

    again = prepare(site, tmp_path, _cfg(), labels_csv=site / "labels.csv", progress=False)
    assert (again.accepted, again.cached) == (0, 2)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.npy")} == mtimes
    assert json.loads((tmp_path / "manifest.json").read_text())["series"] == manifest["series"]
    # Other settings mean another cache: everything is rebuilt.
    rebuilt = prepare(site, tmp_path, _cfg(foreground_hu=-100.0), progress=False)
    assert (rebuilt.accepted, rebuilt.cached) == (2, 0)


def test_output_orientation_is_ras_zyx() -> None:
    """A bright marker in the patient's left, posterior, superior corner lands at low x, low y, high z (RAS: indices grow toward right, anterior, superior)."""
    from ctfed.common.dicom import CTVolume
    from ctfed.common.preprocess import volume_to_tensor

    hu = np.full((20, 20, 20), 40.0, dtype=np.float32)
    hu[15:, 15:, 15:] = 2000.0  # high z (superior), high y (posterior), high x (left) in LPS
    volume = CTVolume(hu=hu, spacing_zyx=(1.0, 1.0, 1.0), origin=(0.0, 0.0, 0.0), direction=np.eye(3))
    out = volume_to_tensor(volume, PreprocessConfig(output_size=SIZE)).astype(np.float32)
    bone = out[2]
    z, y, x = np.unravel_index(np.argmax(bone), bone.shape)
    assert z >= SIZE // 2 and y < SIZE // 2 and x < SIZE // 2


def test_no_phi_in_any_output(federation: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    site = tmp_path / "input"
    shutil.copytree(federation[1], site)  # nested folders named after the patient, RLE, padding
    planted = {"ZZPHINAME123", "ZZPID98765", "ZZACC55555", "ZZHOSPITAL777", "19010203"}
    secrets_seen: set[str] = set(planted)
    files = [p for p in site.rglob("*") if p.is_file() and p.name != "labels.csv"]
    target = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    for path in files:
        ds = pydicom.dcmread(path)
        if ds.SeriesInstanceUID == target:
            ds.PatientName, ds.PatientID, ds.AccessionNumber = "ZZPHINAME123", "ZZPID98765", "ZZACC55555"
            ds.InstitutionName, ds.PatientBirthDate = "ZZHOSPITAL777", "19010203"
            ds.save_as(path)
        for keyword in ("PatientName", "PatientID", "AccessionNumber", "InstitutionName", "PatientBirthDate",
                        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            secrets_seen.add(str(ds.get(keyword)))
    secrets_seen |= {part for p in files for part in p.relative_to(site).parts}  # folder names (patient names)
    secrets_seen = {s for s in secrets_seen if len(s) >= 6}

    out = tmp_path / "cache"
    with caplog.at_level(logging.DEBUG):
        summary = prepare(site, out, _cfg(), labels_csv=site / "labels.csv", progress=False)
    assert summary.accepted == 2
    assert "ZZPHINAME123" in secrets_seen
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for secret in secrets_seen:
                assert secret.encode() not in data, f"{secret!r} leaked into {path.name}"
    for record in caplog.records:
        for secret in secrets_seen:
            assert secret not in record.getMessage()
    labels = CachedVolumes(out).labels
    assert all(label is not None for label in labels)


def test_corrupt_series_does_not_stop_the_run(
    federation: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    site = tmp_path / "input"
    shutil.copytree(federation[1], site)
    (site / "junk.bin").write_bytes(b"\x00garbage" * 100)
    series_files = sorted(p for p in site.rglob("IM*") if "SE2_000" in str(p))
    damaged = series_files[3]
    damaged.write_bytes(damaged.read_bytes()[:-300])  # RLE data cut short: fails only at decode
    with caplog.at_level(logging.DEBUG):
        summary = prepare(site, tmp_path / "cache", _cfg(), progress=False)
    assert summary.accepted == 1
    patient_folder = damaged.relative_to(site).parts[0]  # named after the patient
    assert all(patient_folder not in r.getMessage() and str(site) not in r.getMessage() for r in caplog.records)
    reasons = [r["reason"] for r in json.loads((tmp_path / "cache" / "manifest.json").read_text())["rejected"]]
    assert any("could not be decoded" in r or "unreadable" in r for r in reasons), reasons
    assert "localizer / scout image" in reasons and len(reasons) == 3


def test_cached_volumes_dataset(federation: list[Path], tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        CachedVolumes(tmp_path)
    prepare(federation[0], tmp_path, _cfg(), labels_csv=federation[0] / "labels.csv", progress=False)
    dataset = CachedVolumes(tmp_path)
    assert len(dataset) == 2 and len(dataset.labels) == 2
    item = dataset[1]
    assert isinstance(item, torch.Tensor) and item.dtype == torch.float32
    assert item.shape == (3, SIZE, SIZE, SIZE)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text(json.dumps({"format": 1, "series": [], "rejected": []}))
    with pytest.raises(ValueError, match="no series"):
        CachedVolumes(empty)


def test_cli_synth_and_prepare(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["synth", "--out", str(tmp_path / "dicom"), "--sites", "1", "--scans-per-site", "2", "--seed", "5"]) == 0
    assert "site_0" in capsys.readouterr().out
    cache = tmp_path / "cache"
    args = ["prepare", "--input", str(tmp_path / "dicom" / "site_0"), "--output", str(cache),
            "--size", str(SIZE), "--spacing", "2", "--no-progress"]
    assert main(args + ["--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert "accepted 2" in out and "rejected 1" in out and "manifest.json" in out
    assert all(label is not None for label in CachedVolumes(cache).labels)  # <input>/labels.csv by default
    assert main(args) == 0
    assert "unchanged (cached) 2" in capsys.readouterr().out
    assert main(["prepare", "--input", str(tmp_path / "nope"), "--output", str(cache)]) != 0
    assert "does not exist" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["prepare", "--input", str(empty), "--output", str(tmp_path / "c2"), "--no-progress"]) != 0
    assert "no usable CT series" in capsys.readouterr().err


def test_pretrain_card_has_a_data_summary_without_identifiers(federation: list[Path], tmp_path: Path) -> None:
    """`ctfed pretrain`'s model card summarises the data in numbers; nothing planted in the
    DICOM headers (or any UID, series key or folder name) reaches it."""
    site = tmp_path / "input"
    shutil.copytree(federation[0], site)
    planted = {"ZZPHINAME123", "ZZPID98765", "ZZACC55555", "ZZHOSPITAL777"}
    identifiers = set(planted)
    for path in (p for p in site.rglob("*") if p.is_file() and p.name != "labels.csv"):
        ds = pydicom.dcmread(path)
        ds.PatientName, ds.PatientID, ds.AccessionNumber, ds.InstitutionName = sorted(planted)
        ds.save_as(path)
        identifiers |= {str(ds.get(k)) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")}
        identifiers |= set(path.relative_to(site).parts[:-1])
    cache = tmp_path / "cache"
    summary = prepare(site, cache, _cfg(), labels_csv=site / "labels.csv", progress=False)
    volumes = CachedVolumes(cache)
    identifiers |= {e["key"] for e in volumes.entries} | {e["study_key"] for e in volumes.entries}
    out = tmp_path / "pretrain"
    assert main(["pretrain", "--cache", str(cache), "--out", str(out), "federation.rounds=1", "train.local_steps=1"]) == 0

    card_text = (out / "local_round_0001.json").read_text()
    data = json.loads(card_text)["data_summary"]
    assert data["sites"] == 1 and data["scans"] == summary.accepted == len(volumes)
    assert data["scans_per_site"] == {"local": len(volumes)}
    spacings = [e["spacing_zyx_mm"] for e in volumes.entries]
    assert data["spacing_zyx_mm"]["min"] == [min(axis) for axis in zip(*spacings)]
    assert data["slices"]["max"] == max(e["slice_count"] for e in volumes.entries)
    positives = sum(1 for label in volumes.labels if label and label["any"] > 0)
    assert data["labels"]["labelled_scans"] == len(volumes) and data["labels"]["any"]["positive"] == positives
    assert data["preprocessing"]["output_size"] == volumes.preprocessing["output_size"]
    for identifier in (i for i in identifiers if len(i) >= 6):
        assert identifier not in card_text, f"{identifier!r} in the model card"
