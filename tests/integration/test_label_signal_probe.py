"""The label-signal probe of an encoder's features (simulations/data/label_signal.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from ctfed.common.config import FeaturePooling
from ctfed.simulations.data.label_signal import PROBE_POOLINGS, TuningSet, encoder_curve, encoder_probe


class _Volumes(Dataset):
    def __init__(self, volumes: list[torch.Tensor]) -> None:
        self.volumes = volumes

    def __len__(self) -> int:
        return len(self.volumes)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.volumes[index]


def test_encoder_probe_reports_every_pooling_before_and_after_pretraining() -> None:
    generator = torch.Generator().manual_seed(0)
    labels = np.array([0, 1] * 10)
    # Positives carry a bright cube: a label an untrained encoder's features already show.
    volumes = []
    for label in labels:
        volume = 0.3 * torch.rand(3, 32, 32, 32, generator=generator)
        if label:
            volume[:, 8:20, 8:20, 8:20] += 0.6
        volumes.append(volume)
    # A second task with too few positives for 5 folds gets no row.
    rare = np.zeros_like(labels)
    rare[:3] = 1
    data = TuningSet(caches=[_Volumes(volumes)], volumes=volumes, labels={"cube": labels, "rare": rare})  # type: ignore[list-item]
    untrained = encoder_probe(data, [], steps=0, seed=0)
    trained = encoder_probe(data, ["train.mim_objective=mae", "train.batch_size=4"], steps=2, seed=0)
    for by_task in (untrained, trained):
        assert set(by_task) == {"cube"}
        row = by_task["cube"]
        assert set(row) == set(PROBE_POOLINGS) | {f"{p}_spread" for p in PROBE_POOLINGS}
        assert {p.value for p in FeaturePooling} < set(PROBE_POOLINGS)  # every fine-tuning pooling is probed
        assert all(0.0 <= row[p] <= 1.0 and row[f"{p}_spread"] > 0 for p in PROBE_POOLINGS)
    assert untrained["cube"]["mean_patch"] > 0.9  # the cube is plain to see
    assert trained != untrained  # two steps changed the encoder

    # --curve: one pretraining, probed on the way; its start is the untrained encoder.
    curve = encoder_curve(data, ["train.mim_objective=mae", "train.batch_size=4"], [4, 0, 2], seed=0)
    assert [steps for steps, _ in curve] == [0, 2, 4]
    assert curve[0][1] == untrained and curve[1][1] != curve[2][1]
    with pytest.raises(ValueError, match="multiple of the round length 3"):
        encoder_curve(data, [], [0, 4], seed=0, round_steps=3)


def test_model_free_probes_give_one_row_per_task(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """The script end to end on a tiny tuning set (2 sites x 7 scans at 16^3): a table row and a
    JSON row for every label column; tasks with under 5 scans of a class say why they have no AUROC."""
    import json

    from ctfed.simulations.data.label_signal import main
    from ctfed.simulations.data.synth import LABEL_COLUMNS

    out = tmp_path / "signal"
    argv = ["--out", str(out), "--seed", "1", "--sites", "2", "--scans-per-site", "7", "--size", "16", "--finding-scale", "3"]
    assert main(argv) == 0
    report = json.loads((out / "label_signal.json").read_text())
    (run,) = report["runs"]
    rows = {row["task"]: row for row in run["model_free"]}
    assert list(rows) == list(LABEL_COLUMNS) and report["tasks"] == list(LABEL_COLUMNS)
    probed = [row for row in rows.values() if row["skipped"] is None]
    assert {"any", "infarct", "fracture"} <= {row["task"] for row in probed}  # >= 5 of each class at this seed
    for row in rows.values():
        assert row["scans"] == 14
        if row["skipped"] is None:
            assert all(0.0 <= row[f] <= 1.0 for f in ("raw_voxels", "window_histograms"))
        else:
            assert row["raw_voxels"] is None and "5-fold CV needs >= 5 of each" in row["skipped"]
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert [line.split(" | ")[0][2:] for line in table[1:]] == list(LABEL_COLUMNS)


def test_few_label_probe_fits_on_the_few_and_scores_the_rest() -> None:
    from ctfed.simulations.data.label_signal import few_label_auroc

    generator = np.random.default_rng(0)
    labels = np.array([1] * 20 + [0] * 80)
    # One informative feature among noise: 8 labelled scans already find it...
    separable = np.column_stack([labels * 4.0 + generator.normal(size=100), generator.normal(size=(100, 5))])
    assert few_label_auroc(separable, labels, n_labels=8, seed=0) > 0.8
    # ...pure noise stays at chance, and a draw of one class only is drawn again, not an error.
    noise = generator.normal(size=(100, 6))
    assert abs(few_label_auroc(noise, labels, n_labels=8, seed=0) - 0.5) < 0.1
    assert few_label_auroc(separable, labels, n_labels=8, seed=0) == few_label_auroc(separable, labels, n_labels=8, seed=0)
    # A single positive can never be both among the few and among the scored: refused, not a hang.
    with pytest.raises(ValueError, match="2 scans of each class"):
        few_label_auroc(separable, np.array([1] + [0] * 99), n_labels=8, seed=0)


def _cube_volumes(labels: np.ndarray, size: int = 16) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    volumes = 0.3 * torch.rand(len(labels), 3, size, size, size, generator=generator)
    volumes[torch.as_tensor(labels == 1), :, 4:12, 4:12, 4:12] += 0.6
    return volumes


def test_curve_saves_the_encoder_it_probed(tmp_path) -> None:  # type: ignore[no-untyped-def]
    labels = np.array([0, 1] * 10)
    volumes = list(_cube_volumes(labels, 32))
    data = TuningSet(caches=[_Volumes(volumes)], volumes=volumes, labels={"cube": labels})  # type: ignore[list-item]
    encoder_curve(data, ["train.mim_objective=mae", "train.batch_size=4"], [0, 2], seed=0, save_dir=tmp_path)
    untrained, trained = (torch.load(tmp_path / f"encoder_{n}.pt", weights_only=True) for n in (0, 2))
    assert set(untrained) == set(trained)
    assert any(not torch.equal(untrained[k], trained[k]) for k in trained)


def test_few_label_finetune_learns_a_plain_finding_and_knows_an_unlearnable_task() -> None:
    """simulations/studies/few_label_finetune.py: full fine-tuning and the CNN find a bright cube
    from 12 labels; a task whose labelled scans hold no positive scores 0.5, whatever the mode."""
    from ctfed.simulations.config import load_simulation_config
    from ctfed.simulations.studies.few_label_finetune import finetune_auroc

    cube = np.array([0, 1] * 16)
    unseen = np.zeros_like(cube)
    unseen[-4:] = 1  # positives only among the held-out scans
    labels = torch.tensor(np.stack([cube, unseen], axis=1), dtype=torch.float32)
    volumes = _cube_volumes(cube)
    model_cfg = load_simulation_config(["preset=compare", "model.image_size=16", "preprocess.output_size=16"]).model
    train, test = np.arange(12), np.arange(12, 32)
    for mode in ("full", "probe", "cnn"):
        cube_auroc, unseen_auroc = finetune_auroc(model_cfg, None, volumes, labels, train, test, mode, steps=30, seed=0)
        assert unseen_auroc == 0.5
        if mode != "probe":
            assert cube_auroc > 0.9, mode
    with pytest.raises(ValueError, match="mode must be one of"):
        finetune_auroc(model_cfg, None, volumes, labels, train, test, "lora", steps=1, seed=0)
