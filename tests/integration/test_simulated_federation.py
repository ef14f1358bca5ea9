"""End to end: synthetic DICOM -> caches -> a real Flower simulation -> results and checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ctfed.common.checkpoint import load_checkpoint
from ctfed.common.cli import main
from ctfed.common.config import load_run_config
from ctfed.simulations.config import read_simulation_config
from ctfed.common.model import SSLModel, ViTEncoder

from helpers import assert_no_identifier_in, dicom_identifiers  # tests/helpers.py

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("runs")
    code = main(
        [
            "simulate",
            f"output_dir={out}",
            "run_name=e2e",
            "federation.rounds=2",
            "train.local_steps=2",
            "synth.sites=3",
            "synth.scans_per_site=2",
            # Two scans per site are below the default small-cell floor of the data summary.
            "simulation.site_policy.min_reported_count=0",
            # The plain (vetted FedAvg) path; tests/integration/test_secagg_protocol.py runs the secure one.
            "secagg.enabled=false",
            # All three sites in Ray at once, whatever the cores (2 in CI fit two).
            "simulation.concurrent_sites=3",
        ]
    )
    assert code == 0
    return out / "e2e"


def test_global_card_summarises_the_sites_data(finished_run: Path) -> None:
    """Every site reports aggregate counts in its round metrics; the coordinator's card combines them
    (identifiers: see test_no_patient_identifier_leaves_the_dicom_folder, which reads the cards too)."""
    card = json.loads((finished_run / "checkpoints" / "global_round_0002.json").read_text())
    data = card["data_summary"]
    caches = {site.name: json.loads((site / "manifest.json").read_text()) for site in (finished_run / "cache").iterdir()}
    assert data["sites"] == 3
    assert data["scans_per_site"] == {name: len(m["series"]) for name, m in caches.items()}
    assert data["scans"] == sum(data["scans_per_site"].values())
    assert data["labels"]["labelled_scans"] == data["scans"] and 0 <= data["labels"]["any"]["prevalence"] <= 1
    assert data["preprocessing"]["as_configured"]["output_size"] == caches["site_0"]["preprocessing"]["output_size"]
    assert "data_summary" not in json.loads((finished_run / "checkpoints" / "global_round_0000.json").read_text())


def test_every_site_trained_every_round(finished_run: Path) -> None:
    results = json.loads((finished_run / "results.json").read_text())
    assert results["status"] == "completed"
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    for record in results["rounds"]:
        assert record["aggregated"] is True
        sites = {s["site"]: s for s in record["sites"]}
        assert len(sites) == 3, sites.keys()
        for site in sites.values():
            assert site["status"] == "aggregated"
            assert len(site["losses"]) == 2
            assert all(torch.isfinite(torch.tensor(site["losses"])))
            assert site["num_examples"] > 0
            assert 50 < site["peak_rss_mb"] < 64_000  # a Python process with torch loaded
            assert site["bytes_received"] == record["bytes_sent_per_site"] > 0


def test_sites_whose_labels_cannot_be_split_send_no_monitor(finished_run: Path) -> None:
    """2 scans a site: never 2 of each class, so no site has a monitor split; the rounds go on."""
    results = json.loads((finished_run / "results.json").read_text())
    assert all(s["monitor"] is None and s["status"] == "aggregated" for r in results["rounds"] for s in r["sites"])
    assert "Representation monitor" not in (finished_run / "report.md").read_text()
    assert not (finished_run / "plots" / "monitor.png").exists()


def test_only_encoder_weights_travel(finished_run: Path) -> None:
    results = json.loads((finished_run / "results.json").read_text())
    cfg = read_simulation_config(finished_run / "config.yaml")
    encoder = ViTEncoder(cfg.model).state_dict()
    encoder_bytes = sum(t.numel() * t.element_size() for t in encoder.values())
    head_bytes = sum(p.numel() * p.element_size() for p in SSLModel(cfg.model).head.parameters())
    sent = results["rounds"][0]["bytes_sent_per_site"]
    # Each array travels with a small header (dtype, shape); the head would add far more.
    assert encoder_bytes <= sent <= encoder_bytes + 256 * len(encoder)
    assert sent < encoder_bytes + head_bytes


def test_checkpoint_per_round_and_the_encoder_moved(finished_run: Path) -> None:
    checkpoints = finished_run / "checkpoints"
    initial, model_cfg, card0 = load_checkpoint(checkpoints / "global_round_0000.safetensors")
    final, _, card2 = load_checkpoint(checkpoints / "global_round_0002.safetensors")
    assert (checkpoints / "global_round_0001.safetensors").is_file()
    assert card0["round"] == 0 and card2["round"] == 2
    assert model_cfg == load_run_config().model
    changed = [name for name in initial if not torch.equal(initial[name], final[name])]
    assert changed, "federated training did not change the global encoder"
    encoder = ViTEncoder(model_cfg)
    encoder.load_state_dict(final)  # the checkpoint is a complete, loadable encoder


def test_run_folder_has_config_and_log(finished_run: Path) -> None:
    assert read_simulation_config(finished_run / "config.yaml").federation.rounds == 2
    log = (finished_run / "federation.log").read_text()
    assert "round 2/2" in log
    # simulation.concurrent_sites=3: Ray ran one actor process per site, not one per core.
    assert len(set(re.findall(r"ClientAppActor pid=(\d+)", log))) == 3


def test_results_record_the_simulation_config_whole(finished_run: Path) -> None:
    """The simulation's ServerApp reads ctfed simulate's root, so results.json holds every
    section of config.yaml, the simulation's included (what a resume restores)."""
    from omegaconf import OmegaConf

    results = json.loads((finished_run / "results.json").read_text())
    assert results["config"] == OmegaConf.to_container(OmegaConf.load(finished_run / "config.yaml"))
    assert results["config"]["synth"]["scans_per_site"] == 2


def test_no_patient_identifier_leaves_the_dicom_folder(finished_run: Path) -> None:
    """Everything the run wrote besides the synthetic input DICOM is free of header PHI.

    The Flower app bundle under .flwr/apps is our own source code (the synthesiser's
    list of fake hospital names included), not run output.
    """
    skipped = (finished_run / "dicom", finished_run / ".flwr" / "apps")
    assert_no_identifier_in(finished_run, dicom_identifiers(finished_run / "dicom"), skipped)


def test_flwr_run_defaults_come_from_pyproject(tmp_path: Path) -> None:
    """`flwr run .` without ctfed's run-config file uses conf/simulate.yaml plus pyproject values."""
    import tomllib

    from flwr.app import Context, RecordDict

    from ctfed.server.app import config_from_context

    app_config = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]
    run_config = dict(app_config, **{"num-server-rounds": 4, "run-dir": str(tmp_path / "run")})
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    cfg, run_dir = config_from_context(context)
    assert cfg.federation.rounds == 4
    assert app_config["local-steps"] == 0  # 0: the config's own
    assert cfg.train.local_steps == load_run_config().train.local_steps
    assert cfg.model == load_run_config().model
    assert run_dir == tmp_path / "run"


def test_generated_simulation_app_matches_the_repository_app(tmp_path: Path) -> None:
    """`ctfed simulate` submits a generated app; it must declare the same components and keys."""
    import tomllib

    from ctfed.simulations.runtime.flower_app import write_app

    repo = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    generated = tomllib.loads((write_app(tmp_path) / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    assert generated["components"]["clientapp"] == repo["components"]["clientapp"]
    # The same ServerApp code (ctfed.server.app.serve) over the simulation's root, so that
    # results.json records the simulation sections (tests/integration/test_resume_and_stall.py plays both apps).
    assert repo["components"]["serverapp"] == "ctfed.server.app:app"
    assert generated["components"]["serverapp"] == "ctfed.simulations.runtime.flower_app:server_app"
    assert generated["config"] == repo["config"]
