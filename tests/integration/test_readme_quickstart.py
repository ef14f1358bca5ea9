"""The README's quickstart commands, as written, so the README cannot rot.

Fenced blocks whose info string is ``bash quickstart-run`` are run line by line in one
temporary folder (the built-in defaults; a line's shell globs and comments as a user's shell
treats them), in README order, each expected to exit 0. Blocks marked ``bash quickstart-parse``
need a real deployment (a SuperLink, a hospital's PACS export): each of their commands is
parsed by the real ``ctfed`` / ``flwr`` argument parsers, so a renamed option or subcommand
fails here. Hospital IT's ``ctfed prepare`` and the clinical block (finetune, predict,
export) run here as written too, on synthetic DICOM standing in for the hospital's paths.
The deployment itself is run by tests/integration/test_deployed_tls_federation.py (``ctfed server``'s
SuperLink, ``ctfed site``'s SuperNodes and an intruder's ``ctfed site --config`` process,
``flwr run . ctfed --stream --run-config ...``), tests/integration/test_site_check_cli.py (``ctfed site
--check``), tests/unit/test_site_audit_log.py (``--verify-audit``), tests/integration/test_predict_cli.py (``ctfed
finetune`` then ``ctfed predict``) and tests/integration/test_export_bundle.py (``ctfed export``).
"""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import subprocess
import sys
import warnings
from pathlib import Path

import click
import pytest
import typer

REPO = Path(__file__).resolve().parents[2]
README = REPO / "README.md"
RUN_MARK, PARSE_MARK = "quickstart-run", "quickstart-parse"
# The researcher's `ctfed simulate` takes ~30 s on a 2-core machine; the rest a few seconds.
RUN_TIMEOUT_S = 300
# A fenced block, also indented inside a list item.
FENCE = re.compile(r"^[ \t]*```(?P<info>[^\n`]*)\n(?P<body>.*?)^[ \t]*```[ \t]*$", re.MULTILINE | re.DOTALL)
DOC_PAGES = (README, *sorted((REPO / "docs").glob("*.md")))


def quickstart_blocks(markdown: str) -> list[tuple[str, list[str]]]:
    """[(mark, commands)] of the marked fenced blocks, in order; a trailing backslash joins lines."""
    blocks = []
    for match in FENCE.finditer(markdown):
        words = match.group("info").split()
        mark = next((word for word in words if word in (RUN_MARK, PARSE_MARK)), None)
        if mark is None:
            continue
        joined = match.group("body").replace("\\\n", " ")
        commands = [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]
        blocks.append((mark, commands))
    return blocks


def _words(command: str) -> list[str]:
    """The program and its arguments, without leading VAR=value assignments, a trailing comment
    or the `.ci/in-env` wrapper."""
    words = shlex.split(command, comments=True)
    while words and re.match(r"^[A-Za-z_][A-Za-z0-9_]*=", words[0]):
        words.pop(0)
    if words and words[0] == ".ci/in-env":
        assert (REPO / ".ci" / "in-env").is_file()
        words.pop(0)
    return words


def _parse_ctfed(args: list[str]) -> None:
    from ctfed.common.cli import _build_parser

    parser, chosen = _build_parser(args)
    assert chosen is not None, f"'ctfed {' '.join(args)}': no such subcommand"
    try:
        parser.parse_args(args)
    except SystemExit as exit_:
        pytest.fail(f"'ctfed {shlex.join(args)}' does not parse (exit {exit_.code})")


def _unparsed(context: click.Context) -> list[str]:
    # Click 8.2 deprecates protected_args (Click 9 folds them into args); both exist until then.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return [*getattr(context, "protected_args", []), *context.args]


def _parse_flwr(args: list[str]) -> None:
    """Resolve the subcommand and parse its options with Flower's own click command, without running it."""
    from flwr.cli.app import app

    command: click.Command = typer.main.get_command(app)
    context = command.make_context("flwr", list(args), resilient_parsing=False)
    words = _unparsed(context)
    while isinstance(command, click.Group):
        name, command, words = command.resolve_command(context, words)  # type: ignore[assignment]
        assert command is not None, f"'flwr {shlex.join(args)}': unknown subcommand {name}"
        try:
            context = command.make_context(name or "", list(words), parent=context)
        except click.UsageError as err:
            pytest.fail(f"'flwr {shlex.join(args)}' does not parse: {err.format_message()}")
        words = _unparsed(context)


def parse_command(command: str) -> None:
    words = _words(command)
    program, args = words[0], words[1:]
    if program == "ctfed":
        _parse_ctfed(args)
    elif program == "flwr":
        _parse_flwr(args)
    else:
        pytest.fail(f"no parser for '{program}' in a {PARSE_MARK} block: {command}")


def test_readme_marks_a_quickstart_for_each_user() -> None:
    blocks = quickstart_blocks(README.read_text())
    commands = [command for _, block in blocks for command in block]
    # Researcher, coordinator, hospital IT, clinician-facing: one command each at least.
    for expected in ("ctfed simulate", "ctfed report", "ctfed certs", "ctfed server", "flwr run", "ctfed prepare",
                     "ctfed site --config site.yaml --check", "--verify-audit", "ctfed predict", "ctfed export"):
        assert any(expected in command for command in commands), expected
    assert any(mark == RUN_MARK for mark, _ in blocks)


@pytest.mark.slow
def test_quickstart_blocks_parse_and_run_as_written(tmp_path: Path) -> None:
    blocks = quickstart_blocks(README.read_text())
    for mark, commands in blocks:
        for command in commands:
            parse_command(command)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    ran = []
    for mark, commands in blocks:
        if mark != RUN_MARK:
            continue
        for command in commands:
            done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=RUN_TIMEOUT_S, executable="/bin/bash")
            assert done.returncode == 0, f"README command failed: {command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            ran.append(command)
    assert ran
    # The researcher's quickstart ends with a report to read.
    reports = list(tmp_path.glob("runs/sim-*/report.md"))
    assert len(reports) == 1 and "round" in reports[0].read_text()


def test_every_ctfed_and_flwr_command_in_the_docs_parses() -> None:
    """Every `ctfed` / `flwr` line of a bash block in README.md and docs/ (marked or not) parses;
    other lines (pytest, shell loops) are left alone."""
    checked = 0
    for page in DOC_PAGES:
        for match in FENCE.finditer(page.read_text()):
            if not match.group("info").strip().startswith("bash"):
                continue
            for line in match.group("body").replace("\\\n", " ").splitlines():
                line = line.strip()
                if not line or line.startswith("#"):
                    continue
                words = _words(line)
                if words and words[0] in ("ctfed", "flwr"):
                    parse_command(line)
                    checked += 1
    assert checked >= 40


def _github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_relative_link_in_the_docs_resolves() -> None:
    """Links between README.md and docs/ pages (files, images and #anchors) point at something."""
    headings = {}
    for page in DOC_PAGES:
        prose = FENCE.sub("", page.read_text())
        headings[page.resolve()] = {_github_anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", prose, re.MULTILINE)}
    broken = []
    for page in DOC_PAGES:
        for match in re.finditer(r"\]\(([^)\s]+)\)", FENCE.sub("", page.read_text())):
            target = match.group(1)
            if re.match(r"^[a-z]+:", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page.resolve()
            if not resolved.exists():
                broken.append(f"{page.name}: {target} (no such file)")
            elif anchor and resolved.suffix == ".md" and anchor not in headings.get(resolved, set()):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert not broken, broken


def test_a_renamed_option_fails_the_parse_check() -> None:
    with pytest.raises(pytest.fail.Exception):
        parse_command("ctfed site --config site.yaml --chek")
    with pytest.raises(pytest.fail.Exception):
        parse_command("flwr run . ctfed --streem")
    parse_command("FLWR_HOME=coordinator/flwr-home flwr run . ctfed --stream --run-config 'run-dir=\"/srv/r\"'")


# The hospital's own paths in the README's quickstart-parse blocks, and what stands in for each.
_HOSPITAL_PATHS = ("/pacs/export", "/data/ctfed/cache", "/data/new-dicom", "global_round_0010.safetensors")


@pytest.mark.slow
def test_the_hospital_and_clinical_quickstarts_run_as_written_on_synthetic_dicom(tmp_path: Path) -> None:
    """Hospital IT's `ctfed prepare` and the clinical block (finetune, predict, export), each
    line as the README writes it, every option and override included, with only the
    hospital's own paths standing for folders here: a synthetic PACS export with labels, new
    studies, and a federation's round-10 global encoder (the untrained encoder, saved as the
    coordinator saves one)."""
    from ctfed.common.checkpoint import save_checkpoint
    from ctfed.common.config import load_run_config
    from ctfed.server.results import GLOBAL_ENCODER_KIND
    from ctfed.server.rounds import initial_encoder_state
    from ctfed.simulations.data.synth import synthesize_federation

    blocks = quickstart_blocks(README.read_text())
    commands = [c for mark, block in blocks if mark == PARSE_MARK for c in block if _words(c)[:2] == ["ctfed", "prepare"]]
    clinical = next(block for _, block in blocks if any(_words(c)[:2] == ["ctfed", "predict"] for c in block))
    commands += clinical
    assert [_words(c)[1] for c in commands] == ["prepare", "finetune", "predict", "export"]

    export = synthesize_federation(tmp_path / "pacs", sites=1, scans_per_site=8, seed=2)[0]
    new_studies = synthesize_federation(tmp_path / "new", sites=1, scans_per_site=2, seed=3)[0]
    (new_studies / "labels.csv").unlink()  # new studies come without labels
    cfg = load_run_config([])
    encoder = tmp_path / "global_round_0010.safetensors"
    save_checkpoint(encoder.with_suffix(""), initial_encoder_state(cfg), cfg.model, kind=GLOBAL_ENCODER_KIND, round=10)
    stand_ins = dict(zip(_HOSPITAL_PATHS, (export, tmp_path / "cache", new_studies, encoder)))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    for command in commands:
        for path, stand_in in stand_ins.items():
            command = command.replace(path, str(stand_in))
        done = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=RUN_TIMEOUT_S, executable="/bin/bash")
        assert done.returncode == 0, f"README command failed: {command}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"

    assert (tmp_path / "cache" / "manifest.json").is_file()
    card = json.loads((tmp_path / "runs" / "ft" / "classifier.json").read_text())
    assert card["encoder"]["kind"] == GLOBAL_ENCODER_KIND and card["encoder"]["round"] == 10
    with open(tmp_path / "predictions.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert len({row["study_key"] for row in rows}) == 2 and all(0.0 <= float(row["probability"]) <= 1.0 for row in rows)
    assert (tmp_path / "predictions.key.csv").is_file()
    assert (tmp_path / "bundles" / "ctfed_classifier" / "configs" / "metadata.json").is_file()
