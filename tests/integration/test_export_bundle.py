"""`ctfed export`: a MONAI bundle MONAI's own API loads and runs, and TorchScript, both scoring as ctfed does."""

from __future__ import annotations

import json
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
from ctfed.common.model import ViTEncoder
from ctfed.common.preprocess import CachedVolumes, prepare
from ctfed.simulations.data.synth import synthesize_federation

# MONAI warns on every parse of a bundle's config (it can run code); these bundles are our own.
pytestmark = [pytest.mark.filterwarnings("ignore:parsing config_file"),
              pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated")]

SIZE = 16
MODEL = ["model.image_size=16", "model.patch_size=8"]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A cache of 6 synthetic studies, an encoder `ctfed pretrain` made on it, a classifier
    `ctfed finetune` made from that, and two of the studies as NIfTI volumes in HU."""
    root = tmp_path_factory.mktemp("export")
    dicom = synthesize_federation(root / "dicom", sites=1, scans_per_site=6, seed=4)[0]
    cache = root / "cache"
    prepare(dicom, cache, PreprocessConfig(output_size=SIZE, spacing_mm=2.0), labels_csv=dicom / "labels.csv", progress=False)
    assert main(["pretrain", "--cache", str(cache), "--out", str(root / "pre"), "federation.rounds=1",
                 "train.local_steps=1", "train.batch_size=2", *MODEL]) == 0
    encoder = root / "pre" / "local_round_0001.safetensors"
    assert main(["finetune", "--cache", str(cache), "--out", str(root / "ft"), "--encoder", str(encoder), "--n-boot", "5",
                 "finetune.probe_steps=1", "finetune.stage_steps=1", "finetune.batch_size=2"]) == 0
    nifti = root / "nifti"
    nifti.mkdir()
    for index, ref in enumerate(scan(dicom).series[:2]):
        volume = load_series(ref)
        affine_ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ volume.affine_lps
        nib.save(nib.Nifti1Image(volume.hu.transpose(2, 1, 0).astype(np.float32), affine_ras), str(nifti / f"scan{index}.nii.gz"))
    prepare(nifti, root / "nifti-cache", PreprocessConfig(output_size=SIZE, spacing_mm=2.0), progress=False)
    return {"dicom": dicom, "cache": cache, "encoder": encoder, "classifier": root / "ft" / "classifier.safetensors",
            "nifti": nifti, "nifti_cache": root / "nifti-cache"}


def _nifti_volumes(models: dict[str, Path]) -> dict[str, torch.Tensor]:
    """ctfed's own preprocessing of the NIfTI files (the cache prepare made), by file name."""
    from ctfed.common.nifti import nifti_key
    from ctfed.common.privacy import site_secret

    secret = site_secret(models["nifti_cache"])
    volumes = CachedVolumes(models["nifti_cache"])
    by_key = {entry["key"]: volumes[i] for i, entry in enumerate(volumes.entries)}
    return {path.name: by_key[nifti_key(secret, path.name)] for path in sorted(models["nifti"].glob("*.nii.gz"))}


def test_classifier_bundle_loads_and_runs_in_monai_as_ctfed_scores(models: dict[str, Path], tmp_path: Path) -> None:
    from monai.bundle import ConfigParser, load

    bundle = tmp_path / "ctfed_classifier"
    assert main(["export", str(models["classifier"]), "--format", "monai-bundle", "--out", str(bundle)]) == 0
    for part in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "models/model.ts"):
        assert (bundle / part).is_file(), part
    # MONAI's loader: network_def from inference.json, weights from models/model.pt.
    network = load(name=bundle.name, bundle_dir=tmp_path, workflow_type="inference", device="cpu").eval()
    parser = ConfigParser()
    parser.read_meta(bundle / "configs" / "metadata.json")
    parser.read_config(bundle / "configs" / "inference.json")
    parser["bundle_root"] = str(bundle)
    preprocessing = parser.get_parsed_content("preprocessing")
    postprocessing = parser.get_parsed_content("postprocessing")
    scripted = parser.get_parsed_content("network_ts")

    classifier, card = load_classifier(models["classifier"])
    classifier.eval()
    for name, cached in _nifti_volumes(models).items():
        image = preprocessing({"image": str(models["nifti"] / name)})["image"]
        assert image.shape == cached.shape
        np.testing.assert_array_equal(image.numpy(), cached.numpy())  # the same voxels as the cache, exactly
        with torch.no_grad():
            ours = torch.sigmoid(classifier(cached[None]))[0]
            theirs = postprocessing(network(image[None].float())[0])
            traced = torch.sigmoid(scripted(image[None].float()))[0]
        np.testing.assert_allclose(theirs.numpy(), ours.numpy(), atol=1e-6)
        np.testing.assert_allclose(traced.numpy(), theirs.numpy(), atol=1e-5)

    # And the bundle runs as MONAI bundles do (`python -m monai.bundle run`), over a folder of NIfTI volumes.
    from monai.bundle import run

    run(config_file=str(bundle / "configs" / "inference.json"), meta_file=str(bundle / "configs" / "metadata.json"),
        bundle_root=str(bundle), input_dir=str(models["nifti"]), output_file=str(tmp_path / "out.json"))
    assert torch.is_grad_enabled()  # the bundle's run leaves the process as it found it
    outputs = json.loads((tmp_path / "out.json").read_text())
    with torch.no_grad():
        for name, cached in _nifti_volumes(models).items():
            assert outputs[name] == pytest.approx(torch.sigmoid(classifier(cached[None]))[0].tolist(), abs=1e-6)

    metadata = json.loads((bundle / "configs" / "metadata.json").read_text())
    facts = metadata["ctfed"]
    assert facts["sha256"] == card["sha256"] and facts["label_names"] == ["any"]
    assert facts["operating_point"] == card["operating_point"] and "losses" not in facts
    assert facts["data_summary"]["preprocessing"]["output_size"] == SIZE
    assert metadata["network_data_format"]["outputs"]["pred"]["num_channels"] == 1
    # No identifier of the scans in anything the bundle holds.
    identifiers = {entry[k] for entry in CachedVolumes(models["cache"]).entries for k in ("key", "study_key", "content_hash")}
    for path in models["dicom"].rglob("*.dcm"):
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        identifiers |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.PatientID), str(ds.PatientName)}
    for path in bundle.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for identifier in identifiers:
                assert len(identifier) < 6 or identifier.encode() not in data, f"{identifier!r} in {path.name}"


def test_encoder_as_torchscript_and_bundle_gives_ctfeds_features(models: dict[str, Path], tmp_path: Path) -> None:
    from monai.bundle import load
    from monai.data import load_net_with_metadata

    assert main(["export", str(models["encoder"]), "--format", "torchscript", "--out", str(tmp_path / "ts")]) == 0
    scripted, meta, _ = load_net_with_metadata(str(tmp_path / "ts" / "model.ts"))
    state, model_cfg, card = load_checkpoint(models["encoder"])
    assert meta["ctfed"]["kind"] == "local-encoder" and meta["ctfed"]["sha256"] == card["sha256"]
    encoder = ViTEncoder(model_cfg)
    encoder.load_state_dict(state)
    encoder.eval()
    volumes = CachedVolumes(models["cache"])
    batch = torch.stack([volumes[i] for i in range(3)])  # a batch larger than the traced one
    with torch.no_grad():
        expected = encoder.cls_features(batch)
        np.testing.assert_allclose(scripted(batch).numpy(), expected.numpy(), atol=1e-5)
    assert json.loads((tmp_path / "ts" / "card.json").read_text())["sha256"] == card["sha256"]

    bundle = tmp_path / "ctfed_encoder"
    assert main(["export", str(models["encoder"]), "--format", "monai-bundle", "--out", str(bundle)]) == 0
    network = load(name=bundle.name, bundle_dir=tmp_path, workflow_type="inference", device="cpu").eval()
    with torch.no_grad():
        np.testing.assert_allclose(network(batch).numpy(), expected.numpy(), atol=1e-5)


def test_export_refusals(models: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state, model_cfg, card = load_checkpoint(models["classifier"])
    unfitted = dict(state, **{"standardizer.count": torch.zeros(1)})
    facts = {k: v for k, v in card.items() if k not in ("model", "sha256")}
    save_checkpoint(tmp_path / "global_round_0003", unfitted, model_cfg, **dict(facts, kind="global-classifier"))
    federated = str(tmp_path / "global_round_0003.safetensors")
    assert main(["export", federated, "--format", "torchscript", "--out", str(tmp_path / "x")]) == 2
    assert "pass --cache" in capsys.readouterr().err
    assert main(["export", federated, "--format", "torchscript", "--out", str(tmp_path / "y"), "--cache", str(models["cache"])]) == 0
    save_checkpoint(tmp_path / "strategy", {"m": torch.zeros(2)}, model_cfg, kind="strategy-state")
    assert main(["export", str(tmp_path / "strategy.safetensors"), "--format", "monai-bundle", "--out", str(tmp_path / "z")]) == 2
    assert "'strategy-state' checkpoint" in capsys.readouterr().err
