"""`ctfed predict`: prepare's preprocessing, the classifier's scores and decisions, local identifiers."""

from __future__ import annotations

import csv
import json
import logging
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch

from ctfed.common.checkpoint import load_checkpoint, save_checkpoint
from ctfed.common.cli import main
from ctfed.common.config import PreprocessConfig
from ctfed.common.dicom import load_series, scan
from ctfed.common.finetune import load_classifier
from ctfed.common.labelled import model_input
from ctfed.common.metrics import youden_operating_point
from ctfed.common.preprocess import CachedVolumes, preprocessing_plan, prepare
from ctfed.simulations.data.synth import synthesize_federation

from helpers import PLANTED_IDENTIFIERS, plant_identifiers  # tests/helpers.py

SIZE = 16
MODEL = ["model.image_size=16", "model.patch_size=8"]
STEPS = ["finetune.probe_steps=2", "finetune.stage_steps=2", "finetune.batch_size=2"]
PLANTED = set(PLANTED_IDENTIFIERS.values())


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """8 synthetic studies (+ a localizer) with planted identifiers in one study's headers, the
    site's cache of them and a classifier `ctfed finetune` trained on it."""
    root = tmp_path_factory.mktemp("predict")
    dicom = synthesize_federation(root / "dicom", sites=1, scans_per_site=8, seed=2)[0]
    plant_identifiers([p for p in dicom.rglob("*") if p.is_file() and p.suffix != ".csv"])
    cache = root / "cache"
    prepare(dicom, cache, PreprocessConfig(output_size=SIZE, spacing_mm=2.0), labels_csv=dicom / "labels.csv", progress=False)
    out = root / "ft"
    assert main(["finetune", "--cache", str(cache), "--out", str(out), "--n-boot", "5", *MODEL, *STEPS]) == 0
    return {"dicom": dicom, "cache": cache, "classifier": out / "classifier.safetensors", "root": root}


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _expected(classifier_path: Path, cache: Path) -> dict[str, float]:
    """load_classifier on the cached volumes, by series key."""
    classifier, card = load_classifier(classifier_path)
    volumes = CachedVolumes(cache)
    with torch.no_grad():
        batch = torch.stack([model_input(volumes[i], card["model"]["image_size"]) for i in range(len(volumes))])
        probs = torch.sigmoid(classifier.eval()(batch))[:, 0]
    return {entry["key"]: float(p) for entry, p in zip(volumes.entries, probs)}


def test_card_holds_the_youden_operating_point_of_the_held_out_scans(site: dict[str, Path]) -> None:
    _, _, card = load_checkpoint(site["classifier"])
    point = card["operating_point"]["any"]
    assert point["method"] == "youden_j" and point["split"] == "held-out"
    assert point["positives"] + point["negatives"] == card["test_scans"]
    assert 0.0 < point["threshold"] < 1.0 and point["youden_j"] == pytest.approx(point["sensitivity"] + point["specificity"] - 1)
    # The rule: the middle of the best midpoints between distinct scores.
    y, score = np.array([0, 0, 1, 1, 0, 1]), np.array([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    chosen = youden_operating_point(y, score)
    assert chosen is not None and chosen["threshold"] == pytest.approx(0.25)  # J = 2/3 at 0.25 and 0.8
    assert (chosen["sensitivity"], chosen["specificity"]) == (1.0, pytest.approx(2 / 3))
    assert youden_operating_point(np.array([1, 1]), np.array([0.2, 0.4])) is None  # one class: none


def test_predictions_equal_load_classifier_on_the_cached_volumes(site: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "out" / "predictions.csv"
    assert main(["predict", "--classifier", str(site["classifier"]), "--input", str(site["dicom"]),
                 "--output", str(out), "--cache", str(site["cache"]), "--batch-size", "3", "--device", "cpu",
                 "--no-progress"]) == 0
    rows = _rows(out)
    expected = _expected(site["classifier"], site["cache"])
    manifest = json.loads((site["cache"] / "manifest.json").read_text())
    study_of = {e["key"]: e["study_key"] for e in manifest["series"]}
    threshold = load_checkpoint(site["classifier"])[2]["operating_point"]["any"]["threshold"]
    assert len(rows) == len(expected) == 8 and {r["series_key"] for r in rows} == set(expected)
    for row in rows:
        assert row["task"] == "any" and row["source"] == "dicom"
        assert row["study_key"] == study_of[row["series_key"]]  # prepare's pseudonym, under the cache's secret
        assert float(row["probability"]) == pytest.approx(expected[row["series_key"]], abs=2e-6)
        assert float(row["operating_point"]) == pytest.approx(threshold, abs=1e-6)
        assert row["decision"] == str(int(float(row["probability"]) >= float(row["operating_point"])))
    # The key file maps each pseudonym back to its study; both files are the owner's only.
    keys = {r["study_key"]: r["StudyInstanceUID"] for r in _rows(out.with_name("predictions.key.csv"))}
    uids = {str(pydicom.dcmread(ref.files[0], stop_before_pixels=True).StudyInstanceUID) for ref in scan(site["dicom"]).series}
    assert set(keys) == {r["study_key"] for r in rows} and set(keys.values()) <= uids and len(keys) == 8
    for path in (out, out.with_name("predictions.key.csv")):
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    # The localizer is listed with its reason, as in prepare's report.
    report = out.with_name("predictions.report.md").read_text()
    assert "localizer / scout image" in report and "studies scored: 8" in report
    assert not list(out.parent.glob("*.npy"))  # predict writes no volume


def test_nifti_input_scores_as_its_prepared_volume(site: dict[str, Path], tmp_path: Path) -> None:
    """A NIfTI study scores as prepare + load_classifier score it; its file name stays in the key file."""
    series = next(ref for ref in scan(site["dicom"]).series)
    volume = load_series(series)
    nifti_root = tmp_path / "nifti"
    (nifti_root / "export").mkdir(parents=True)
    affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine_lps
    nib.save(nib.Nifti1Image(volume.hu.transpose(2, 1, 0).astype(np.float32), affine_ras),
             str(nifti_root / "export" / "DOE_JOHN_19520314.nii.gz"))
    out = tmp_path / "nifti.csv"
    assert main(["predict", "--classifier", str(site["classifier"]), "--input", str(nifti_root), "--output", str(out),
                 "--no-progress"]) == 0
    (row,) = _rows(out)
    prepare(nifti_root, tmp_path / "cache", PreprocessConfig(output_size=SIZE, spacing_mm=2.0), progress=False)
    (expected,) = _expected(site["classifier"], tmp_path / "cache").values()
    assert row["source"] == "nifti" and float(row["probability"]) == pytest.approx(expected, abs=2e-6)
    assert "DOE_JOHN" not in out.read_text() and "DOE_JOHN" not in out.with_name("nifti.report.md").read_text()
    assert _rows(out.with_name("nifti.key.csv"))[0]["nifti_file"] == "export/DOE_JOHN_19520314.nii.gz"


def test_planted_identifiers_stay_out_of_every_file_but_the_key_file(
    site: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    identifiers = set(PLANTED)
    for path in site["dicom"].rglob("*"):
        if path.is_file() and path.suffix != ".csv":
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            identifiers |= {str(ds.get(k)) for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID",
                                                     "FrameOfReferenceUID", "PatientName", "PatientID")}
            identifiers |= set(path.relative_to(site["dicom"]).parts)  # folder names (patient names)
    identifiers = {s for s in identifiers if len(s) >= 6}
    out = tmp_path / "pseudonymous" / "predictions.csv"
    with caplog.at_level(logging.DEBUG):
        assert main(["predict", "--classifier", str(site["classifier"]), "--input", str(site["dicom"]),
                     "--output", str(out), "--no-progress"]) == 0
    key_file = out.with_name("predictions.key.csv")
    for path in out.parent.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            allowed = {r["StudyInstanceUID"] for r in _rows(key_file)} if path == key_file else set()
            for identifier in identifiers - allowed:
                assert identifier.encode() not in data, f"{identifier!r} leaked into {path.name}"
    for record in caplog.records:
        for identifier in identifiers:
            assert identifier not in record.getMessage()

    # Asked for: the accession number is the CSV's id column, and nothing else identifying is there.
    by_accession = tmp_path / "accession" / "predictions.csv"
    assert main(["predict", "--classifier", str(site["classifier"]), "--input", str(site["dicom"]),
                 "--output", str(by_accession), "--id-column", "AccessionNumber", "--no-progress"]) == 0
    assert "ZZACC55555" in {r["AccessionNumber"] for r in _rows(by_accession)}
    assert not by_accession.with_name("predictions.key.csv").exists()
    text = by_accession.read_text()
    for identifier in identifiers - {"ZZACC55555"}:
        assert identifier not in text


def test_refusals_name_the_reason(site: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["predict", "--input", str(site["dicom"]), "--output", str(tmp_path / "p.csv"), "--no-progress"]
    # An encoder has no head.
    state, model_cfg, card = load_checkpoint(site["classifier"])
    encoder = {k[len("encoder."):]: v for k, v in state.items() if k.startswith("encoder.")}
    save_checkpoint(tmp_path / "enc", encoder, model_cfg, kind="local-encoder")
    assert main([*base, "--classifier", str(tmp_path / "enc.safetensors")]) == 2
    assert "encoder checkpoint" in capsys.readouterr().err
    # The input's plan must be the classifier's.
    assert main([*base, "--classifier", str(site["classifier"]), "--size", "24"]) == 2
    assert "output_size: 16 vs 24" in capsys.readouterr().err
    other = tmp_path / "other-cache"
    prepare(site["dicom"], other, PreprocessConfig(output_size=SIZE, spacing_mm=3.0), progress=False)
    assert main([*base, "--classifier", str(site["classifier"]), "--cache", str(other)]) == 2
    assert "spacing_mm: 2.0 vs 3.0" in capsys.readouterr().err
    # The device options are training's: a CUDA device this torch cannot see is named.
    if not torch.cuda.is_available():
        assert main([*base, "--classifier", str(site["classifier"]), "--device", "cuda"]) == 2
        assert "sees no CUDA device" in capsys.readouterr().err
    assert main([*base, "--classifier", str(site["classifier"]), "--device", "cpu", "--precision", "fp16"]) == 2
    assert "fp16 needs a CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "p.csv").exists()


def test_bf16_autocast_two_workers_and_the_study_uid_column(site: dict[str, Path], tmp_path: Path) -> None:
    args = ["predict", "--classifier", str(site["classifier"]), "--input", str(site["dicom"]), "--cache", str(site["cache"]),
            "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "fp32.csv")]) == 0
    assert main([*args, "--output", str(tmp_path / "bf16.csv"), "--precision", "bf16", "--id-column", "StudyInstanceUID",
                 "--workers", "2"]) == 0
    by_series = {r["series_key"]: r for r in _rows(tmp_path / "fp32.csv")}
    uid_of = {r["study_key"]: r["StudyInstanceUID"] for r in _rows(tmp_path / "fp32.key.csv")}
    for row in _rows(tmp_path / "bf16.csv"):
        reference = by_series[row["series_key"]]
        assert row["StudyInstanceUID"] == uid_of[reference["study_key"]]
        assert float(row["probability"]) == pytest.approx(float(reference["probability"]), abs=0.02)  # bf16's 8 bits


def test_old_card_and_federated_classifier(site: dict[str, Path], tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    state, model_cfg, card = load_checkpoint(site["classifier"])
    # An older card without an operating point: probabilities, an empty decision, one warning.
    old = {k: v for k, v in card.items() if k not in ("operating_point", "model", "sha256")}
    save_checkpoint(tmp_path / "old", state, model_cfg, **old)
    with caplog.at_level(logging.WARNING):
        assert main(["predict", "--classifier", str(tmp_path / "old.safetensors"), "--input", str(site["dicom"]),
                     "--output", str(tmp_path / "old.csv"), "--cache", str(site["cache"]), "--no-progress"]) == 0
    rows = _rows(tmp_path / "old.csv")
    assert rows and all(r["decision"] == "" and r["operating_point"] == "" and r["probability"] for r in rows)
    assert sum("no operating point" in r.getMessage() for r in caplog.records) == 1

    # A phase-2 global classifier: its feature statistics stayed at the sites, so the site's cache fits them.
    unfitted = {k: (torch.zeros_like(v) if k == "standardizer.count" else v) for k, v in state.items()}
    unfitted["standardizer.mean"], unfitted["standardizer.std"] = torch.zeros_like(state["standardizer.mean"]), torch.ones_like(state["standardizer.std"])
    plan = preprocessing_plan(PreprocessConfig(output_size=SIZE, spacing_mm=2.0))
    save_checkpoint(tmp_path / "global_round_0004", unfitted, model_cfg, kind="global-classifier", label_names=["any"],
                    pooling="cls", data_summary={"preprocessing": {"as_configured": plan}},
                    operating_point={"any": {"threshold": 0.5, "sites": {"site_0": 0.4, "site_1": 0.6}}})
    federated = tmp_path / "global_round_0004.safetensors"
    args = ["predict", "--classifier", str(federated), "--input", str(site["dicom"]), "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "g0.csv")]) == 2
    assert "pass --cache" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "g.csv"), "--cache", str(site["cache"])]) == 0
    classifier, _ = load_classifier(federated)
    volumes = CachedVolumes(site["cache"])
    scans = [(model_input(volumes[i], SIZE), None) for i in range(len(volumes))]
    classifier.fit_standardizer(scans)
    with torch.no_grad():
        probs = torch.sigmoid(classifier.eval()(torch.stack([s for s, _ in scans])))[:, 0]
    expected = {e["key"]: float(p) for e, p in zip(volumes.entries, probs)}
    for row in _rows(tmp_path / "g.csv"):
        assert float(row["probability"]) == pytest.approx(expected[row["series_key"]], abs=2e-6)
        assert row["decision"] == str(int(float(row["probability"]) >= 0.5))


def test_pydicom_data_ct_sample_scores_like_its_uncompressed_twin(site: dict[str, Path], tmp_path: Path) -> None:
    from pydicom.uid import generate_uid
    import data_store  # pydicom-data's samples (tests/unit/test_dicom_ingest.py reads them too)

    samples = Path(data_store.__file__).parent / "data"
    probabilities = []
    for name in ("693_J2KR.dcm", "693_UNCR.dcm"):
        folder = tmp_path / name / "series"
        folder.mkdir(parents=True)
        ds = pydicom.dcmread(samples / name)
        orientation = np.array(ds.ImageOrientationPatient, float)
        normal = np.cross(orientation[:3], orientation[3:])
        origin = np.array(ds.ImagePositionPatient, float)
        for k in range(6):
            ds.ImagePositionPatient = [round(float(v), 4) for v in origin + 2.0 * k * normal]
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[name, str(k)])
            ds.save_as(folder / f"slice{k}.dcm")
        out = tmp_path / f"{name}.csv"
        assert main(["predict", "--classifier", str(site["classifier"]), "--input", str(folder.parent),
                     "--output", str(out), "--no-progress"]) == 0
        (row,) = _rows(out)
        probabilities.append(float(row["probability"]))
    assert probabilities[0] == probabilities[1] and 0.0 < probabilities[0] < 1.0
