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
import socket
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
from ctfed.common.config import ConfigError
from ctfed.simulations.config import ray_address_host_port
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


# Ray's own variable: ray.init() without an address connects to the cluster it names.
# Flower's federation config cannot carry an address (its init-args are num-cpus, num-gpus
# and two logging knobs), so the simulation's driver learns it from its environment.
RAY_ADDRESS_ENV = "RAY_ADDRESS"
# How long a cluster's head may take to accept a connection before the run gives up on it.
_RAY_CONNECT_TIMEOUT_S = 5.0


def resolve_ray_address(ray_address: str) -> str:
    """``simulation.ray_address`` as the head's host:port, checked to accept connections;
    "" stays "" (a private Ray). Raises SimulationError naming the address when no cluster
    answers there, instead of leaving Ray to retry for a minute inside the run."""
    if not ray_address:
        return ""
    try:
        host_port = ray_address_host_port(ray_address)
    except ConfigError as err:
        raise SimulationError(str(err)) from err
    if host_port is None:  # "auto": the way Ray resolves it (RAY_ADDRESS, then this machine's latest cluster)
        from ray._private.services import get_ray_address_from_environment

        try:
            resolved = get_ray_address_from_environment("auto", None)
        except ConnectionError as err:
            raise SimulationError(
                "simulation.ray_address=auto: no running Ray cluster found on this machine; "
                "start one (ray start --head --port PORT) or give its host:port"
            ) from err
        host_port = ray_address_host_port(resolved)
        assert host_port is not None
    host, port = host_port
    try:
        socket.create_connection((host, port), timeout=_RAY_CONNECT_TIMEOUT_S).close()
    except OSError as err:
        raise SimulationError(
            f"simulation.ray_address={ray_address}: no Ray head answers at {host}:{port} ({err}); "
            f"is the cluster up (ray start --head --port {port})?"
        ) from err
    return f"{host}:{port}"


def simulation_env(flwr_home: Path, ray_address: str) -> dict[str, str]:
    """The Flower processes' environment; ``ray_address`` (resolved, or "" for a private Ray)
    is what the simulation's ray.init() connects to."""
    env = offline_env(flwr_home)
    if ray_address:
        env[RAY_ADDRESS_ENV] = ray_address
    else:
        env.pop(RAY_ADDRESS_ENV, None)  # "" means a private Ray, whatever the shell exported
    return env


@contextlib.contextmanager
def simulation_superlink(flwr_home: Path, env: Mapping[str, str] | None = None) -> Iterator[str]:
    """A SuperLink in simulation mode on a free loopback port; yields the connection name.
    ``env``: its environment (default: ``offline_env``), which the simulation inherits."""
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
        env=dict(env) if env is not None else offline_env(flwr_home),
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
    ray_address: str = "",
) -> None:
    """Run the Flower app at ``app_dir`` with ``num_sites`` simulated SuperNodes.

    ``ray_address``: "" starts a private Ray for the run; "auto" or host:port runs the sites
    on that existing cluster (``simulation.ray_address``), which must not get ``concurrent_sites``.
    Console output of the federation is shown live and kept in ``log_path``.
    Raises SimulationError if the run fails or exceeds ``timeout_s``, or no cluster answers.
    """
    if ray_address and concurrent_sites:
        # ray.init() refuses num_cpus when it connects; say so before anything starts.
        raise SimulationError(
            f"concurrent_sites={concurrent_sites} sets the cores of a private Ray; the cluster at "
            f"{ray_address} has its nodes' (ray start --num-cpus)"
        )
    env = simulation_env(flwr_home, resolve_ray_address(ray_address))
    overrides = [arg for key, value in run_config.items() for arg in ("--run-config", f"{key}={toml_value(value)}")]
    federation = federation_config(num_sites, client_cpus, client_gpus, concurrent_sites)
    with simulation_superlink(flwr_home, env) as connection:
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
                env=env,
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
