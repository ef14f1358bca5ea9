"""The compare study: split and statistics units, then one tiny end-to-end run of ``preset=compare``."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from ctfed.common.checkpoint import load_checkpoint, state_digest
from ctfed.common.cli import main
from ctfed.common.config import ConfigError
from ctfed.simulations.config import CompareConfig, SynthConfig, load_simulation_config, read_simulation_config
from ctfed.common.preprocess import CachedVolumes
from ctfed.server.rounds import initial_encoder_state
from ctfed.simulations.studies.compare import COMPARE_JSON, POOLED, SHARED, Arm
from ctfed.simulations.studies.compare_report import AUROC_PLOT, COMPARE_MD, LOSS_PLOT
from ctfed.common.labelled import NotEvaluableError, stratified_split
from ctfed.simulations.studies.downstream import paired_auroc_difference
from ctfed.simulations.report.report import PLOTS_DIR

from helpers import write_manifest_cache  # tests/helpers.py

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _cache(root: Path, labels: list[int]) -> CachedVolumes:
    """A minimal prepared cache: one 1x8³ volume per label."""
    return CachedVolumes(write_manifest_cache(root, labels))


def test_split_is_stratified_deterministic_and_disjoint(tmp_path: Path) -> None:
    volumes = _cache(tmp_path / "site", [0, 1, 0, 1, 1, 0, 1, 1])
    split = stratified_split(volumes, ["any"], test_fraction=0.5, seed=3)
    assert split == stratified_split(volumes, ["any"], test_fraction=0.5, seed=3)
    assert not set(split.train) & set(split.test)
    assert sorted(split.train + split.test) == list(range(8))
    test_labels = [volumes.labels[i]["any"] for i in split.test]
    assert sorted(test_labels) == [0, 0, 1, 1, 1]  # half of 3 negatives and of 5 positives, rounded half up
    assert {volumes.labels[i]["any"] for i in split.train} == {0, 1}


def test_split_refuses_a_class_with_one_scan(tmp_path: Path) -> None:
    volumes = _cache(tmp_path / "site", [1, 1, 1, 0])
    with pytest.raises(NotEvaluableError, match="any=0"):
        stratified_split(volumes, ["any"], test_fraction=0.5, seed=0)


def test_paired_auroc_difference() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    good = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    same = paired_auroc_difference(labels, good, good, n_boot=200, seed=0)
    assert same["value"] == same["low"] == same["high"] == 0.0
    flipped = paired_auroc_difference(labels, good, 1.0 - good, n_boot=200, seed=0)
    assert flipped["value"] == 1.0 and flipped["low"] > 0
    assert flipped["n_boot"] <= 200


def test_config_rules() -> None:
    assert SynthConfig(sites=2, scans_per_site_list=[3, 5]).scan_counts == [3, 5]
    assert SynthConfig(sites=2, scans_per_site=4).scan_counts == [4, 4]
    with pytest.raises(ConfigError, match="one scan count per site"):
        SynthConfig(sites=3, scans_per_site_list=[3, 5])
    with pytest.raises(ConfigError, match="baseline_modes"):
        CompareConfig(baseline_modes=["progressive"])
    with pytest.raises(ConfigError, match="baseline_modes"):
        CompareConfig(baseline_modes=["finetune_everything"])
    cfg = load_simulation_config(["preset=compare"])
    assert cfg.compare.enabled and len(set(cfg.synth.scan_counts)) > 1


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    code = main(
        [
            "simulate",
            "preset=compare",
            f"output_dir={out}",
            "run_name=cmp",
            "synth.sites=2",
            # site_0 holds 3 positives and 2 negatives, site_1 4 and 2: both can be split.
            "synth.scans_per_site_list=[5,6]",
            "federation.rounds=1",
            "train.local_steps=2",
            "compare.finetune.probe_steps=1",
            "compare.finetune.stage_steps=2",
            "compare.baseline_modes=[]",
            "compare.n_boot=50",
            # A second federation costs ~20 s; the teacher section is tested from this run's data below.
            "compare.teacher_policies=false",
            # Secure aggregation of 2 sites needs a threshold of 2 (the default is 3).
            "secagg.num_shares=3",
            "secagg.reconstruction_threshold=2",
        ]
    )
    assert code == 0
    return out / "cmp"



@pytest.mark.slow
def test_every_arm_scored_at_every_site(compare_run: Path) -> None:
    data = json.loads((compare_run / COMPARE_JSON).read_text())
    assert data["status"] == "completed"
    assert list(data["arms"]) == [arm.value for arm in Arm]
    sites = list(data["sites"])
    assert sites == ["site_0", "site_1"] and data["smallest_site"] == "site_0"
    for arm, entry in data["arms"].items():
        results = entry["downstream"][data["primary_mode"]]
        assert set(results) == {*sites, POOLED}, arm
        for place, result in results.items():
            for metric, est in result["metrics"][data["task"]].items():
                assert all(math.isfinite(est[k]) for k in ("value", "low", "high")), (arm, place, metric, est)
                assert 0.0 <= est["low"] <= est["value"] <= est["high"] <= 1.0, (arm, place, metric, est)
        for site in sites:
            monitor = entry["representation"][site]
            assert 0.0 <= monitor["knn_accuracy"] <= 1.0 and monitor["embedding_std"] >= 0.0
        assert entry["wall_seconds"]["downstream"] > 0
    assert {v["key"] for v in data["verdicts"]} >= {"pretrained_vs_scratch", "federated_vs_local_only", "gap_to_centralized"}
    assert all(not v["evidence"] for v in data["verdicts"])  # a CI-sized run is never called evidence


@pytest.mark.slow
def test_budgets_are_equal_across_arms(compare_run: Path) -> None:
    data = json.loads((compare_run / COMPARE_JSON).read_text())
    budgets = {arm: entry["budget"] for arm, entry in data["arms"].items()}
    assert data["budget"]["pretrain_steps_per_model"] == 2
    pretrained = [Arm.federated, Arm.centralized, Arm.local_only]
    assert {budgets[arm.value]["pretrain_steps_per_model"] for arm in pretrained} == {2}
    assert budgets[Arm.scratch.value]["pretrain_steps_per_model"] == 0
    assert {b["finetune_steps"] for b in budgets.values()} == {3}
    # Every trained model's loss curve has one value per step.
    for arm in pretrained:
        assert {len(losses) for losses in data["arms"][arm.value]["pretrain_losses"].values()} == {2}
    assert set(data["arms"][Arm.local_only.value]["encoders"]) == {"site_0", "site_1"}


@pytest.mark.slow
def test_federated_arm_is_the_final_checkpoint_and_scratch_the_initial_encoder(compare_run: Path) -> None:
    data = json.loads((compare_run / COMPARE_JSON).read_text())
    final, _, _ = load_checkpoint(compare_run / "checkpoints" / "global_round_0001.safetensors")
    federated = data["arms"][Arm.federated.value]["encoders"][SHARED]
    assert federated["file"] == "checkpoints/global_round_0001.safetensors"
    assert federated["sha256"] == state_digest(final)

    initial = initial_encoder_state(read_simulation_config(compare_run / "config.yaml"))
    scratch = data["arms"][Arm.scratch.value]["encoders"][SHARED]
    assert scratch["file"] == "checkpoints/global_round_0000.safetensors"
    assert scratch["sha256"] == state_digest(initial) != federated["sha256"]

    centralized = data["arms"][Arm.centralized.value]["encoders"][SHARED]
    state, _, card = load_checkpoint(compare_run / centralized["file"])
    assert state_digest(state) == centralized["sha256"] and card["steps"] == 2
    assert any(not torch.equal(state[name], initial[name]) for name in state)


@pytest.mark.slow
def test_report_and_plots_exist(compare_run: Path) -> None:
    report = (compare_run / COMPARE_MD).read_text()
    for arm in Arm:
        assert f"| {arm.value} |" in report
    assert "## Verdicts" in report and "Too small to conclude" in report and "Missed by" not in report
    for plot in (AUROC_PLOT, LOSS_PLOT):
        path = compare_run / PLOTS_DIR / plot
        assert path.read_bytes().startswith(PNG_SIGNATURE)
        assert f"({PLOTS_DIR}/{plot})" in report


@pytest.mark.slow
def test_a_study_cut_short_still_reports_its_finished_arms(compare_run: Path, tmp_path: Path) -> None:
    """compare.json as it stands after the first arm (a crash later): `ctfed report` renders it."""
    data = json.loads((compare_run / COMPARE_JSON).read_text())
    data["status"] = "running"
    data["verdicts"] = []
    data["arms"] = {Arm.federated.value: data["arms"][Arm.federated.value]}
    partial = tmp_path / "partial"
    shutil.copytree(compare_run, partial, ignore=shutil.ignore_patterns("dicom", "cache", ".flwr", "app"))
    (partial / COMPARE_JSON).write_text(json.dumps(data))
    assert main(["report", str(partial)]) == 0
    report = (partial / COMPARE_MD).read_text()
    assert "Status **running**" in report and "| federated |" in report and "| scratch |" not in report
    assert "Not judged yet" in report


def test_teacher_policy_section_reports_both_policies(compare_run: Path, tmp_path: Path) -> None:
    """compare.md's teacher-policy table, paired difference and loss plot, from a teacher_policies
    section built out of this run's federation (the second federation is exercised by preset=compare)."""
    import copy

    from ctfed.simulations.studies.compare import ssl_loss_per_round
    from ctfed.simulations.studies.compare_report import TEACHER_PLOT, render_compare_report, teacher_policy_difference

    run = tmp_path / "cmp"
    shutil.copytree(compare_run, run, ignore=shutil.ignore_patterns("dicom", "cache", ".flwr", "tensorboard"))
    data = json.loads((run / COMPARE_JSON).read_text())
    losses = ssl_loss_per_round(run)
    assert len(losses["mean"]) == 1 and set(losses["sites"]) == {"site_0", "site_1"}
    federated = data["arms"][Arm.federated.value]
    entry = {"run_dir": ".", "steps_per_model": 2, "seconds": 1.0, "ssl_loss_per_round": losses,
             "downstream": federated["downstream"], "representation": federated["representation"]}
    keep = copy.deepcopy(entry) | {"policy": "keep", "run_dir": "arms/teacher_keep"}
    # Flip the keep policy's scores at every site: its AUROC becomes 1 - reset's.
    for site in keep["downstream"][data["primary_mode"]].values():
        if "probs" in site:
            site["probs"] = [[1.0 - p[0]] for p in site["probs"]]
    data["teacher_policies"] = {"base": "reset", "policies": {"reset": entry | {"policy": "reset"}, "keep": keep}}
    (run / COMPARE_JSON).write_text(json.dumps(data))
    diff = teacher_policy_difference(data)
    pooled = federated["downstream"][data["primary_mode"]]["pooled"]["metrics"][data["task"]]["auroc"]["value"]
    assert diff is not None and diff["of"] == "keep - reset"
    assert diff["value"] == pytest.approx((1.0 - pooled) - pooled)
    report = render_compare_report(run).read_text()
    assert "## Teacher policy" in report and "`keep`" in report and "`reset`" in report
    assert "Paired pooled AUROC difference keep - reset" in report
    assert (run / "plots" / TEACHER_PLOT).is_file() and f"plots/{TEACHER_PLOT}" in report


def test_a_verdict_on_too_few_test_scans_says_too_small_to_conclude() -> None:
    from ctfed.simulations.studies.compare_report import verdict_text

    def verdict(n_test: int, low: float, high: float) -> dict:
        return {
            "a": {"arm": "federated", "mode": "progressive", "auroc": {"value": 0.6, "low": 0.5, "high": 0.7}},
            "b": {"arm": "scratch", "mode": "progressive", "auroc": {"value": 0.62, "low": 0.52, "high": 0.72}},
            "difference": {"of": "federated - scratch", "value": -0.02, "low": low, "high": high},
            "target": 0.05, "kind": "more than", "met": False, "ci_clears_target": False, "missed_by": 0.07,
            "n_test": n_test, "n_positive": n_test // 2, "evidence": n_test >= 100 and (high - low) / 2 <= 0.05,
        }

    small = verdict_text(verdict(22, -0.4, 0.35))
    assert "Too small to conclude" in small and "Missed by" not in small and "docs/studies.md" in small
    large = verdict_text(verdict(400, -0.06, 0.02))
    assert "Missed by 0.070" in large and "Too small" not in large
