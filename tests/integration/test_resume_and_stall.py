"""Resume keeps the run's saved config and the sites' local state; a federation that aggregates nothing stops and says why.

The round loop runs in process against the real ClientApp handlers (secure aggregation's
four stages included) on tiny synthetic caches; the simulation resume path is covered by
tests/integration/test_fault_tolerance.py's killed-coordinator test.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from ctfed.common import secagg as sa
from ctfed.common.config import ConfigError, RunConfig, load_run_config
from ctfed.simulations.config import load_simulation_config
from ctfed.server.results import FederationStopped, ResumeError, RoundRecord, RunRecorder, SiteRoundRecord
from ctfed.server.rounds import dropout_tolerance, dropout_warning, initial_encoder_state, run_federation

from helpers import read_results  # tests/helpers.py

SAVED = ["federation.rounds=3", "secagg.num_shares=3", "secagg.reconstruction_threshold=2"]


def _one_round_run(run_dir: Path, overrides: list[str]) -> RunConfig:
    """A run folder as a coordinator leaves it after round 1: results.json and checkpoints."""
    cfg = load_run_config(overrides)
    recorder = RunRecorder(run_dir, cfg)
    state = initial_encoder_state(cfg)
    recorder.save_global(0, state)
    recorder.save_global(1, state)
    site = SiteRoundRecord(site="a", status="aggregated", num_examples=2, loss=1.0)
    recorder.add_round(RoundRecord(round=1, sites=[site], aggregated=True, bytes_sent_per_site=1, seconds=1.0, checkpoint=""))
    return cfg


def test_resume_refuses_a_changed_config_and_lists_every_difference(tmp_path: Path) -> None:
    _one_round_run(tmp_path, SAVED)
    before = (tmp_path / "results.json").read_bytes()
    # The case: the resubmission carries the defaults (5 shares, automatic threshold) and local DP.
    submitted = load_run_config(["federation.rounds=3", "privacy.mode=local"])
    with pytest.raises(ResumeError) as refused:
        RunRecorder.resume(tmp_path, submitted)
    message = str(refused.value)
    assert "secagg.num_shares: 3 -> 5" in message
    assert "secagg.reconstruction_threshold: 2 -> 0" in message
    assert "privacy.mode: 'none' -> 'local'" in message
    assert "resume-override=true" in message
    assert (tmp_path / "results.json").read_bytes() == before  # nothing was rewritten


def test_resume_takes_only_the_round_count_and_keeps_the_saved_config(tmp_path: Path) -> None:
    _one_round_run(tmp_path, SAVED)
    # The deployed path without a run-config file: defaults plus num-server-rounds=5,
    # which also resolves train.schedule_rounds to 5; the run keeps its schedule of 3.
    more_rounds = load_run_config(["federation.rounds=5", "secagg.num_shares=3", "secagg.reconstruction_threshold=2"])
    recorder, _ = RunRecorder.resume(tmp_path, more_rounds)
    assert recorder.cfg.federation.rounds == 5
    assert (recorder.cfg.secagg.num_shares, recorder.cfg.secagg.reconstruction_threshold) == (3, 2)
    assert recorder.cfg.train.schedule_rounds == 3
    entry = read_results(tmp_path)["resumes"][-1]
    assert entry["config_changes"] == {"federation.rounds": {"from": 3, "to": 5}}
    assert entry["config_override"] is False
    assert read_results(tmp_path)["config"]["federation"]["rounds"] == 5


def test_resume_with_override_accepts_and_records_the_changes(tmp_path: Path) -> None:
    _one_round_run(tmp_path, SAVED)
    submitted = load_run_config(["federation.rounds=3"])
    recorder, _ = RunRecorder.resume(tmp_path, submitted, override_config=True)
    assert (recorder.cfg.secagg.num_shares, recorder.cfg.secagg.reconstruction_threshold) == (5, 0)
    results = read_results(tmp_path)
    assert results["resumes"][-1]["config_override"] is True
    assert results["resumes"][-1]["config_changes"] == {
        "secagg.num_shares": {"from": 3, "to": 5},
        "secagg.reconstruction_threshold": {"from": 2, "to": 0},
    }
    assert results["config"]["secagg"]["num_shares"] == 5
    # Even an override cannot swap the model the checkpoints hold.
    with pytest.raises(ResumeError, match="model differs"):
        RunRecorder.resume(tmp_path, load_run_config(["federation.rounds=3", "model.num_layers=3"]), override_config=True)


def test_the_server_app_refuses_a_changed_resume_before_any_round(tmp_path: Path) -> None:
    """The deployed path: ``flwr run ... resume=true`` reaches the same check through the ServerApp."""
    from ctfed.server.app import main

    _one_round_run(tmp_path / "run", SAVED)
    run_config = {"run-dir": str(tmp_path / "run"), "resume": True, "num-server-rounds": 3, "local-steps": 0}
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    # No grid: the refusal comes before any message could be sent.
    with pytest.raises(ResumeError, match="secagg.num_shares: 3 -> 5"):
        main(None, context)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="resume-override=true applies to a resume"):
        main(None, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                           run_config={**run_config, "resume": False, "resume-override": True}))  # type: ignore[arg-type]


def test_run_config_file_and_num_server_rounds_cannot_disagree(tmp_path: Path) -> None:
    from ctfed.common.config import save_run_config
    from ctfed.server.app import config_from_context

    config_file = tmp_path / "run.yaml"
    save_run_config(load_run_config(["federation.rounds=3"]), config_file)

    def resolve(**run_config: object) -> RunConfig:
        values = {"run-config-file": str(config_file), "num-server-rounds": 0, "local-steps": 0, **run_config}
        return config_from_context(Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=values))[0]

    assert resolve().federation.rounds == 3  # the file decides
    assert resolve(**{"num-server-rounds": 3}).federation.rounds == 3  # agreeing is fine
    with pytest.raises(ConfigError, match=r"num-server-rounds=2 but federation.rounds=3 in .*run.yaml"):
        resolve(**{"num-server-rounds": 2})
    with pytest.raises(ConfigError, match="local-steps=7 but train.local_steps=2"):
        resolve(**{"local-steps": 7})


def test_dropout_tolerance_follows_the_secure_aggregation_rule() -> None:
    defaults = load_run_config()
    # The automatic threshold: the smallest count above 2n/3 of each round's neighbourhood n.
    assert (defaults.secagg.num_shares, defaults.secagg.reconstruction_threshold) == (5, 0)
    assert dropout_tolerance(defaults, 3) == 0  # the federation: one drop and nothing aggregates
    assert dropout_tolerance(defaults, 4) == 1  # 3 of 4
    assert dropout_tolerance(defaults, 6) == 1  # neighbourhoods of 5 need 4 of them
    explicit = load_run_config(["secagg.num_shares=3", "secagg.reconstruction_threshold=2"])
    assert dropout_tolerance(explicit, 3) == 1  # (which the sites' default 2/3 floor refuses)
    plain = load_run_config(["secagg.enabled=false"])
    assert dropout_tolerance(plain, 3) == 1
    warning = dropout_warning(defaults, 3)
    assert warning and "tolerates no dropout" in warning and "neighbourhoods of 4 or more" in warning
    assert "secagg.num_shares=4" in (dropout_warning(load_run_config(["secagg.num_shares=3"]), 4) or "")
    assert dropout_warning(defaults, 4) is None and dropout_warning(plain, 2) is None


def test_a_federation_that_aggregates_nothing_stops_failed_with_the_reason(
    three_site_caches: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The issue's run: 3 sites, SecAgg+ that tolerates no dropout, one site gone for good.

    With the automatic threshold a site lost before the neighbourhoods form leaves a 2-site
    neighbourhood that aggregates; the rounds here fail for good because the coordinator
    needs all 3 sites (federation.min_sites=3)."""
    from ctfed.client.app import train
    from ctfed.client.secagg import stage_handlers
    from ctfed.simulations.runtime.inprocess import InProcessGrid

    run_dir = tmp_path / "run"
    cfg = load_run_config([
        "federation.rounds=6", "federation.max_failed_rounds=2", "federation.min_sites=3", "train.local_steps=1",
        "monitor.enabled=false",
    ])
    nodes = [1, 2, 3]
    contexts = {
        n: Context(run_id=1, node_id=n, node_config={"partition-id": i}, state=RecordDict(),
                   run_config={"data-dir": str(three_site_caches), "run-dir": str(run_dir)})
        for i, n in enumerate(nodes)
    }
    grid = InProcessGrid(stage_handlers(train), nodes, drop_at={3: sa.message_type(sa.STAGE_TRAIN)}, contexts=contexts)
    with caplog.at_level(logging.WARNING), pytest.raises(FederationStopped, match="2 consecutive rounds aggregated nothing"):
        run_federation(grid, cfg, run_dir)
    assert "tolerates no dropout" in caplog.text
    results = read_results(run_dir)
    assert results["status"] == "failed"
    assert "federation.max_failed_rounds=2" in results["reason"]
    assert "secure aggregation needs at least 3" in results["reason"]
    assert [(r["round"], r["aggregated"]) for r in results["rounds"]] == [(1, False), (2, False)]

    # A resume starts counting again: the run goes on (and stops again while the site is gone).
    with pytest.raises(FederationStopped):
        run_federation(grid, cfg, run_dir, resume=True)
    assert [r["round"] for r in read_results(run_dir)["rounds"]] == [1, 2, 3, 4]


def test_each_server_app_reads_the_run_config_file_with_its_own_root(tmp_path: Path) -> None:
    """The repository's ServerApp (a coordinator) reads ``RunConfig`` and ignores the simulation
    sections of a file ``ctfed simulate`` wrote; the ServerApp a simulation submits reads the
    file whole, so a resumed simulation compares (and keeps) its simulation sections too."""
    from ctfed.common.config import save_run_config
    from ctfed.server.app import app, config_from_context
    from ctfed.simulations.config import SIMULATE_CONFIG_NAME, SimulationRunConfig
    from ctfed.simulations.runtime.flower_app import server_app

    run_dir = tmp_path / "run"
    saved = load_simulation_config(SAVED)
    recorder = RunRecorder(run_dir, saved)
    state = initial_encoder_state(saved)
    recorder.save_global(0, state)
    recorder.save_global(1, state)
    site = SiteRoundRecord(site="a", status="aggregated", num_examples=2, loss=1.0)
    recorder.add_round(RoundRecord(round=1, sites=[site], aggregated=True, bytes_sent_per_site=1, seconds=1.0, checkpoint=""))
    assert "synth" in read_results(run_dir)["config"]  # a simulation's results.json records its sections

    # Resubmitted with the default secure aggregation and a fault the run did not have.
    config_file = tmp_path / "config.yaml"
    submitted = load_simulation_config(["federation.rounds=3", "simulation.faults=[{site:1,kind:crash}]"])
    save_run_config(submitted, config_file)
    values = {"run-config-file": str(config_file), "run-dir": str(run_dir), "num-server-rounds": 0, "local-steps": 0}
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=values)
    coordinator_cfg, _ = config_from_context(context)
    assert type(coordinator_cfg) is RunConfig and coordinator_cfg.train == submitted.train
    assert config_from_context(context, SimulationRunConfig, SIMULATE_CONFIG_NAME)[0] == submitted

    resume = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={**values, "resume": True})
    # No grid: both refusals come before any message could be sent.
    with pytest.raises(ResumeError) as simulated:
        server_app(None, resume)  # type: ignore[arg-type]
    assert "secagg.num_shares: 3 -> 5" in str(simulated.value) and "simulation.faults" in str(simulated.value)
    with pytest.raises(ResumeError) as coordinator:
        app(None, resume)  # type: ignore[arg-type]
    assert "secagg.num_shares: 3 -> 5" in str(coordinator.value) and "simulation" not in str(coordinator.value)


def test_a_resumed_round_starts_where_the_uninterrupted_run_does(three_site_caches: Path, tmp_path: Path) -> None:
    """Issue #14 point 3: a resume is a new Flower run (every site's context.state empty), yet
    round 3 after a resume from round 2 trains step for step as round 3 of a run that never
    stopped, because the sites load their local state (head, teacher, centres, AdamW moments)
    from their state folders. Without those files round 3 starts elsewhere."""
    import shutil

    from ctfed.client.app import train
    from ctfed.simulations.runtime.inprocess import InProcessGrid

    # schedule_rounds fixed: a 2-round submission must not resolve another LR/EMA schedule.
    base = ["train.local_steps=2", "train.schedule_rounds=3", "federation.min_sites=3", "monitor.enabled=false",
            "secagg.enabled=false"]
    nodes = [11, 12, 13]

    def federate(run_dir: Path, rounds: int, resume: bool = False) -> list[list[list[float]]]:
        contexts = {  # new Contexts: what a new Flower run hands the ClientApps
            n: Context(run_id=7, node_id=n, node_config={"partition-id": i}, state=RecordDict(),
                       run_config={"data-dir": str(three_site_caches), "run-dir": str(run_dir)})
            for i, n in enumerate(nodes)
        }
        grid = InProcessGrid({"train": train}, nodes, contexts=contexts)
        run_federation(grid, load_run_config([*base, f"federation.rounds={rounds}"]), run_dir, resume=resume)
        return [sorted(s["losses"] for s in r["sites"]) for r in read_results(run_dir)["rounds"]]

    uninterrupted = federate(tmp_path / "whole", 3)
    stopped = tmp_path / "stopped"
    federate(stopped, 2)
    copy = tmp_path / "copy"
    shutil.copytree(stopped, copy)
    resumed = federate(stopped, 3, resume=True)
    assert resumed == uninterrupted  # every step's loss of every site, round 3 included

    # The control: the same resume without the sites' files restarts their local state.
    for site_state in (copy / "sites").iterdir():
        shutil.rmtree(site_state / "local_state")
    afresh = federate(copy, 3, resume=True)
    assert afresh[:2] == uninterrupted[:2] and afresh[2] != uninterrupted[2]
