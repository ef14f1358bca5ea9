"""The `ctfed` console script as a user meets it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ctfed.common.cli import SUBCOMMANDS, main

REPO = Path(__file__).resolve().parents[2]


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


def test_in_env_runs_a_command_where_it_is_typed_and_the_tests_from_the_checkout(tmp_path) -> None:  # noqa: ANN001
    # A hospital runs `.ci/in-env ctfed site --config site.yaml` from its own folder: the
    # relative path must be its own (#14 point 9); the tests still find the repository.
    wrapper = REPO / ".ci" / "in-env"
    here = subprocess.run([str(wrapper), "python", "-c", "import os; print(os.getcwd())"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert here.returncode == 0, here.stderr
    assert here.stdout.strip() == str(tmp_path.resolve())
    tests = subprocess.run([str(wrapper), "pytest", "--collect-only", "-q", "tests/unit/test_warmup.py"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert tests.returncode == 0 and "test_warmup.py::" in tests.stdout, tests.stdout + tests.stderr


def test_the_printed_submit_command_works_from_any_folder(tmp_path) -> None:  # noqa: ANN001
    import shlex

    from ctfed.server.deploy_cli import RUNS_DIR, RunningSuperLink, submit_command

    link = RunningSuperLink(process=None, port=1, local_address="127.0.0.1:1",  # type: ignore[arg-type]
                            flwr_home=tmp_path / "flwr-home", log_file=tmp_path / "superlink.log")
    env, *command = shlex.split(submit_command(link, tmp_path))
    assert env == f"FLWR_HOME={tmp_path / 'flwr-home'}"
    assert command[:2] == ["flwr", "run"] and command[3:5] == ["ctfed", "--stream"]
    app = command[2]
    assert app == str(REPO) and "[tool.flwr.app]" in (REPO / "pyproject.toml").read_text()  # absolute, not "."
    assert command[5] == "--run-config"
    run_dir = command[6].removeprefix('run-dir="').removesuffix('"')
    assert run_dir.startswith(str(tmp_path / RUNS_DIR) + "/run-")  # results under the state folder
