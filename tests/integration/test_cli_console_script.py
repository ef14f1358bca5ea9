"""The `ctfed` console script as a user meets it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ctfed.common.cli import SUBCOMMANDS, main


def _ctfed(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ctfed.common.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_help_lists_every_subcommand() -> None:
    result = _ctfed("--help")
    assert result.returncode == 0
    for sub in SUBCOMMANDS:
        assert sub.name in result.stdout
    assert {"synth", "prepare", "simulate"} <= {sub.name for sub in SUBCOMMANDS}


@pytest.mark.parametrize("name", [sub.name for sub in SUBCOMMANDS])
def test_each_subcommand_has_help(name: str) -> None:
    result = _ctfed(name, "--help")
    assert result.returncode == 0, result.stderr
    assert f"ctfed {name}" in result.stdout


def test_no_subcommand_prints_usage_and_fails(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "synth" in capsys.readouterr().out


def test_bad_override_is_a_clear_error_not_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "federation.roundz=3"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean 'federation.rounds'?" in err
    assert "Traceback" not in err


def test_show_config_prints_resolved_values(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["simulate", "--show-config", "model=small", "federation.rounds=7"]) == 0
    out = capsys.readouterr().out
    assert "rounds: 7" in out
    assert "image_size: 64" in out
