"""The privacy sweep: more federations on the same sites, epsilon against downstream AUROC."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ctfed.common.cli import main
from ctfed.common.config import ConfigError
from ctfed.simulations.config import load_simulation_config
from ctfed.simulations.studies.sweep import PLOT_NAME, SWEEP_NAME, SWEEP_REPORT, arm_config


def test_sweep_config_rules() -> None:
    cfg = load_simulation_config(["preset=privacy"])
    assert cfg.sweep.enabled and len(cfg.sweep.arms) >= 4
    with pytest.raises(ConfigError, match="would change what the arms are compared on"):
        load_simulation_config(["sweep.arms=[{name:x,overrides:['synth.sites=5']}]"])
    with pytest.raises(ConfigError, match="unique"):
        load_simulation_config(["sweep.base_name=a", "sweep.arms=[{name:a,overrides:[]}]"])
    with pytest.raises(ConfigError, match="folder names"):
        load_simulation_config(["sweep.arms=[{name:'../x',overrides:[]}]"])
    arm = arm_config(cfg, ["privacy.mode=local", "federation.rounds=3"])
    assert arm.privacy.mode.value == "local" and arm.federation.rounds == 3
    assert not arm.sweep.enabled and not arm.compare.enabled and arm.model == cfg.model
    with pytest.raises(ConfigError, match="sweep arm overrides"):
        arm_config(cfg, ["privacy.mode=loud"])


@pytest.mark.slow
def test_privacy_sweep_reports_epsilon_and_auroc_per_arm(tmp_path: Path) -> None:
    code = main(
        [
            "simulate", "preset=privacy", f"output_dir={tmp_path}", "run_name=sweep",
            "synth.sites=2", "synth.scans_per_site_list=[5,6]", "federation.rounds=1", "train.local_steps=2",
            "compare.finetune.probe_steps=1", "compare.finetune.stage_steps=2", "compare.n_boot=50",
            "secagg.num_shares=3", "secagg.reconstruction_threshold=2",
            "sweep.arms=[{name:dp,overrides:['privacy.mode=local','privacy.local.noise_multiplier=1.0']}]",
        ]
    )
    assert code == 0
    run_dir = tmp_path / "sweep"
    data = json.loads((run_dir / SWEEP_NAME).read_text())
    assert list(data["arms"]) == ["no-dp", "dp"]
    base, dp = data["arms"]["no-dp"], data["arms"]["dp"]
    assert base["epsilon"] is None and base["privacy_mode"] == "none"
    assert dp["epsilon"] > 0 and dp["privacy_mode"] == "local"
    # The arm's epsilon is its sites' own accountants' figure, as results.json records it.
    arm_results = json.loads((run_dir / "arms" / "dp" / "results.json").read_text())
    assert dp["epsilon"] == max(s["epsilon"] for s in arm_results["rounds"][-1]["sites"])
    for arm in (base, dp):
        auroc = arm["pooled_auroc"]
        assert 0 <= auroc["low"] <= auroc["value"] <= auroc["high"] <= 1
        assert arm["secure_aggregation"] is True and arm["rounds_aggregated"] == arm["rounds"] == 1
    report = (run_dir / SWEEP_REPORT).read_text()
    assert "| dp |" in report and "| no-dp |" in report
    assert (run_dir / "plots" / PLOT_NAME).read_bytes().startswith(b"\x89PNG")
    (run_dir / SWEEP_REPORT).unlink()
    assert main(["report", str(run_dir)]) == 0  # re-rendered from sweep.json, no training
    assert (run_dir / SWEEP_REPORT).read_text() == report
