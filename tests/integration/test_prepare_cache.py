"""prepare(): cache contents, incrementality, robustness, privacy, dataset and CLI."""

from __future__ import annotations

import csv
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch
from pydicom.uid import ExplicitVRLittleEndian

from ctfed.common.cli import main
from ctfed.common.config import (
    ConfigError,
    PreprocessConfig,
    SeriesPerStudy,
    SeriesSelectionConfig,
    SeriesTieBreak,
    load_run_config,
)
from ctfed.common.dicom import SeriesRef, rank_study_series
from ctfed.common.preprocess import PREPARE_LOCK, CachedVolumes, prepare
from ctfed.simulations.data.synth import BONE_RECONSTRUCTION, LABEL_COLUMNS, synthesize_federation

from helpers import PLANTED_IDENTIFIERS, plant_identifiers  # tests/helpers.py

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
        assert set(entry["label"]) == set(LABEL_COLUMNS)  # every labels.csv column but the key
        array = np.load(tmp_path / entry["file"])
        assert array.dtype == np.float16 and array.shape == (3, SIZE, SIZE, SIZE)
        assert array.min() >= 0.0 and array.max() <= 1.0
        assert array[2].max() > 0.5  # bone window sees the skull
        # The head's box (at most the 40 x 45 x 45 mm field of view) over 16 voxels per axis.
        assert all(0.0 < v <= extent / SIZE + 2.0 for v, extent in zip(entry["cached_voxel_zyx_mm"], (40.0, 45.1, 45.1)))
    sizes = np.asarray([e["cached_voxel_zyx_mm"] for e in manifest["series"]])
    assert CachedVolumes(tmp_path).cached_voxel_mm() == pytest.approx(tuple(np.median(sizes, axis=0)))
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.npy")}

    again = prepare(site, tmp_path, _cfg(), labels_csv=site / "labels.csv", progress=False)
    assert (again.accepted, again.cached) == (0, 2)
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*.npy")} == mtimes
    assert json.loads((tmp_path / "manifest.json").read_text())["series"] == manifest["series"]
    # Other settings mean another cache: everything is rebuilt.
    rebuilt = prepare(site, tmp_path, _cfg(foreground_hu=-100.0), progress=False)
    assert (rebuilt.accepted, rebuilt.cached) == (2, 0)


def test_a_second_prepare_on_the_same_cache_is_refused_while_the_first_writes(federation: list[Path], tmp_path: Path) -> None:
    # Two prepares on one cache rewrote each other's manifest and raced on its temporary file
    # (seen as FileNotFoundError on '.manifest.json.tmp').
    import fcntl

    out = tmp_path / "cache"
    out.mkdir()
    with open(out / PREPARE_LOCK, "a+") as held:  # a first prepare, mid-run
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="another 'ctfed prepare' is writing"):
            prepare(federation[0], out, _cfg())
        assert not (out / "manifest.json").exists()  # the refused one wrote nothing
    summary = prepare(federation[0], out, _cfg())  # released: it runs
    assert len(CachedVolumes(out)) == summary.accepted > 0


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


def test_cached_voxel_size_is_the_head_box_over_the_output_size() -> None:
    """A 30 x 20 x 60 mm (z, y, x) block at 2 x 1 x 1.5 mm spacing, cached at 16^3 from 1 mm:
    each cached voxel is the block's extent / 16 along its axis."""
    from ctfed.common.dicom import CTVolume
    from ctfed.common.preprocess import transform_volume

    hu = np.full((15, 20, 40), 40.0, dtype=np.float32)  # all foreground
    volume = CTVolume(hu=hu, spacing_zyx=(2.0, 1.0, 1.5), origin=(0.0, 0.0, 0.0), direction=np.eye(3))
    array, voxel_mm = transform_volume(volume, PreprocessConfig(output_size=SIZE))
    assert array.shape == (3, SIZE, SIZE, SIZE)
    # Resampling to 1 mm keeps the voxel centres' span: (n - 1) x spacing + 1 voxels.
    assert voxel_mm == pytest.approx([29 / SIZE, 20 / SIZE, 59.5 / SIZE], abs=1.01 / SIZE)


def test_a_consuming_transform_gives_the_same_array_and_releases_the_hu_volume() -> None:
    """``prepare`` lets the transform drop the HU array once copied (issue #14's memory bound)."""
    from ctfed.common.dicom import CTVolume
    from ctfed.common.preprocess import transform_volume

    hu = np.random.default_rng(0).normal(0.0, 400.0, (18, 20, 22)).astype(np.float32)
    kept = CTVolume(hu=hu.copy(), spacing_zyx=(2.0, 1.0, 1.5), origin=(0.0, 0.0, 0.0), direction=np.eye(3))
    consumed = CTVolume(hu=hu.copy(), spacing_zyx=(2.0, 1.0, 1.5), origin=(0.0, 0.0, 0.0), direction=np.eye(3))
    expected = transform_volume(kept, PreprocessConfig(output_size=SIZE))
    got = transform_volume(consumed, PreprocessConfig(output_size=SIZE), consume=True)
    assert np.array_equal(got[0], expected[0]) and got[1] == expected[1]
    assert consumed.hu is None and np.array_equal(kept.hu, hu)  # the caller's array is untouched without consume


def test_an_older_cache_without_voxel_sizes_is_processed_again(federation: list[Path], tmp_path: Path) -> None:
    site = federation[0]
    prepare(site, tmp_path, _cfg(), progress=False)
    manifest_path = tmp_path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    for entry in manifest["series"]:
        del entry["cached_voxel_zyx_mm"]
    manifest_path.write_text(json.dumps(manifest))
    assert CachedVolumes(tmp_path).cached_voxel_mm() is None
    again = prepare(site, tmp_path, _cfg(), progress=False)
    assert (again.accepted, again.cached) == (2, 0)
    assert CachedVolumes(tmp_path).cached_voxel_mm() is not None


def test_a_cache_resampled_in_float64_is_prepared_again_and_its_plan_is_not_reproduced(
    federation: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Before issue #14's memory bound, Spacing resampled in float64: such a cache's volumes differ
    by float16 steps, so its plan (without ``resample_dtype``) is neither reused nor reproduced."""
    from ctfed.common.preprocess import config_from_plan, preprocessing_plan

    site = federation[0]
    prepare(site, tmp_path, _cfg(), progress=False)
    manifest_path = tmp_path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["preprocessing"]["resample_dtype"] == "float32"
    older = {k: v for k, v in manifest["preprocessing"].items() if k != "resample_dtype"}
    manifest_path.write_text(json.dumps({**manifest, "preprocessing": older}))
    with caplog.at_level(logging.WARNING):
        again = prepare(site, tmp_path, _cfg(), progress=False)
    assert (again.accepted, again.cached) == (2, 0) and "rebuilding" in caplog.text
    with pytest.raises(ValueError, match="lacks resample_dtype .*older ctfed"):
        config_from_plan(older)
    with pytest.raises(ValueError, match="resampling in 'float64'"):
        config_from_plan({**older, "resample_dtype": "float64"})
    assert preprocessing_plan(config_from_plan(manifest["preprocessing"])) == manifest["preprocessing"]


def test_no_phi_in_any_output(federation: list[Path], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    site = tmp_path / "input"
    shutil.copytree(federation[1], site)  # nested folders named after the patient, RLE, padding
    secrets_seen: set[str] = set(PLANTED_IDENTIFIERS.values())
    files = [p for p in site.rglob("*") if p.is_file() and p.name != "labels.csv"]
    plant_identifiers(files)
    for path in files:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
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
    # The manifest's per-channel statistics are those of the cached voxels (volumes weigh alike).
    volumes = torch.stack([dataset[i] for i in range(len(dataset))])
    stats = json.loads((tmp_path / "manifest.json").read_text())["channel_stats"]
    assert stats == dataset.channel_stats and stats["volumes"] == 2
    assert stats["mean"] == pytest.approx(volumes.mean(dim=(0, 2, 3, 4)).tolist(), abs=1e-3)
    assert stats["std"] == pytest.approx(volumes.std(dim=(0, 2, 3, 4), correction=0).tolist(), abs=1e-3)
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
    assert main(args + ["--slice-gap-tolerance", "1.5"]) == 2
    assert "would accept missing slices" in capsys.readouterr().err
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


@pytest.fixture(scope="module")
def two_series_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two studies, each written twice: the 1 mm soft-tissue series and a 0.75 mm bone-kernel one."""
    root = tmp_path_factory.mktemp("recon")
    return synthesize_federation(root, sites=1, scans_per_site=2, seed=6, reconstructions=[BONE_RECONSTRUCTION])[0]


def _manifest(cache: Path) -> dict:
    return json.loads((cache / "manifest.json").read_text())


def test_one_series_per_study_prefers_the_soft_tissue_kernel(two_series_site: Path, tmp_path: Path) -> None:
    summary = prepare(two_series_site, tmp_path, _cfg(), labels_csv=two_series_site / "labels.csv", progress=False)
    assert (summary.accepted, summary.rejected) == (2, 3)  # 2 bone series + the localizer
    manifest = _manifest(tmp_path)
    assert len({e["study_key"] for e in manifest["series"]}) == 2
    assert all(e["slice_count"] == 40 and e["spacing_zyx_mm"][0] == pytest.approx(1.0) for e in manifest["series"])
    chosen = {e["key"] for e in manifest["series"]}
    passed_over = [r for r in manifest["rejected"] if r["reason"].startswith("another series of the same study")]
    assert len(passed_over) == 2
    for rejection in passed_over:
        reason = rejection["reason"]
        assert reason.split("preferred: series:")[1].split(" ")[0] in chosen
        assert "preferred pattern" in reason and "this one matches excluded pattern 'bone'" in reason
        assert "0.75 mm slices, 53 images" in reason
    # Only configured pattern text reaches the outputs, never the series' own description.
    for path in (tmp_path / "manifest.json", tmp_path / "report.md"):
        text = path.read_text()
        assert "HEAD BONE" not in text and "H70h" not in text and "Hr38h" not in text
    assert "another series of the same study was preferred" in (tmp_path / "report.md").read_text()
    # The study's label goes with the one series kept for it.
    labels = {row["StudyInstanceUID"]: row["any"] for row in csv.DictReader(open(two_series_site / "labels.csv"))}
    assert sorted(str(e["label"]["any"]) for e in manifest["series"]) == sorted(labels.values())

    # all: both reconstructions of each study, sharing its key and label.
    everything = prepare(two_series_site, tmp_path / "all", _cfg(series_selection=SeriesSelectionConfig(per_study="all")),
                         labels_csv=two_series_site / "labels.csv", progress=False)
    assert (everything.accepted, everything.rejected) == (4, 1)
    by_study: dict[str, list[dict]] = {}
    for entry in _manifest(tmp_path / "all")["series"]:
        by_study.setdefault(entry["study_key"], []).append(entry)
    assert sorted(len(v) for v in by_study.values()) == [2, 2]
    assert all(v[0]["label"] == v[1]["label"] for v in by_study.values())


def test_next_series_of_the_study_is_cached_when_the_preferred_one_fails(two_series_site: Path, tmp_path: Path) -> None:
    site = tmp_path / "input"
    shutil.copytree(two_series_site, site)
    soft = sorted((site / "study000_series2").iterdir())
    soft[20].unlink()  # a missing slice: the soft-tissue series of study 0 cannot be used
    summary = prepare(site, tmp_path / "cache", _cfg(), progress=False)
    assert summary.accepted == 2
    entries = _manifest(tmp_path / "cache")["series"]
    assert sorted(e["slice_count"] for e in entries) == [40, 53]  # study 0 falls back to its bone series
    reasons = [r["reason"] for r in _manifest(tmp_path / "cache")["rejected"]]
    assert sum("irregular slice spacing" in r for r in reasons) == 1
    assert sum(r.startswith("another series of the same study") for r in reasons) == 1  # study 1's bone series


def _ref(uid: str, study: str, description: str, kernel: str, thickness: float | None, images: int) -> SeriesRef:
    return SeriesRef(series_uid=uid, study_uid=study, files=[], rows=8, columns=8, transfer_syntax=ExplicitVRLittleEndian,
                     multiframe=False, description=description, kernel=kernel, slice_thickness_mm=thickness, images=images)


def test_series_ranking_patterns_then_tie_break() -> None:
    thin = _ref("1", "A", "HEAD 0.5", "J30s", 0.5, 20)
    many = _ref("2", "A", "HEAD 1.0", "J30s", 1.0, 40)
    bone = _ref("3", "A", "HEAD 0.5", "J70h", 0.5, 400)
    soft = _ref("4", "A", "Soft tissue BONE", "FC26", 5.0, 30)  # excluded wins over preferred
    alone = _ref("5", "", "HEAD", "J70h", 1.0, 40)  # no study UID: cannot be grouped
    default = SeriesSelectionConfig()
    [choice, single] = rank_study_series([bone, soft, many, thin, alone], default)
    assert [r.series_uid for r in choice.ranked] == ["1", "2", "3", "4"]
    assert choice.why["1"] == r"matches preferred pattern '\\b[HJQ]r?[2-4]\\d', 0.5 mm slices, 20 images"
    assert choice.why["4"].startswith("matches excluded pattern 'bone'")
    assert [r.series_uid for r in single.ranked] == ["5"]
    most = SeriesSelectionConfig(tie_break="most_slices")
    assert [r.series_uid for r in rank_study_series([thin, many, bone], most)[0].ranked] == ["2", "1", "3"]
    blind = SeriesSelectionConfig(preferred=[], excluded=[])
    assert [r.series_uid for r in rank_study_series([thin, many, bone], blind)[0].ranked] == ["3", "1", "2"]
    assert choice.why["1"] != rank_study_series([thin], blind)[0].why["1"]
    assert rank_study_series([thin, many], blind)[0].why["1"].startswith("matches no configured pattern")
    assert len(rank_study_series([thin, many, bone], SeriesSelectionConfig(per_study="all"))) == 3


def test_slice_gap_tolerance_from_the_config(federation: list[Path], tmp_path: Path) -> None:
    site = tmp_path / "input"
    shutil.copytree(federation[0], site)
    files = sorted((site / "study000_series2").iterdir())
    ds = pydicom.dcmread(files[10])
    ds.ImagePositionPatient[2] = float(ds.ImagePositionPatient[2]) + 0.15  # gaps of 1.15 and 0.85 mm
    ds.save_as(files[10])
    strict = prepare(site, tmp_path / "strict", _cfg(), progress=False)  # 10% of 1 mm
    assert strict.accepted == 1
    reasons = [r["reason"] for r in _manifest(tmp_path / "strict")["rejected"]]
    assert any("irregular slice spacing" in r and "0.150 mm" in r for r in reasons), reasons
    loose = prepare(site, tmp_path / "loose", _cfg(slice_gap_tolerance=0.05, slice_gap_tolerance_mm=0.2), progress=False)
    assert loose.accepted == 2
    assert "max(5%, 0.2 mm)" in (tmp_path / "loose" / "report.md").read_text()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"slice_gap_tolerance": 1.0}, "would accept missing slices"),
        ({"slice_gap_tolerance_mm": -0.1}, "slice_gap_tolerance_mm must be >= 0"),
        ({"slice_gap_tolerance": 0.0}, "both 0"),
        ({"series_selection": {"preferred": ["(unclosed"]}}, "not a regular expression"),
        ({"series_selection": {"per_study": "some"}}, "'some' is not a valid SeriesPerStudy"),
    ],
)
def test_acceptance_settings_are_validated(kwargs: dict, message: str) -> None:
    if "series_selection" in kwargs:
        with pytest.raises(ConfigError, match=message):
            SeriesSelectionConfig(**kwargs["series_selection"])
    else:
        with pytest.raises(ConfigError, match=message):
            PreprocessConfig(**kwargs)


def test_series_selection_from_hydra_overrides() -> None:
    cfg = load_run_config(["preprocess.series_selection.per_study=all", "preprocess.series_selection.tie_break=most_slices",
                           "preprocess.slice_gap_tolerance_mm=0.3"]).preprocess
    assert cfg.series_selection.per_study == SeriesPerStudy.all
    assert cfg.series_selection.tie_break == SeriesTieBreak.most_slices
    assert cfg.slice_gap_tolerance_mm == 0.3
    assert load_run_config().preprocess.series_selection.per_study == SeriesPerStudy.one


# The child exceeds its file-size limit as a full disk would stop it: the write fails (EFBIG,
# with SIGXFSZ ignored) and the process goes on to handle it.
_LIMITED_PREPARE = (
    "import resource, signal, sys\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    "limit = int(sys.argv[1])\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))\n"
    "from ctfed.common.cli import main\n"
    "sys.exit(main(sys.argv[2:]))\n"
)


def test_a_cache_that_cannot_be_written_fails_in_one_line_and_leaves_nothing_half_written(federation: list[Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    cache = tmp_path / "cache"
    command = ["prepare", "--input", str(federation[0]), "--output", str(cache), "--size", "32", "--no-progress"]
    volume_bytes = 3 * 32**3 * 2  # one cached volume: 3 float16 channels of 32^3
    # Files up to half a volume fit (the manifest, the report): every volume's write fails.
    limited = subprocess.run([sys.executable, "-c", _LIMITED_PREPARE, str(volume_bytes // 2), *command],
                             capture_output=True, text=True, timeout=300)
    assert limited.returncode == 1, limited.stderr[-2000:]
    assert "Traceback" not in limited.stderr
    errors = [line for line in limited.stderr.splitlines() if line.startswith("ctfed prepare:")]
    assert len(errors) == 1 and "cannot write the cache: " in errors[0] and "run the same command again" in errors[0], errors
    assert str(cache) in errors[0] and ("File too large" in errors[0] or "short write" in errors[0])
    assert not [p.name for p in cache.rglob("*.tmp")]  # no half-written temporary left
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["series"] == []  # nothing listed that was not written whole
    assert not list(cache.glob("*.npy"))
    # With room again the same command builds the whole cache.
    assert main(command) == 0
    volumes = CachedVolumes(cache)
    assert len(volumes) == 2 and all(tuple(volumes[i].shape) == (3, 32, 32, 32) for i in range(len(volumes)))
