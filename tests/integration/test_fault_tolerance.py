"""Faults: sites that die, straggle or send garbage, and a coordinator that is killed mid-run."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ctfed.common.checkpoint import load_checkpoint
from ctfed.common.cli import main
from ctfed.common.config import ConfigError
from ctfed.simulations.config import load_simulation_config
from ctfed.common.exchange import EPSILON_KEY, SiteReply
from ctfed.common.processes import descendant_pids, stop_process_group
from ctfed.server.results import ResumeError, RoundRecord, RunRecorder, SiteRoundRecord, site_record
from ctfed.server.rounds import initial_encoder_state

from helpers import read_results  # tests/helpers.py

SMALL_RUN = ["train.local_steps=2", "synth.scans_per_site=2"]


@pytest.mark.slow
def test_bad_sites_are_rejected_and_rounds_complete(tmp_path: Path) -> None:
    # The `faults` preset: site 2 sends a huge update in round 1; in round 2 site 0 dies,
    # site 1 sends NaN and site 3 straggles past the round timeout.
    code = main(["simulate", "preset=faults", f"output_dir={tmp_path}", "run_name=faults"])
    assert code == 0
    results = read_results(tmp_path / "faults")
    assert results["status"] == "completed"
    first, second = results["rounds"]
    status = {r["round"]: {s["site"]: s["status"] for s in r["sites"]} for r in (first, second)}
    assert status[1] == {"site_0": "aggregated", "site_1": "aggregated", "site_2": "rejected", "site_3": "aggregated"}
    assert status[2] == {"site_0": "failed", "site_1": "rejected", "site_2": "aggregated", "site_3": "timeout"}
    reasons = {(r["round"], s["site"]): s["reason"] for r in (first, second) for s in r["sites"]}
    assert "max_update_norm" in reasons[(1, "site_2")]
    assert "NaN" in reasons[(2, "site_1")]
    assert "injected fault" in reasons[(2, "site_0")]
    assert first["aggregated"] and second["aggregated"]
    # The rejected updates never reached the model: it stays finite and small.
    state, _, _ = load_checkpoint(tmp_path / "faults" / "checkpoints" / "global_round_0002.safetensors")
    assert all(torch.isfinite(t).all() for t in state.values())
    assert max(float(t.abs().max()) for t in state.values() if t.is_floating_point()) < 100


def test_fault_config_is_checked() -> None:
    with pytest.raises(ConfigError, match="synth.sites is 3"):
        load_simulation_config(["simulation.faults=[{site:5,kind:crash}]"])
    with pytest.raises(ConfigError, match="delay_s > 0"):
        load_simulation_config(["simulation.faults=[{site:0,kind:straggle}]"])
    with pytest.raises(ConfigError):
        load_simulation_config(["simulation.faults=[{site:0,kind:explode}]"])


def test_malformed_site_metrics_cannot_crash_the_coordinator() -> None:
    metrics = {"num-examples": "many", "loss": float("nan"), "loss-first": True, "losses": "x", EPSILON_KEY: 2.5}
    record = site_record(SiteReply.from_metrics("site_x", metrics), "aggregated", bytes_received=10)
    assert (record.num_examples, record.loss, record.loss_first, record.losses) == (0, None, None, [])
    assert record.epsilon == 2.5 and record.bytes_received == 10 and record.peak_rss_mb is None


def _round(number: int) -> RoundRecord:
    site = SiteRoundRecord(site="a", status="aggregated", num_examples=2, loss=1.0)
    return RoundRecord(round=number, sites=[site], aggregated=True, bytes_sent_per_site=10, seconds=1.0, checkpoint="")


def test_resume_falls_back_to_the_last_verified_checkpoint(tmp_path: Path) -> None:
    cfg = load_simulation_config(["federation.rounds=3"])
    recorder = RunRecorder(tmp_path, cfg)
    state = initial_encoder_state(cfg)
    for number in (0, 1, 2):
        recorder.save_global(number, {k: v + number for k, v in state.items()})
        if number:
            recorder.add_round(_round(number))
    # Round 2's weights were cut short (the process died while writing them).
    weights = tmp_path / "checkpoints" / "global_round_0002.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])

    resumed, resumed_state = RunRecorder.resume(tmp_path, cfg)
    assert resumed.last_round == 1
    assert all(torch.equal(resumed_state[k], state[k] + 1) for k in state)
    assert read_results(tmp_path)["resumes"][0]["after_round"] == 1
    assert [r["round"] for r in read_results(tmp_path)["rounds"]] == [1]

    other_model = replace(cfg, model=replace(cfg.model, num_layers=cfg.model.num_layers + 1))
    with pytest.raises(ResumeError, match="model differs"):
        RunRecorder.resume(tmp_path, other_model)
    with pytest.raises(ResumeError, match="nothing to resume"):
        RunRecorder.resume(tmp_path / "empty", cfg)


def test_resume_continues_the_privacy_ledger_of_the_checkpoint_it_resumes_from(tmp_path: Path) -> None:
    from ctfed.common.dp import LedgerEntry, PrivacyLedger

    cfg = load_simulation_config(["federation.rounds=3", "privacy.mode=central", "secagg.enabled=false"])
    recorder = RunRecorder(tmp_path, cfg)
    state = initial_encoder_state(cfg)
    ledger = PrivacyLedger()
    recorder.save_global(0, state)
    for number in (1, 2):
        ledger.record(LedgerEntry(round=number, noise_multiplier=1.0, sample_rate=1.0, steps=1))
        recorder.central_privacy_ledger = ledger.to_dict()
        recorder.save_global(number, state)
        recorder.add_round(_round(number))
    # Round 2's card is gone: the run continues from round 1, with round 1's epsilon.
    (tmp_path / "checkpoints" / "global_round_0002.json").unlink()
    resumed, _ = RunRecorder.resume(tmp_path, cfg)
    restored = PrivacyLedger.from_dict(resumed.central_privacy_ledger)
    assert [e.round for e in restored.entries] == [1]
    one_round = PrivacyLedger()
    one_round.record(LedgerEntry(round=1, noise_multiplier=1.0, sample_rate=1.0, steps=1))
    assert one_round.epsilon(1e-5) > 0
    assert restored.epsilon(1e-5) == pytest.approx(one_round.epsilon(1e-5))


@pytest.mark.slow
def test_killed_coordinator_resumes_from_last_completed_round(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_dir = tmp_path / "killed"
    command = [
        sys.executable, "-c", "import sys; from ctfed.common.cli import main; sys.exit(main(sys.argv[1:]))",
        "simulate", f"output_dir={tmp_path}", "run_name=killed", *SMALL_RUN, "federation.rounds=3",
    ]
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True, env=os.environ.copy()
    )
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            if (run_dir / "results.json").exists() and read_results(run_dir)["rounds"]:
                break
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.5)
        else:
            pytest.fail("round 1 never completed")
    finally:
        # A power cut: every process of the federation dies at once, nobody cleans up.
        for pid in [process.pid, *descendant_pids(process.pid)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        stop_process_group(process)
    before = read_results(run_dir)
    assert before["status"] == "running"
    done = before["rounds"][-1]["round"]
    assert done < 3
    card_before = json.loads((run_dir / "checkpoints" / f"global_round_{done:04d}.json").read_text())
    # Each site wrote its local training state (head, teacher, centres, AdamW) of round `done`
    # under the federation's id, in its state folder (client/local_state.py).
    federation = before["federation_id"]
    sites = ("site_0", "site_1", "site_2")
    for site in sites:
        assert (run_dir / "sites" / site / "local_state" / federation / f"round_{done:04d}.pt").is_file(), site

    # Other secure-aggregation settings: refused before anything runs, each difference named.
    other = ["secagg.num_shares=4"]
    config_before = (run_dir / "config.yaml").read_bytes()
    capsys.readouterr()
    assert main(["simulate", "--resume", str(run_dir), *other]) == 2
    refusal = capsys.readouterr().err
    assert "secagg.num_shares: 5 -> 4" in refusal
    assert "--override-config" in refusal
    assert (run_dir / "config.yaml").read_bytes() == config_before
    assert read_results(run_dir) == before

    # Accepted with the explicit override, which results.json records.
    assert main(["simulate", "--resume", str(run_dir), "--override-config", *other]) == 0
    after = read_results(run_dir)
    assert after["status"] == "completed"
    assert [r["round"] for r in after["rounds"]] == [1, 2, 3]
    # The same federation, and every site continued its local state from round `done` (a new
    # Flower run: its context.state was empty).
    assert after["federation_id"] == federation
    resumed_log = (run_dir / "federation-resumed.log").read_text()
    for site in sites:
        assert (
            f"site {site} round {done + 1}: resumed its local training state of round {done} of federation "
            f"{federation[:8]} from disk"
        ) in resumed_log, site
        assert sorted(p.name for p in (run_dir / "sites" / site / "local_state" / federation).iterdir()) == [
            "round_0002.pt", "round_0003.pt"
        ]
    assert after["rounds"][:done] == before["rounds"]  # finished rounds are kept as they were
    assert after["resumes"] == [
        {
            "after_round": done, "checkpoint_sha256": card_before["sha256"], "time": after["resumes"][0]["time"],
            "config_changes": {"secagg.num_shares": {"from": 5, "to": 4}},
            "config_override": True,
        }
    ]
    assert (after["config"]["secagg"]["num_shares"], after["config"]["secagg"]["reconstruction_threshold"]) == (4, 0)
    assert f"| Resumed | after round {done} |" in (run_dir / "report.md").read_text()
    # The CSV and TensorBoard views hold each round once, though rounds after `done` may
    # have been logged by the killed run before its checkpoint was written.
    with (run_dir / "results.csv").open() as handle:
        rows = [(int(row["round"]), row["site"]) for row in csv.DictReader(handle)]
    assert sorted(rows) == sorted({(r, s) for r in range(1, 4) for s in ("site_0", "site_1", "site_2")})
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss/site_0")] == [1, 2, 3]
    for record in after["rounds"][done:]:
        assert record["aggregated"] and all(s["status"] == "aggregated" for s in record["sites"])


@pytest.mark.slow
def test_a_simulation_that_aggregates_nothing_exits_non_zero_with_the_reason(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The run: 3 sites, no dropout tolerated (the coordinator needs all 3:
    # federation.min_sites=3), and one site that fails every round; it used to end
    # "completed" with exit code 0.
    code = main([
        "simulate", f"output_dir={tmp_path}", "run_name=stalled", *SMALL_RUN, "train.local_steps=1", "federation.min_sites=3",
        "federation.rounds=3", "federation.max_failed_rounds=1", "simulation.faults=[{site:0,kind:crash}]", "monitor.enabled=false",
    ])
    out = capsys.readouterr().out
    assert code == 1
    assert "WARNING: secure aggregation over 3 sites tolerates no dropout" in out
    results = read_results(tmp_path / "stalled")
    assert results["status"] == "failed"
    assert "1 consecutive rounds aggregated nothing (federation.max_failed_rounds=1)" in results["reason"]
    assert results["reason"] in out
    assert [(r["round"], r["aggregated"]) for r in results["rounds"]] == [(1, False)]
    assert "| Status | failed |" in (tmp_path / "stalled" / "report.md").read_text()
