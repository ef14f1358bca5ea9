"""Run the ctfed Flower app in Flower's simulation engine (Ray), the way ``flwr run`` does.

We start our own simulation SuperLink on a free loopback port with a private ``FLWR_HOME``
(instead of the CLI's shared detached local SuperLink on a fixed port), submit the app with
``flwr run --stream``, and stop the SuperLink afterwards, so a run leaves no process behind
and two runs on one machine do not collide.
"""

from __future__ import annotations

import contextlib
import logging
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Iterator, Mapping

from ctfed.common.processes import (
    ProcessError,
    flower_tool,
    free_port,
    offline_env,
    stop_process_group,
    wait_healthy,
    write_connection,
)
from ctfed.simulations.runtime.flower_app import toml_value

logger = logging.getLogger(__name__)

CONNECTION_NAME = "ctfed-sim"
# The streamed log repeats every Flower record in a second, plain format, and carries
# third-party warnings a user cannot act on; the console skips them, the log file keeps all.
_CONSOLE_NOISE = re.compile(
    r"^\d\d/\d\d/\d{4} \d\d:\d\d:\d\d:"  # Flower's duplicate plain-format records
    r"|meshgrid|_VF\.meshgrid|RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO|warnings\.warn\("
)


class SimulationError(ProcessError):
    """The simulation engine could not start or the run failed."""


def _flower_tool(name: str) -> str:
    """Flower's executable, failing as a SimulationError (what ``ctfed simulate`` reports)."""
    return flower_tool(name, error=SimulationError)


@contextlib.contextmanager
def simulation_superlink(flwr_home: Path) -> Iterator[str]:
    """A SuperLink in simulation mode on a free loopback port; yields the connection name."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    write_connection(flwr_home, CONNECTION_NAME, f"127.0.0.1:{port}")
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
        wait_healthy(port, process, log_file, what="the simulation SuperLink", error=SimulationError)
        logger.debug("simulation SuperLink ready on 127.0.0.1:%d", port)
        yield CONNECTION_NAME
    finally:
        stop_process_group(process)


def federation_config(num_sites: int, client_cpus: int, client_gpus: float = 0.0, concurrent_sites: int = 0) -> str:
    """``flwr run --federation-config``: how many simulated sites, and what each may use
    (Ray packs sites onto the machine's CPUs and GPUs by it); ``concurrent_sites`` > 0 tells
    Ray the machine has room for that many sites' CPUs (``simulation.concurrent_sites``)."""
    config = f"num-supernodes={num_sites} client-resources-num-cpus={client_cpus}"
    if client_gpus > 0:
        config += f" client-resources-num-gpus={client_gpus:g}"
    if concurrent_sites > 0:
        config += f" init-args-num-cpus={concurrent_sites * client_cpus}"
    return config


def run_app(
    app_dir: Path,
    run_config: Mapping[str, object],
    num_sites: int,
    client_cpus: int,
    flwr_home: Path,
    timeout_s: float,
    log_path: Path,
    client_gpus: float = 0.0,
    concurrent_sites: int = 0,
) -> None:
    """Run the Flower app at ``app_dir`` with ``num_sites`` simulated SuperNodes.

    Console output of the federation is shown live and kept in ``log_path``.
    Raises SimulationError if the run fails or exceeds ``timeout_s``.
    """
    overrides = [arg for key, value in run_config.items() for arg in ("--run-config", f"{key}={toml_value(value)}")]
    federation = federation_config(num_sites, client_cpus, client_gpus, concurrent_sites)
    with simulation_superlink(flwr_home) as connection:
        command = [
            _flower_tool("flwr"), "run", str(app_dir), connection,
            "--stream",
            *overrides,
            "--federation-config", federation,
        ]
        logger.debug("running: %s", " ".join(command))
        with log_path.open("w", encoding="utf-8") as log:
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
