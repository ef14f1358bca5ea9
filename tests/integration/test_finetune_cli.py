"""`ctfed finetune`: one site fine-tunes a pretrained (or fresh) encoder on its labelled cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from ctfed.common.checkpoint import load_checkpoint
from ctfed.common.cli import main
from ctfed.common.config import FeaturePooling, PreprocessConfig
from ctfed.common.finetune import load_classifier
from ctfed.common.labelled import LabelledScans
from ctfed.common.preprocess import CachedVolumes, prepare
from ctfed.simulations.data.synth import synthesize_federation

STEPS = ["finetune.probe_steps=2", "finetune.stage_steps=3", "finetune.batch_size=2"]


@pytest.fixture(scope="module")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A labelled cache of 10 scans (both classes of `any`) and an encoder `ctfed pretrain` made on it."""
    root = tmp_path_factory.mktemp("ft")
    site = synthesize_federation(root / "dicom", sites=1, scans_per_site=10, seed=2)[0]
    cache = root / "cache"
    prepare(site, cache, PreprocessConfig(output_size=32, spacing_mm=2.0), labels_csv=site / "labels.csv", progress=False)
    positives = [int(label["any"]) for label in CachedVolumes(cache).labels]
    assert 2 <= sum(positives) <= len(positives) - 2, positives  # a stratified split needs 2 per class
    assert main(["pretrain", "--cache", str(cache), "--out", str(root / "pre"), "federation.rounds=1", "train.local_steps=1"]) == 0
    return cache, root / "pre" / "local_round_0001.safetensors"


def test_finetune_from_a_pretrained_encoder(labelled: tuple[Path, Path], tmp_path: Path) -> None:
    cache, encoder_path = labelled
    out = tmp_path / "ft"
    code = main(["finetune", "--cache", str(cache), "--out", str(out), "--encoder", str(encoder_path), "--n-boot", "20",
                 *STEPS, "finetune.pooling=cls_mean_patch"])
    assert code == 0
    classifier, card = load_classifier(out / "classifier.safetensors")
    encoder, _, encoder_card = load_checkpoint(encoder_path)
    assert card["kind"] == "local-classifier" and card["label_names"] == ["any"]
    assert classifier.pooling is FeaturePooling.cls_mean_patch and classifier.head.in_features == 96
    assert card["encoder"] == {"kind": "local-encoder", "sha256": encoder_card["sha256"], "round": 1}
    assert card["finetune"]["pooling"] == "cls_mean_patch" and card["finetune"]["probe_steps"] == 2
    volumes = CachedVolumes(cache)
    assert card["train_scans"] + card["test_scans"] == len(volumes) and card["steps"] == 5 == len(card["losses"])
    auroc = card["evaluation"]["any"]["auroc"]
    assert math.isfinite(auroc["value"]) and auroc["low"] <= auroc["value"] <= auroc["high"]
    # Progressive freezing never trains the stem or block 0: they are the pretrained weights.
    state = classifier.state_dict()
    for name in ("patch_embedding.patch_embeddings.weight", "blocks.0.attn.qkv.weight", "cls_token.token"):
        assert torch.equal(state[f"encoder.{name}"], encoder[name]), name
    # The saved classifier scores like the one that was evaluated (rebuilt from its card).
    scans = LabelledScans(volumes, range(len(volumes)), ["any"], 32)
    with torch.no_grad():
        probs = torch.sigmoid(classifier.eval()(torch.stack([scans[i][0] for i in range(len(scans))])))
    assert probs.shape == (len(volumes), 1) and bool(((probs > 0) & (probs < 1)).all())
    # No pseudonymous key or folder name in the card.
    text = (out / "classifier.json").read_text()
    for entry in volumes.entries:
        assert entry["key"] not in text and entry["study_key"] not in text
    assert cache.name not in json.loads(text)["data_summary"]["scans_per_site"]


def test_finetune_from_scratch_and_clear_errors(
    labelled: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cache, encoder_path = labelled
    assert main(["finetune", "--cache", str(cache), "--out", str(tmp_path / "scratch"), "--n-boot", "10", *STEPS]) == 0
    scratch, card = load_classifier(tmp_path / "scratch" / "classifier.safetensors")
    encoder, _, _ = load_checkpoint(encoder_path)
    assert card["encoder"] == {"kind": "scratch"} and card["pooling"] == "cls"
    assert not torch.equal(scratch.state_dict()["encoder.patch_embedding.patch_embeddings.weight"],
                           encoder["patch_embedding.patch_embeddings.weight"])
    capsys.readouterr()

    # A classifier is not an encoder to start from.
    classifier_path = tmp_path / "scratch" / "classifier.safetensors"
    assert main(["finetune", "--cache", str(cache), "--out", str(tmp_path / "x"), "--encoder", str(classifier_path)]) == 2
    assert "'local-classifier' checkpoint" in capsys.readouterr().err
    # The checkpoint defines the architecture; a conflicting model override is refused.
    assert main(["finetune", "--cache", str(cache), "--out", str(tmp_path / "x"), "--encoder", str(encoder_path),
                 "model=small"]) == 2
    assert "drop the model override" in capsys.readouterr().err
    # A label the cache does not carry cannot be split into train and test scans.
    assert main(["finetune", "--cache", str(cache), "--out", str(tmp_path / "x"), "finetune.label_names=[edh_missing]"]) == 2
    assert "cannot split" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()  # nothing half-written
