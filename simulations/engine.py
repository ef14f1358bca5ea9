"""Run the ctfed Flower app in Flower's simulation engine (Ray), the way ``flwr run`` does.

We start our own simulation SuperLink on a free loopback port with a private ``FLWR_HOME``
(instead of the CLI's shared detached local SuperLink on a fixed port), submit the app with
``flwr run --stream``, and stop the SuperLink afterwards, so a run leaves no process behind
and two runs on one machine do not collide.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Iterator, Mapping

logger = logging.getLogger(__name__)

CONNECTION_NAME = "ctfed-sim"
# The streamed log repeats every Flower record in a second, plain format, and carries
# third-party warnings a user cannot act on; the console skips them, the log file keeps all.
_CONSOLE_NOISE = re.compile(
    r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:"  # Flower's duplicate plain-format records
    r"|meshgrid|_VF\.meshgrid|RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO|warnings\.warn\("
)
STARTUP_TIMEOUT_S = 60.0


class SimulationError(RuntimeError):
    """The simulation engine could not start or the run failed."""


def _flower_tool(name: str) -> str:
    """Flower's executables from the same environment as this interpreter."""
    candidate = Path(sys.executable).parent / name
    found = str(candidate) if candidate.exists() else shutil.which(name)
    if not found:
        raise SimulationError(f"'{name}' not found; is flwr[simulation] installed in this environment?")
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def offline_env(flwr_home: Path) -> dict[str, str]:
    """Environment for Flower processes: private home, no telemetry, no update checks."""
    env = os.environ.copy()
    # Flower's processes launch each other by name (flower-superexec, flwr-simulation).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.update(
        {
            "FLWR_HOME": str(flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_DEDUP_LOGS": "0",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def _wait_healthy(port: int, process: subprocess.Popen, log_file: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SimulationError(
                f"the simulation SuperLink exited with code {process.returncode}; see {log_file}"
            )
        with contextlib.suppress(OSError):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as response:
                if response.status == 200:
                    return
        time.sleep(0.3)
    raise SimulationError(f"the simulation SuperLink did not become ready in {STARTUP_TIMEOUT_S:.0f} s; see {log_file}")


@contextlib.contextmanager
def simulation_superlink(flwr_home: Path) -> Iterator[str]:
    """A SuperLink in simulation mode on a free loopback port; yields the connection name."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION_NAME}"\n\n'
        f'[superlink.{CONNECTION_NAME}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    log_file = flwr_home / "superlink.log"
    command = [
        _flower_tool("flower-superlink"),
        "--insecure",
        "--simulation",
        "--isolation", "subprocess",
        "--host", "127.0.0.1",
        "--port", str(port),
        "--disable-runtime-dependency-installation",
        "--log-file", str(log_file),
    ]
    process = subprocess.Popen(
        command,
        env=offline_env(flwr_home),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # so we can stop the SuperLink and the runs it spawned together
    )
    try:
        _wait_healthy(port, process, log_file)
        logger.debug("simulation SuperLink ready on 127.0.0.1:%d", port)
        yield CONNECTION_NAME
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def run_app(
    app_dir: Path,
    run_config: Mapping[str, object],
    num_sites: int,
    client_cpus: int,
    flwr_home: Path,
    timeout_s: float,
    log_path: Path,
) -> None:
    """Run the Flower app at ``app_dir`` with ``num_sites`` simulated SuperNodes.

    Console output of the federation is shown live and kept in ``log_path``.
    Raises SimulationError if the run fails or exceeds ``timeout_s``.
    """
    overrides = [arg for key, value in run_config.items() for arg in ("--run-config", f"{key}={_toml_value(value)}")]
    federation = f"num-supernodes={num_sites} client-resources-num-cpus={client_cpus}"
    with simulation_superlink(flwr_home) as connection:
        command = [
            _flower_tool("flwr"), "run", str(app_dir), connection,
            "--stream",
            *overrides,
            "--federation-config", federation,
        ]
        logger.debug("running: %s", " ".join(command))
        with log_path.open("w") as log:
            process = subprocess.Popen(
                command,
                env=offline_env(flwr_home),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                bufsize=1,
            )
            watchdog = threading.Timer(timeout_s, process.kill)
            watchdog.start()
            try:
                assert process.stdout is not None
                for line in process.stdout:
                    log.write(line)
                    if not _CONSOLE_NOISE.search(line):
                        sys.stdout.write(line)
                returncode = process.wait()
            finally:
                timed_out = not watchdog.is_alive()
                watchdog.cancel()
    if timed_out:
        raise SimulationError(f"the federation did not finish within {timeout_s:.0f} s; log: {log_path}")
    if returncode != 0:
        raise SimulationError(f"'flwr run' exited with code {returncode}; log: {log_path}")
