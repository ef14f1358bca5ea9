"""The run report: rendered from results.json as the coordinator's RunRecorder writes it.

No federation runs here: the run folders are written with the real ``RunRecorder`` and
record classes, so a change to the results schema shows up in these tests.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from matplotlib.image import imread

from ctfed.common.config import RunConfig, load_run_config, save_run_config
from ctfed.common.model import ViTEncoder, count_parameters
from ctfed.server.results import RoundRecord, RunRecorder, SiteRoundRecord
from ctfed.simulations.report import report_cli
from ctfed.simulations.report.report import (
    BYTES_PLOT,
    LOSS_ROUNDS_PLOT,
    LOSS_STEPS_PLOT,
    MONITOR_PLOT,
    PLOTS_DIR,
    REPORT_NAME,
    ReportError,
    console_table,
    load_results,
    render_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SENT = 463_680  # bytes of the tiny encoder on the wire: shows as 452.8 KiB


def trained(site: str, losses: list[float], num_examples: int = 8) -> SiteRoundRecord:
    return SiteRoundRecord(
        site=site,
        status="aggregated",
        num_examples=num_examples,
        loss_first=losses[0],
        loss=losses[-1],
        losses=losses,
        train_seconds=0.25,
        data_seconds=0.05,
        bytes_received=SENT,
    )


def round_record(number: int, sites: list[SiteRoundRecord], aggregated: bool = True) -> RoundRecord:
    return RoundRecord(
        round=number,
        sites=sites,
        aggregated=aggregated,
        bytes_sent_per_site=SENT,
        seconds=1.5,
        checkpoint=f"global_round_{number:04d}.safetensors",
    )


def record_run(run_dir: Path, rounds: list[RoundRecord], cfg: RunConfig, finish: bool = True) -> Path:
    """A run folder as ``ctfed simulate`` leaves it: config.yaml, then results.json per round."""
    run_dir.mkdir(parents=True)
    save_run_config(cfg, run_dir / "config.yaml")
    recorder = RunRecorder(run_dir, cfg)
    for record in rounds:
        recorder.add_round(record)
    if finish:
        recorder.finish()
    return run_dir


@pytest.fixture(scope="module")
def cfg() -> RunConfig:
    return load_run_config(["federation.rounds=3", "train.local_steps=3"])


@pytest.fixture
def completed(tmp_path: Path, cfg: RunConfig) -> Path:
    rounds = [
        round_record(
            1,
            [
                trained("site_0", [2.5, 2.3, 2.1]),
                trained("site_1", [2.6, 2.4, 2.2], num_examples=24),
                SiteRoundRecord(site="site_2", status="failed", reason="worker | died\n(out of memory)"),
            ],
        ),
        round_record(
            2,
            [
                trained("site_0", [2.0, 1.9, 1.8]),
                trained("site_1", [2.1, 2.0, 1.9], num_examples=24),
                SiteRoundRecord(
                    site="site_2", status="rejected", reason="non-finite values in blocks.0.attn", bytes_received=SENT
                ),
            ],
        ),
        round_record(3, [trained("site_0", [1.7, 1.6, 1.5]), trained("site_1", [1.8, 1.7, 1.6], num_examples=24)]),
    ]
    return record_run(tmp_path / "run", rounds, cfg)


def plots(run_dir: Path) -> list[Path]:
    return [run_dir / PLOTS_DIR / name for name in (LOSS_STEPS_PLOT, LOSS_ROUNDS_PLOT, BYTES_PLOT)]


def test_report_and_valid_pngs_are_written(completed: Path) -> None:
    report = render_report(completed)
    assert report == completed / REPORT_NAME and report.is_file()
    text = report.read_text()
    for path in plots(completed):
        assert path.read_bytes().startswith(PNG_SIGNATURE), path
        pixels = imread(path)
        assert pixels.shape[0] > 0 and pixels.shape[1] > 0
        assert pixels.std() > 0, f"{path} is blank"
        assert f"]({PLOTS_DIR}/{path.name})" in text, "plots must be embedded with relative links"


def test_monitor_table_and_plot_only_when_sites_reported_it(completed: Path, tmp_path: Path, cfg: RunConfig) -> None:
    text = render_report(completed).read_text()
    assert "Representation monitor" not in text and not (completed / PLOTS_DIR / MONITOR_PLOT).exists()

    def monitored(site: str, knn: float, std: float) -> SiteRoundRecord:
        record = trained(site, [2.0, 1.5])
        record.monitor = {"knn_accuracy": knn, "embedding_std": std, "uniform_std": 0.125, "scans": 6, "k": 2}
        return record

    rounds = [
        round_record(1, [monitored("site_0", 0.5, 0.0125), monitored("site_1", 0.75, 0.025)]),
        round_record(2, [monitored("site_0", 0.25, 0.05), trained("site_1", [1.4, 1.3])]),
    ]
    run = record_run(tmp_path / "monitored", rounds, cfg)
    text = render_report(run).read_text()
    section = text[text.index("## Representation monitor") : text.index("## Rounds")]
    assert "| Round | site_0 | site_1 |" in section
    assert "| 1 | 0.500 · 0.100 | 0.750 · 0.200 |" in section  # kNN · std / uniform
    assert "| 2 | 0.250 · 0.400 | – |" in section  # site_1 sent none in round 2
    assert "site_0 6 scans (k=2)" in section
    png = run / PLOTS_DIR / MONITOR_PLOT
    assert f"]({PLOTS_DIR}/{MONITOR_PLOT})" in text and png.read_bytes().startswith(PNG_SIGNATURE)
    assert imread(png).std() > 0


def test_summary_names_status_sites_rounds_and_model(completed: Path, cfg: RunConfig) -> None:
    text = render_report(completed).read_text()
    assert "| Status | completed |" in text
    assert "| Rounds recorded | 3 of 3 |" in text
    assert "3: site_0, site_1, site_2" in text
    encoder_params = count_parameters(ViTEncoder(cfg.model))
    assert f"{cfg.model.name}: encoder {encoder_params:,} trainable parameters" in text
    wall = json.loads((completed / "results.json").read_text())["wall_seconds"]
    assert f"| Wall time | {wall:.1f} s |" in text
    assert "| Resumed | never stopped |" in text


def test_round_tables_hold_each_sites_numbers(completed: Path) -> None:
    text = render_report(completed).read_text()
    assert "| site_0 | aggregated | 8 | 2.5000 → 2.1000 | 0.2 s (data 0.1 s) | 452.8 KiB | 452.8 KiB |" in text
    assert "| site_1 | aggregated | 24 | 1.8000 → 1.6000 |" in text
    # FedAvg weights by examples: (8 * 2.1 + 24 * 2.2) / 32.
    assert "weighted mean last-step loss 2.1750" in text
    assert "| Final loss | 1.5750 (round 3," in text


def test_failed_and_rejected_sites_are_shown_with_their_reasons(completed: Path) -> None:
    text = render_report(completed).read_text()
    assert "| site_2 | failed | 0 | – | – | 452.8 KiB | 0 B |" in text
    # The reason's newline and pipe must not break the list item or a table.
    assert "- Round 1, site_2, failed: worker \\| died (out of memory)" in text
    assert "- Round 2, site_2, rejected: non-finite values in blocks.0.attn" in text


def test_a_run_in_progress_renders(tmp_path: Path, cfg: RunConfig) -> None:
    partial = record_run(
        tmp_path / "partial", [round_record(1, [trained("site_0", [2.5, 2.4, 2.3])])], cfg, finish=False
    )
    text = render_report(partial).read_text()
    assert "| Status | running |" in text and "still in progress" in text
    assert "| Rounds recorded | 1 of 3 |" in text
    assert all(path.is_file() for path in plots(partial))


def test_a_run_before_its_first_round_renders(tmp_path: Path, cfg: RunConfig) -> None:
    text = render_report(record_run(tmp_path / "fresh", [], cfg, finish=False)).read_text()
    assert "No round has finished yet." in text and "| Sites | none yet |" in text


def test_a_single_round_without_any_loss_renders(tmp_path: Path, cfg: RunConfig) -> None:
    """Every site failing (no loss anywhere) must still give a report, with the round marked."""
    failed = [SiteRoundRecord(site=f"site_{i}", status="failed", reason="timeout") for i in range(2)]
    run_dir = record_run(tmp_path / "single", [round_record(1, failed, aggregated=False)], cfg)
    text = render_report(run_dir).read_text()
    assert "**not aggregated**" in text
    assert "| Final loss | – |" in text
    assert all(imread(path).size for path in plots(run_dir))


def test_rerendering_gives_identical_files(completed: Path) -> None:
    first = render_report(completed).read_bytes()
    first_plots = [path.read_bytes() for path in plots(completed)]
    assert render_report(completed).read_bytes() == first
    assert [path.read_bytes() for path in plots(completed)] == first_plots


def test_without_config_yaml_the_config_in_results_is_used(completed: Path) -> None:
    """Deployed runs (``flwr run``) have results.json but may lack ctfed simulate's config.yaml."""
    with_yaml = render_report(completed).read_text()
    (completed / "config.yaml").unlink()
    assert render_report(completed).read_text() == with_yaml


def test_cli_renders_and_prints_the_path(completed: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report_cli.run(argparse.Namespace(run_dir=completed)) == 0
    assert capsys.readouterr().out.strip() == str(completed / REPORT_NAME)


def test_cli_fails_clearly_without_results(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert report_cli.run(argparse.Namespace(run_dir=tmp_path)) == 1
    err = capsys.readouterr().err
    assert "ctfed report:" in err and "results.json not found" in err
    assert not (tmp_path / REPORT_NAME).exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot be read as JSON"),
        ('{"status": "completed", "config": {}, "wall_seconds": 1.0}', "'rounds'"),
        ('{"status": "completed", "config": {}, "wall_seconds": 1.0, "rounds": [{"round": 1}]}', "sites"),
        (
            '{"status": "completed", "config": {}, "wall_seconds": 1.0, "rounds": [{"round": 1, "sites": '
            '[{"site": "a", "status": "aggregated", "loss": "low"}], "aggregated": true, '
            '"bytes_sent_per_site": 1, "seconds": 1.0, "checkpoint": ""}]}',
            "rounds[0].sites[0].loss",
        ),
        (
            '{"status": "completed", "config": {}, "wall_seconds": 1.0, "rounds": [{"round": 1, "sites": '
            '[{"site": "a", "status": "aggregated", "monitor": {"knn_accuracy": 0.5}}], "aggregated": true, '
            '"bytes_sent_per_site": 1, "seconds": 1.0, "checkpoint": ""}]}',
            "rounds[0].sites[0].monitor.embedding_std",
        ),
    ],
)
def test_malformed_results_are_named(tmp_path: Path, content: str, message: str) -> None:
    (tmp_path / "results.json").write_text(content)
    with pytest.raises(ReportError, match="not a ctfed results file|cannot be read") as caught:
        load_results(tmp_path)
    assert message in str(caught.value)
    assert report_cli.run(argparse.Namespace(run_dir=tmp_path)) == 1


def test_console_table_lists_every_site_round(completed: Path) -> None:
    table = console_table(load_results(completed)).splitlines()
    assert len(table) == 1 + 8  # header, 3 + 3 + 2 site rounds
    assert "2.5000 -> 2.1000" in table[1] and "452.8 KiB" in table[1]
    assert table[3].split()[:3] == ["1", "site_2", "failed"]


def test_text_outputs_are_utf8_under_an_ascii_locale(tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """Reports hold "→" and "±"; a site or container running with LANG=C must still write them
    (Python's default text encoding is then ASCII)."""
    import locale

    from ctfed.common.fileio import write_text_atomic
    from ctfed.common.preprocess import read_labels

    saved = locale.setlocale(locale.LC_ALL)
    request.addfinalizer(lambda: locale.setlocale(locale.LC_ALL, saved))
    locale.setlocale(locale.LC_ALL, "C")
    assert locale.getpreferredencoding(False).lower() in {"ansi_x3.4-1968", "ascii", "us-ascii"}
    write_text_atomic(tmp_path / "report.md", "loss 1.0 → 0.5 ± 0.1\n")
    assert (tmp_path / "report.md").read_bytes().decode("utf-8") == "loss 1.0 → 0.5 ± 0.1\n"

    # A labels.csv saved by a spreadsheet program: UTF-8 with a byte-order mark.
    labels = tmp_path / "labels.csv"
    labels.write_bytes("\ufeffStudyInstanceUID,any\n1.2.3,1\n".encode("utf-8"))
    [(key, values)] = read_labels(labels, b"secret").items()
    assert values["any"] == 1 and "1.2.3" not in key
