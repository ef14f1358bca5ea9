"""The coordinator's run folder beside results.json: report.md, config.yaml, federation.log.

The run folders are written by the real ``RunRecorder`` (server/results.py) and its resume,
so a deployed run folder is checked here the way the ServerApp keeps it; the deployed test
(tests/integration/test_deployed_tls_federation.py) checks the same files on real processes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ctfed.common import fileio
from ctfed.common.config import RunConfig, load_run_config
from ctfed.server.report import REPORT_NAME
from ctfed.server.results import RESULTS_NAME, RoundRecord, RunRecorder, SiteRoundRecord, config_values
from ctfed.server.rounds import initial_global_state
from ctfed.server.run_folder import CONFIG_NAME, LOG_NAME, run_log, update_report


@pytest.fixture(scope="module")
def cfg() -> RunConfig:
    return load_run_config(["federation.rounds=2", "train.local_steps=2", "secagg.num_shares=3"])


def _round(number: int) -> RoundRecord:
    site = SiteRoundRecord(site="hospital-a", status="aggregated", num_examples=4, loss_first=2.0, loss=1.5, losses=[2.0, 1.5])
    return RoundRecord(
        round=number, sites=[site], aggregated=True, bytes_sent_per_site=100, seconds=1.0,
        checkpoint=f"global_round_{number:04d}.safetensors",
    )


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / RESULTS_NAME).read_text())


def test_report_and_config_follow_each_round(tmp_path: Path, cfg: RunConfig) -> None:
    recorder = RunRecorder(tmp_path / "run", cfg)
    run_dir = recorder.run_dir
    # From the start, before any round: the config the run records, and a report saying so.
    loaded = OmegaConf.to_container(OmegaConf.load(run_dir / CONFIG_NAME))
    assert loaded == _results(run_dir)["config"]
    assert loaded["secagg"]["num_shares"] == 3
    assert "No round has finished yet." in (run_dir / REPORT_NAME).read_text()

    recorder.add_round(_round(1))
    text = (run_dir / REPORT_NAME).read_text()
    assert "### Round 1" in text and "| Status | running |" in text and "| Rounds recorded | 1 of 2 |" in text
    assert "`ctfed report RUN_DIR` adds them" in text  # no plots on the coordinator's loop
    recorder.add_round(_round(2))
    recorder.finish()
    text = (run_dir / REPORT_NAME).read_text()
    assert "### Round 2" in text and "| Status | completed |" in text
    assert not [p.name for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_config_yaml_holds_no_secret(tmp_path: Path, cfg: RunConfig) -> None:
    """A run config carries no key, certificate, passphrase or site path: those live in each
    site's site.yaml and the coordinator's certs folder, never in the run's record."""
    run_dir = RunRecorder(tmp_path / "run", cfg).run_dir
    text = (run_dir / CONFIG_NAME).read_text()
    assert "BEGIN" not in text and "PRIVATE" not in text
    words = ("key", "secret", "cert", "passphrase", "password", "token", "data_path", "state_dir")
    assert not [k for k in config_values(cfg) if any(w in k.lower() for w in words)]


def test_an_interrupted_report_write_leaves_the_last_whole_report(
    tmp_path: Path, cfg: RunConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder = RunRecorder(tmp_path / "run", cfg)
    recorder.add_round(_round(1))
    before = (recorder.run_dir / REPORT_NAME).read_bytes()
    real_replace = fileio.os.replace

    def crash_on_report(src: Path, dst: Path) -> None:
        if Path(dst).name == REPORT_NAME:
            raise OSError("disk full (simulated)")
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", crash_on_report)
    with pytest.raises(OSError, match="disk full"):
        recorder.add_round(_round(2))
    # results.json has round 2; the report is still round 1's, whole, never a torn file.
    assert [r["round"] for r in _results(recorder.run_dir)["rounds"]] == [1, 2]
    assert (recorder.run_dir / REPORT_NAME).read_bytes() == before


def test_unrenderable_results_are_logged_not_raised(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / REPORT_NAME).write_text("the last good report")
    with caplog.at_level(logging.ERROR, logger="ctfed"):
        update_report(tmp_path, {"status": "running", "config": {}, "wall_seconds": 1.0})  # no "rounds"
    assert "report.md not updated" in caplog.text and "'rounds'" in caplog.text
    assert (tmp_path / REPORT_NAME).read_text() == "the last good report"


def test_federation_log_gets_the_runs_lines_and_a_resume_appends(tmp_path: Path, cfg: RunConfig) -> None:
    run_dir = tmp_path / "run"
    log = logging.getLogger("ctfed.server.rounds")
    flower = logging.getLogger("flwr")
    with run_log(run_dir) as path:
        log.info("[round 1/2] done")
        flower.info("flower bookkeeping")  # Flower's INFO stays in the console
        flower.warning("flower warns")
        assert "[round 1/2] done" in path.read_text()  # flushed per line, while the run goes
    log.info("after the run")  # the handler is gone with the block
    first = path.read_text()
    with run_log(run_dir):
        log.info("resuming after round 1")
        log.info("[round 2/2] done")
    text = path.read_text()
    assert text.startswith(first)
    lines = text.splitlines()
    assert [line.split(": ", 1)[1] for line in lines] == [
        "[round 1/2] done", "flower warns", "resuming after round 1", "[round 2/2] done"
    ]
    assert path.name == LOG_NAME


def test_a_resumed_run_rewrites_report_and_config(tmp_path: Path, cfg: RunConfig) -> None:
    recorder = RunRecorder(tmp_path / "run", cfg)
    state = initial_global_state(cfg)
    recorder.save_global(0, state)
    recorder.save_global(1, state)
    recorder.add_round(_round(1))
    run_dir = recorder.run_dir
    (run_dir / REPORT_NAME).write_text("stale")
    (run_dir / CONFIG_NAME).write_text("stale: true\n")

    more_rounds = load_run_config(["federation.rounds=3", "train.local_steps=2", "secagg.num_shares=3"])
    resumed, _ = RunRecorder.resume(run_dir, more_rounds)
    assert resumed.last_round == 1
    config = OmegaConf.to_container(OmegaConf.load(run_dir / CONFIG_NAME))
    assert config == _results(run_dir)["config"] and config["federation"]["rounds"] == 3
    text = (run_dir / REPORT_NAME).read_text()
    assert "| Resumed | after round 1 |" in text and "### Round 1" in text and "1 of 3" in text
