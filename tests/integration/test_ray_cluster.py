"""``simulation.ray_address``: a simulated federation on an existing two-node Ray cluster
(a head and one worker node on this machine, started by the test and stopped after)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import LocalRayCluster

from ctfed.common.cli import main

pytestmark = pytest.mark.slow


def test_a_simulation_runs_on_an_existing_two_node_cluster(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with LocalRayCluster(workers=1, cpus_per_node=1) as cluster:
        code = main(
            [
                "simulate", f"output_dir={tmp_path}", "run_name=cluster",
                "synth.sites=2", "synth.scans_per_site=2", "federation.rounds=1", "train.local_steps=1",
                "federation.min_sites=2", "secagg.enabled=false", "monitor.enabled=false",
                "simulation.site_policy.min_reported_count=0",
                f"simulation.ray_address={cluster.address}",
            ]
        )
        assert code == 0, capsys.readouterr().out[-3000:]
        seen = cluster.probe()
    run = tmp_path / "cluster"
    results = json.loads((run / "results.json").read_text())
    assert results["status"] == "completed"
    assert {s["site"] for s in results["rounds"][0]["sites"] if s["status"] == "aggregated"} == {"site_0", "site_1"}
    # One site actor per node (1 CPU each, client_cpus=1): the sites ran on both nodes, which
    # only the cluster's second node could give; a private Ray is one node.
    assert len(seen["nodes"]) == 2
    assert seen["site_actor_nodes"] == seen["nodes"]
    # The run records which Ray it used: config (and results.json's copy) and the report.
    assert results["config"]["simulation"]["ray_address"] == cluster.address
    assert f"Ray cluster at {cluster.address}" in (run / "report.md").read_text()
    assert f"sites run on the Ray cluster at simulation.ray_address={cluster.address}" in capsys.readouterr().out
